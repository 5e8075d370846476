"""`train(cfg, run_dir)`: claim the run directory, fit, select on validation, test the best checkpoint once,
and write the run's record, failures included (`_run`: one policy for every entry point).

`run_job` (train.py) adds what sweeps need: skip finished jobs, resume unfinished ones, and go on to the
next job after a failure; `fmnist.sweeps.tune` calls `train` for each trial.
"""

from __future__ import annotations

import fnmatch
import itertools
import logging
import math
import re
import shlex
import signal
import threading
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import pandas as pd
import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import LearningRateMonitor, Timer
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict

from fmnist import console
from fmnist.cli import OTHER_RUN_DIR, OTHER_SWEEP_DIR, RUN_DIR_KEY, SWEEP_DIR_KEY, stopped_by_ctrl_c
from fmnist.config import (ADDED_KEYS, PLACEMENT_KEYS, RENAMED_KEYS, RESUMABLE_KEYS, RUN_OPTIONS, check_values,
                           composition_message, is_count, is_text_keyed, override_key, override_text)
from fmnist.data.datamodule import FashionMNISTDataModule
from fmnist.data.sources import data_digests
from fmnist.errors import CheckpointError, ConfigError, DivergedError, FmnistError
from fmnist.fsio import (atomic_write, check_writable, early_writes, held_logs, keep_early_writes, load_checkpoint,
                         storage_errors)
from fmnist.hardware import check_accelerator, check_nodes, device_kind, devices_used
from fmnist.models import check_model, training_flops_per_image
from fmnist.training.precision import resolve_precision
from fmnist.runs import (BEST_CHECKPOINT_PREFIX, CHECKPOINT_DIR, COMPLETED, CONFIG_FILE, DIVERGED, EPOCH_COLUMNS,
                         EPOCHS_FILE, ERROR_FILE, FAILED, FINISHED, INTERRUPTED, LAST_CHECKPOINT, METRICS_FILE, NET_PREFIX,
                         PRUNED, RECORDED, RUNNING, now, provenance, read_epochs, read_record, record_problem,
                         update_record)
from fmnist.training.callbacks import (DIVERGED_ADVICE, HEARTBEAT_S, EpochCSV, Forecast, Lookahead,
                                       PerImagePredictions, TestArtifacts, TrackersSeeTheStop, WeightEMA,
                                       loss_diverged, step_callbacks)
from fmnist.training.checkpoint import SafeCheckpointIO, SafeModelCheckpoint
from fmnist.training.module import LitClassifier
from fmnist.training.rundir import RunDirInUse, own_run_dir
from fmnist.training.trackers import (TRACKER_FILES, check_trackers, close_trackers_failed, for_each,
                                      hparams_row, open_trackers, tracker_ids)

