"""`LitClassifier`: any `fmnist.models` architecture trained with cross-entropy, with torchmetrics metrics."""

from __future__ import annotations

import logging
import math

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from fmnist import NUM_CLASSES
from fmnist.config import TrainConfig
from fmnist.models import build_model, memory_format_input, tta_logits
from fmnist.training.muon import Muon

log = logging.getLogger(__name__)

# Training images whose 3x3 patches set a whitening stem (`model.whiten_stem`): ~1.4 M patches, plenty
# for a 9 x 9 covariance, in well under a second.
WHITENING_IMAGES = 2000


def fast_path_applies(device: torch.device) -> bool:
    """Whether `fast_path=true` changes anything on `device`: CUDA graphs exist on CUDA only."""
    return device.type == "cuda"


def take_fast_path(net: torch.nn.Module, device: torch.device) -> bool:
    """`fast_path=true` (and the benchmark's raw loop with --fast-path): on CUDA, compile `net` in place with
    CUDA graphs of the forward and backward passes, replayed each step, so that a small model is not bound by
    launching its kernels. Returns whether it did (False, `net` untouched, elsewhere)."""
    if not fast_path_applies(device):
        return False
    net.compile(mode="reduce-overhead")
    return True


# The optimizer registry (names as fmnist.config.OPTIMIZERS): the class and the `optim.*` keys it takes.
OPTIMIZER_CLASSES = {"adam": (torch.optim.Adam, ("weight_decay",)), "adamw": (torch.optim.AdamW, ("weight_decay",)),
                     "sgd": (torch.optim.SGD, ("weight_decay", "momentum", "nesterov")),
                     "muon": (Muon, ("weight_decay", "momentum", "nesterov"))}


def fused_on(device: torch.device) -> dict:
    """The optimizer's `fused=True` on CUDA: one kernel steps every parameter, where the default multi-tensor step
    launches several per parameter group and reads each step count on the host, a per-step cost that bounds a
    small model there. Elsewhere torch's default ({})."""
    return {"fused": True} if torch.device(device).type == "cuda" else {}


def lr_factor(step: int, total: int, warmup: int, shape: str) -> float:
    """Multiplier of the base learning rate at `step`: linear warm-up, then flat, cosine or linear decay."""
    if step < warmup:
        return (step + 1) / warmup
    if shape == "none":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1 + math.cos(math.pi * progress)) if shape == "cosine" else 1.0 - progress


def parameter_groups(net: torch.nn.Module, lr: float, weight_decay: float, bias_lr_scale: float) -> list[dict]:
    """The optimizer's parameter groups: one, or the biases apart at `bias_lr_scale` x `lr` (weight decay / it)."""
    if bias_lr_scale == 1.0:
        return [{"params": list(net.parameters())}]
    biases = [p for name, p in net.named_parameters() if name.endswith("bias")]
    others = [p for name, p in net.named_parameters() if not name.endswith("bias")]
    return [{"params": others},
            {"params": biases, "lr": lr * bias_lr_scale, "weight_decay": weight_decay / bias_lr_scale}]


