"""`train(cfg, run_dir)`: fit, select on validation, test the best checkpoint once, write the run's record.

`run_job` wraps it with what sweeps need: skip finished jobs, resume unfinished ones, and record a
failure (with its error) instead of raising, so the other jobs of a sweep go on.
"""

from __future__ import annotations

import logging
import signal
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from fmnist.training.callbacks import EpochCSV, step_callbacks
from fmnist.training.checkpoint import SafeCheckpointIO, SafeModelCheckpoint
from fmnist.config import check_values
from fmnist.data.datamodule import FashionMNISTDataModule
from fmnist.errors import ConfigError, DivergedError, FmnistError
from fmnist.hardware import resolve_precision
from fmnist.training.module import LitClassifier
from fmnist.results.plots import confusion_matrix_figure, misclassified_figure
from fmnist.results.runs import FINISHED, provenance, read_record, update_record

log = logging.getLogger(__name__)

# Keys that may differ when a run is resumed (e.g. to extend it) without making it another run.
RESUMABLE_CHANGES = {"ckpt_path", "trainer.max_epochs", "trainer.max_time", "trainer.accelerator",
                     "trainer.devices", "trainer.enable_progress_bar"}


class RunDirInUse(ConfigError):
    """The run directory belongs to another run: nothing may be written there."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flatten(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def _check_run_dir(cfg: DictConfig, run_dir: Path) -> bool:
    """Refuse to write into another run's directory; return True when resuming from last.ckpt."""
    record = read_record(run_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    saved = run_dir / "config.yaml"
    if cfg.ckpt_path != "last":
        if record is not None or last.exists():
            raise RunDirInUse(f"{run_dir} already holds a run (status {(record or {}).get('status')!r}); "
                              "pass ckpt_path=last to resume it, or choose another directory.")
        return False
    if saved.exists():
        old = _flatten(OmegaConf.to_container(OmegaConf.load(saved), resolve=True))
        new = _flatten(OmegaConf.to_container(cfg, resolve=True))
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k not in RESUMABLE_CHANGES)
        if changed:
            raise ConfigError(f"cannot resume {run_dir}: its config differs in {changed} "
                              f"(was {[old.get(k) for k in changed]}, now {[new.get(k) for k in changed]}).")
    if not last.exists():
        log.warning("%s has no checkpoints/last.ckpt: starting the run from its first epoch", run_dir)
    return last.exists()


def _best_epoch(run_dir: Path) -> int | None:
    path = run_dir / "epochs.csv"
    epochs = pd.read_csv(path) if path.exists() else None
    return None if epochs is None or epochs.empty else int(epochs.loc[epochs["val/acc"].idxmax(), "epoch"])


def train(cfg: DictConfig, run_dir: Path, overrides: list[str] | None = None,
          callbacks: list[L.Callback] | None = None) -> dict:
    """Train per `cfg` in `run_dir`; return (and record in metrics.json) the final metrics.

    `overrides` (the command-line overrides that made `cfg`) are recorded for the sweep summary;
    `callbacks` join the trainer's own (e.g. a search's per-epoch report to its trial).
    """
    check_values(cfg)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    last = run_dir / "checkpoints" / "last.ckpt"
    # DDP ranks > 0 start after rank 0 has claimed the directory: only rank 0 checks and writes.
    resume = _check_run_dir(cfg, run_dir) if rank_zero_only.rank == 0 else cfg.ckpt_path == "last" and last.exists()
    started = time.perf_counter()
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    model_kwargs = OmegaConf.to_container(cfg.model, resolve=True)
    trainer_kwargs["precision"], precision = resolve_precision(cfg.trainer.precision, cfg.trainer.accelerator, model_kwargs)
    if rank_zero_only.rank == 0:
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
        update_record(run_dir, status="running", seed=cfg.seed, started_at=_now(), overrides=list(overrides or []),
                      precision=precision, **provenance())

    L.seed_everything(cfg.seed, workers=False, verbose=False)
    datamodule = FashionMNISTDataModule(**OmegaConf.to_container(cfg.data, resolve=True), seed=cfg.seed)
    model = LitClassifier(model=model_kwargs, optim=OmegaConf.to_container(cfg.optim, resolve=True))
    logger = TensorBoardLogger(save_dir=str(run_dir), name="", version="", default_hp_metric=False)
    checkpoint = SafeModelCheckpoint(dirpath=run_dir / "checkpoints", filename="best-epoch{epoch:03d}",
                                     monitor="val/acc", mode="max", save_last=True, auto_insert_metric_name=False)
    trainer = L.Trainer(**trainer_kwargs, default_root_dir=str(run_dir),
                        logger=logger, plugins=[SafeCheckpointIO()],
                        callbacks=[checkpoint, EpochCSV(run_dir / "epochs.csv"), LearningRateMonitor(logging_interval="epoch"),
                                   *step_callbacks(cfg.progress_bar_refresh if cfg.trainer.enable_progress_bar else None),
                                   *(callbacks or [])])
    trainer.fit(model, datamodule=datamodule, ckpt_path=str(last) if resume else None, weights_only=True)
    fit_seconds = time.perf_counter() - started

    metrics = {"val/acc_best": float(model.val_acc_best.compute()), "best_epoch": _best_epoch(run_dir),
               "epochs": trainer.current_epoch, "fit_seconds": round(fit_seconds, 1)}
    if cfg.test:
        best = "best" if checkpoint.best_model_path else None  # fast_dev_run keeps no checkpoints
        result = trainer.test(model, datamodule=datamodule, ckpt_path=best, weights_only=True, verbose=False)[0]
        metrics.update({k: float(v) for k, v in result.items()})
        if trainer.is_global_zero:
            _log_test_artifacts(model, logger, run_dir, trainer.global_step)
    if trainer.is_global_zero:
        logger.log_hyperparams(_flatten(OmegaConf.to_container(cfg, resolve=True)),
                               {"hp/val_acc_best": metrics["val/acc_best"], "hp/test_acc": metrics.get("test/acc", -1.0)})
        logger.finalize("success")
        metrics["wall_seconds"] = round(time.perf_counter() - started, 1)
        update_record(run_dir, status="completed", finished_at=_now(), metrics=metrics)
    return metrics