log = logging.getLogger(__name__)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flatten(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def flat_config(cfg: DictConfig) -> dict:
    """`cfg` resolved and flattened: `{"data.augment.hflip": True, ...}`."""
    return _flatten(OmegaConf.to_container(cfg, resolve=True))


def saved_config(saved: Path) -> dict:
    """A run's saved config.yaml, flattened (`data.augment.hflip`), keys renamed since under their new names;
    ConfigError naming the file if it is not a run's config (damaged, or edited into something else)."""
    try:
        loaded = OmegaConf.load(saved)
        old = _flatten(OmegaConf.to_container(loaded, resolve=True)) if isinstance(loaded, DictConfig) else None
    except Exception as e:  # YAML's and OmegaConf's errors have no common base; any means the same here
        raise ConfigError(f"{saved}: cannot read it as the config a run writes ({str(e).splitlines()[0]}); the run "
                          "it belongs to cannot be compared with this command. Start a new run directory.") from e
    if old is None:
        raise ConfigError(f"{saved}: holds a list, not the mapping of config keys a run writes; "
                          "the run it belongs to cannot be compared with this command. Start a new run directory.")
    return {RENAMED_KEYS.get(k, k): v for k, v in old.items()}


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
        runs_config = isinstance(saved, DictConfig) and {"model", "optim", "trainer", "data"} <= set(saved)
    except Exception:  # absent, unreadable or not YAML: not a run's config
        runs_config = False
    if not runs_config:
        return entries
    return [name for name in entries if not any(fnmatch.fnmatch(name, p) for p in WRITTEN_BEFORE_RECORD)]


def _check_run_dir(cfg: DictConfig, run_dir: Path, elsewhere: str = OTHER_RUN_DIR) -> tuple[bool, dict]:
    """Refuse to write into another run's directory, or into one holding files no run wrote; return whether the run
    resumes from last.ckpt, and the config it was saved with, flattened (empty for a new run). `elsewhere`: the
    keys that choose another directory, for the messages."""
    record = read_record(run_dir)
    status = (record or {}).get("status")
    last = run_dir / CHECKPOINT_DIR / LAST_CHECKPOINT
    saved = run_dir / CONFIG_FILE
    if (run_dir / METRICS_FILE).exists() and status not in RECORDED:  # resuming or not: it is not ours to update
        raise RunDirInUse(f"{run_dir} holds a {METRICS_FILE} that is not a run's record (no run status in it); "
                          f"a run never writes over it. Choose another directory ({elsewhere}).")
    holds_a_run = record is not None or last.exists()
    foreign = [] if holds_a_run else _files_no_run_wrote(run_dir)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise RunDirInUse(f"{run_dir} holds files that no run wrote ({shown}); a run is written into a new or "
                          "empty directory, so that nothing of yours is replaced; nothing was written. Choose "
                          f"another directory ({elsewhere}).")
    if cfg.ckpt_path != "last":
        if holds_a_run:
            raise RunDirInUse(f"{run_dir} already holds a run (status {status!r}); "
                              "pass ckpt_path=last to resume it, or choose another directory.")
        return False, {}
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
    epochs = (record or {}).get("metrics", {}).get("epochs") or 0
    if not last.exists() and epochs:  # only a run stopped before its first checkpoint starts again from epoch 1
        raise ConfigError(f"cannot resume {run_dir}: its {CHECKPOINT_DIR}/{LAST_CHECKPOINT} is gone, though the run "
                          f"trained {epochs} epoch(s); resuming would train it again from its first epoch, over its "
                          f"record. Put the file back, or start a new run in another directory ({elsewhere}).")
    if status == COMPLETED and epochs >= cfg.trainer.max_epochs:
        raise ConfigError(f"{run_dir} already completed its {epochs} epoch(s), and trainer.max_epochs="
                          f"{cfg.trainer.max_epochs} asks for no more; nothing was written. Raise trainer.max_epochs "
                          "to train it further.")
    return last.exists(), old


def differences_from_finished(cfg: DictConfig, run_dir: Path, record: dict) -> list[str]:
    """What makes `cfg` another experiment than the finished one in `run_dir`: config keys that change the
    result (placement keys aside; a run's length counts: a finished 20-epoch job is not a 30-epoch one) and the
    data's content. Empty when it is the same experiment."""
    keys = _changed_keys(run_dir / CONFIG_FILE, cfg, aside=PLACEMENT_KEYS)[0]
    if record.get("data_digest") and record["data_digest"] != data_digests(cfg.data.dir):
        keys.append(f"the data's content (CSVs in {cfg.data.dir})")
    return keys


def _best_epoch(run_dir: Path) -> int | None:
    """The epoch of the best validation accuracy in the run's epochs.csv; None before any validation."""
    path = run_dir / EPOCHS_FILE
    validated = pd.read_csv(path).dropna(subset=["val/acc"]) if path.exists() else None
    return None if validated is None or validated.empty else int(validated.loc[validated["val/acc"].idxmax(), "epoch"])


def check_config(cfg: DictConfig) -> None:
    """ConfigError naming the key for a composed training config whose values make no sense: the model's keys
    against its architecture, then every other key's range."""
    check_model(cfg.model)
    check_values(cfg)
    check_trackers(cfg)


def check_sweep_jobs(config: DictConfig, config_loader) -> None:
    """ConfigError for a sweep that holds a job `check_config` refuses, before its first job starts: found by
    that job, it would stop the sweep after the jobs before it had trained.

    `config`: the sweep's config as Hydra gives it to a callback. As many jobs are composed as the longest list
    of swept values has values: the k-th takes the k-th value of every swept key (the last repeated), so every
    value is checked, in a job as the sweep composes it (a composition takes a fraction of a second). Rules
    between keys (`data.augment.flip_alternate` needs `hflip`, `optim.nesterov` a momentum) hold or fail per
    combination: in each composed job, every combination of the swept values of keys that are not config
    groups is then set and checked too (milliseconds each, without composing).
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import QuotedString
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from fmnist.cli import check_resolvable, refuse_unknown_keys

    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    parsed = OverridesParser.create(config_loader=config_loader).parse_overrides(
        [*(f"{key}={value}" for key, value in params.items()), *OmegaConf.to_container(config.hydra.overrides.task)])
    values: dict[str, list[str]] = {}  # as Hydra's basic sweeper reads them: a later override of a key wins
    plain: dict[str, list] = {}  # the swept values of keys that are not config groups, as Python values
    for override in parsed:
        key = override.get_key_element()
        plain.pop(override.key_or_group, None)
        if override.is_discrete_sweep():
            values[key] = [f"{key}={value}" for value in override.sweep_string_iterator()]
            if not (key.startswith("hydra.") or config_loader.repository.group_exists(override.key_or_group)):
                plain[override.key_or_group] = [v.text if isinstance(v, QuotedString) else v
                                                for v in override.sweep_iterator()]
        elif not override.is_sweep_override():
            values[key] = [f"{key}={override.get_value_element_as_str()}"]

    def refused(job: list[str], error: ConfigError) -> ConfigError:
        where = f"the sweep's job {' '.join(job)}" if job else "the sweep"
        return ConfigError(f"{where}: {error} No job of the sweep was started.")

    for key, choices in values.items():  # a job is named, and grouped into its setting, without placement keys
        key = override_key(key)  # `+experiment` is experiment
        if key in PLACEMENT_KEYS and len(set(choices)) > 1:
            shown = ", ".join(dict.fromkeys(c.split("=", 1)[1] for c in choices))
            raise ConfigError(
                f"the sweep varies {key} ({shown}), which is not part of a job's name: a job is named by "
                "the overrides that change what it computes within its experiment and placement, so these jobs would "
                "share one directory, where one of them would run and the others be refused or skipped. Run one sweep "
                "for each value. No job of the sweep was started.")

    composed: dict[tuple[str, ...], DictConfig] = {}  # a composed job per choice of the swept config groups
    for k in range(max((len(v) for v in values.values()), default=0)):
        job = [v[min(k, len(v) - 1)] for v in values.values()]
        swept = [o for o, v in zip(job, values.values()) if len(v) > 1]
        try:
            try:
                cfg = config_loader.load_sweep_config(config, job)
            except (HydraException, OmegaConfBaseException) as e:  # e.g. seed=abc: as train.py reports it
                raise ConfigError(composition_message(e)) from None
            with open_dict(cfg):
                del cfg["hydra"]
            refuse_unknown_keys(cfg, job)
            check_resolvable(cfg, required=True)
            check_config(cfg)
        except ConfigError as e:
            raise refused(swept, e) from None
        composed.setdefault(tuple(o for o in swept if o.split("=")[0].lstrip("+") not in plain), cfg)
    if len(plain) < 2 and len(composed) < 2:  # no combination that the jobs above left out
        return
    for job, cfg in every_combination(composed, plain):
        try:
            check_config(cfg)
        except ConfigError as e:
            raise refused(job, e) from None


def every_combination(composed: dict[tuple[str, ...], DictConfig], plain: dict[str, list]):
    """Each config of `composed` (keyed by the overrides that chose its config groups) with every combination of
    the values of `plain` (keys that are not config groups) set on it: yield the overrides that name the
    combination (as `override_text` writes them) and the config, which the next combination changes. Setting values
    takes milliseconds where composing takes a fraction of a second, so a sweep's or a search's start can check
    every combination for the rules between keys, having composed once per value."""
    for groups, cfg in composed.items():
        for combination in itertools.product(*plain.values()):
            for key, value in zip(plain, combination):
                OmegaConf.update(cfg, key, value, merge=True)  # each value composed before: its type fits
            yield [*groups, *(f"{key}={override_text(value)}" for key, value in zip(plain, combination)
                              if len(plain[key]) > 1)], cfg


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
def _claimed(cfg: DictConfig, run_dir: Path, in_sweep: bool = False):
    """Own `run_dir` and pass every check before anything is written there; yield whether to resume.

    A refusal (bad value, another run's directory, another process in it, unreadable data or
    checkpoint) raises here and leaves the directory byte-identical. DDP ranks > 0 start after
    rank 0 has claimed the directory: only rank 0 checks, locks and writes.
    """
    check_config(cfg)
    check_accelerator(cfg.trainer.accelerator, cfg.trainer.devices, cfg.trainer.precision)
    check_nodes(cfg.trainer.num_nodes)
    last = run_dir / CHECKPOINT_DIR / LAST_CHECKPOINT
    if rank_zero_only.rank != 0:
        keep_early_writes()  # rank 0 has claimed the directory: this rank's log stays, whatever ends the run
        with _sigterm_raises():
            yield cfg.ckpt_path == "last" and last.exists()
        return
    elsewhere = OTHER_SWEEP_DIR if in_sweep else OTHER_RUN_DIR
    with own_run_dir(run_dir, elsewhere):
        resume, saved = _check_run_dir(cfg, run_dir, elsewhere)
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
        with _sigterm_raises():
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


# Set by every SIGTERM a run sees, even one that Lightning's handler took after its last check for it (during the
# final validation or test), which the run then does not stop for: a study stops on it before its next trial.
SIGTERM_RECEIVED = threading.Event()


@contextmanager
def _sigterm_raises():
    """SIGTERM raises SIGTERMException from the first write on (before, while train.py checks the run, it unwinds
    the command: fmnist.cli.sigterm_unwinds): a run stopped while it starts is still recorded `interrupted`, with its
    resume command.

    Inside fit and test Lightning's handler runs first and calls this one; there the run stops at the
    next step boundary (Lightning's way) rather than in the middle of a write.
    """
    def handler(signum, frame):
        SIGTERM_RECEIVED.set()
        if signal.getsignal(signal.SIGTERM) is handler:
            raise SIGTERMException()

    previous = signal.signal(signal.SIGTERM, handler) if threading.current_thread() is threading.main_thread() else None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


@contextmanager
def _ctrl_c_stops_at_a_step(trainer: L.Trainer):
    """Within the block (fit, test), Ctrl-C stops the run at the next step, as Lightning stops it for SIGTERM,
    and is then raised as KeyboardInterrupt; a second Ctrl-C raises at once.

    Raised wherever the main thread happens to be, a KeyboardInterrupt can land inside a library's code:
    once in about 40 stops, the run then hung while closing TensorBoard's writer, whose thread had not
    been woken (presumably interrupted inside its queue). A SIGINT that is ignored (a background job)
    stays ignored.
    """
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    caught = []

    def handler(signum, frame):  # no I/O here: it runs between any two bytecodes of the main thread
        if caught:
            raise KeyboardInterrupt
        caught.append(signum)
        trainer._signal_connector.received_sigterm = True  # Lightning's flag, checked after each step

    signal.signal(signal.SIGINT, handler)
    try:
        yield
    except SIGTERMException as e:
        if caught:
            raise KeyboardInterrupt from e
        raise
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if caught:  # after the last step: the run still stops here, before anything else starts
        raise KeyboardInterrupt


def _is_list_of_mappings(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, dict) for v in value)


# The fields of a checkpoint Lightning restores a run from, besides the weights: (check, what it should be).
RESUMED_FIELDS = {"epoch": (is_count, "a count"), "global_step": (is_count, "a count"),
                  "optimizer_states": (_is_list_of_mappings, "a list of mappings"),
                  "lr_schedulers": (_is_list_of_mappings, "a list of mappings"),
                  "loops": (lambda v: isinstance(v, dict), "a mapping"),
                  "callbacks": (lambda v: isinstance(v, dict), "a mapping")}


def _check_checkpoint(cfg: DictConfig, path: Path) -> int:
    """Refuse a last.ckpt that cannot be loaded safely or holds another architecture's weights; return the epoch it
    was written in (Lightning's, from 0)."""
    checkpoint = load_checkpoint(path)
    state = checkpoint.get("state_dict", {})
    if not is_text_keyed(state):
        raise CheckpointError(f"{path}: cannot resume from it: its `state_dict` is not a mapping of parameter names "
                              "to weights, as train.py writes it (a damaged or foreign file); start a new run "
                              "directory.")
    wrong = [f"`{key}` should be {what}" for key, (ok, what) in RESUMED_FIELDS.items()
             if key in checkpoint and not ok(checkpoint[key])]
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
    return int(checkpoint.get("epoch") or 0)


def _check_epochs(path: Path, checkpoint_epoch: int) -> None:
    """Refuse to resume a run whose epochs.csv is damaged, or gone while its last.ckpt was written after the first
    epoch (whose row is written just after that epoch's checkpoint, so every earlier epoch has one): the resumed
    run keeps the rows and adds to them."""
    if not path.exists() or path.stat().st_size == 0:
        if checkpoint_epoch >= 1:
            raise ConfigError(f"{path}: {'empty' if path.exists() else 'missing'}, though the run's {LAST_CHECKPOINT} "
                              "holds trained epochs: resuming would start its per-epoch record again and lose the earlier "
                              "epochs' rows (curves, time to accuracy). Put the file back, or start a new run directory.")
        return
    try:
        frame = read_epochs(path)
    except ConfigError as e:
        raise ConfigError(f"{e} Resuming keeps the run's earlier rows: mend the file, or start a new run "
                          "directory.") from None
    foreign = [c for c in frame.columns if c not in EPOCH_COLUMNS]
    if foreign:
        raise ConfigError(f"{path}: holds columns a run does not write ({', '.join(foreign)}); resuming keeps "
                          "the run's earlier rows: mend the file, or start a new run directory.")


class RunPruned(Exception):
    """Raised by a callback to stop a run early on purpose (a search's pruner): recorded `pruned`, not `failed`."""


def train(cfg: DictConfig, run_dir: Path, overrides: list[str] | None = None, hydra_files: dict | None = None,
          callbacks: list[L.Callback] | None = None, resume_hint: str | None = None, record: dict | None = None) -> dict:
    """Train per `cfg` in `run_dir`; return (and record in metrics.json) the final metrics.

    First the claim (`_claimed`): a refusal raises and writes nothing. Then `_run`: fit, test, record,
    and a failure recorded with its status before it is raised. `overrides` (the command-line
    overrides that made `cfg`) are recorded for the sweep summary; `hydra_files` (name: config) are
    saved in `.hydra/` once every check has passed; `callbacks` join the trainer's own (e.g. a
    search's per-epoch report to its trial); `resume_hint` says how to resume an interrupted run;
    `record` adds fields to metrics.json (e.g. a search's trial and parameters).
    """
    run_dir = Path(run_dir)
    with _claimed(cfg, run_dir) as resume:
        return _run(cfg, run_dir, resume, overrides, hydra_files, callbacks, resume_hint, record)


def stopping_signal(error: BaseException) -> int | None:
    """SIGINT or SIGTERM when `error` is how that signal stopped a run, else None."""
    if stopped_by_ctrl_c(error):
        return signal.SIGINT
    return signal.SIGTERM if isinstance(error, SIGTERMException) else None  # Lightning's, or `_sigterm_raises`'


def resume_with(command: str) -> str:
    """The `resume_hint` of a run that a command resumes (`failure_of`)."""
    return f"resume from the last finished epoch (from the first, if none finished) with: {command}"


def failure_of(error: BaseException, resume_hint: str | None = None) -> tuple[str, str] | None:
    """(status, message) that a run ended by `error` records; None for an exit that is not a failure.
    `resume_hint`: what to do about an interrupted run (`resume_with`)."""
    if stopping_signal(error):
        return INTERRUPTED, f"stopped by a signal; {resume_hint or resume_with('ckpt_path=last')}"
    if isinstance(error, RunPruned):
        return PRUNED, str(error)
    if isinstance(error, DivergedError):
        return DIVERGED, str(error)
    if isinstance(error, FmnistError):
        return FAILED, str(error)
    return (FAILED, f"{type(error).__name__}: {error}") if isinstance(error, Exception) else None


def _run(cfg: DictConfig, run_dir: Path, resume: bool, overrides: list[str] | None, hydra_files: dict | None,
         callbacks: list[L.Callback] | None, resume_hint: str | None, record: dict | None) -> dict:
    """A claimed run: fit, test, record; however it ends before that, its record says how (then it raises)."""
    try:
        with storage_errors(), _overflowing_steps_diverge():
            return _fit(cfg, run_dir, resume, overrides, hydra_files, callbacks, record)
    except BaseException as e:
        failure = failure_of(e, resume_hint)
        if failure is not None:
            record_failure(run_dir, *failure, e)
            if failure[0] == INTERRUPTED:
                log.warning("%s", failure[1])
        raise


@contextmanager
def _overflowing_steps_diverge():
    """An optimizer step too large for the weights' dtype (`optim.lr=1e39`, which torch refuses as a step's scale
    before any loss can turn infinite) ends the run `diverged`, as a smaller step that blows up the loss does."""
    try:
        yield
    except RuntimeError as e:
        if "cannot be converted to type" not in str(e) or "without overflow" not in str(e):
            raise
        raise DivergedError(f"training diverged: an optimizer step does not fit in the weights' number type ({e}). "
                            f"{DIVERGED_ADVICE}") from e


@contextmanager
def _process_group_released():
    """Destroy the DDP process group when the run ends, however it ends.

    Lightning does this at exit for NCCL but not for gloo (DDP on CPUs), whose worker threads can then
    abort the interpreter's shutdown ("terminate called without an active exception"), and its launcher
    kills every rank when one dies that way. Releasing it here also lets a sweep's next job start a new one.
    """
    try:
        yield
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def planned_steps(cfg: DictConfig) -> int | None:
    """The training steps the config bounds the run to (a count in `trainer.limit_train_batches`, or
    `data.train_subset`, times the epochs); None when only the data's size would tell."""
    per_epoch = []
    limit = cfg.trainer.get("limit_train_batches")
    if isinstance(limit, int) and not isinstance(limit, bool):
        per_epoch.append(limit)
    if cfg.data.get("train_subset"):
        per_epoch.append(math.ceil(cfg.data.train_subset / cfg.data.batch_size))
    epochs = cfg.trainer.get("max_epochs")
    return min(per_epoch) * epochs if per_epoch and epochs is not None and epochs >= 0 else None


def _stopped_by_time(cfg: DictConfig, trainer: L.Trainer) -> str | None:
    """How `trainer.max_time` ended a fit before its planned steps (None when it did not): a record says so, since
    Lightning counts the epoch it cut short as finished (its epochs.csv row is partial; a resume starts the next)."""
    timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
    if timer is None or (timer.time_remaining() or 0) > 0:
        return None
    planned = trainer.estimated_stepping_batches  # Lightning's count, as the schedules use it (inf: unbounded)
    if trainer.global_step >= planned:
        return None
    return (f"stopped by trainer.max_time ({cfg.trainer.max_time}) at step {trainer.global_step}"
            + (f" of {int(planned)}" if math.isfinite(planned) else ""))


@_process_group_released()
def _fit(cfg: DictConfig, run_dir: Path, resume: bool, overrides: list[str] | None, hydra_files: dict | None,
         callbacks: list[L.Callback] | None, record: dict | None) -> dict:
    last = run_dir / CHECKPOINT_DIR / LAST_CHECKPOINT
    started = time.perf_counter()
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    model_kwargs = OmegaConf.to_container(cfg.model, resolve=True)
    run_options = {key: cfg[key] for key in RUN_OPTIONS}
    record_so_far = read_record(run_dir) or {}  # a resumed run's: its precision, the tracker runs it continues
    chosen = record_so_far.get("precision") or {} if resume else {}
    if cfg.trainer.precision == "auto" and chosen.get("requested") == "auto" and chosen.get("resolved") \
            and chosen.get("device") == device_kind(cfg.trainer.accelerator):
        # A resume trains on in the precision the run's start chose, and its record keeps how that was decided:
        # one run, one precision, whatever a probe or another process's cached verdict would say now.
        trainer_kwargs["precision"], precision = chosen["resolved"], chosen
        log.info("precision auto -> %s: kept from the run's start (%s)", chosen["resolved"], chosen.get("reason"))
    else:
        trainer_kwargs["precision"], precision = resolve_precision(cfg.trainer.precision, cfg.trainer.accelerator,
                                                                   {**model_kwargs, "channels_last": cfg.channels_last},
                                                                   cfg.data.batch_size, planned_steps(cfg))
    if rank_zero_only.rank == 0:
        # config.yaml first: it is what marks a directory as a run's that stopped before its first record.
        atomic_write(run_dir / CONFIG_FILE, OmegaConf.to_yaml(cfg, resolve=True))
        for name, conf in (hydra_files or {}).items():
            (run_dir / ".hydra").mkdir(exist_ok=True)
            atomic_write(run_dir / ".hydra" / name, OmegaConf.to_yaml(conf))
    earlier = record_so_far.get("trackers", {})
    trackers = open_trackers(cfg, run_dir, earlier, overrides)
    hparams = hparams_row(cfg, overrides, trainer_kwargs["precision"])
    if rank_zero_only.rank == 0:
        # A resumed run starts afresh: the error that stopped it last time is no longer its state.
        update_record(run_dir, drop=("error", "finished_at", "stopped_by", "tested"), status=RUNNING, seed=cfg.seed,
                      started_at=now(), overrides=list(overrides or []), precision=precision, data_digest=data_digests(cfg.data.dir),
                      trackers=tracker_ids(trackers, run_dir, earlier), **provenance(), **(record or {}))
        for_each(trackers, "start", hparams, OmegaConf.to_container(cfg, resolve=True))
        (run_dir / ERROR_FILE).unlink(missing_ok=True)

    L.seed_everything(cfg.seed, workers=False, verbose=False)
    datamodule = FashionMNISTDataModule(**OmegaConf.to_container(cfg.data, resolve=True), seed=cfg.seed)
    model = LitClassifier(model=model_kwargs, optim=OmegaConf.to_container(cfg.optim, resolve=True), **run_options)
    # Lightning's summary table cannot count FLOPs here (its column reads 0): one line with the real ones instead.
    if trainer_kwargs.pop("enable_model_summary") and rank_zero_only.rank == 0:
        log.info("model %s: %.2f M parameters, %.1f MFLOP per training image (forward + backward)", cfg.model.name,
                 sum(p.numel() for p in model.parameters()) / 1e6, training_flops_per_image(model.net) / 1e6)
    checkpoint = SafeModelCheckpoint(dirpath=run_dir / CHECKPOINT_DIR, filename=BEST_CHECKPOINT_PREFIX + "{epoch:03d}",
                                     monitor="val/acc", mode="max", save_last=True, auto_insert_metric_name=False)
    # A bar that cannot redraw in place (output to a file or pipe) would fill the log with `\r` lines:
    # there, and when the bar is off, each epoch is one log line instead.
    trainer_kwargs["enable_progress_bar"] = bar = cfg.trainer.enable_progress_bar and console.is_terminal()
    epoch_csv = EpochCSV(run_dir / EPOCHS_FILE, echo=not bar, trackers=trackers)
    forecast = Forecast(heartbeat_s=None if bar else HEARTBEAT_S)
    trainer = L.Trainer(**trainer_kwargs, enable_model_summary=False, default_root_dir=str(run_dir),
                        logger=[t.logger for t in trackers] or False, plugins=[SafeCheckpointIO()],
                        callbacks=[checkpoint, epoch_csv, forecast,
                                   *([LearningRateMonitor(logging_interval="epoch")] if trackers else []),
                                   TestArtifacts(run_dir, trackers), TrackersSeeTheStop(trackers),
                                   PerImagePredictions(run_dir),
                                   *step_callbacks(cfg.progress_bar_refresh if bar else None),
                                   *([Lookahead(cfg.optim.lookahead_steps, cfg.optim.lookahead_alpha)]
                                     if cfg.optim.lookahead_steps else []),
                                   *([WeightEMA(cfg.optim.ema_decay)] if cfg.optim.ema_decay else []), *(callbacks or [])])
    with console.beside_the_bar(bar), _ctrl_c_stops_at_a_step(trainer):
        trainer.fit(model, datamodule=datamodule, ckpt_path=str(last) if resume else None, weights_only=True)
    fit_seconds = time.perf_counter() - started
    stopped_by = _stopped_by_time(cfg, trainer)
    val_acc_best = float(model.val_acc_best.compute())
    if not math.isfinite(val_acc_best):  # the time ran out before the first validation
        if stopped_by and rank_zero_only.rank == 0:
            update_record(run_dir, stopped_by=stopped_by)
        close_trackers_failed(trackers)
        raise ConfigError(f"the run was {stopped_by or 'stopped'} before its first validation, so no model was chosen "
                          "and none was tested. Give it more time (trainer.max_time), or validate sooner.")

    metrics = {"val/acc_best": val_acc_best, "best_epoch": _best_epoch(run_dir),
               "epochs": trainer.current_epoch, "fit_seconds": round(fit_seconds, 1),
               # the epochs' seconds summed over every process that trained this run (fit_seconds: this one)
               "train_seconds": round(epoch_csv.train_seconds, 3)}
    if "val/loss" in trainer.callback_metrics:
        metrics["val/loss"] = float(trainer.callback_metrics["val/loss"])
    best = "best" if checkpoint.best_model_path else None  # fast_dev_run keeps no best checkpoint
    if cfg.test:
        with console.beside_the_bar(bar), _ctrl_c_stops_at_a_step(trainer):
            result = trainer.test(model, datamodule=datamodule, ckpt_path=best, weights_only=True, verbose=False)[0]
        metrics.update({k: float(v) for k, v in result.items()})
    # `completed` promises usable numbers: a NaN or absurd validation or test loss is a divergence too.
    bad = {k: v for k, v in metrics.items() if k in ("val/loss", "test/loss") and loss_diverged(v, trainer.global_step)}
    if bad:
        close_trackers_failed(trackers)
        raise DivergedError(f"training diverged: {', '.join(f'{k} is {v}' for k, v in bad.items())} at the end of "
                            f"the run (epoch {trainer.current_epoch}). {DIVERGED_ADVICE}")
    if rank_zero_only.rank == 0:
        metrics["wall_seconds"] = round(time.perf_counter() - started, 1)
        update_record(run_dir, status=COMPLETED, finished_at=now(), metrics=metrics,
                      tested="best checkpoint" if best else "final weights (no best checkpoint was kept)",
                      **({"stopped_by": stopped_by} if stopped_by else {}))
        for_each(trackers, "finish", hparams, metrics, run_dir)
    return metrics


def run_job(cfg: DictConfig, run_dir: Path, in_sweep: bool = False, overrides: list[str] | None = None,
            hydra_files: dict | None = None, apart: bool = False) -> float:
    """`train.py`'s job: `train` with a sweep's rules; return `val/acc_best` (NaN when it failed inside a sweep).

    In a sweep a finished job is skipped and an unfinished one resumed, and a job that fails after its
    checks passed (recorded by `_run`) does not raise, so the other jobs go on. A refused job raises
    and writes nothing. Ctrl-C exits 130 and SIGTERM 143, after the run is recorded `interrupted`,
    except in a job that runs `apart` from the sweep's process (a SLURM job cancelled or out of time):
    its stop is its own result, NaN, so that the sweep collects every job's outcome.
    """
    run_dir = Path(run_dir)
    record = read_record(run_dir)
    if in_sweep and record:
        problem = record_problem(run_dir, record)
        if problem:  # a hand-edited record: whether the job finished, and with what, is unknown
            raise ConfigError(f"{problem}; the sweep skips or resumes a job by its record, so it cannot go on with "
                              "this one. Put back the record the run wrote, or remove the job directory to run the "
                              "job again.")
        if record.get("status") in FINISHED:
            changed = differences_from_finished(cfg, run_dir, record)
            if changed:
                raise ConfigError(f"{run_dir} holds a finished job of another experiment: it differs in {changed}. "
                                  f"Its result is not reused. Give this sweep another directory ({OTHER_SWEEP_DIR}), or "
                                  "remove the old job directory to run it again.")
            log.info("%s already %s: skipped (remove its directory to run it again)", run_dir.name, record["status"])
            return float(record.get("metrics", {}).get("val/acc_best", float("nan")))
        cfg = cfg.copy()
        cfg.ckpt_path = "last"
    again = " ".join([*(shlex.quote(o) for o in overrides or [] if not o.startswith("ckpt_path=")),
                      shlex.quote(f"hydra.run.dir={hydra_quote(str(run_dir))}"), "ckpt_path=last"])
    resume_hint = resume_with("run the same sweep command again" if in_sweep else f"python train.py {again}")
    with _claimed(cfg, run_dir, in_sweep) as resume:
        try:
            metrics = _run(cfg, run_dir, resume, overrides, hydra_files, None, resume_hint, None)
        except BaseException as e:
            stopped = stopping_signal(e)
            if stopped and not apart:
                raise SystemExit(128 + stopped) from e
            if not stopped and not (in_sweep and isinstance(e, Exception)):
                raise
            log.error("job %s %s: %s", run_dir.name, failure_of(e)[0], e)
            return float("nan")
    if rank_zero_only.rank == 0:
        console.print_result(run_dir, read_record(run_dir) or {})
    return metrics["val/acc_best"]


def hydra_quote(value: str) -> str:
    """`value` as a Hydra override value: as is when plain, else quoted (spaces, non-ASCII, `,` or `=`)."""
    if re.fullmatch(r"[\w/.:@+-]+", value, re.ASCII):
        return value
    # In Hydra's quoted strings a backslash escapes a quote, so a run of backslashes before a quote or at
    # the end is doubled first (`x\` would otherwise escape the closing quote).
    escaped = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, value)
    return "'" + escaped.replace("'", "\\'") + "'"


def record_failure(run_dir: Path, status: str, message: str, error: BaseException) -> None:
    """metrics.json says how the run ended (`status`, `message`); error.txt has the traceback. Rank 0 only."""
    if rank_zero_only.rank != 0 or not run_dir.exists():
        return
    try:
        update_record(run_dir, status=status, error=message, finished_at=now())
        if status != PRUNED:  # a pruned run was stopped on purpose: its message says why, no traceback
            atomic_write(run_dir / ERROR_FILE, "".join(traceback.format_exception(error)))
    except OSError as e:  # e.g. the full disk that stopped the run: the error itself is still reported
        log.warning("could not record the failure in %s (%s)", run_dir, e)
