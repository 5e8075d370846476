"""Claiming a run directory (`claimed`): every check a run passes before it writes anything there, and the
directory's lock, held for the whole run.

The config's values, the directory's owner (`fmnist.training.rundir`) and what it already holds, whether the run
resumes and with the same config, the data, and the checkpoint and per-epoch record a resume continues from. A
refusal raises here and leaves the directory byte-identical. (The statistical claims of a report are
`fmnist.results`' concern, not this module's.)
"""

from __future__ import annotations

import fnmatch
import logging
import math
from contextlib import contextmanager
from pathlib import Path

from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import ModelCheckpoint
import torch
from omegaconf import DictConfig, OmegaConf
from torch.optim.swa_utils import AveragedModel

from fmnist.cli import OTHER_RUN_DIR, OTHER_SWEEP_DIR
from fmnist.config import (ADDED_KEYS, PLACEMENT_KEYS, RESUMABLE_KEYS, flat_config, is_count,
                           is_text_keyed)
from fmnist.data.datamodule import FashionMNISTDataModule
from fmnist.data.sources import data_digests
from fmnist.errors import CheckpointError, ConfigError, first_line
from fmnist.fsio import (RUN_DIR_KEY, SWEEP_DIR_KEY, check_writable, early_writes, held_logs, keep_early_writes,
                         load_checkpoint, some_names)
from fmnist.hardware import check_accelerator, check_nodes, devices_used
from fmnist.models import NON_FINITE_WHY, non_finite, weights_error
from fmnist.runs import (BEST_CHECKPOINT_PREFIX, CHECKPOINT_DIR, COMPLETED, CONFIG_FILE, CONFIG_SECTIONS,
                         EPOCH_COLUMNS, EPOCHS_FILE, INTERRUPTED, LAST_CHECKPOINT, METRICS_FILE, NET_PREFIX, RECORDED,
                         TRIAL_RECORD_KEY, best_checkpoint_order, lacking_epochs, read_epochs, read_record,
                         record_problem, saved_config, short_digest)
from fmnist.training.checkpoint import moved_state
from fmnist.training.checks import check_config
from fmnist.training.module import LitClassifier
from fmnist.training.rundir import RunDirInUse, own_run_dir
from fmnist.training.signals import sigterm_raises
from fmnist.training.trackers import TRACKER_FILES

log = logging.getLogger(__name__)


def _changed_keys(saved: Path, cfg: DictConfig, aside: tuple[str, ...] = RESUMABLE_KEYS) -> tuple[list[str], dict, dict]:
    """Keys whose values differ between the run's saved config (if any) and `cfg`, those in `aside` (by default
    the keys a resumed run may change) left out; with both flattened configs, for messages."""
    old = saved_config(saved) if saved.exists() else {}
    new = flat_config(cfg)
    if old:  # a run saved before a key existed behaved as that key's ADDED_KEYS value does
        old = {**{k: v for k, v in ADDED_KEYS.items() if k in new}, **old}
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k not in aside), old, new


# What a run writes before its first record (metrics.json): its config, Hydra's copies of it, its log, and the
# trackers' files in the run directory. A run stopped as it started leaves only these.
WRITTEN_BEFORE_RECORD = (".hydra", CONFIG_FILE, "*.log", *TRACKER_FILES)


def _files_no_run_wrote(run_dir: Path) -> list[str]:
    """The names of what `run_dir` holds that no run wrote; empty for a new or empty directory and for one a run
    was stopped in before its first record (its config.yaml is a run's config, beside only what a run writes
    before its record: it is started afresh)."""
    ours = {path.resolve() for path in (*early_writes(), *held_logs())}  # this command's own log
    entries = sorted(p.name for p in run_dir.iterdir() if p.resolve() not in ours)
    try:
        saved = OmegaConf.load(run_dir / CONFIG_FILE) if entries else None
        runs_config = isinstance(saved, DictConfig) and set(CONFIG_SECTIONS) <= set(saved)
    except Exception:  # absent, unreadable or not YAML: not a run's config
        runs_config = False
    if not runs_config:
        return entries
    return [name for name in entries if not any(fnmatch.fnmatch(name, p) for p in WRITTEN_BEFORE_RECORD)]


