"""Where a run's numbers go besides its run directory: the config group `logger` picks the trackers.

`logger=tensorboard` (the default), `csv`, `mlflow`, `wandb`, `many` (all four), or any list
(`logger.backends=[tensorboard,mlflow]`). What each gets is in docs/reference.md ("Trackers"): the hparams row
(the keys the command line or sweep changed, then `HPARAMS`), the per-step metrics `LitClassifier` logs, and the
final metrics; all but CSV also one point per epoch (`by_epoch/...`), the figures and the config. The run is named as its
directory is (a sweep job with the keys its sweep varies first). Per-step metrics go through Lightning's own loggers; the rest through `Tracker`.

A tracker that cannot be reached (an MLflow server that is down) costs one warning: the run goes on
with its other trackers and its run directory, which always holds everything. A resumed run
continues its tracker runs: their ids are kept in the run record (`metrics.json`, `trackers`).
"""

from __future__ import annotations

import csv
import io
import logging
import os
import shlex
import uuid
import warnings
from pathlib import Path
from typing import Callable

from lightning.pytorch.loggers import CSVLogger, Logger, MLFlowLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from fmnist.console import tensorboard_command
from fmnist.errors import first_line
from fmnist.fsio import atomic_write
from fmnist.overrides import computing_overrides, job_name, override_key, swept_keys
from fmnist.runs import CHECKPOINT_DIR, CONFIG_FILE, CONFUSION_FILE, EPOCHS_FILE, LAST_CHECKPOINT, METRICS_FILE

log = logging.getLogger(__name__)

# Always in the hparams row, next to whatever the command line or sweep changed.
HPARAMS = ("model.name", "model.dropout", "tta", "data.batch_size", "data.train_subset", "optim.name", "optim.lr",
           "optim.weight_decay", "optim.ema_decay", "trainer.max_epochs", "seed")
# A local MLflow store when no tracking server is given: the runs in a SQLite file, the artifacts beside it.
MLFLOW_LOCAL_DB = Path("outputs") / "mlflow.db"
# An unreachable server should cost seconds, not MLflow's default minutes of retries (a user's setting wins).
MLFLOW_PATIENCE = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def hparams_row(cfg: DictConfig, overrides: list[str] | None, precision: str) -> dict:
    """A short hparams row: the swept/overridden keys first, then `HPARAMS`, with their real types."""
    changed = [override_key(o) for o in computing_overrides(overrides or [])]
    keys = [k for k in changed
            if OmegaConf.select(cfg, k) is not None and not isinstance(OmegaConf.select(cfg, k), DictConfig)]
    row = {k: OmegaConf.select(cfg, k) for k in dict.fromkeys([*keys, *HPARAMS])}
    # Trackers take numbers, strings and booleans: a list as its text, null as "null".
    row = {k: v if isinstance(v, (int, float, str, bool)) else "null" if v is None else str(list(v))
           for k, v in row.items()}
    return {**row, "precision": precision}


def run_name(run_dir: Path, overrides: list[str] | None) -> str:
    """A run's name in MLflow and W&B: its directory's, except that a sweep job whose directory has another
    order of its keys (one named before names led with the swept keys) still leads with them."""
    swept = swept_keys(run_dir.parent)
    if not swept or not overrides:
        return run_dir.name
    return job_name(overrides, swept)


BY_EPOCH = "by_epoch"  # the prefix of the per-epoch points


def by_epoch(row: dict) -> dict:
    """An epochs.csv row's curves as `by_epoch/...` points (Lightning's own are against steps)."""
    return {f"{BY_EPOCH}/{k}": row[k] for k in ("train/loss", "train/acc", "val/loss", "val/acc") if k in row}


