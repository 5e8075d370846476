"""What a run prints: one line per message, no third-party noise a user cannot act on, a closing summary."""

from __future__ import annotations

import logging
import os
import shlex
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

from tqdm.contrib.logging import logging_redirect_tqdm

from fmnist.config import TRACKERS

log = logging.getLogger("fmnist")

# How a console line looks in every command: the time and the message (log files add the logger and level).
CONSOLE_FORMAT = "[%(asctime)s] %(message)s"
CONSOLE_DATEFMT = "%H:%M:%S"
FILE_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"  # a run's train.log


def tensorboard_command(run_dir: Path) -> str:
    """The command that shows a run in TensorBoard, quoted to paste into a shell."""
    return f"tensorboard --logdir {shlex.quote(str(run_dir))}"


def _silenced(stream):
    """`stream` once its reader has gone: its file descriptor pointed at /dev/null, or, for a stream without one,
    a /dev/null stream in its place."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, stream.fileno())
        finally:
            os.close(devnull)
        return stream
    except (OSError, ValueError, AttributeError):
        return open(os.devnull, "w")


class ConsoleHandler(logging.StreamHandler):
    """The console's log handler. When the reader of its stream goes away (`python train.py | head -1`), the
    stream is sent to /dev/null from then on, instead of a traceback for every later line and a BrokenPipeError
    for every print: the run goes on, and its train.log keeps every line."""

    def handleError(self, record: logging.LogRecord) -> None:
        if not isinstance(sys.exc_info()[1], BrokenPipeError):
            super().handleError(record)
            return
        self.stream = _silenced(self.stream)


class LogFileHandler(logging.FileHandler):
    """A run's log file (train.log). When it cannot be written (a full or read-only disk), one line says so on
    stderr and the file takes no more lines, instead of a traceback for every later line: the console still has
    them all, and the command's own paragraph names the disk. Written as UTF-8, a path whose name holds bytes that
    are not UTF-8 (Python's surrogate escapes) as those bytes, as `fmnist.fsio.atomic_write` writes it."""

    def __init__(self, filename, mode: str = "a", encoding: str | None = None, delay: bool = False,
                 errors: str | None = None):
        super().__init__(filename, mode, encoding or "utf-8", delay, errors or "surrogateescape")

    def handleError(self, record: logging.LogRecord) -> None:
        error = sys.exc_info()[1]
        if not isinstance(error, OSError):
            super().handleError(record)
            return
        self.emit = lambda record: None  # this handler only: the console's lines go on
        print(f"warning: cannot write the log file {self.baseFilename} ({error.strerror or error}); its lines from "
              "here on are on the console only.", file=sys.stderr)


class ReaderMayGo:
    """A plain command's standard output (`fmnist.cli.run_plain`). When its reader goes away
    (`python -m fmnist.results summary DIR | head -1`), what is printed from then on goes to /dev/null instead of
    raising BrokenPipeError: the command still finishes its work, every file it writes included."""

    def __init__(self, stream):
        self.stream = stream

    def __getattr__(self, name):
        return getattr(self.stream, name)

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except BrokenPipeError:
            self.stream = _silenced(self.stream)
            return len(text)

    def flush(self) -> None:
        try:
            self.stream.flush()
        except BrokenPipeError:
            self.stream = _silenced(self.stream)


@contextmanager
def logged_to(path: Path):
    """Within the block, every log line also goes to `path` (as train.py's runs write train.log). The file is
    created at the first line only, so a block refused before it logs anything leaves no file behind."""
    handler = LogFileHandler(path, delay=True)
    handler.setFormatter(logging.Formatter(FILE_FORMAT))
    handler.addFilter(_DropNotices())
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()

# Third-party warnings that say nothing a user of this project can act on, each with the reason.
HARMLESS_WARNINGS = [
    # Lightning 2.6 calls a torch pytree API that torch 2.13 deprecated; fixed upstream, nothing to do here.
    r".*isinstance\(treespec, LeafSpec\)` is deprecated",
    # Short runs (presets smoke/cpu) have fewer steps than the logging interval; epochs.csv has every epoch anyway.
    r"The number of training batches \(\d+\) is smaller than the logging interval",
    # The model summary cannot count FLOPs under mixed precision; training is unaffected.
    r"Precision .* is not supported by the model summary",
    # On resume the checkpoint directory holds the run's own checkpoints: that is the point of resuming.
    r"Checkpoint directory .* exists and is not empty",
    # On resume the best-so-far metric is restored, not updated, before its first compute: expected.
    r"The ``compute`` method of metric MaxMetric was called before the ``update`` method",
    # On a machine with SLURM installed: jobs go to SLURM through `hydra/launcher=slurm` (submitit starts them
    # with srun itself), so a command run directly is meant to run here.
    r"The `srun` command is available on your system but is not used",
]
# Lightning's notices that never apply here: an advertisement, TPUs (this project runs on CPUs and GPUs), and its
# "[rank: 0] Received SIGTERM: 15", which a stopped run says itself, with the command that resumes it.
NOTICES = ("litlogger", "TPU available", "Received SIGTERM")


class _DropNotices(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(word in record.getMessage() for word in NOTICES)


def setup() -> None:
    """Route Lightning's log lines through the project's handlers once, and hide the harmless warnings.

    Lightning adds its own console handler when it is imported before logging is configured (as it
    is here, before Hydra configures it), so every line came out twice: plain and in Hydra's format.
    """
    for pattern in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    for handler in logging.getLogger().handlers:  # filters on handlers also see the records of child loggers
        if not any(isinstance(f, _DropNotices) for f in handler.filters):
            handler.addFilter(_DropNotices())


def is_terminal() -> bool:
    """Whether a progress bar can redraw in place (otherwise its `\\r` lines clutter logs)."""
    return sys.stderr.isatty()


@contextmanager
def beside_the_bar(bar: bool):
    """While a progress bar is drawn, console log lines are written above it (tqdm.write) instead of over it."""
    if not bar:
        yield
        return
    with logging_redirect_tqdm():
        yield


def print_result(run_dir: Path, record: dict) -> None:
    """The closing block: status, best validation accuracy (epoch), test accuracy, where it all is."""
    metrics = record.get("metrics", {})
    lines = [f"run {record.get('status', '?')}: {run_dir}"]
    if "val/acc_best" in metrics:
        lines.append(f"  best val acc  {metrics['val/acc_best']:.2%} (epoch {metrics.get('best_epoch')} "
                     f"of {metrics.get('epochs')})")
    if "test/acc" in metrics:
        lines.append(f"  test acc      {metrics['test/acc']:.2%} (loss {metrics['test/loss']:.4f}), "
                     f"{record.get('tested', 'best checkpoint')}")
    if record.get("stopped_by"):  # the last epoch may be partial
        lines.append(f"  {record['stopped_by']}")
    if "train_seconds" in metrics:  # summed over every process that trained the run, so a resume counts it all
        lines.append(f"  training      {metrics['train_seconds']:.0f} s, precision {record.get('precision', {}).get('resolved')}")
    views = record.get("trackers", {}).get("views", {"tensorboard": tensorboard_command(run_dir)})
    lines += [f"  {TRACKERS.get(name, (name,))[0]:<13} {view}" for name, view in views.items()]
    log.info("\n".join(lines))
