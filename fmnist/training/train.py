"""`train(cfg, run_dir)`: claim the run directory (`fmnist.training.claim`), fit, select on validation, test the
best checkpoint once, and write the run's record, failures included (`_run`: one policy for every entry point).

`run_job` (the job of the `train.py` entry point) adds what sweeps need: skip finished jobs, resume unfinished
ones, and go on to the next job after a failure; `fmnist.sweeps.tune` calls `train` for each trial.
"""

from __future__ import annotations

import logging
import math
import os
import shlex
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import pandas as pd
import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import LearningRateMonitor, Timer
from omegaconf import DictConfig, OmegaConf

from fmnist import console
from fmnist.cli import OTHER_SWEEP_DIR
from fmnist.config import RUN_OPTIONS
from fmnist.data.datamodule import FashionMNISTDataModule
from fmnist.data.sources import data_digests
from fmnist.errors import ConfigError, DivergedError, FmnistError
from fmnist.fsio import RUN_DIR_KEY, SWEEP_DIR_KEY, atomic_write, storage_errors
from fmnist.hardware import device_kind, memory_errors
from fmnist.models import training_flops_per_image
from fmnist.overrides import hydra_quote
from fmnist.provenance import now, provenance
from fmnist.runs import (BEST_CHECKPOINT_PREFIX, CHECKPOINT_DIR, COMPLETED, CONFIG_FILE, DIVERGED, EPOCHS_FILE,
                         ERROR_FILE, FAILED, FINISHED, INTERRUPTED, LAST_CHECKPOINT, PRUNED, RUNNING, read_record,
                         record_problem, update_record)
from fmnist.training.averaging import Lookahead, WeightEMA
from fmnist.training.callbacks import (DIVERGED_ADVICE, CompileWarmUp, PerImagePredictions, TestArtifacts,
                                       TrackersSeeTheStop, loss_diverged, step_callbacks)
from fmnist.training.checkpoint import SafeCheckpointIO, SafeModelCheckpoint
from fmnist.training.claim import claimed, differences_from_finished
from fmnist.training.epochs import HEARTBEAT_S, EpochCSV, Forecast
from fmnist.training.module import LitClassifier
from fmnist.training.precision import resolve_precision
from fmnist.training.signals import StopTogether, ctrl_c_stops_at_a_step, stopping_signal
from fmnist.training.trackers import close_trackers_failed, for_each, hparams_row, open_trackers, tracker_ids

log = logging.getLogger(__name__)


class RunPruned(Exception):
    """Raised by a callback to stop a run early on purpose (a search's pruner): recorded `pruned`, not `failed`."""


def train(cfg: DictConfig, run_dir: Path, overrides: list[str] | None = None, hydra_files: dict | None = None,
          callbacks: list[L.Callback] | None = None, resume_hint: str | None = None, record: dict | None = None,
          storage_key: str = RUN_DIR_KEY) -> dict:
    """Train per `cfg` in `run_dir`; return (and record in metrics.json) the final metrics.

    First the claim (`fmnist.training.claim.claimed`): a refusal raises and writes nothing. Then `_run`: fit,
    test, record, and a failure recorded with its status before it is raised. `overrides` (the command-line
    overrides that made `cfg`) are recorded for the sweep summary; `hydra_files` (name: config) are
    saved in `.hydra/` once every check has passed; `callbacks` join the trainer's own (e.g. a
    search's per-epoch report to its trial); `resume_hint` says how to resume an interrupted run;
    `record` adds fields to metrics.json (e.g. a search's trial and parameters); `storage_key`: the key a full
    or read-only disk's message names as the one that chooses where the run writes (tune.py's `out_dir`).
    """
    run_dir = Path(run_dir)
    with claimed(cfg, run_dir) as resume:
        return _run(cfg, run_dir, resume, overrides, hydra_files, callbacks, resume_hint, record, storage_key)


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
         callbacks: list[L.Callback] | None, resume_hint: str | None, record: dict | None,
         storage_key: str = RUN_DIR_KEY) -> dict:
    """A claimed run: fit, test, record; however it ends before that, its record says how (then it raises)."""
    too_big = (f"lower data.batch_size ({cfg.data.batch_size}), or data.eval_batch_size ({cfg.data.eval_batch_size}) "
               "if it ran out while validating or testing, or choose a smaller model; then run it again")
    try:
        with storage_errors(key=storage_key), memory_errors(too_big), _overflowing_steps_diverge():
            return _fit(cfg, run_dir, resume, overrides, hydra_files, callbacks, record)
    except BaseException as e:
        failure = failure_of(e, resume_hint)
        if failure is not None:
            record_failure(run_dir, *failure, e)
            if failure[0] == INTERRUPTED and rank_zero_only.rank == 0:  # said once, not by every DDP rank
                log.warning("%s", failure[1])
        raise


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


