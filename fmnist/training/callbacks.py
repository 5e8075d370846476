"""Lightning callbacks: a divergence stop, exact-resume RNG state, compilation before training, test-set artifacts,
a signal's stop told to the trackers, and every image's prediction. What a run says of its epochs is
`fmnist.training.epochs`; averaged weights (EMA, lookahead), `fmnist.training.averaging`."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from fmnist.errors import DivergedError
from fmnist.fsio import atomic_output
from fmnist.models import tta_logits
from fmnist.runs import CONFUSION_FILE, PREDICTIONS_FILE
from fmnist.training.epochs import ProgressBar, step_loss
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


def step_callbacks(progress_refresh_steps: int | None) -> list[L.Callback]:
    """The callbacks that act on every training step, shared by `train` and the benchmark.

    The progress bar redraws every `progress_refresh_steps` steps (None: no bar): a redraw per
    step is a measurable share of a small step (docs/performance.md).
    """
    callbacks: list[L.Callback] = [StopOnDivergence(), RNGState()]
    if progress_refresh_steps:
        callbacks.append(ProgressBar(refresh_rate=progress_refresh_steps))
    return callbacks