class LitClassifier(L.LightningModule):
    """Hyperparameters are plain dicts and numbers, so checkpoints reload with `weights_only=True`.

    model: the `model` config (`name` and the architecture's arguments);
    optim: the `optim` config (fmnist.config.OptimConfig), every key present;
    tta, compile, channels_last, fast_path: how the model runs (fmnist.config.RUN_OPTIONS; defaults those of
    TrainConfig).
    """

    def __init__(self, model: dict, optim: dict, tta: str = TrainConfig.tta, compile: bool = TrainConfig.compile,
                 channels_last: bool = TrainConfig.channels_last, fast_path: bool = TrainConfig.fast_path):
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.net = build_model(**model)
        self.channels_last = channels_last
        self.tta = tta  # validation and test only
        if self.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        if compile:
            self.net.compile()  # in place: state_dict keys stay those of `net`
        self.net_compiled = compile  # or, from `setup`, by the fast path (CompileWarmUp compiles it before training)
        # Training loss and accuracy: summed on the device at each step (`training_step`) and handed to these
        # aggregates once per epoch (`_hand_over_training_sums`), since a torchmetrics update per step costs host
        # time comparable to a small model's whole step on a GPU. Under DDP they average the ranks' values, which
        # is the mean over images: training ranks get equal shares. ("disable": with it, torchmetrics 1.9 ignores
        # an update's weight, so each takes one value per epoch, already a mean over images.)
        self.train_loss = MeanMetric(nan_strategy="disable")
        self.train_acc = MeanMetric(nan_strategy="disable")  # the share of images classified right
        self._start_training_sums()
        # validate_args=False: the per-step input checks cost more than the update itself (and sync a GPU).
        self.val_acc = MulticlassAccuracy(NUM_CLASSES, average="micro", validate_args=False)
        self.test_acc = MulticlassAccuracy(NUM_CLASSES, average="micro", validate_args=False)
        self.val_acc_best = MaxMetric()
        self.val_acc_best.persistent(True)  # saved in checkpoints: a resumed run keeps its best so far
        self._restored_best: torch.Tensor | None = None  # that best, as a resume's checkpoint holds it
        self.test_confusion = MulticlassConfusionMatrix(NUM_CLASSES, validate_args=False)  # read by TestArtifacts

    def setup(self, stage: str) -> None:
        # Lightning restores a resumed run's weights after `setup`, so a resume keeps its trained stem.
        if stage == "fit" and getattr(self.net, "whiten_stem", False):
            self.net.whiten_stem_(self.trainer.datamodule.model_inputs("train", WHITENING_IMAGES))
        if stage == "fit" and self.hparams.get("fast_path"):
            device = self.trainer.strategy.root_device
            if take_fast_path(self.net, device):
                self.net_compiled = True
            else:
                log.info("fast_path=true: ignored on %s (it captures CUDA graphs); this run trains as without it",
                         device.type)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(memory_format_input(x, self.channels_last))

    def _loss(self, batch, tta: str = "none"):
        x, y = batch
        logits = tta_logits(self, x, tta)
        return F.cross_entropy(logits.float(), y, label_smoothing=self.hparams.optim["label_smoothing"]), logits, y

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Kept for `on_fit_start`: a `*-true` precision converts the module after a resume restores it, and would
        # round the best accuracy so far to its own bits (0.1 as 0.1001 in bf16). With an EMA (Lightning's
        # WeightAveraging) `state_dict` holds the averaged copy, whose best stays unset, and `current_model_state`
        # the trained module.
        state = checkpoint.get("current_model_state") or checkpoint["state_dict"]
        self._restored_best = state.get("val_acc_best.max_value")

    def on_fit_start(self) -> None:
        # A `*-true` precision converts the whole module, torchmetrics' float states included: these stay fp32.
        for aggregate in (self.train_loss, self.train_acc, self.val_acc_best):
            aggregate.set_dtype(torch.float32)
        restored, self._restored_best = self._restored_best, None
        if restored is not None:  # a resume's best so far, as its checkpoint holds it
            self.val_acc_best.max_value = restored.to(self.device, torch.float32)

    def _start_training_sums(self) -> None:
        self.training_sums = torch.zeros(2, device=self.device)  # loss x images, and images classified right
        self.training_images = 0  # the images those sums cover

    def on_train_start(self) -> None:
        self._start_training_sums()  # on the run's device (a resume that starts inside an epoch skips the next hook)

    def on_train_epoch_start(self) -> None:
        self._start_training_sums()

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss, logits, y = self._loss(batch)
        # With CutMix the targets are label probabilities: training accuracy counts the largest share.
        labels = y if y.ndim == 1 else y.argmax(1)
        loss_sum, correct = self.training_sums  # views: the in-place additions below land in the sums
        loss_sum.add_(loss.detach(), alpha=len(labels))
        correct.add_((logits.argmax(1) == labels).sum())
        self.training_images += len(labels)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # The epoch's last step, whichever way it ends (its last batch, max_steps, a stop such as max_time's):
        # the callbacks' `on_train_epoch_end` (epochs.csv) runs before this module's.
        if self.trainer.fit_loop.epoch_loop.done:
            self._hand_over_training_sums()

    def on_train_epoch_end(self) -> None:
        self._hand_over_training_sums()  # an epoch that ended unforeseen: at least the loggers get its figures

    def _hand_over_training_sums(self) -> None:
        """Add the steps' sums to the epoch's loss and accuracy aggregates, which Lightning computes (across ranks)
        and resets at the epoch's end. A `self.log` per step would cost a deep copy of Lightning's metadata each."""
        if not self.training_images:
            return
        mean_loss, accuracy = self.training_sums / self.training_images
        self.train_loss.update(mean_loss)
        self.train_acc.update(accuracy)
        self.log("train/loss", self.train_loss, on_step=False, on_epoch=True, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        self._start_training_sums()

    def validation_step(self, batch, batch_idx: int) -> dict:
        loss, logits, y = self._loss(batch, self.tta)
        preds = logits.argmax(dim=1)
        self.val_acc.update(preds, y)
        self.log("val/loss", loss, on_epoch=True, prog_bar=True, batch_size=len(y), sync_dist=True)
        self.log("val/acc", self.val_acc, on_epoch=True, prog_bar=True, batch_size=len(y))
        return {"preds": preds}

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:  # a couple of batches before training say nothing about the best
            return
        self.val_acc_best(self.val_acc.compute())
        self.log("val/acc_best", self.val_acc_best.compute(), prog_bar=True, sync_dist=True)

    def test_step(self, batch, batch_idx: int) -> dict:
        loss, logits, y = self._loss(batch, self.tta)
        preds = logits.argmax(dim=1)
        self.test_acc.update(preds, y)
        self.test_confusion.update(preds, y)
        self.log("test/loss", loss, on_epoch=True, batch_size=len(y), sync_dist=True)
        self.log("test/acc", self.test_acc, on_epoch=True, batch_size=len(y))
        return {"preds": preds}

    def optimizer(self) -> torch.optim.Optimizer:
        """The run's optimizer (`optim.name`) over the net's parameter groups, unscheduled."""
        o = self.hparams.optim
        cls, keys = OPTIMIZER_CLASSES[o["name"]]
        return cls(parameter_groups(self.net, o["lr"], o["weight_decay"], o["bias_lr_scale"]),
                   lr=o["lr"], **{k: o[k] for k in keys}, **fused_on(self.device))

    def configure_optimizers(self):
        o = self.hparams.optim
        optimizer = self.optimizer()
        shape, warmup_epochs = o["scheduler"], o["warmup_epochs"]
        if shape == "none" and warmup_epochs == 0:
            return optimizer
        total = int(self.trainer.estimated_stepping_batches)
        warmup = int(warmup_epochs * total / max(1, self.trainer.max_epochs))
        if warmup_epochs > self.trainer.max_epochs:  # allowed (a short try of a recipe), but said
            log.warning("optim.warmup_epochs=%s is longer than trainer.max_epochs=%s: the learning rate stays in its "
                        "warm-up and reaches at most %.0f%% of optim.lr=%s", warmup_epochs, self.trainer.max_epochs,
                        100 * lr_factor(total - 1, total, warmup, shape), o["lr"])
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total, warmup, shape))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