def _log_test_artifacts(model: LitClassifier, logger: TensorBoardLogger, run_dir: Path, step: int) -> None:
    """Confusion matrix (CSV and TensorBoard image) and a grid of misclassified test images."""
    cm = model.confusion.numpy()
    np.savetxt(run_dir / "confusion_matrix.csv", cm, fmt="%d", delimiter=",")
    logger.experiment.add_figure("test/confusion_matrix", confusion_matrix_figure(cm), step)
    if model.misclassified:
        images, true, pred = (np.concatenate([np.asarray(m[i]) for m in model.misclassified])[:32] for i in range(3))
        logger.experiment.add_figure("test/misclassified", misclassified_figure(images, true, pred), step)


def run_job(cfg: DictConfig, run_dir: Path, in_sweep: bool = False, overrides: list[str] | None = None) -> float:
    """Run one job and return its `val/acc_best` (NaN when it failed inside a sweep).

    In a sweep a finished job is skipped and an unfinished one resumed; a failing job is recorded
    in its metrics.json (and error.txt) and, in a sweep, does not raise.
    """
    run_dir = Path(run_dir)
    record = read_record(run_dir)
    if in_sweep and record:
        if record.get("status") in FINISHED:
            log.info("%s already %s: skipped", run_dir.name, record["status"])
            return float(record.get("metrics", {}).get("val/acc_best", float("nan")))
        cfg = cfg.copy()
        cfg.ckpt_path = "last"
    try:
        return train(cfg, run_dir, overrides)["val/acc_best"]
    except RunDirInUse:
        raise
    except (KeyboardInterrupt, SystemExit) as e:  # Ctrl-C, or SIGTERM (Lightning's SIGTERMException)
        again = " ".join([*(o for o in overrides or [] if not o.startswith("ckpt_path=")),
                          f"hydra.run.dir={run_dir}", "ckpt_path=last"])
        how = "run the same sweep command again" if in_sweep else f"python train.py {again}"
        message = f"stopped by a signal; resume from the last finished epoch with: {how}"
        _record_failure(run_dir, "interrupted", message, e)
        log.warning("%s", message)
        if isinstance(e, SIGTERMException):  # a bare SystemExit would exit 0: say "terminated" instead
            raise SystemExit(128 + signal.SIGTERM) from e
        raise
    except Exception as e:
        status = "diverged" if isinstance(e, DivergedError) else "failed"
        _record_failure(run_dir, status, str(e) if isinstance(e, FmnistError) else f"{type(e).__name__}: {e}", e)
        if not in_sweep:
            raise
        log.error("job %s %s: %s", run_dir.name, status, e)
        return float("nan")


def _record_failure(run_dir: Path, status: str, message: str, error: BaseException) -> None:
    if rank_zero_only.rank != 0 or not run_dir.exists():
        return
    update_record(run_dir, status=status, error=message, finished_at=_now())
    (run_dir / "error.txt").write_text("".join(traceback.format_exception(error)))

