"""Lightning callbacks: a per-epoch CSV (and line), the fit's forecast and heartbeat, a divergence stop, exact-resume
RNG state, compilation before training, test-set artifacts, a signal's stop told to the trackers, every image's
prediction, an exponential moving average of the weights, lookahead, and a progress bar that counts epochs from 1
like everything else here."""

from __future__ import annotations

import csv
import io
import logging
import math
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import TQDMProgressBar, WeightAveraging
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from fmnist.errors import DivergedError
from fmnist.fsio import atomic_output, atomic_write
from fmnist.models import training_flops_per_image, tta_logits
from fmnist.runs import CONFUSION_FILE, EPOCH_COLUMNS, PREDICTIONS_FILE
from fmnist.training.figures import confusion_matrix_figure, misclassified_figure
from fmnist.training.trackers import for_each, log_figure

log = logging.getLogger(__name__)

DIVERGED_ADVICE = "Lower optim.lr or set trainer.gradient_clip_val."
# A mean cross-entropy above this many nats is a divergence even when finite: it puts e^-100 of the
# probability on the true class on average, which only logits blown up to hundreds do (chance is
# ln 10 = 2.3 nats; a trained model's worst images reach 10-20).
ABSURD_LOSS = 100.0
# Training steps before an absurd (finite) validation loss counts: until then batch-norm's running statistics
# (momentum 0.1) still hold much of their initial values, and a few large first steps give eval-mode logits in
# the hundreds without anything diverging (seen on a 2-step smoke run at lr 1e-2).
JUDGE_AFTER_STEPS = 50


def loss_diverged(value: float, steps: int) -> bool:
    """Whether a mean cross-entropy, measured after `steps` training steps, says the model diverged: NaN or
    infinite, or above ABSURD_LOSS once JUDGE_AFTER_STEPS steps have run."""
    return not math.isfinite(value) or (value > ABSURD_LOSS and steps >= JUDGE_AFTER_STEPS)


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


class StopOnDivergence(L.Callback):
    """Stop with DivergedError when the training loss is NaN or infinite, or the validation loss is that or
    above ABSURD_LOSS after JUDGE_AFTER_STEPS steps (a single training step's loss may spike; a whole
    validation pass's may not).

    Checked every `every` steps and at each epoch's last step, not every step: reading the loss
    waits for the GPU, and once the weights are NaN every later loss is too. Under DDP the check is of the
    ranks' mean loss, so that every rank stops at the same step: one rank's NaN stopping that rank alone left
    the others in the next step's gradient all-reduce, which failed with gloo's "Connection closed by peer"
    traceback and a record of that error instead of `diverged`.
    """

    def __init__(self, every: int = 10):
        self.every = every

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx % self.every and batch_idx + 1 != trainer.num_training_batches:
            return
        loss = step_loss(outputs)
        if trainer.world_size > 1:  # every rank takes part, a skipped step (None) too
            loss = trainer.strategy.reduce(torch.zeros((), device=pl_module.device) if loss is None
                                           else loss.detach().float(), reduce_op="mean")
        if loss is not None and not torch.isfinite(loss).item():
            raise DivergedError(f"training diverged: loss is {loss.item()} at epoch {trainer.current_epoch + 1}, "
                                f"step {trainer.global_step}. {DIVERGED_ADVICE}")

    def on_validation_end(self, trainer, pl_module) -> None:
        # A training loss can stay finite while the weights already give NaN on other data.
        loss = trainer.callback_metrics.get("val/loss")
        if not trainer.sanity_checking and loss is not None and loss_diverged(float(loss), trainer.global_step):
            raise DivergedError(f"training diverged: validation loss is {loss.item()} at epoch "
                                f"{trainer.current_epoch + 1}. {DIVERGED_ADVICE}")


def rng_state() -> dict:
    """torch's global random state (the CPU's, and every GPU's where there are GPUs), as `set_rng_state` takes it."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Put back a state from `rng_state`."""
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class RNGState(L.Callback):
    """Save and restore torch's random state in checkpoints, so a resumed run continues bit-for-bit.

    Dropout and augmentation draw from the global generators; the data order has its own per-epoch seed.
    The state is saved at the end of an epoch and put back at the start of the first resumed epoch:
    Lightning loads callback states before it sets the run up, and setting up draws from the generator.
    """

    def __init__(self):
        self._restore: dict | None = None

    def state_dict(self) -> dict:
        return rng_state()

    def load_state_dict(self, state_dict: dict) -> None:
        self._restore = state_dict

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self._restore is None:
            return
        set_rng_state(self._restore)
        self._restore = None