def _validations(run_dir: Path) -> tuple[int | None, float | None]:
    """From the run's epochs.csv, which holds the epochs of every process that trained the run (a resumed run's
    earlier ones too): the epoch of the best validation accuracy, and the last validation's loss; None, None
    before any validation. (Lightning's metrics hold only what this process validated: a resumed process whose
    epochs all skip validation has none.)"""
    try:
        epochs = pd.read_csv(run_dir / EPOCHS_FILE)
    except (FileNotFoundError, pd.errors.EmptyDataError):  # no epoch finished
        return None, None
    validated = epochs.dropna(subset=["val/acc"]) if "val/acc" in epochs else epochs.iloc[:0]
    if validated.empty:
        return None, None
    last_loss = float(validated["val/loss"].iloc[-1]) if "val/loss" in validated else None
    return int(validated.loc[validated["val/acc"].idxmax(), "epoch"]), last_loss


def _precision(cfg: DictConfig, model_kwargs: dict, record_so_far: dict, resume: bool) -> tuple[str, dict]:
    """The Lightning precision of the run, and how it was decided (its record's `precision`): `resolve_precision`'s,
    or, for a resume of a run whose start resolved `auto` on this kind of device, the precision that start chose:
    one run, one precision, whatever a probe or another process's cached verdict would say now. A DDP rank that
    rank 0 started (Lightning's launcher, once rank 0 has recorded its choice) takes rank 0's: deciding again could
    choose another (a probe's unclear or busy verdict is not cached; the cache may have changed meanwhile), so that
    the ranks would train in different precisions and the record would name rank 0's."""
    started_by_rank_0 = rank_zero_only.rank != 0 and record_so_far.get("pid") == os.getppid()
    if started_by_rank_0 and (record_so_far.get("precision") or {}).get("resolved"):
        return record_so_far["precision"]["resolved"], record_so_far["precision"]
    chosen = (record_so_far.get("precision") or {}) if resume else {}
    if cfg.trainer.precision == "auto" and chosen.get("requested") == "auto" and chosen.get("resolved") \
            and chosen.get("device") == device_kind(cfg.trainer.accelerator):
        log.info("precision auto -> %s: kept from the run's start (%s)", chosen["resolved"], chosen.get("reason"))
        return chosen["resolved"], chosen
    return resolve_precision(cfg.trainer.precision, cfg.trainer.accelerator,
                             {**model_kwargs, "channels_last": cfg.channels_last},
                             cfg.data.batch_size, planned_steps(cfg))


def _start_record(cfg: DictConfig, run_dir: Path, overrides: list[str] | None, hydra_files: dict | None,
                  record: dict | None, record_so_far: dict, precision: dict, trainer_precision: str) -> tuple[list, dict]:
    """A run's first files: config.yaml and `.hydra/`, the `running` record with its provenance, and the trackers'
    runs (new, or the resumed run's own); return the trackers and the hyperparameters they show."""
    if rank_zero_only.rank == 0:
        # config.yaml first: it is what marks a directory as a run's that stopped before its first record.
        atomic_write(run_dir / CONFIG_FILE, OmegaConf.to_yaml(cfg, resolve=True))
        for name, conf in (hydra_files or {}).items():
            (run_dir / ".hydra").mkdir(exist_ok=True)
            atomic_write(run_dir / ".hydra" / name, OmegaConf.to_yaml(conf))
    earlier = record_so_far.get("trackers", {})
    trackers = open_trackers(cfg, run_dir, earlier, overrides)
    hparams = hparams_row(cfg, overrides, trainer_precision)
    if rank_zero_only.rank == 0:
        # A resumed run starts afresh: the error that stopped it last time is no longer its state.
        update_record(run_dir, drop=("error", "finished_at", "stopped_by", "tested"), status=RUNNING, seed=cfg.seed,
                      started_at=now(), overrides=list(overrides or []), precision=precision, data_digest=data_digests(cfg.data.dir),
                      trackers=tracker_ids(trackers, run_dir, earlier), **provenance(), **(record or {}))
        for_each(trackers, "start", hparams, OmegaConf.to_container(cfg, resolve=True))
        (run_dir / ERROR_FILE).unlink(missing_ok=True)
    return trackers, hparams


