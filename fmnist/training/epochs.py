"""What a run says of its epochs: a row per epoch in epochs.csv (and its line on the console), the fit's forecast
and heartbeat, and a progress bar that counts epochs from 1, as everything else here does."""

from __future__ import annotations

import csv
import io
import logging
import time
from pathlib import Path

import lightning as L
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import TQDMProgressBar

from fmnist.fsio import atomic_write
from fmnist.models import training_flops_per_image
from fmnist.runs import EPOCH_COLUMNS
from fmnist.training.trackers import for_each

log = logging.getLogger(__name__)


class EpochCSV(L.Callback):
    """Append one row per finished epoch to `epochs.csv`, so figures and tables need no TensorBoard parsing.

    `train_seconds` is cumulative training wall time (including validation), kept across resumes:
    the time-to-accuracy curve of a run on its hardware. `train_images` (images trained on, all
    ranks) and `train_flops` (their forward + backward FLOPs) are the same curve's machine-free axes.
    An epoch without validation (`trainer.check_val_every_n_epoch` above 1) leaves the `val/` cells
    empty: Lightning's metrics still hold the last validation's values then.
    """

    def __init__(self, path: Path, echo: bool = False, trackers: list | None = None):
        self.path = Path(path)
        self.trackers = trackers if trackers is not None else []  # each gets the row too (fmnist.training.trackers)
        self.echo = echo  # also log each row as one line (when there is no progress bar to watch)
        self.train_seconds = 0.0
        self.train_images = 0
        self.flops_per_image = 0
        self._epoch_start = 0.0
        self._validated = False  # whether validation ran in the current epoch
        self._last_lr = None  # the learning rate of the epoch's last training step

    def on_fit_start(self, trainer, pl_module) -> None:
        self.flops_per_image = training_flops_per_image(pl_module.net)

    def on_train_start(self, trainer, pl_module) -> None:  # after a resume has restored current_epoch
        if rank_zero_only.rank == 0 and self.path.exists():
            # A resumed run redoes the epochs after its checkpoint: drop their old rows.
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if float(r["epoch"]) <= trainer.current_epoch]  # checked: whole numbers
            self._write(rows, mode="w")

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._epoch_start = time.perf_counter()
        self._validated = False
        self._last_lr = None

    def on_validation_end(self, trainer, pl_module) -> None:
        self._validated = self._validated or not trainer.sanity_checking

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.train_images += len(batch[1]) * trainer.world_size

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # The rate this step trains with. Lightning steps a per-step schedule before the batch's end, so the rate
        # held at the epoch's end is the next step's (after the last epoch, one that never runs).
        self._last_lr = trainer.optimizers[0].param_groups[0]["lr"]

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or rank_zero_only.rank != 0:
            return
        seconds = time.perf_counter() - self._epoch_start
        self.train_seconds += seconds
        m = trainer.callback_metrics
        row = {"epoch": trainer.current_epoch + 1, "step": trainer.global_step,
               "lr": self._last_lr if self._last_lr is not None else trainer.optimizers[0].param_groups[0]["lr"],
               "epoch_seconds": round(seconds, 3), "train_seconds": round(self.train_seconds, 3),
               "train_images": self.train_images, "train_flops": self.train_images * self.flops_per_image}
        row.update({k: round(float(m[k]), 6) for k in EPOCH_COLUMNS
                    if k in m and (self._validated or not k.startswith("val/"))})
        self._write([row], mode="a")
        for_each(self.trackers, "epoch", row)
        if self.echo:
            log.info("%s", epoch_line(row, trainer.max_epochs, seconds))

    def _write(self, rows: list[dict], mode: str) -> None:
        """Write `rows` (mode "w") or add them (mode "a"), the whole file at once (atomic_write): a resume rewrites
        it, and a full disk or a kill in the middle of that would leave it truncated, its epochs lost and the run
        no longer resumable (a resume refuses an epochs.csv without the epochs of its checkpoint)."""
        new = mode == "w" or not self.path.exists()
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, EPOCH_COLUMNS)
        if new:
            writer.writeheader()
        writer.writerows(rows)
        atomic_write(self.path, (b"" if new else self.path.read_bytes()) + text.getvalue().encode())

    def state_dict(self) -> dict:
        return {"train_seconds": self.train_seconds, "train_images": self.train_images}

    def load_state_dict(self, state_dict: dict) -> None:
        self.train_seconds = state_dict["train_seconds"]
        self.train_images = state_dict.get("train_images", 0)


def epoch_line(row: dict, max_epochs: int, seconds: float) -> str:
    """An epochs.csv row as the line a run without a progress bar prints:
    `epoch 3/20: train loss 0.3112 acc 88.70% | val loss 0.2950 acc 89.32% (best 89.32%) | 60 s, ~17 min left`."""
    def percent(key: str) -> str:
        return f"{100 * row[key]:.2f}%" if key in row else "-"
    train = f"train loss {row.get('train/loss', float('nan')):.4f} acc {percent('train/acc')}"
    val = (f"val loss {row['val/loss']:.4f} acc {percent('val/acc')} (best {percent('val/acc_best')})"
           if "val/loss" in row else "no validation this epoch")
    left = max_epochs - row["epoch"]  # max_epochs -1: no bound (trainer.max_time or max_steps ends the run)
    return (f"epoch {row['epoch']}{f'/{max_epochs}' if max_epochs > 0 else ''}: {train} | {val} | {duration(seconds)}"
            + (f", ~{duration(left * seconds)} left" if max_epochs > 0 and left > 0 else ""))