def _check_run_dir(cfg: DictConfig, run_dir: Path, elsewhere: str = OTHER_RUN_DIR,
                   in_sweep: bool = False) -> tuple[bool, dict]:
    """Refuse to write into another run's directory, or into one holding files no run wrote, or a resume that cannot
    continue its run (`_check_resume`); return whether the run resumes from last.ckpt, and the config it was saved
    with, flattened (empty for a new run). `elsewhere`: the keys that choose another directory, for the messages."""
    record = read_record(run_dir)
    status = (record or {}).get("status")
    last = run_dir / CHECKPOINT_DIR / LAST_CHECKPOINT
    if (run_dir / METRICS_FILE).exists() and status not in RECORDED:  # resuming or not: it is not ours to update
        why = "no run status in it" if record is not None else "it cannot be read as a JSON object: cut short, or another file"
        raise RunDirInUse(f"{run_dir} holds a {METRICS_FILE} that is not a run's record ({why}); "
                          f"a run never writes over it. Choose another directory ({elsewhere}).")
    holds_a_run = record is not None or last.exists()
    foreign = [] if holds_a_run else _files_no_run_wrote(run_dir)
    if foreign:
        raise RunDirInUse(f"{run_dir} holds files that no run wrote ({some_names(foreign)}); a run is written into a new or "
                          "empty directory, so that nothing of yours is replaced; nothing was written. Choose "
                          f"another directory ({elsewhere}).")
    if cfg.ckpt_path == "last":
        return _check_resume(cfg, run_dir, record, elsewhere, in_sweep)
    if holds_a_run:
        if record is None:  # a run's last.ckpt, its record gone: not resumable either (`_check_resume`)
            raise RunDirInUse(f"{run_dir} already holds a run (its {CHECKPOINT_DIR}/{LAST_CHECKPOINT}, its "
                              f"{METRICS_FILE} gone); choose another directory ({elsewhere}).")
        raise RunDirInUse(f"{run_dir} already holds a run (status {status!r}); "
                          "pass ckpt_path=last to resume it, or choose another directory.")
    return False, {}