def _trainer(cfg: DictConfig, run_dir: Path, trainer_kwargs: dict, trackers: list,
             callbacks: list[L.Callback] | None) -> tuple[L.Trainer, SafeModelCheckpoint, EpochCSV, CompileWarmUp, bool]:
    """The run's Trainer with its callbacks, in the order they act on a step; return it with the checkpoint,
    epoch-row and compile warm-up callbacks the run reads afterwards, and whether the progress bar is shown."""
    checkpoint = SafeModelCheckpoint(dirpath=run_dir / CHECKPOINT_DIR, filename=BEST_CHECKPOINT_PREFIX + "{epoch:03d}",
                                     monitor="val/acc", mode="max", save_last=True, auto_insert_metric_name=False)
    # A bar that cannot redraw in place (output to a file or pipe) would fill the log with `\r` lines:
    # there, and when the bar is off, each epoch is one log line instead.
    trainer_kwargs["enable_progress_bar"] = bar = cfg.trainer.enable_progress_bar and console.is_terminal()
    epoch_csv = EpochCSV(run_dir / EPOCHS_FILE, echo=not bar, trackers=trackers)
    forecast = Forecast(heartbeat_s=None if bar else HEARTBEAT_S)
    warm_up = CompileWarmUp()
    trainer = L.Trainer(**trainer_kwargs, enable_model_summary=False, default_root_dir=str(run_dir),
                        logger=[t.logger for t in trackers] or False, plugins=[SafeCheckpointIO()],
                        callbacks=[StopTogether(), warm_up, checkpoint, epoch_csv, forecast,
                                   *([LearningRateMonitor(logging_interval="epoch")] if trackers else []),
                                   TestArtifacts(run_dir, trackers), TrackersSeeTheStop(trackers),
                                   PerImagePredictions(run_dir),
                                   *step_callbacks(cfg.progress_bar_refresh if bar else None),
                                   *([Lookahead(cfg.optim.lookahead_steps, cfg.optim.lookahead_alpha)]
                                     if cfg.optim.lookahead_steps else []),
                                   *([WeightEMA(cfg.optim.ema_decay)] if cfg.optim.ema_decay else []), *(callbacks or [])])
    return trainer, checkpoint, epoch_csv, warm_up, bar


