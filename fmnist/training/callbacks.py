"""Lightning callbacks: a per-epoch CSV, a divergence stop, exact-resume RNG state, test-set artifacts."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar

from fmnist.errors import DivergedError
from fmnist.models import training_flops_per_image

DIVERGED_ADVICE = "Lower optim.lr or set trainer.gradient_clip_val."
EPOCH_COLUMNS = ["epoch", "step", "train/loss", "train/acc", "val/loss", "val/acc", "val/acc_best", "lr",
                 "epoch_seconds", "train_seconds", "train_images", "train_flops"]


class EpochCSV(L.Callback):
    """Append one row per finished epoch to `epochs.csv`, so figures and tables need no TensorBoard parsing.

    `train_seconds` is cumulative training wall time (including validation), kept across resumes:
    the time-to-accuracy curve of a run on its hardware. `train_images` (images trained on, all
    ranks) and `train_flops` (their forward + backward FLOPs) are the same curve's machine-free axes.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.train_seconds = 0.0
        self.train_images = 0
        self.flops_per_image = 0
        self._epoch_start = 0.0

    def on_fit_start(self, trainer, pl_module) -> None:
        self.flops_per_image = training_flops_per_image(pl_module.net)

    def on_train_start(self, trainer, pl_module) -> None:  # after a resume has restored current_epoch
        if trainer.is_global_zero and self.path.exists():
            # A resumed run redoes the epochs after its checkpoint: drop their old rows.
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["epoch"]) <= trainer.current_epoch]
            self._write(rows, mode="w")

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._epoch_start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.train_images += len(batch[1]) * trainer.world_size

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        seconds = time.perf_counter() - self._epoch_start
        self.train_seconds += seconds
        m = trainer.callback_metrics
        row = {"epoch": trainer.current_epoch + 1, "step": trainer.global_step,
               "lr": trainer.optimizers[0].param_groups[0]["lr"],
               "epoch_seconds": round(seconds, 3), "train_seconds": round(self.train_seconds, 3),
               "train_images": self.train_images, "train_flops": self.train_images * self.flops_per_image}
        row.update({k: round(float(m[k]), 6) for k in EPOCH_COLUMNS if k in m})
        self._write([row], mode="a")

    def _write(self, rows: list[dict], mode: str) -> None:
        new = mode == "w" or not self.path.exists()
        with open(self.path, mode, newline="") as f:
            writer = csv.DictWriter(f, EPOCH_COLUMNS)
            if new:
                writer.writeheader()
            writer.writerows(rows)

    def state_dict(self) -> dict:
        return {"train_seconds": self.train_seconds, "train_images": self.train_images}

    def load_state_dict(self, state_dict: dict) -> None:
        self.train_seconds = state_dict["train_seconds"]
        self.train_images = state_dict.get("train_images", 0)


class StopOnDivergence(L.Callback):
    """Stop with DivergedError when the training or validation loss is NaN or infinite.

    Checked every `every` steps and at each epoch's last step, not every step: reading the loss
    waits for the GPU, and once the weights are NaN every later loss is too.
    """

    def __init__(self, every: int = 10):
        self.every = every

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx % self.every and batch_idx + 1 != trainer.num_training_batches:
            return
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None and not torch.isfinite(loss).item():
            raise DivergedError(f"training diverged: loss is {loss.item()} at epoch {trainer.current_epoch + 1}, "
                                f"step {trainer.global_step}. {DIVERGED_ADVICE}")

    def on_validation_end(self, trainer, pl_module) -> None:
        # A training loss can stay finite while the weights already give NaN on other data.
        loss = trainer.callback_metrics.get("val/loss")
        if not trainer.sanity_checking and loss is not None and not torch.isfinite(loss).item():
            raise DivergedError(f"training diverged: validation loss is {loss.item()} at epoch "
                                f"{trainer.current_epoch + 1}. {DIVERGED_ADVICE}")


class RNGState(L.Callback):
    """Save and restore torch's random state in checkpoints, so a resumed run continues bit-for-bit.

    Dropout and augmentation draw from the global generators; the data order has its own per-epoch seed.
    """

    def state_dict(self) -> dict:
        state = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        torch.set_rng_state(state_dict["cpu"])
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])


def step_callbacks(progress_refresh_steps: int | None) -> list[L.Callback]:
    """The callbacks that act on every training step, shared by `train` and the benchmark.

    The progress bar redraws every `progress_refresh_steps` steps (None: no bar): a redraw per
    step cost ~1 ms, 3-5% of a batch-32 step on a 2-core CPU.
    """
    callbacks: list[L.Callback] = [StopOnDivergence(), RNGState()]
    if progress_refresh_steps:
        callbacks.append(TQDMProgressBar(refresh_rate=progress_refresh_steps))
    return callbacks