def _check_resume(cfg: DictConfig, run_dir: Path, record: dict | None, elsewhere: str,
                  in_sweep: bool) -> tuple[bool, dict]:
    """ConfigError for `ckpt_path=last` where the run in `run_dir` cannot be continued as it trained: none there, a
    record damaged or gone, a tune.py trial, another config or other data than the run's, its last.ckpt gone after
    it trained epochs, or a completed run asked for no more epochs. Returns as `_check_run_dir` does."""
    status = (record or {}).get("status")
    last = run_dir / CHECKPOINT_DIR / LAST_CHECKPOINT
    saved = run_dir / CONFIG_FILE
    if not in_sweep and record is None and not last.exists() and not saved.exists():
        # A single run's new directory (Hydra's default, or a mistyped one): nothing of a run to continue. A sweep
        # resumes its jobs by itself, and one of its jobs not started yet starts from its first epoch.
        raise ConfigError(f"ckpt_path=last continues a stopped run in its own directory, and {run_dir} holds none (no "
                          f"{METRICS_FILE}, {CONFIG_FILE} or {CHECKPOINT_DIR}/{LAST_CHECKPOINT}); nothing was "
                          f"written. Add {RUN_DIR_KEY}=DIR naming the stopped run's directory (the resume command in "
                          f"its {METRICS_FILE}, also printed when it stopped, has both), or leave out ckpt_path=last "
                          "to start a new run.")
    problem = record_problem(run_dir, record)
    if problem:  # a resume reads the record (its epochs, precision, trackers) and would rewrite it as the run goes
        raise ConfigError(f"cannot resume {run_dir}: {problem}; nothing was written. Put back the record the run "
                          f"wrote, or start a new run in another directory ({elsewhere}).")
    trial = (record or {}).get(TRIAL_RECORD_KEY)
    if isinstance(trial, dict):  # tune.py records a trial's value once; it never resumes a trial
        raise ConfigError(f"cannot resume {run_dir}: it is trial {trial.get('trial')} of tune.py's study "
                          f"{trial.get('study')!r}, which recorded the trial's result; training it on here would change "
                          "the trial under the study (its summary.md and best.yaml would no longer match it); nothing "
                          "was written. Run the same tune.py command to continue the study (a stopped trial is "
                          f"replaced by a new one), or train the trial's overrides (in its {METRICS_FILE}) in another "
                          f"directory ({elsewhere}).")
    if last.exists() and record is None:  # a run writes its record before its first checkpoint
        raise ConfigError(f"cannot resume {run_dir}: its {METRICS_FILE} is gone, and with it the data the run trained "
                          "on (its SHA-1) and how it was started, which a resume checks and keeps; nothing was written. "
                          f"Put the file back, or start a new run in another directory ({elsewhere}).")
    if last.exists() and not saved.exists():  # a run writes its config before its first checkpoint
        raise ConfigError(f"cannot resume {run_dir}: its {CONFIG_FILE} is gone, and with it what the run trained, so "
                          "nothing shows that this command continues the same run; nothing was written. Put the file "
                          f"back, or start a new run in another directory ({elsewhere}).")
    old = {}
    if saved.exists():
        changed, old, new = _changed_keys(saved, cfg)
        if changed:
            raise ConfigError(f"cannot resume {run_dir}: its config differs in {changed} "
                              f"(was {[old.get(k) for k in changed]}, now {[new.get(k) for k in changed]}).")
    recorded = (record or {}).get("data_digest")
    if last.exists() and recorded and recorded != (now := data_digests(cfg.data.dir)):
        # data.dir may move (a placement key), but the run's epochs so far were trained, and its best epoch chosen,
        # on the data it recorded; the record would then say the new data's digest alone
        splits = [split for split in sorted({*recorded, *now}) if recorded.get(split) != now.get(split)]
        why = ("its next epochs would train on other data, and its best epoch be chosen across two validation "
               "splits" if "train" in splits else "it would be tested on other images than the run recorded, and "
               "its record would say the new test CSV's SHA-1 for all of it")
        raise ConfigError(f"cannot resume {run_dir}: the {' and '.join(splits)} CSV(s) in {cfg.data.dir} are not the "
                          f"ones the run recorded (SHA-1 {short_digest(recorded.get(splits[0]))}, now "
                          f"{short_digest(now.get(splits[0]))}); {why}; nothing was written. Give data.dir the "
                          f"run's CSVs, or start a new run in another directory ({elsewhere}).")
    # A stopped run's record counts no epochs; its epochs.csv rows do. Its first row may precede the first last.ckpt
    # (a disk that filled as that was written: the run starts again), but not in a run stopped by a signal, which
    # lets an epoch's end, its checkpoint included, finish first.
    rows = _rows_written(run_dir / EPOCHS_FILE)
    epochs = (record or {}).get("metrics", {}).get("epochs") or (rows if rows >= 2 or status == INTERRUPTED else 0)
    if not last.exists() and epochs:  # only a run stopped before its first checkpoint starts again from epoch 1
        raise ConfigError(f"cannot resume {run_dir}: its {CHECKPOINT_DIR}/{LAST_CHECKPOINT} is gone, though the run "
                          f"trained {epochs} epoch(s); resuming would train it again from its first epoch, over its "
                          f"record. Put the file back, or start a new run in another directory ({elsewhere}).")
    if status == COMPLETED and epochs >= cfg.trainer.max_epochs:
        cut = (record or {}).get("stopped_by")
        if cut:  # a longer max_time cannot finish that epoch: Lightning resumes at the next one
            raise ConfigError(f"{run_dir} was {cut}, in its epoch {epochs}, which Lightning counts as finished (its "
                              f"{EPOCHS_FILE} row is that partial epoch's), and trainer.max_epochs={cfg.trainer.max_epochs} "
                              "asks for no more; a resume starts at the next epoch whatever trainer.max_time is. Nothing "
                              "was written. Raise trainer.max_epochs to train it further (its epoch "
                              f"{epochs} stays short), or start a new run with the longer trainer.max_time.")
        raise ConfigError(f"{run_dir} already completed its {epochs} epoch(s), and trainer.max_epochs="
                          f"{cfg.trainer.max_epochs} asks for no more; nothing was written. Raise trainer.max_epochs "
                          "to train it further.")
    return last.exists(), old


def _rows_written(path: Path) -> int:
    """The epochs an epochs.csv holds rows of (0 for none, or no file; 1 for one that cannot be read: it is there)."""
    try:
        return len(read_epochs(path)) if path.exists() else 0
    except (ConfigError, OSError):
        return 1