def batch_sizes(loader, batches: int) -> list[int]:
    """The sizes of the first `batches` batches of an `InMemoryBatches` (all of them, or a fit's limit): the
    full size, and the last one's where it is smaller."""
    images, size = len(loader.indices()), loader.batch_size
    return sorted({min(size, images - i * size) for i in (0, batches - 1)}, reverse=True) if batches else []


class CompileWarmUp(L.Callback):
    """Compile a compiled network (`compile=true`, or `fast_path=true` on CUDA) before training rather than in its
    first steps, so that `train_seconds` counts training alone, as airbench times its runs; `seconds` is what the
    warm-up took in this process (the record's `warmup_seconds`).

    The network runs on the batch shapes the fit gives it: its training batches' sizes (the full one and the
    epoch's last, as the fit's batch limit leaves them), forward and backward, on training images augmented as
    in training (an augmentation can change the strides a compiled graph is specialised to); then, when the
    first epoch validates, its validation batches' sizes in eval mode with the run's TTA. Each WARMUP_CALLS
    times, since CUDA graphs are recorded at the second call and replayed from the third. Then the weights,
    batch-norm statistics and random state are put back and the gradients cleared, so that the run trains as it
    would without the warm-up.
    """

    WARMUP_CALLS = 3

    def __init__(self):
        self.seconds = 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        if not pl_module.net_compiled:
            return
        started = time.perf_counter()
        net, plugin, data, device = pl_module.net, trainer.precision_plugin, trainer.datamodule, pl_module.device
        weights, random_state, mode = {k: v.clone() for k, v in net.state_dict().items()}, rng_state(), net.training
        images, labels = (t.to(device) for t in data.splits["train"])
        with torch.enable_grad():
            for n in batch_sizes(trainer.train_dataloader, trainer.num_training_batches):
                for _ in range(self.WARMUP_CALLS):
                    x, _ = data.on_after_batch_transfer((images[:n], labels[:n]), 0)  # trainer.training: augmented
                    with plugin.train_step_context():
                        logits = pl_module(x)
                    # Cleared before each backward: under CUDA graphs, gradients left from the last replay are
                    # overwritten by the next one, and adding to them fails.
                    net.zero_grad(set_to_none=True)
                    logits.float().sum().backward()
        if trainer.val_dataloaders is not None:  # set up before training when the first epoch validates
            net.eval()
            with torch.no_grad():  # as Lightning validates within a fit (not in inference mode)
                for n in batch_sizes(trainer.val_dataloaders, trainer.num_val_batches[0]):
                    x = plugin.convert_input(data.model_inputs("val", n).to(device))
                    for _ in range(self.WARMUP_CALLS):
                        with plugin.val_step_context():
                            tta_logits(pl_module, x, pl_module.tta)
        net.train(mode)
        net.zero_grad(set_to_none=True)
        net.load_state_dict(weights)
        set_rng_state(random_state)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.seconds = time.perf_counter() - started
        log.info("compiled the network before training: %.1f s, not counted in train_seconds", self.seconds)


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