@_process_group_released()
def _fit(cfg: DictConfig, run_dir: Path, resume: bool, overrides: list[str] | None, hydra_files: dict | None,
         callbacks: list[L.Callback] | None, record: dict | None) -> dict:
    """The claimed run itself: choose the precision, write the run's first files (config.yaml, `.hydra/`, the
    `running` record, the trackers' runs), build the data, model, callbacks and Trainer, fit (from last.ckpt when
    `resume`), test the best checkpoint once, and record the metrics; return them."""
    last = run_dir / CHECKPOINT_DIR / LAST_CHECKPOINT
    started = time.perf_counter()
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    model_kwargs = OmegaConf.to_container(cfg.model, resolve=True)
    run_options = {key: cfg[key] for key in RUN_OPTIONS}
    record_so_far = read_record(run_dir) or {}  # a resumed run's: its precision, the tracker runs it continues
    trainer_kwargs["precision"], precision = _precision(cfg, model_kwargs, record_so_far, resume)
    trackers, hparams = _start_record(cfg, run_dir, overrides, hydra_files, record, record_so_far, precision,
                                      trainer_kwargs["precision"])

    L.seed_everything(cfg.seed, workers=False, verbose=False)
    datamodule = FashionMNISTDataModule(**OmegaConf.to_container(cfg.data, resolve=True), seed=cfg.seed)
    model = LitClassifier(model=model_kwargs, optim=OmegaConf.to_container(cfg.optim, resolve=True), **run_options)
    # Lightning's summary table cannot count FLOPs here (its column reads 0): one line with the real ones instead.
    if trainer_kwargs.pop("enable_model_summary") and rank_zero_only.rank == 0:
        log.info("model %s: %.2f M parameters, %.1f MFLOP per training image (forward + backward)", cfg.model.name,
                 sum(p.numel() for p in model.parameters()) / 1e6, training_flops_per_image(model.net) / 1e6)
    trainer, checkpoint, epoch_csv, warm_up, bar = _trainer(cfg, run_dir, trainer_kwargs, trackers, callbacks)
    with console.beside_the_bar(bar), ctrl_c_stops_at_a_step(trainer):
        trainer.fit(model, datamodule=datamodule, ckpt_path=str(last) if resume else None, weights_only=True)
    fit_seconds = time.perf_counter() - started
    stopped_by = _stopped_by_time(cfg, trainer)
    val_acc_best = float(model.val_acc_best.compute())
    if not math.isfinite(val_acc_best):  # the time ran out before the first validation
        if stopped_by and rank_zero_only.rank == 0:
            update_record(run_dir, stopped_by=stopped_by)
        close_trackers_failed(trackers)
        error = ConfigError(f"the run was {stopped_by or 'stopped'} before its first validation, so no model was "
                            "chosen and none was tested. Give it more time (trainer.max_time), or validate sooner.")
        error.on_every_rank = True  # val_acc_best is synced across DDP ranks
        raise error

    best_epoch, last_val_loss = _validations(run_dir)
    metrics = {"val/acc_best": val_acc_best, "best_epoch": best_epoch,
               "epochs": trainer.current_epoch, "fit_seconds": round(fit_seconds, 1),
               # the epochs' seconds summed over every process that trained this run (fit_seconds: this one)
               "train_seconds": round(epoch_csv.train_seconds, 3)}
    if warm_up.seconds:  # a compiled network's compilation, before training and outside train_seconds
        metrics["warmup_seconds"] = round(warm_up.seconds, 1)
    if last_val_loss is not None:
        metrics["val/loss"] = last_val_loss
    best = "best" if checkpoint.best_model_path else None  # fast_dev_run keeps no best checkpoint
    if cfg.test:
        with console.beside_the_bar(bar), ctrl_c_stops_at_a_step(trainer):
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
        tested = ("best checkpoint" if best else "final weights (no best checkpoint was kept)") if cfg.test else None
        update_record(run_dir, status=COMPLETED, finished_at=now(), metrics=metrics,
                      **({"tested": tested} if tested else {}), **({"stopped_by": stopped_by} if stopped_by else {}))
        for_each(trackers, "finish", hparams, metrics, run_dir)
    return metrics


def run_job(cfg: DictConfig, run_dir: Path, in_sweep: bool = False, overrides: list[str] | None = None,
            hydra_files: dict | None = None, apart: bool = False) -> float:
    """`train.py`'s job: a run claimed and run as `train` runs one (not through it: see the `try` below), with a
    sweep's rules; return `val/acc_best` (NaN when it failed inside a sweep).

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
                      shlex.quote(f"{RUN_DIR_KEY}={hydra_quote(str(run_dir))}"), "ckpt_path=last"])
    resume_hint = resume_with("run the same sweep command again" if in_sweep else f"python train.py {again}")
    # `train`'s claim and run, with the `try` around the run alone: a refusal raises in a sweep too, while the
    # claimed run's failure is this job's result.
    with claimed(cfg, run_dir, in_sweep) as resume:
        try:
            metrics = _run(cfg, run_dir, resume, overrides, hydra_files, callbacks=None, resume_hint=resume_hint,
                           record=None, storage_key=SWEEP_DIR_KEY if in_sweep else RUN_DIR_KEY)
        except BaseException as e:
            stopped = stopping_signal(e)
            shared = stopped or (isinstance(e, FmnistError) and e.on_every_rank and not in_sweep)
            if shared and rank_zero_only.rank != 0 and not apart:
                # Every DDP rank ended here together (a signal's stop: StopTogether; a divergence): rank 0 records
                # it, says it once and exits with the command's code. Another rank exits 0, since Lightning's watch
                # in rank 0 SIGKILLs rank 0 when one exits otherwise, perhaps before rank 0 has recorded the end.
                raise SystemExit(0) from e
            if stopped and not apart:
                raise SystemExit(128 + stopped) from e
            if not stopped and not (in_sweep and isinstance(e, Exception)):
                raise
            log.error("job %s %s: %s", run_dir.name, failure_of(e)[0], e)
            return float("nan")
    if rank_zero_only.rank == 0:
        console.print_result(run_dir, read_record(run_dir) or {})
    return metrics["val/acc_best"]