def differences_from_finished(cfg: DictConfig, run_dir: Path, record: dict) -> list[str]:
    """What makes `cfg` another experiment than the finished one in `run_dir`: config keys that change the
    result (placement keys aside; a run's length counts: a finished 20-epoch job is not a 30-epoch one) and the
    data's content. Empty when it is the same experiment."""
    keys = _changed_keys(run_dir / CONFIG_FILE, cfg, aside=PLACEMENT_KEYS)[0]
    if record.get("data_digest") and record["data_digest"] != data_digests(cfg.data.dir):
        keys.append(f"the data's content (CSVs in {cfg.data.dir})")
    return keys


def check_data(cfg: DictConfig) -> None:
    """Read the run's CSVs and check the config against them: DataError for a bad file, ConfigError for split sizes
    that do not fit it or a batch limit that leaves a split no batch. What the run would refuse only after its
    first files are written."""
    _check_batch_limits(cfg, FashionMNISTDataModule(**OmegaConf.to_container(cfg.data, resolve=True),
                                                    seed=cfg.seed).check())


def _check_batch_limits(cfg: DictConfig, images: dict[str, int]) -> None:
    """ConfigError for a `trainer.limit_*_batches` fraction that leaves none of a split's batches (Lightning refuses
    it only when it reaches that split: the test's, after the whole training)."""
    for split, batch_size in (("train", cfg.data.batch_size), ("val", cfg.data.eval_batch_size),
                              ("test", cfg.data.eval_batch_size)):
        key = f"trainer.limit_{split}_batches"
        limit = OmegaConf.select(cfg, key)
        batches = math.ceil(images[split] / batch_size)
        if isinstance(limit, float) and int(limit * batches) < 1:
            raise ConfigError(f"config key {key} must keep at least one of the {split} split's {batches} "
                              f"batch{'es' * (batches != 1)} "
                              f"({images[split]} images of {batch_size}); got {limit}, which keeps none. Give a "
                              f"larger fraction (at least {1 / batches:.3g}) or a number of batches.")


@contextmanager
def claimed(cfg: DictConfig, run_dir: Path, in_sweep: bool = False):
    """Own `run_dir` and pass every check before anything is written there; yield whether to resume, holding
    the directory's lock for the block (the whole run).

    A refusal (bad value, another run's directory, another process in it, unreadable data or
    checkpoint) raises here and leaves the directory byte-identical. Once the checks pass, what Hydra
    wrote early is kept (`keep_early_writes`) and SIGTERM raises from then on (`sigterm_raises`), so
    that a run stopped as it starts is still recorded. DDP ranks > 0 start after rank 0 has claimed
    the directory: they check the config and the device, and only rank 0 checks the directory, locks it
    and writes.
    """
    check_config(cfg)
    check_accelerator(cfg.trainer.accelerator, cfg.trainer.devices, cfg.trainer.precision)
    check_nodes(cfg.trainer.num_nodes)
    last = run_dir / CHECKPOINT_DIR / LAST_CHECKPOINT
    if rank_zero_only.rank != 0:
        keep_early_writes()  # rank 0 has claimed the directory: this rank's log stays, whatever ends the run
        with sigterm_raises():
            yield cfg.ckpt_path == "last" and last.exists()
        return
    elsewhere = OTHER_SWEEP_DIR if in_sweep else OTHER_RUN_DIR
    with own_run_dir(run_dir, elsewhere):
        resume, saved = _check_run_dir(cfg, run_dir, elsewhere, in_sweep)
        check_writable(run_dir, key=SWEEP_DIR_KEY if in_sweep else RUN_DIR_KEY)
        check_data(cfg)
        if resume:
            _check_epochs(run_dir / EPOCHS_FILE, _check_checkpoint(cfg, last))
        elif cfg.ckpt_path == "last":  # logged only now: a refusal must not add to the run's train.log
            log.warning("%s has no %s/%s: starting the run from its first epoch", run_dir, CHECKPOINT_DIR, LAST_CHECKPOINT)
        for note in (one_process_ddp_note(cfg.trainer),
                     resume and stretched_schedule_note(saved, cfg)):
            if note:
                log.warning(note)
        keep_early_writes()  # the checks passed: a later job's refusal leaves this one's sweep file as it is
        with sigterm_raises():
            yield resume