def duration(seconds: float) -> str:
    """A human duration: `45 s`, `12 min`, `3.2 h`."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def forecast_line(epochs: int, epoch_seconds: float, device: str) -> str:
    """The line a run prints before its long part: `20 epochs x ~95 s = ~32 min on this CPU`."""
    return f"{epochs} epoch{'s' * (epochs != 1)} x ~{duration(epoch_seconds)} = ~{duration(epochs * epoch_seconds)} on this {device}"


# How often a run without a progress bar shows a line inside an epoch or the test.
HEARTBEAT_S = 30.0
# A forward pass costs about a third of a forward + backward pass: what a validation image costs
# next to a training image, for the forecast before the first validation has run.
EVAL_COST = 1 / 3


def step_loss(outputs):
    """A training step's loss from what `training_step` returned: a dict holding it as "loss", or the loss itself
    (None for a skipped step)."""
    return outputs["loss"] if isinstance(outputs, dict) else outputs


class Forecast(L.Callback):
    """Say how long the fit will take once the first steps have been timed, and show life while it runs.

    The forecast comes after `min_steps` timed steps and `min_seconds` (or the epoch's end, when an
    epoch is shorter), counting from the end of the first step, which carries one-off costs
    (allocation, kernel selection). An epoch's estimate is its training images at the measured rate
    plus its validation images at EVAL_COST of it. With `heartbeat_s`, a line at most that often inside
    an epoch and during the test (for output that no progress bar can redraw: a pipe, a log file).
    """

    def __init__(self, heartbeat_s: float | None = HEARTBEAT_S, min_steps: int = 5, min_seconds: float = 2.0):
        self.heartbeat_s, self.min_steps, self.min_seconds = heartbeat_s, min_steps, min_seconds
        self._told = False
        self._timed_from = self._last_beat = self._epoch_start = self._test_start = 0.0
        self._steps = self._images = 0

    @staticmethod
    def _device(trainer) -> str:
        root = trainer.strategy.root_device
        return "GPU" if root.type == "cuda" else root.type.upper()

    def _beat_due(self, now: float) -> bool:
        """Whether a heartbeat line is due now (rank 0 only); if so, the next one is counted from now."""
        if self.heartbeat_s is None or now - self._last_beat < self.heartbeat_s or rank_zero_only.rank != 0:
            return False
        self._last_beat = now
        return True

    def on_train_start(self, trainer, pl_module) -> None:
        self._told = trainer.current_epoch >= trainer.max_epochs
        self._steps = self._images = 0
        self._last_beat = time.perf_counter()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._epoch_start = self._last_beat = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        if not self._told:
            if self._steps == 0:
                self._timed_from = now  # the first step's one-off costs stay out of the rate
            else:
                self._images += len(batch[1])
            self._steps += 1
            timed = now - self._timed_from
            last = batch_idx + 1 == trainer.num_training_batches
            if (self._steps > self.min_steps and timed >= self.min_seconds) or last:
                self._tell(trainer, timed / self._images if self._images else (now - self._epoch_start) / len(batch[1]))
        if self._beat_due(now):
            done, total = batch_idx + 1, trainer.num_training_batches
            elapsed = now - self._epoch_start
            loss = step_loss(outputs)
            log.info("epoch %d/%d: step %d/%d, %.0f img/s, loss %.4f, epoch done in ~%s", trainer.current_epoch + 1,
                     trainer.max_epochs, done, total, done * len(batch[1]) / elapsed, float(loss),
                     duration(elapsed / done * (total - done)))

    def _tell(self, trainer, seconds_per_image: float) -> None:
        self._told = True
        if rank_zero_only.rank != 0:
            return
        train_images = trainer.num_training_batches * getattr(trainer.train_dataloader, "batch_size", 1)
        val_batches = sum(trainer.num_val_batches) if trainer.num_val_batches else 0
        val_images = val_batches * getattr(trainer.val_dataloaders, "batch_size", 1)
        epoch_seconds = seconds_per_image * (train_images + EVAL_COST * val_images)
        log.info("%s (from the first steps' speed)",
                 forecast_line(trainer.max_epochs - trainer.current_epoch, epoch_seconds, self._device(trainer)))

    def on_test_start(self, trainer, pl_module) -> None:
        self._test_start = self._last_beat = time.perf_counter()

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        now = time.perf_counter()
        if self._beat_due(now):
            done, total = batch_idx + 1, sum(trainer.num_test_batches)
            log.info("test: batch %d/%d, done in ~%s", done, total,
                     duration((now - self._test_start) / done * (total - done)))


class ProgressBar(TQDMProgressBar):
    """tqdm's bar, with epochs counted from 1 (as in epochs.csv, checkpoints and metrics.json) and the total,
    and accuracies in percent, as in every line and block a run prints."""

    def get_metrics(self, trainer, pl_module) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        return {k: f"{100 * v:.2f}%" if isinstance(v, float) and k.rsplit("/", 1)[-1].startswith("acc") else v
                for k, v in metrics.items()}

    def on_train_epoch_start(self, trainer, *args) -> None:
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.set_description(f"Epoch {trainer.current_epoch + 1}/{trainer.max_epochs}")
