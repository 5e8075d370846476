"""Shared fixtures: tiny Kaggle-format CSVs and configs composed the way `train.py` composes them."""

from __future__ import annotations

import atexit
import copy
import functools
import importlib.util
import logging
import os
import runpy
import shutil
import signal
import subprocess
import sys
import tempfile
import traceback
import warnings
from pathlib import Path

# One OpenMP thread per process unless the caller sets another count, before torch is imported (here and
# in every process a test starts): the tests train tiny models, which a second thread does not speed up,
# while two workers whose processes each keep two threads spinning on two cores lose a fifth of the
# suite's time on a busy machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Precision verdicts in a cache of this test process's own (inherited by the processes it starts): the
# machine's cached verdicts must not decide a test's precision, nor the tests' probes the user's runs. Each
# test then has a cache of its own (`precision_cache_per_test`).
os.environ["FMNIST_CACHE_DIR"] = tempfile.mkdtemp(prefix="fmnist-test-cache-")
atexit.register(shutil.rmtree, os.environ["FMNIST_CACHE_DIR"], ignore_errors=True)  # each test process's own

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from torch.utils._python_dispatch import TorchDispatchMode
from hydra.core.global_hydra import GlobalHydra

from fmnist.data.csv_io import write_csv
from fmnist.inference.config import register as register_inference
from fmnist.overrides import register

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
register()
register_inference()  # evaluate, predict and export schemas, for compose_named

# Small enough for a 1-batch CPU training in seconds. The CSV logger, not TensorBoard: drawing and encoding
# TensorBoard's figures (confusion matrix, misclassified images) is most of such a run's time. The tests of
# the trackers, and the README's commands, run the default TensorBoard logger. Evaluation batches of 32 as well:
# with the default (1000), the one validation and one test batch of preset=smoke hold every image of the tiny
# data's splits, and their forward passes cost more than the training steps.
FAST = ["preset=smoke", "data.val_size=100", "data.batch_size=32", "data.eval_batch_size=32", "logger=csv"]
# FAST as a sweep's job directories and summary settings name it: its values sorted, without the preset and the
# logger, which those names leave out.
FAST_NAMED = "data.batch_size=32,data.eval_batch_size=32,data.val_size=100"


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
    """Compose `conf/<name>.yaml` (train, evaluate, predict, export, tune) with overrides, as its entry point does.

    Each test gets its own copy; a composition asked for again (`model=simple` in many tests) is copied, not
    composed again: a composition costs a quarter of a second of CPU."""
    return copy.deepcopy(_composed(name, overrides))


@functools.lru_cache(maxsize=None)
def _composed(name: str, overrides: tuple[str, ...]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(name, overrides=list(overrides))


def compose_cfg(*overrides: str):
    return compose_named("train", *overrides)


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` by relative path, with its bytes: what "nothing changed" compares."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def build(name: str, **changes):
    """The architecture `name` as conf/model/<name>.yaml configures it, with `changes`."""
    from fmnist.models import build_model

    return build_model(**{**compose_cfg(f"model={name}").model, **changes})


@pytest.fixture(autouse=True)
def precision_cache_per_test(tmp_path_factory, monkeypatch):
    """An empty precision-verdicts cache for each test: a verdict that one test's probe measured (on a machine
    quiet at that moment) must not pick the precision of a later test in the same worker."""
    monkeypatch.setenv("FMNIST_CACHE_DIR", str(tmp_path_factory.mktemp("precision-cache")))


@pytest.fixture(autouse=True)
def signal_handlers_kept():
    """Ctrl-C and SIGTERM are handled after each test as before it: a handler that one test changes (Lightning
    ignores Ctrl-C while it shuts a stopped run down) must not outlive it, since the processes that later
    tests start inherit an ignored signal."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        if handler is not None and signal.getsignal(sig) is not handler:
            signal.signal(sig, handler)


@pytest.fixture
def make_cfg(data_dir):
    """Compose the training config with FAST settings, the tiny data, and extra overrides."""
    return lambda *overrides: compose_cfg(*FAST, f"data.dir={data_dir}", *overrides)


def import_script(name: str):
    """scripts/NAME.py as a module, to call its functions in the test's process."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # where its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def run_entry_point(script: str, *args: str, cwd: Path | None = None) -> int:
    """The entry point run as `python script args` would run it (as `__main__`, with that argv), but in this
    process; returns its exit code. Its output goes wherever this process's goes (`run_in_process` captures it).

    What the run changes in the process (logging handlers, warning filters, Hydra's global state, torch's
    thread count, the environment, the working directory) is put back afterwards.
    """
    root = logging.getLogger()
    handlers, level, threads = list(root.handlers), root.level, torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()  # trainer.deterministic=true sets it
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", [str(ROOT / script), *args])
        patch.setenv("HYDRA_FULL_ERROR", "0")  # entry points set it to 1
        patch.chdir(cwd or ROOT)
        try:
            with warnings.catch_warnings():
                runpy.run_path(str(ROOT / script), run_name="__main__")
        except SystemExit as e:
            return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except Exception:  # as Python ends a script that raises: the traceback on stderr, exit code 1
            traceback.print_exc()
            return 1
        finally:
            GlobalHydra.instance().clear()
            for handler in set(root.handlers) - set(handlers):
                handler.close()
            root.handlers[:], root.level = handlers, level
            torch.set_num_threads(threads)
            torch.use_deterministic_algorithms(deterministic)
    return 0


@pytest.fixture
def run_in_process(capfd):
    """`run(script, *args, cwd=None)`: `run_entry_point`, returning a CompletedProcess with its exit code and
    what it wrote to stdout and stderr."""
    def run(script: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
        capfd.readouterr()
        code = run_entry_point(script, *args, cwd=cwd)
        out, err = capfd.readouterr()
        return subprocess.CompletedProcess([script, *args], code, out, err)

    return run


def pytest_collection_modifyitems(items):
    """The README test, then the other slow tests, first: under `make test`'s workers (pytest-xdist, work
    stealing) the longest tests start early and the short ones fill in at the end, instead of a
    two-minute test starting last while the other worker has nothing left to do."""
    items.sort(key=lambda item: (item.path.name != "test_readme.py", item.get_closest_marker("slow") is None))


@pytest.fixture
def tmpfs(tmp_path):
    """Mount a tmpfs (as root); yield a function that mounts one with the given options."""
    mounted = []

    def mount(options: str) -> Path:
        point = tmp_path / f"mnt{len(mounted)}"
        point.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True).returncode:
            pytest.skip("needs root to mount a tmpfs")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        # Lazily: a file the test's process still holds open there (a traceback's frame, a library's handle) would
        # make a plain umount fail and leave the mount behind, under pytest's temporary directories, on every run.
        subprocess.run(["umount", "--lazy", str(point)], check=False)


class TensorOps(TorchDispatchMode):
    """Counts, while entered, the tensor operations dispatched, views apart (they launch nothing), and the reads of
    a tensor's value into Python (`.item()`, `bool(t)`), each of which syncs a GPU."""

    def __init__(self):
        super().__init__()
        self.ops, self.reads = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += not func.is_view
        self.reads += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))