def stretched_schedule_note(saved: dict, cfg: DictConfig) -> str | None:
    """A note when a resumed run with a learning-rate schedule is given another `trainer.max_epochs` (`saved`: the
    run's config, flattened): the schedule is laid over the new length, from the step the run stopped at."""
    before, now = saved.get("trainer.max_epochs"), cfg.trainer.max_epochs
    if before in (None, now) or cfg.optim.scheduler == "none":  # a warm-up alone spans its own epochs, whatever the length
        return None
    return (f"trainer.max_epochs is {now}, was {before}: the learning-rate schedule (optim.scheduler="
            f"{cfg.optim.scheduler}, optim.warmup_epochs={cfg.optim.warmup_epochs}) now spans {now} epochs, so the "
            "rate moves from where the old schedule had it to where the new one has it at this step; the run is not "
            f"what a {now}-epoch run from the start would be")


def one_process_ddp_note(trainer: DictConfig) -> str | None:
    """A note when DDP is asked for on one device in all (`trainer=ddp preset=smoke`: the preset sets one CPU
    device; `trainer=ddp` on a machine with one GPU): the run trains in one process, as without DDP, which a smoke
    test of DDP would miss."""
    if not str(trainer.strategy).startswith("ddp") or trainer.num_nodes != 1 \
            or devices_used(trainer.accelerator, trainer.devices) != 1:
        return None
    return (f"trainer.strategy={trainer.strategy} with one device (trainer.devices={trainer.devices}) trains in one "
            "process, as without DDP; give trainer.devices=2 or more for data-parallel processes (preset=smoke sets "
            "trainer.devices=1; on a CPU add trainer.accelerator=cpu)")


def _is_list_of_mappings(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, dict) for v in value)


# The fields of a checkpoint Lightning restores a run from, besides the weights: (check, what it should be).
RESUMED_FIELDS = {"epoch": (is_count, "a count"), "global_step": (is_count, "a count"),
                  "optimizer_states": (_is_list_of_mappings, "a list of mappings"),
                  "lr_schedulers": (_is_list_of_mappings, "a list of mappings"),
                  "loops": (lambda v: isinstance(v, dict) and isinstance(v.get("fit_loop"), dict),
                            "a mapping holding the `fit_loop` mapping"),
                  "callbacks": (is_text_keyed, "a mapping keyed by the callbacks' names")}


def _check_checkpoint(cfg: DictConfig, path: Path) -> int:
    """Refuse a last.ckpt that cannot be loaded safely or holds another architecture's weights; return the epoch it
    was written in (Lightning's, from 0)."""
    checkpoint = load_checkpoint(path)
    state = checkpoint.get("state_dict", {})
    if not is_text_keyed(state):
        raise CheckpointError(f"{path}: cannot resume from it: its `state_dict` is not a mapping of parameter names "
                              "to weights, as train.py writes it (a damaged or foreign file); start a new run "
                              "directory.")
    wrong = [f"`{key}` is missing" if key not in checkpoint else f"`{key}` should be {what}"
             for key, (ok, what) in RESUMED_FIELDS.items()
             if key not in checkpoint or not ok(checkpoint[key])]  # Lightning writes each, and restores each
    if wrong:
        raise CheckpointError(f"{path}: cannot resume from it: {'; '.join(wrong)}, as Lightning writes it (a "
                              "damaged or foreign file). Start a new run directory.")
    trained = (checkpoint.get("hyper_parameters") or {}).get("optim")  # the optimizer state's kind
    if isinstance(trained, dict) and trained.get("name") not in (None, cfg.optim.name):
        raise CheckpointError(f"{path}: cannot resume from it: it was trained with optim.name={trained['name']}, and "
                              f"this run uses {cfg.optim.name} (a checkpoint copied from another run?). Resume with "
                              "the config the checkpoint was trained with, or start a new run directory.")
    model = LitClassifier(model=OmegaConf.to_container(cfg.model, resolve=True),
                          optim=OmegaConf.to_container(cfg.optim, resolve=True))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k.startswith(NET_PREFIX)}
    found = {k: tuple(getattr(v, "shape", ())) for k, v in state.items() if k.startswith(NET_PREFIX)}
    differ = sorted(k for k in set(expected) | set(found) if expected.get(k) != found.get(k))
    if differ:
        raise CheckpointError(f"{path}: cannot resume from it: its weights are not those of the configured model "
                              f"(model.name={cfg.model.name}); e.g. {differ[0]} has shape {found.get(differ[0])} "
                              f"there and {expected.get(differ[0])} here (None: absent). Resume with the config "
                              "the checkpoint was trained with, or start a new run directory.")
    problem = _restore_problem(checkpoint, model, path.parent)
    if problem:
        raise CheckpointError(f"{path}: cannot resume from it: {problem}; start a new run directory.")
    best = _best_named(checkpoint, path.parent)
    trained = int(checkpoint.get("epoch") or 0) + 1  # Lightning counts from 0, the best files' names from 1
    # A later epoch's best file: killed between that epoch's best file (the one named here then deleted) and its
    # last.ckpt, a window SIGKILL can hit. The resume redoes that epoch.
    later = any(best_checkpoint_order(f)[0] > trained
                for f in path.parent.glob(f"{BEST_CHECKPOINT_PREFIX}*.ckpt"))
    if best is not None and not best.is_file() and not later:  # it trained on, then failed to test it, as every retry
        raise CheckpointError(f"{path}: cannot resume from it: the best checkpoint it names, {best.name}, is gone, and "
                              "the resumed run would test it (or keep a later one chosen against a score it no longer "
                              "has); nothing was written. Put the file back, or start a new run directory.")
    return int(checkpoint.get("epoch") or 0)