# The status Lightning closes a logger with after a fit that raised: Lightning's word, not a run's status
# (fmnist.runs.FAILED), and MLflow's FAILED unless a signal stopped the run (RunMLFlowLogger).
LIGHTNING_FAILED = "failed"
# Logger methods Lightning calls during a run (per-step metrics, checkpoints, the end).
LIGHTNING_CALLS = ("log_metrics", "log_hyperparams", "save", "finalize", "after_save_checkpoint")


class Tracker:
    """One tracker: its Lightning logger (per-step metrics), and what Lightning does not log for us."""

    name = ""
    files: tuple[str, ...] = ()  # what it writes into the run directory (glob patterns); MLflow: nothing

    def __init__(self, logger: Logger):
        self.logger = logger
        self.failed = False  # once a call fails, the tracker is skipped for the rest of the run
        for method in LIGHTNING_CALLS:  # the calls Lightning makes itself, guarded like ours (`for_each`)
            setattr(logger, method, self._guarded(getattr(logger, method)))

    def _guarded(self, method):
        def call(*args, **kwargs):
            if self.failed:
                return None
            try:
                return method(*args, **kwargs)
            except Exception as e:  # a tracker's client can fail in any way; the run must not depend on it
                self.fail(e)

        return call

    def fail(self, error: Exception) -> None:
        """Warn once and skip this tracker from now on: the run goes on, its run directory holds everything."""
        if not self.failed:
            self.failed = True
            log.warning("logger %s failed (%s: %s); the run goes on without it (its run directory holds everything).",
                        self.name, type(error).__name__, first_line(error)[:200])

    def ids(self) -> dict:
        """What a resumed run needs to continue this tracker's run (kept in the run record)."""
        return {}

    def view(self, run_dir: Path) -> str:
        """How a person looks at this run in the tracker (the closing block prints it)."""
        return ""

    def start(self, hparams: dict, config: dict) -> None:
        """At the start of fit: the hparams row and the resolved config, where the tracker shows them early."""

    def epoch(self, row: dict) -> None:
        """One point per finished epoch (`epochs.csv`'s row), against the epoch."""

    def figure(self, tag: str, figure, step: int) -> None:
        """A matplotlib figure (the confusion matrix, the misclassified images)."""

    def finish(self, hparams: dict, metrics: dict, run_dir: Path) -> None:
        """At the end of a completed run: the final metrics, the run directory's files, and close."""
        self.logger.finalize("success")

    def stopped(self) -> None:
        """A signal (Ctrl-C, SIGTERM) is stopping the run, before Lightning closes the tracker: where the tracker
        tells a run stopped from outside from a failed one, it says so."""


class TensorBoard(Tracker):
    name = "tensorboard"
    files = ("events.out.tfevents.*",)

    def view(self, run_dir: Path) -> str:
        return tensorboard_command(run_dir)

    def epoch(self, row: dict) -> None:
        for key, value in by_epoch(row).items():
            self.logger.experiment.add_scalar(key, value, row["epoch"])

    def figure(self, tag: str, figure, step: int) -> None:
        self.logger.experiment.add_figure(tag, figure, step)

    def finish(self, hparams: dict, metrics: dict, run_dir: Path) -> None:
        # TensorBoard's hparams table: the row with the run's results beside it.
        self.logger.log_hyperparams(hparams, {"hp/val_acc_best": metrics["val/acc_best"],
                                              "hp/test_acc": metrics.get("test/acc", -1.0)})
        super().finish(hparams, metrics, run_dir)


class RunTensorBoardLogger(TensorBoardLogger):
    """TensorBoard in the run directory, without Lightning's `hparams.yaml` (empty here: the module saves its
    hyperparameters in checkpoints, not the logger); `config.yaml` holds the run's whole config."""

    @rank_zero_only
    def save(self) -> None:
        self.experiment.flush()


class RunMLFlowLogger(MLFlowLogger):
    """MLflow's logger, whose run ends KILLED, MLflow's status for a run stopped from outside, when a signal
    stopped it (`MLflow.stopped`): Lightning closes every run that did not finish as `failed`."""

    stopped_by_signal = False

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        super().finalize("KILLED" if status == LIGHTNING_FAILED and self.stopped_by_signal else status)


