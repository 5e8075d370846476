"""Batches cut by index from tensors held in memory: no per-sample Dataset, no collate, no workers.

The whole split lives as one uint8 tensor (on the GPU when training there), so a batch costs one
indexing operation. Shuffling is a permutation seeded by (seed, epoch): reproducible, and the same
after resuming from a checkpoint. Under DDP each rank takes a disjoint share: an equal one in training
(the shuffled remainder dropped), every image in evaluation, split unevenly.
Alternating flips are applied here because they depend on which image a batch row is and on the
epoch, both of which only the batcher knows. `network_input` turns a batch into what a network takes,
for training, evaluation, inference and the exported model alike.
"""

from __future__ import annotations

import math
from typing import Callable

import torch


def network_input(images: torch.Tensor, normalize: bool, mean: float, std: float,
                  augment: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """uint8 pixels [N, 1, 28, 28] as every network here takes them: scaled to [0, 1], then augmented by
    `augment` (a training batch), then standardised with the training split's `mean` and `std` if `normalize`."""
    x = images.float() / 255
    if augment is not None:
        x = augment(x)
    return (x - mean) / std if normalize else x

# Random streams per seed (`_generator`), none shared with another seed: one per epoch's shuffle, and the last for
# the alternating flips, beyond any run's epoch count, so no shuffle shares its numbers.
STREAMS_PER_SEED = 100_003
FLIP_STREAM = STREAMS_PER_SEED - 1


class InMemoryBatches:
    """An iterable of (images uint8 [B, 1, 28, 28], labels int64 [B]) batches; Lightning accepts it as a dataloader."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, shuffle: bool,
                 seed: int = 0, rank: int = 0, world_size: int = 1, alternate_flips: bool = False):
        self.images, self.labels = images, labels
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        # Lightning calls `loader.sampler.set_epoch(epoch)` before every epoch; being our own sampler
        # lets each epoch get its own permutation. (`batch_sampler` is looked up next to it.)
        self.sampler, self.batch_sampler = self, None
        # Image i is mirrored in even epochs if flip_first[i], in odd epochs if not (None: no flips here).
        self.flip_first = None
        if alternate_flips:
            generator = self._generator(FLIP_STREAM)
            self.flip_first = (torch.rand(len(labels), generator=generator) < 0.5).to(labels.device)

    def _generator(self, stream: int) -> torch.Generator:
        """The random stream `stream` of this seed: the epoch's number for its shuffle, FLIP_STREAM for the flips."""
        return torch.Generator().manual_seed(self.seed * STREAMS_PER_SEED + stream)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def indices(self) -> torch.Tensor:
        """This rank's sample indices for the current epoch, in order."""
        n = len(self.labels)
        if self.shuffle:
            order = torch.randperm(n, generator=self._generator(self.epoch))
        else:
            order = torch.arange(n)
        if self.world_size > 1:
            # Training ranks must take equal steps (gradients are all-reduced each step), so the
            # shuffled remainder is dropped; evaluation keeps every sample, unevenly split.
            usable = (n // self.world_size) * self.world_size if self.shuffle else n
            order = order[self.rank:usable:self.world_size]
        return order.to(self.labels.device)

    def __iter__(self):
        order = self.indices()
        contiguous = not self.shuffle and self.world_size == 1
        for start in range(0, len(order), self.batch_size):
            if contiguous:  # slicing is a view: evaluation copies nothing
                yield self.images[start:start + self.batch_size], self.labels[start:start + self.batch_size]
            else:
                batch = order[start:start + self.batch_size]
                yield self._flipped(self.images[batch], batch), self.labels[batch]

    def _flipped(self, images: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        if self.flip_first is None:
            return images
        mirror = self.flip_first[batch] ^ bool(self.epoch % 2)
        return torch.where(mirror.view(-1, 1, 1, 1), images.flip(-1), images)

    def __len__(self) -> int:
        n = len(self.labels)
        per_rank = (n // self.world_size if self.shuffle else math.ceil((n - self.rank) / self.world_size))
        return math.ceil(per_rank / self.batch_size)