def _best_named(checkpoint: dict, checkpoint_dir: Path) -> Path | None:
    """The best checkpoint a last.ckpt's ModelCheckpoint state names, where the run's checkpoints now are."""
    for key, state in checkpoint["callbacks"].items():
        if key.split("{")[0].endswith("ModelCheckpoint"):
            best = moved_state(state, str(checkpoint_dir)).get("best_model_path")
            return Path(best) if best else None
    return None


def _is_score(value) -> bool:
    """A score as ModelCheckpoint keeps it: a number, or a one-element floating-point tensor (inf before any)."""
    if torch.is_tensor(value):
        return value.numel() == 1 and value.is_floating_point()
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _restore_problem(checkpoint: dict, model: LitClassifier, checkpoint_dir: Path) -> str | None:
    """What restoring `checkpoint` would fail on, or None: each part Lightning restores is loaded into a fresh copy
    of what it restores it into (the module, the EMA's averaged model, the optimizer and its schedule, the
    best-checkpoint callback, the lookahead's slow weights), so that a resume fails here, before its record is
    rewritten `running`, instead of inside the fit; the fit loop's state is checked for its type only
    (RESUMED_FIELDS). Weights and optimizer state that hold NaN or inf fail too: the run would stop at its first
    step, recorded `diverged`."""
    def averaged():
        AveragedModel(model).load_state_dict({f"module.{k}": v for k, v in checkpoint["state_dict"].items()}
                                             | checkpoint["averaging_state"])

    def optimizer(state):  # torch checks the groups; the moments' shapes and values only the first step would
        trial = model.optimizer()
        trial.load_state_dict(state)
        for param, moments in trial.state.items():
            for name, value in moments.items():
                if torch.is_tensor(value) and value.ndim and value.shape != param.shape:
                    raise ValueError(f"its {name} has shape {tuple(value.shape)}, its parameter {tuple(param.shape)}")
                if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all():
                    raise ValueError(f"its {name} holds NaN or infinite values")

    def schedule(state):  # LambdaLR's: it pops its `lr_lambdas` from the mapping it is given, and takes the rest
        trial = torch.optim.lr_scheduler.LambdaLR(model.optimizer(), lambda step: 1.0)
        trial.load_state_dict(dict(state))
        if not is_count(trial.last_epoch) or len(trial.base_lrs) != len(trial.optimizer.param_groups):
            raise ValueError("its last_epoch should be a step count and its base_lrs one rate per parameter group")

    def best_checkpoints(state):  # as the run's callback restores it (SafeModelCheckpoint), without its clean-up
        callback = ModelCheckpoint(dirpath=checkpoint_dir)
        callback.load_state_dict(moved_state(state, callback.dirpath))
        paths = [callback.best_model_path, callback.kth_best_model_path, callback.last_model_path,
                 *callback.best_k_models]
        scores = [callback.best_model_score, callback.kth_value, *callback.best_k_models.values()]
        if not all(isinstance(p, str) for p in paths) or not all(s is None or _is_score(s) for s in scores):
            raise TypeError("its paths should be text and its scores numbers")

    def lookahead(state):
        slow, shapes = list(state["slow"]), [tuple(p.shape) for p in model.parameters()]
        if slow and [tuple(getattr(s, "shape", ())) for s in slow] != shapes:
            raise ValueError(f"its {len(slow)} slow weights are not the shapes of the model's {len(shapes)} parameters")
        if not all(torch.is_tensor(s) and torch.isfinite(s).all() for s in slow) or not is_count(state["synced_at"]):
            raise ValueError("its slow weights should be finite tensors, and `synced_at` a step count")

    restorers = {"ModelCheckpoint": best_checkpoints, "Lookahead": lookahead}  # by the callbacks' state keys
    tries = [("its `state_dict`", lambda: model.load_state_dict(checkpoint["state_dict"]))]
    if "current_model_state" in checkpoint and "averaging_state" in checkpoint:  # an EMA's raw weights, and its count
        tries += [("its `averaging_state`", averaged),
                  ("its `current_model_state`", lambda: model.load_state_dict(checkpoint["current_model_state"]))]
    tries += [(f"its `optimizer_states[{i}]`", lambda state=state: optimizer(state))
              for i, state in enumerate(checkpoint["optimizer_states"])]
    tries += [(f"its `lr_schedulers[{i}]`", lambda state=state: schedule(state))
              for i, state in enumerate(checkpoint["lr_schedulers"])]
    tries += [(f"its callback state `{key.split('{')[0]}`", lambda state=state, restore=restore: restore(state))
              for key, state in checkpoint["callbacks"].items()
              for name, restore in restorers.items() if key.split("{")[0].endswith(name)]
    for what, restore in tries:
        try:
            restore()
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as e:
            # torch's load_state_dict names the keys after a first line that names none
            reason = weights_error(e) if first_line(e).startswith("Error(s) in loading") else first_line(e)
            return (f"{what} cannot be restored ({type(e).__name__}: {reason[:300] or 'no reason given'}): a damaged "
                    "file, or one that another version of this code wrote")
        broken = non_finite(model.net) if what.endswith(("`state_dict`", "`current_model_state`")) else []
        if broken:
            return f"{what} holds NaN or infinite weights (e.g. net.{broken[0]}): {NON_FINITE_WHY}"
    return None


