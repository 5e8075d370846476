import shutil

import numpy as np
import pytest
import torch
from lightning.pytorch.plugins.precision import Precision

from fmnist.data.augment import augment, erase, hflip, shift
from fmnist.data.batches import InMemoryBatches
from fmnist.data.datamodule import FashionMNISTDataModule, stratified_split
from fmnist.errors import ConfigError, DataError
from tests.conftest import snapshot


def test_datamodule_shapes_scaling_and_split(data_dir):
    dm = FashionMNISTDataModule(dir=str(data_dir), val_size=100, batch_size=32, eval_batch_size=50)
    dm.setup("fit")
    assert len(dm.splits["train"][1]) == 500 and len(dm.splits["val"][1]) == 100 and len(dm.splits["test"][1]) == 200
    x, y = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
    assert x.shape == (32, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert 0.0 <= x.min() and x.max() <= 1.0 and x.max() > 0.5
    # stratified: 600 balanced rows -> 10 validation images per class
    assert torch.bincount(dm.splits["val"][1]).tolist() == [10] * 10


def test_split_is_seeded_disjoint_and_exact():
    labels = np.random.default_rng(0).integers(0, 10, 1234)
    rest, chosen = stratified_split(labels, 137, seed=5)
    assert len(chosen) == 137 and len(rest) == 1234 - 137 and not set(rest) & set(chosen)
    np.testing.assert_array_equal(chosen, stratified_split(labels, 137, seed=5)[1])
    assert not np.array_equal(chosen, stratified_split(labels, 137, seed=6)[1])
    expected = 137 * np.bincount(labels) / len(labels)
    assert np.all(np.abs(np.bincount(labels[chosen], minlength=10) - expected) < 1)


def test_train_subset_and_normalize(data_dir):
    dm = FashionMNISTDataModule(dir=str(data_dir), val_size=100, train_subset=50, normalize=True)
    dm.setup("fit")
    assert len(dm.splits["train"][1]) == 50 and torch.bincount(dm.splits["train"][1]).tolist() == [5] * 10
    x, _ = dm.on_after_batch_transfer(next(iter(dm.val_dataloader())), 0)
    assert abs(float(x.mean())) < 0.5 and dm.std > 0


@pytest.mark.parametrize("kwargs,key", [({"val_size": 600}, "data.val_size"), ({"train_subset": 501}, "data.train_subset")])
def test_impossible_sizes(data_dir, kwargs, key):
    dm = FashionMNISTDataModule(dir=str(data_dir), **{"val_size": 100, **kwargs})
    with pytest.raises(ConfigError, match=key):
        dm.setup("fit")


@pytest.mark.parametrize("step", ["prepare_data", "check", "setup"])
def test_a_refused_test_csv_leaves_no_parse_cache_of_the_training_one(tmp_path, data_dir, step):
    shutil.copy(data_dir / "fashion-mnist_train.csv", tmp_path)
    (tmp_path / "fashion-mnist_test.csv").write_text("label,pixel1\n1,2\n")
    before = snapshot(tmp_path)
    with pytest.raises(DataError, match="fashion-mnist_test.csv, line 1: expected a header"):
        getattr(FashionMNISTDataModule(dir=str(tmp_path), val_size=100), step)()
    assert snapshot(tmp_path) == before


def test_missing_data_dir(tmp_path):
    with pytest.raises(DataError, match="fashion-mnist_train.csv: file not found"):
        FashionMNISTDataModule(dir=str(tmp_path)).setup("fit")


def _epoch(loader, epoch):
    loader.set_epoch(epoch)
    return torch.cat([y for _, y in loader])


def test_shuffle_covers_every_index_once_and_is_seeded():
    labels = torch.arange(103)
    images = torch.zeros(103, 1, 28, 28, dtype=torch.uint8)
    loader = InMemoryBatches(images, labels, batch_size=10, shuffle=True, seed=1)
    assert len(loader) == 11
    first = _epoch(loader, 0)
    assert sorted(first.tolist()) == list(range(103))
    assert torch.equal(first, _epoch(InMemoryBatches(images, labels, 10, shuffle=True, seed=1), 0))
    assert not torch.equal(first, _epoch(loader, 1))
    assert not torch.equal(first, _epoch(InMemoryBatches(images, labels, 10, shuffle=True, seed=2), 0))


def _mirrored(loader, epoch, images, labels):
    """Which images (by index) the loader mirrored in `epoch`; checks rows are whole images, labels unchanged."""
    loader.set_epoch(epoch)
    order = loader.indices()
    batches = list(loader)
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    assert torch.equal(y, labels[order])
    flipped = (x == images[order].flip(-1)).flatten(1).all(1)
    assert torch.all(flipped | (x == images[order]).flatten(1).all(1))
    return torch.zeros(len(labels), dtype=torch.bool).index_put((order,), flipped)


def test_alternating_flips_show_each_image_both_ways_within_two_epochs():
    images = torch.randint(0, 256, (103, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(103) % 10

    def loader(seed, **kw):
        return InMemoryBatches(images, labels, 8, shuffle=True, seed=seed, **kw)

    alternating = loader(3, alternate_flips=True)
    even, odd = _mirrored(alternating, 0, images, labels), _mirrored(alternating, 1, images, labels)
    assert torch.all(even ^ odd) and 30 < int(even.sum()) < 73  # each image once each way; about half first
    assert torch.equal(_mirrored(alternating, 2, images, labels), even)  # and again (a resume lands here too)
    assert torch.equal(_mirrored(loader(3, alternate_flips=True), 0, images, labels), even)  # seeded
    assert not torch.equal(_mirrored(loader(4, alternate_flips=True), 0, images, labels), even)
    assert not _mirrored(loader(3), 0, images, labels).any()  # off by default: the datamodule's hflip flips


def test_alternating_flips_replace_the_random_ones_in_the_datamodule(data_dir):
    """With flip_alternate the batcher mirrors and the datamodule's augmentation does not mirror again."""
    dm = FashionMNISTDataModule(dir=str(data_dir), val_size=100, batch_size=64, seed=0,
                                augment={"hflip": True, "flip_alternate": True})
    dm.setup("fit")
    loader = dm.train_dataloader()
    images, labels = dm.splits["train"]
    mirrored = _mirrored(loader, 0, images, labels)
    assert 0 < int(mirrored.sum()) < len(labels)
    batch = next(iter(loader))
    dm.trainer = type("T", (), {"training": True, "precision_plugin": Precision()})()  # a training fit's, in fp32
    x, _ = dm.on_after_batch_transfer((batch[0], batch[1]), 0)
    assert torch.equal(x, batch[0].float() / 255)


@pytest.mark.slow
def test_a_trainer_gives_each_epoch_its_own_order(data_dir):
    """Through Lightning's public loop: the first batch differs between epochs (the loader learns the epoch)."""
    import lightning as L

    from fmnist.training.module import LitClassifier
    from tests.conftest import compose_cfg

    first_batches = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 0:
                first_batches.append(batch[1].clone())

    cfg = compose_cfg("model=simple")
    dm = FashionMNISTDataModule(dir=str(data_dir), val_size=100, batch_size=32)
    trainer = L.Trainer(accelerator="cpu", max_epochs=2, limit_train_batches=1, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[Record()])
    trainer.fit(LitClassifier(model=dict(cfg.model), optim=dict(cfg.optim)), datamodule=dm)
    assert len(first_batches) == 2 and not torch.equal(*first_batches)


def test_eval_order_and_ranks_are_disjoint():
    labels = torch.arange(103)
    images = torch.zeros(103, 1, 28, 28, dtype=torch.uint8)
    assert _epoch(InMemoryBatches(images, labels, 10, shuffle=False), 0).tolist() == list(range(103))
    train = [_epoch(InMemoryBatches(images, labels, 8, True, seed=0, rank=r, world_size=2), 3) for r in range(2)]
    assert len(train[0]) == len(train[1]) == 51 and not set(train[0].tolist()) & set(train[1].tolist())
    evals = [InMemoryBatches(images, labels, 8, False, rank=r, world_size=2) for r in range(2)]
    seen = torch.cat([_epoch(e, 0) for e in evals])
    assert sorted(seen.tolist()) == list(range(103)) and [len(e) for e in evals] == [7, 7]


def test_augmentations_keep_shape_and_change_pixels():
    torch.manual_seed(0)
    x = torch.rand(64, 1, 28, 28)
    for out in (hflip(x), shift(x, 2), erase(x, 1.0), augment(x, flip=True, max_shift=2, erase_p=0.5)):
        assert out.shape == x.shape and out.dtype == x.dtype
    flipped = hflip(x)
    same = (flipped == x).flatten(1).all(1)
    assert torch.all(same | (flipped == x.flip(-1)).flatten(1).all(1)) and 10 < int(same.sum()) < 54
    shifted = shift(x, 3)
    assert not torch.equal(shifted, x) and float(shifted.max()) <= 1.0
    # a shifted image is a translated copy: its nonzero pixels all come from the original
    assert (shifted.flatten(1).sum(1) <= x.flatten(1).sum(1) + 1e-4).all()
    assert torch.equal(shift(x, 0), x)
    erased = erase(x, 1.0)
    zeros = (erased == 0).flatten(1).sum(1)
    assert torch.all(zeros >= 16) and torch.all(zeros <= 14 * 14)
    assert torch.equal(erase(x, 0.0), x)