class PerImagePredictions(L.Callback):
    """Every image's predicted class, so that two runs can be compared image by image (McNemar's test,
    an interval over seeds and images): `predictions.npz` in the run directory holds `val_pred`, `val_label` and
    `val_epoch` (the epoch of the best validation accuracy so far, the checkpoint that is tested) and
    `test_pred`, `test_label`, in the order of the split's images. Under DDP each rank sees a share of
    the images, and nothing is saved."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / PREDICTIONS_FILE
        self.preds: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []
        self.best_so_far = -1.0  # validation accuracy of the epoch whose predictions are saved

    def _start(self) -> None:
        self.preds, self.labels = [], []

    def _collect(self, trainer, outputs, batch) -> None:
        if trainer.world_size == 1 and not trainer.sanity_checking:
            self.preds.append(outputs["preds"].to("cpu", torch.uint8))
            self.labels.append(batch[1].to("cpu", torch.uint8))

    def _arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return torch.cat(self.preds).numpy(), torch.cat(self.labels).numpy()

    def _save(self, **arrays) -> None:
        try:
            with np.load(self.path) as before:
                kept = {k: before[k] for k in before.files if k not in arrays}
        except (OSError, ValueError):
            kept = {}
        with atomic_output(self.path) as tmp:
            with open(tmp, "wb") as f:
                np.savez_compressed(f, **kept, **arrays)

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._start()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._collect(trainer, outputs, batch)

    def on_fit_start(self, trainer, pl_module) -> None:
        # A resumed run goes on from the best epoch it saved before it stopped.
        self.best_so_far = -1.0
        try:
            with np.load(self.path) as saved:
                self.best_so_far = float((saved["val_pred"] == saved["val_label"]).mean())
        except (OSError, ValueError, KeyError):
            pass

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        # Only a strictly better epoch replaces the saved one, as the checkpoint callback keeps the first
        # epoch of the best validation accuracy.
        if not self.preds or rank_zero_only.rank != 0 or trainer.state.fn != TrainerFn.FITTING:
            return
        pred, label = self._arrays()
        accuracy = float((pred == label).mean())
        if accuracy > self.best_so_far:
            self.best_so_far = accuracy
            self._save(val_pred=pred, val_label=label, val_epoch=np.array(trainer.current_epoch + 1))

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._start()

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._collect(trainer, outputs, batch)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        if self.preds and rank_zero_only.rank == 0:
            pred, label = self._arrays()
            self._save(test_pred=pred, test_label=label)


class TestArtifacts(L.Callback):
    """The test set's confusion matrix (CSV in the run directory and a figure for each tracker) and a grid of
    misclassified test images, from the predictions `test_step` returns."""

    def __init__(self, run_dir: Path, trackers: list | None = None, images: int = 32):
        self.run_dir, self.images = Path(run_dir), images
        self.trackers = trackers if trackers is not None else []
        self.wrong: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self.wrong = []

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        have = sum(len(w[0]) for w in self.wrong)
        if have < self.images:
            x, y = batch
            wrong = outputs["preds"] != y
            x = x.float()  # numpy has no bf16 (trainer.precision=bf16-true)
            self.wrong.append(tuple(t[wrong][: self.images - have].cpu() for t in (x, y, outputs["preds"])))

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        cm = pl_module.test_confusion.compute().cpu().numpy()  # on every rank: under DDP this gathers
        pl_module.test_confusion.reset()
        if rank_zero_only.rank != 0:
            return
        with atomic_output(self.run_dir / CONFUSION_FILE) as tmp:  # a kill or a full disk leaves none, not half
            np.savetxt(tmp, cm, fmt="%d", delimiter=",")
        log_figure(self.trackers, "test/confusion_matrix", lambda: confusion_matrix_figure(cm), trainer.global_step)
        if any(len(w[0]) for w in self.wrong):
            images, true, pred = (torch.cat([w[i] for w in self.wrong]).numpy() for i in range(3))
            log_figure(self.trackers, "test/misclassified", lambda: misclassified_figure(images, true, pred),
                       trainer.global_step)


class TrackersSeeTheStop(L.Callback):
    """Tells the trackers when a signal stops the run (Lightning raises SIGTERMException for SIGTERM and for the
    first Ctrl-C, see `fmnist.training.signals.ctrl_c_stops_at_a_step`; KeyboardInterrupt for a second), before Lightning closes them."""

    def __init__(self, trackers: list):
        self.trackers = trackers

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, (SIGTERMException, KeyboardInterrupt)):
            for_each(self.trackers, "stopped")


def ema_with_warmup(decay: float):
    """An `AveragedModel` multi-tensor averaging function: EMA whose decay ramps up as min(decay, (1 + n) / (10 + n)).

    A plain EMA starts from the initial weights and forgets them at `decay` per step, so for the
    first few hundred steps it mixes weights far apart in training (and batch-norm statistics that
    match none of them) and scores near chance; the ramp makes the early average follow recent steps.
    Integer buffers (batch-norm's step counters) are copied.
    """
    @torch.no_grad()
    def average(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        if averaged[0].is_floating_point():
            # The weight stays a tensor on the model's device: reading the step count would sync a GPU each step.
            n = num_averaged.float()
            weight = 1.0 - torch.clamp((1.0 + n) / (10.0 + n), max=decay)
            torch._foreach_mul_(averaged, 1.0 - weight)
            torch._foreach_add_(averaged, torch._foreach_mul(current, weight))
        else:
            torch._foreach_copy_(averaged, current)
    return average


class WeightEMA(WeightAveraging):
    """An EMA of the weights and buffers (`optim.ema_decay`), evaluated wherever the model is.

    Lightning's callback swaps the averaged weights in for validation, saves them as each
    checkpoint's `state_dict` (the raw ones under `current_model_state`, so a resume restores
    both), and copies them into the model when training ends. So `best-*.ckpt`, and everything
    that loads it (the test, evaluate, predict, export), holds the averaged weights.
    """

    def __init__(self, decay: float):
        super().__init__(multi_avg_fn=ema_with_warmup(decay))
        self.updates: int | None = None  # the steps the average holds (its `n_averaged`), once read

    def on_load_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        # Lightning's callback would also load the raw weights when `trainer.test(ckpt_path=...)` restores
        # a checkpoint after fitting, so the test would score them instead of the averaged weights.
        if trainer.state.fn == TrainerFn.FITTING:
            super().on_load_checkpoint(trainer, pl_module, checkpoint)
            self.updates = None  # the loaded average's own count, read at its next update

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        # Lightning's callback, once per optimizer step, but without `AveragedModel.update_parameters`: that reads
        # its step count, a tensor on the model's device, twice per call, which on a GPU is two syncs per step.
        if trainer.global_step > self._latest_update_step and self.should_update(step_idx=trainer.global_step - 1):
            self.update_average(pl_module)
            self._latest_update_step = trainer.global_step

    @torch.no_grad()
    def update_average(self, pl_module: L.LightningModule) -> None:
        """What `AveragedModel.update_parameters` does (with `use_buffers`, as here), with the step count kept in
        Python: read from the average once (after a resume it is the loaded one's), then counted."""
        average = self._average_model
        if self.updates is None:
            self.updates = int(average.n_averaged)
        averaged = [*average.module.parameters(), *average.module.buffers()]
        current = [t.detach() for t in (*pl_module.parameters(), *pl_module.buffers())]
        if self.updates == 0:
            torch._foreach_copy_(averaged, current)
        else:
            groups: dict[tuple, tuple[list, list]] = {}  # the multi-tensor function takes one device and dtype
            for into, now in zip(averaged, current, strict=True):
                group = groups.setdefault((into.device, into.dtype), ([], []))
                group[0].append(into)
                group[1].append(now)
            for into, now in groups.values():
                average.multi_avg_fn(into, now, average.n_averaged)
        average.n_averaged += 1
        self.updates += 1


class Lookahead(L.Callback):
    """Lookahead (`optim.lookahead_steps`, `optim.lookahead_alpha`): every `steps` optimizer steps the slow
    weights move `alpha` of the way to the trained (fast) ones, and the fast ones restart from them.

    The slow weights are part of every checkpoint, so a resumed run continues exactly. Batch-norm
    statistics are not averaged: they follow the fast weights, as in Zhang et al. (2019).
    """

    def __init__(self, steps: int, alpha: float):
        self.steps, self.alpha = steps, alpha
        self.slow: list[torch.Tensor] | None = None  # set at the start of training, or by a checkpoint
        self.synced_at = 0  # the optimizer step of the last sync (accumulated batches share a step)

    def on_train_start(self, trainer, pl_module) -> None:
        params = list(pl_module.parameters())
        if self.slow is None:
            self.slow = [p.detach().clone() for p in params]
        else:  # from a checkpoint, on the CPU
            self.slow = [s.to(p.device, p.dtype) for s, p in zip(self.slow, params)]

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if step == self.synced_at or step % self.steps:
            return
        fast = list(pl_module.parameters())
        torch._foreach_lerp_(self.slow, fast, self.alpha)
        torch._foreach_copy_(fast, self.slow)
        self.synced_at = step

    def state_dict(self) -> dict:
        return {"slow": [s.cpu() for s in self.slow or []], "synced_at": self.synced_at}

    def load_state_dict(self, state_dict: dict) -> None:
        self.slow = list(state_dict["slow"]) or None
        self.synced_at = state_dict["synced_at"]


def step_callbacks(progress_refresh_steps: int | None) -> list[L.Callback]:
    """The callbacks that act on every training step, shared by `train` and the benchmark.

    The progress bar redraws every `progress_refresh_steps` steps (None: no bar): a redraw per
    step is a measurable share of a small step (docs/performance.md).
    """
    callbacks: list[L.Callback] = [StopOnDivergence(), RNGState()]
    if progress_refresh_steps:
        callbacks.append(ProgressBar(refresh_rate=progress_refresh_steps))
    return callbacks