def _check_epochs(path: Path, checkpoint_epoch: int) -> None:
    """Refuse to resume a run whose epochs.csv is damaged, or lacks a row of an epoch its last.ckpt holds (written
    in Lightning's epoch `checkpoint_epoch`, from 0): the resumed run keeps the rows and adds to them, from the epoch
    after the checkpoint's. Its own epoch's row is there too: an epoch's row is written in the same hook as its
    last.ckpt, before it (Lightning runs checkpoint callbacks after the others)."""
    if not path.exists() or path.stat().st_size == 0:
        raise ConfigError(f"{path}: {'empty' if path.exists() else 'missing'}, though the run's {LAST_CHECKPOINT} "
                          "holds trained epochs: resuming would start its per-epoch record again and lose the earlier "
                          "epochs' rows (curves, time to accuracy). Put the file back, or start a new run directory.")
    try:
        frame = read_epochs(path)
    except ConfigError as e:
        raise ConfigError(f"{e} Resuming keeps the run's earlier rows: mend the file, or start a new run "
                          "directory.") from None
    foreign = [c for c in frame.columns if c not in EPOCH_COLUMNS]
    if foreign:
        raise ConfigError(f"{path}: holds columns a run does not write ({', '.join(foreign)}); resuming keeps "
                          "the run's earlier rows: mend the file, or start a new run directory.")
    lacking = lacking_epochs(frame, checkpoint_epoch + 1)
    if lacking:  # cut short: the resumed run would add its rows after the gap, and the curves lose those epochs
        raise ConfigError(f"{path}: {lacking}, though the run's {LAST_CHECKPOINT} was written after epoch "
                          f"{checkpoint_epoch + 1}: resuming would lose those epochs' rows (curves, time to accuracy). "
                          "Put the file back, or start a new run directory.")
