"""Shared fixtures: tiny Kaggle-format CSVs and configs composed the way `train.py` composes them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from fmnist.config import register
from fmnist.inference.config import register as register_inference
from fmnist.data.csv_io import write_csv

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
register()
register_inference()  # evaluate, predict and export schemas, for compose_named

# Small enough for a 1-batch CPU training in seconds.
FAST = ["preset=smoke", "data.val_size=100", "data.batch_size=32"]


def make_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Balanced labels and images whose brightness depends on the class (so there is something to learn)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    rng.shuffle(labels)
    images = rng.integers(0, 60, (n, 28, 28)) + labels[:, None, None] * 19
    return images.astype(np.uint8), labels


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """A directory with a 600-row training CSV and a 200-row test CSV."""
    d = tmp_path_factory.mktemp("data")
    write_csv(d / "fashion-mnist_train.csv", *make_images(600, 0))
    write_csv(d / "fashion-mnist_test.csv", *make_images(200, 1))
    return d


def compose_named(name: str, *overrides: str):
    """Compose `conf/<name>.yaml` (train, evaluate, predict, export, tune) with overrides, as its entry point does."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(name, overrides=list(overrides))


def compose_cfg(*overrides: str):
    return compose_named("train", *overrides)


@pytest.fixture
def make_cfg(data_dir):
    """Compose the training config with FAST settings, the tiny data, and extra overrides."""
    return lambda *overrides: compose_cfg(*FAST, f"data.dir={data_dir}", *overrides)