class CSV(Tracker):
    name = "csv"
    files = ("csv",)  # Lightning's CSVLogger writes csv/metrics.csv

    def view(self, run_dir: Path) -> str:
        return str(run_dir / self.files[0] / "metrics.csv")

    def finish(self, hparams: dict, metrics: dict, run_dir: Path) -> None:
        self.logger.log_hyperparams(hparams)
        self.logger.log_metrics({f"final/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
        super().finish(hparams, metrics, run_dir)


# The run directory's files each tracker keeps a copy of when the run completes.
ARTIFACTS = (CONFIG_FILE, METRICS_FILE, EPOCHS_FILE, CONFUSION_FILE)


class MLflow(Tracker):
    name = "mlflow"

    def stopped(self) -> None:
        self.logger.stopped_by_signal = True

    def ids(self) -> dict:
        # The run knows its experiment; the store, recorded, is where a resume finds the run again from any directory.
        return {"mlflow_run_id": self.logger.run_id, "mlflow_tracking_uri": absolute_store(self.logger.experiment.tracking_uri)}

    def view(self, run_dir: Path) -> str:
        uri = self.logger.experiment.tracking_uri
        where = uri if uri.startswith("http") else f"`mlflow ui --backend-store-uri {shlex.quote(uri)}`"
        return f"{where}, experiment {run_dir.parent.name}, run {self.logger.run_id}"

    def start(self, hparams: dict, config: dict) -> None:
        logged = self.logger.experiment.get_run(self.logger.run_id).data.params
        # MLflow refuses to change a parameter: a resumed (extended) run keeps the values it started with.
        self.logger.log_hyperparams({k: v for k, v in hparams.items() if k not in logged})

    def epoch(self, row: dict) -> None:
        self.logger.log_metrics(by_epoch(row), step=row["epoch"])

    def figure(self, tag: str, figure, step: int) -> None:
        self.logger.experiment.log_figure(self.logger.run_id, figure, f"figures/{tag.replace('/', '_')}.png")

    def finish(self, hparams: dict, metrics: dict, run_dir: Path) -> None:
        self.logger.log_metrics({f"final/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
        for name in ARTIFACTS:
            if (run_dir / name).is_file():
                self.logger.experiment.log_artifact(self.logger.run_id, str(run_dir / name), "run")
        super().finish(hparams, metrics, run_dir)


class WandB(Tracker):
    name = "wandb"
    files = ("wandb",)  # W&B's own directory under its save_dir, the run directory

    def ids(self) -> dict:
        return {"wandb_run_id": self.logger.experiment.id}

    def view(self, run_dir: Path) -> str:
        run = self.logger.experiment
        if run.settings.mode in ("offline", "dryrun"):
            return f"written offline: `wandb sync {Path(run.dir).parent}` uploads it"
        return str(run.url)

    def start(self, hparams: dict, config: dict) -> None:
        run = self.logger.experiment
        run.config.update({**config, "hparams": hparams}, allow_val_change=True)
        run.define_metric(f"{BY_EPOCH}/epoch")  # the step metric is defined before the metrics that use it
        run.define_metric(f"{BY_EPOCH}/*", step_metric=f"{BY_EPOCH}/epoch")  # plotted against the epoch

    def epoch(self, row: dict) -> None:
        # No step given: W&B's own step counts on (Lightning's per-step metrics carry trainer/global_step).
        self.logger.experiment.log({**by_epoch(row), f"{BY_EPOCH}/epoch": row["epoch"]})

    def figure(self, tag: str, figure, step: int) -> None:
        import wandb

        self.logger.experiment.log({tag: wandb.Image(figure)})

    def finish(self, hparams: dict, metrics: dict, run_dir: Path) -> None:
        import wandb

        run = self.logger.experiment
        run.summary.update({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        files = wandb.Artifact(f"run-{run.id}", type="run-files")  # an artifact: W&B's own files/ keeps its names
        for name in ARTIFACTS:
            if (run_dir / name).is_file():
                files.add_file(str(run_dir / name), name=name)
        run.log_artifact(files)
        super().finish(hparams, metrics, run_dir)
        run.finish()


def _mlflow(cfg: DictConfig, run_dir: Path, ids: dict, name: str) -> Logger:
    for key, value in MLFLOW_PATIENCE.items():
        os.environ.setdefault(key, value)
    # MLflow's INFO lines ("Creating initial MLflow database tables...") come in its own format and ask nothing of
    # a user; its warnings still show. Read when mlflow is imported, which is after this.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)  # its retry lines would repeat ours
    recorded = ids.get("mlflow_tracking_uri")  # a resumed run: the store it began in, where its run id is
    uri = absolute_store(cfg.logger.mlflow_tracking_uri) if cfg.logger.mlflow_tracking_uri else recorded
    run_id = ids.get("mlflow_run_id") if uri == recorded or recorded is None else None  # another store: a new run
    if uri is None:
        MLFLOW_LOCAL_DB.parent.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{MLFLOW_LOCAL_DB.resolve()}"
    # A store without a server keeps a new experiment's artifacts beside its database (MLflow's default would be
    # ./mlruns, wherever the command runs); a server decides for itself.
    artifacts = (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlruns").as_uri() \
        if uri.startswith("sqlite:///") else None
    return RunMLFlowLogger(experiment_name=run_dir.parent.name, run_name=name, tracking_uri=uri,
                           run_id=run_id, artifact_location=artifacts, tags={"run_dir": str(run_dir)})


def absolute_store(uri: str) -> str:
    """An MLflow tracking URI with a local store's relative path (`sqlite:///mlflow.db`, `file:mlruns`) made
    absolute: the same store from whatever directory a resume runs in. Other URIs (servers) are left as they are."""
    if uri.startswith("sqlite:///") and not uri[len("sqlite:///"):].startswith("/"):
        return f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"
    if uri.startswith("file:") and not uri.startswith("file:/"):
        return Path(uri[len("file:"):]).resolve().as_uri()
    return uri


def _csv(cfg: DictConfig, run_dir: Path, ids: dict, name: str) -> Logger:
    """Lightning's CSVLogger, whose writer deletes `metrics.csv` when it starts: a resumed run (one with a
    `last.ckpt`) gets its earlier rows back and adds to them, as it does to TensorBoard's and epochs.csv."""
    logger = CSVLogger(save_dir=str(run_dir), name=CSV.files[0], version="")
    path = Path(logger.log_dir) / "metrics.csv"
    if not ((run_dir / CHECKPOINT_DIR / LAST_CHECKPOINT).is_file() and path.is_file()):
        return logger
    kept = path.read_text()
    with warnings.catch_warnings():  # "Previous log files in this directory will be deleted": they are put back
        warnings.simplefilter("ignore")
        writer = logger.experiment
    atomic_write(path, kept)
    writer.metrics_keys = next(csv.reader(io.StringIO(kept)), [])  # its header: new rows are appended under it
    return logger


def _wandb(cfg: DictConfig, run_dir: Path, ids: dict, name: str) -> Logger:
    import wandb

    # W&B prints a banner and a summary of its own, and captures the console: the run's console is ours.
    logger = WandbLogger(project=cfg.logger.wandb_project, name=name, group=run_dir.parent.name,
                         save_dir=str(run_dir), offline=cfg.logger.wandb_mode == "offline",
                         id=ids.get("wandb_run_id") or uuid.uuid4().hex[:12], resume="allow",
                         settings=wandb.Settings(silent=True, console="off"))
    # Lightning passes wandb.init `anonymous=None`, which W&B 0.31 warns has no effect (any value, None too):
    # a warning nobody here can act on, so the key is not passed.
    logger._wandb_init.pop("anonymous", None)
    return logger


TRACKER_CLASSES = {
    # TensorBoard names a run by its directory (the path under the --logdir it is given).
    "tensorboard": (TensorBoard, lambda cfg, run_dir, ids, name: RunTensorBoardLogger(
        save_dir=str(run_dir), name="", version="", default_hp_metric=False)),
    "csv": (CSV, _csv),
    "mlflow": (MLflow, _mlflow),
    "wandb": (WandB, _wandb),
}


TRACKER_FILES = tuple(pattern for cls, _ in TRACKER_CLASSES.values() for pattern in cls.files)


def open_trackers(cfg: DictConfig, run_dir: Path, ids: dict, overrides: list[str] | None = None) -> list[Tracker]:
    """The run's trackers, each connected (continuing the tracker runs of `ids`, the record's `trackers`, where a
    resumed run has them); one that cannot be is left out with one warning."""
    title = run_name(run_dir, overrides)
    trackers = []
    for name in cfg.logger.backends:
        cls, make = TRACKER_CLASSES[name]
        try:
            tracker = cls(make(cfg, run_dir, ids, title))
            # Under DDP only rank 0's logger writes: another rank's `experiment` is Lightning's stand-in, which
            # has no run id or URI to check (the check would fail, and warn that the tracker cannot be reached).
            if rank_zero_only.rank == 0:
                tracker.logger.experiment  # connects (MLflow: creates or finds the experiment and the run)
                tracker.ids(), tracker.view(run_dir)
        except Exception as e:  # any failure of a tracker's client: the run must not depend on it
            others = [t for t in cfg.logger.backends if t != name]
            log.warning("logger %s cannot be reached (%s: %s); this run logs to %s.", name,
                        type(e).__name__, first_line(e)[:200],
                        f"{', '.join(others)} and its run directory" if others else "its run directory only")
            continue
        trackers.append(tracker)
    return trackers


def tracker_ids(trackers: list[Tracker], run_dir: Path, earlier: dict) -> dict:
    """For the run record: the ids a resumed run needs, and how to look at the run in each tracker (`views`). The
    ids of an earlier start's trackers (`earlier`, the record's `trackers`) that this one could not reach are kept,
    for a later resume to continue them."""
    return {**{k: v for k, v in earlier.items() if k != "views"}, **{k: v for t in trackers for k, v in t.ids().items()},
            "views": {t.name: t.view(run_dir) for t in trackers}}


def log_figure(trackers: list[Tracker], tag: str, draw: Callable[[], object], step: int) -> None:
    """Draw a figure with `draw()` only if a tracker shows figures (the CSV tracker does not), give it to each,
    then close it: pyplot keeps every figure it made until it is closed, and a process that trains many
    runs (tune.py's trials) would hold them all."""
    shown = [t for t in trackers if type(t).figure is not Tracker.figure and not t.failed]
    if not shown:
        return
    import matplotlib.pyplot as plt

    figure = draw()
    try:
        for_each(shown, "figure", tag, figure, step)
    finally:
        plt.close(figure)


def close_trackers_failed(trackers: list[Tracker]) -> None:
    """Close the trackers as Lightning does when a fit ends with an error, for a run that fails after Lightning's
    fit and test returned."""
    for tracker in trackers:
        tracker.logger.finalize(LIGHTNING_FAILED)  # guarded: a failing tracker is warned about once


def for_each(trackers: list[Tracker], method: str, *args) -> None:
    """Call `method` on every tracker that has not failed; one that fails now is warned about once and skipped."""
    for tracker in trackers:
        if tracker.failed:
            continue
        try:
            getattr(tracker, method)(*args)
        except Exception as e:  # see Tracker._guarded
            tracker.fail(e)
