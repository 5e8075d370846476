"""`FashionMNISTDataModule`: Kaggle CSVs -> uint8 tensors in memory -> batches cut by index.

Pixels are scaled to [0, 1] per batch after the batch reaches its device (optionally standardised
with the training split's mean and std), and training batches are augmented there as a whole.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

import lightning as L
import numpy as np
import torch

from fmnist import NUM_CLASSES
from fmnist.config import AugmentConfig, DataConfig
from fmnist.data.augment import augment, cutmix
from fmnist.data.batches import InMemoryBatches, network_input
from fmnist.data.csv_io import load_csvs
from fmnist.data.sources import find_csv
from fmnist.errors import ConfigError

log = logging.getLogger(__name__)


def stratified_split(labels: np.ndarray, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (rest, chosen) where `chosen` has `size` samples in the classes' proportions."""
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    exact = size * counts / counts.sum()
    quota = np.floor(exact).astype(int)
    # Largest remainders get the leftover samples, so the total is exactly `size`.
    quota[np.argsort(quota - exact)[: size - quota.sum()]] += 1
    chosen = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:q] for c, q in zip(classes, quota)])
    chosen = np.sort(chosen)
    rest = np.setdiff1d(np.arange(len(labels)), chosen, assume_unique=True)
    return rest, chosen


class FashionMNISTDataModule(L.LightningDataModule):
    """Fashion-MNIST from Kaggle-format CSVs, with a seeded stratified validation split."""

    # Defaults are DataConfig's (fmnist/config.py), the one place they are set.
    def __init__(self, dir: str = DataConfig.dir, val_size: int = DataConfig.val_size,
                 batch_size: int = DataConfig.batch_size, eval_batch_size: int = DataConfig.eval_batch_size,
                 normalize: bool = DataConfig.normalize, train_subset: int | None = DataConfig.train_subset,
                 on_device: bool = DataConfig.on_device, augment: dict | None = None, seed: int = 0):
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.augment = {**asdict(AugmentConfig()), **(augment or {})}
        self.splits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.mean, self.std = 0.0, 1.0

    def prepare_data(self) -> None:
        # Runs once per node before `setup`: parses the CSVs so that DDP ranks find the cache.
        self._load_csvs()

    def _load_csvs(self) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
        """(images, labels) of the training and the test CSV, read together: a refused test CSV leaves no cache
        of the training one."""
        train, test = load_csvs(find_csv(Path(self.hparams.dir), split) for split in ("train", "test"))
        return train, test

    def check(self) -> dict[str, int]:
        """Read both CSVs and check the split sizes against them: what `setup` would refuse, refused early.
        Return the images of each split (`train`, `val`, `test`)."""
        (_, labels), (_, test_labels) = self._load_csvs()
        train_idx, val_idx = self._split(labels)
        classes = np.unique(labels[train_idx])
        if len(classes) < NUM_CLASSES:  # it trains, but cannot learn the missing classes
            log.warning("the training split holds only class(es) %s of 0-%d: the model cannot learn the others",
                        classes.tolist(), NUM_CLASSES - 1)
        return {"train": len(train_idx), "val": len(val_idx), "test": len(test_labels)}

    def _split(self, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(train, val) indices of the training CSV's rows; ConfigError if the sizes do not fit it."""
        hp = self.hparams
        if not 1 <= hp.val_size < len(labels):
            raise ConfigError(f"config key data.val_size must be between 1 and {len(labels) - 1} "
                              f"(the training CSV has {len(labels)} rows); got {hp.val_size}.")
        train_idx, val_idx = stratified_split(labels, hp.val_size, hp.seed)
        if hp.train_subset is not None:
            if hp.train_subset > len(train_idx):
                raise ConfigError(f"config key data.train_subset must be at most {len(train_idx)} (training rows "
                                  f"left after the validation split); got {hp.train_subset}.")
            _, keep = stratified_split(labels[train_idx], hp.train_subset, hp.seed)
            train_idx = train_idx[keep]
        return train_idx, val_idx

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        hp = self.hparams
        (images, labels), (test_images, test_labels) = self._load_csvs()
        train_idx, val_idx = self._split(labels)
        device = self.trainer.strategy.root_device if (self.trainer is not None and hp.on_device) else "cpu"

        def to_tensors(x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
            return torch.from_numpy(x).unsqueeze(1).to(device), torch.from_numpy(y).to(device)

        self.splits = {"train": to_tensors(images[train_idx], labels[train_idx]),
                       "val": to_tensors(images[val_idx], labels[val_idx]),
                       "test": to_tensors(test_images, test_labels)}
        if hp.normalize:
            train = images[train_idx].astype(np.float64) / 255
            self.mean, self.std = float(train.mean()), float(train.std())

    def state_dict(self) -> dict:
        """Saved in every checkpoint: the standardisation a model was trained with, so that evaluation,
        prediction and export apply it without the training CSV (`setup` recomputes it on resume)."""
        return {"mean": self.mean, "std": self.std} if self.hparams.normalize else {}

    def _loader(self, split: str, shuffle: bool) -> InMemoryBatches:
        images, labels = self.splits[split]
        trainer = self.trainer
        return InMemoryBatches(images, labels, self.hparams.batch_size if shuffle else self.hparams.eval_batch_size,
                               shuffle=shuffle, seed=self.hparams.seed,
                               rank=trainer.global_rank if trainer else 0, world_size=trainer.world_size if trainer else 1,
                               alternate_flips=shuffle and self.augment["hflip"] and self.augment["flip_alternate"])

    def train_dataloader(self) -> InMemoryBatches:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> InMemoryBatches:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> InMemoryBatches:
        return self._loader("test", shuffle=False)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        images, labels = batch
        training = self.trainer is not None and self.trainer.training
        x = self._network_inputs(images, augmented=training)
        if training and self.augment["cutmix"] > 0:
            x, labels = cutmix(x, labels, self.augment["cutmix"])  # labels become (B, classes) probabilities
        # The images became floats only here, after Lightning cast a batch's floats for a `*-true` precision
        # (the weights are bf16, fp16 or fp64 there): cast them as it would have.
        return self.trainer.precision_plugin.convert_input((x, labels)) if self.trainer is not None else (x, labels)

    def _network_inputs(self, images: torch.Tensor, augmented: bool) -> torch.Tensor:
        """uint8 images as the network takes them: scaled to [0, 1], augmented if asked, then standardised."""
        a = self.augment
        # Alternating flips were applied by the batcher (fmnist/data/batches.py).
        augmented_as_asked = (lambda x: augment(x, flip=a["hflip"] and not a["flip_alternate"], max_shift=a["shift"],
                                                erase_p=a["erase"])) if augmented else None
        return network_input(images, self.hparams.normalize, self.mean, self.std, augmented_as_asked)

    def model_inputs(self, split: str, n: int) -> torch.Tensor:
        """The first `n` images of `split` (after `setup`) as the network sees them, without augmentation."""
        return self._network_inputs(self.splits[split][0][:n], augmented=False)
