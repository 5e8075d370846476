"""Find a checkpoint (a file, a run directory or a sweep directory) and rebuild its model from it alone.

The architecture and the preprocessing come from the checkpoint's own hyperparameters (`model.*`
and the datamodule's `normalize`, with the training mean/std it stored), so no `model=...` needs
repeating. Every load goes through `load_checkpoint`, i.e. `torch.load(weights_only=True)`.

The model is rebuilt as the bare network (fmnist.models), not as the Lightning module that trained
it: evaluate, predict and export never import Lightning, which would double their start-up time.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fmnist import NUM_CLASSES
from fmnist.config import (ADDED_KEYS, EVAL_BATCH_SIZE, RUN_OPTIONS, TTA_MODES, DataConfig, TrainConfig, is_count,
                           is_finite_number, is_text_keyed)
from fmnist.data.batches import network_input
from fmnist.data.csv_io import csv_digest
from fmnist.data.sources import CSV_NAMES, find_csv
from fmnist.errors import CheckpointError, ConfigError, DataError
from fmnist.fsio import file_digest, load_checkpoint, not_a_file, some_names
from fmnist.inference.config import CKPT_FORMS
from fmnist.models import (MODELS, NON_FINITE_WHY, build_model, check_model, memory_format_input, non_finite, tta_logits,
                           weights_error, with_defaults)
from fmnist.runs import (BEST_CHECKPOINT_PREFIX, CHECKPOINT_DIR, COMPLETED, CONFIG_FILE, LAST_CHECKPOINT, NET_PREFIX,
                         best_checkpoint_order, collect, read_confusion_matrix, read_record, status_note)

log = logging.getLogger(__name__)

WHAT_CKPT_IS = f"expected {CKPT_FORMS}"
# The model shipped with the repository (`ckpt=pretrained`): scripts/ship_model.py writes it, with its card.
PRETRAINED_DIR = Path(__file__).resolve().parents[2] / "pretrained"
PRETRAINED = PRETRAINED_DIR / "speedrun_cpu.ckpt"
# Where a checkpoint holds the datamodule's state (the training mean/std): Lightning files it under the
# class name, fmnist.data.datamodule.FashionMNISTDataModule.__qualname__.
DATAMODULE_STATE_KEY = "FashionMNISTDataModule"


@dataclass
class Resolved:
    """Which checkpoint a `ckpt=` value names, and the run (and sweep job) it belongs to."""

    path: Path
    run_dir: Path | None = None
    note: str = ""  # how a sweep's job was chosen, for the user


def given_as(ckpt: str | Path, key: str) -> str:
    """`ckpt` as a command line gives it: `ckpt=VALUE` for the key `ckpt`, `--ckpt VALUE` for an option."""
    return f"{key} {ckpt}" if key.startswith("-") else f"{key}={ckpt}"


def best_in_run(run_dir: Path, suggest_last: bool = True, key: str = "ckpt", warn: bool = True) -> Path:
    """The run's best-on-validation checkpoint (`checkpoints/best-epochNNN.ckpt`). `suggest_last`: where there is
    none, the error suggests its last one as the value of `key` (for a command that takes a checkpoint). `warn`:
    whether to say which of several best files is used (said once, where the checkpoint is chosen)."""
    best = sorted((run_dir / CHECKPOINT_DIR).glob(f"{BEST_CHECKPOINT_PREFIX}*.ckpt"), key=best_checkpoint_order)
    if not best:
        last = run_dir / CHECKPOINT_DIR / LAST_CHECKPOINT
        hint = f"; pass {given_as(last, key)} to use its last checkpoint" if last.exists() and suggest_last else ""
        raise CheckpointError(f"{run_dir}: run directory without a best checkpoint "
                              f"({CHECKPOINT_DIR}/{BEST_CHECKPOINT_PREFIX}*.ckpt){hint}.")
    if len(best) > 1 and warn:  # only one is kept; a later file beat the earlier ones on validation accuracy
        log.warning("%s holds %d best checkpoints: using the latest, %s", run_dir, len(best), best[-1].name)
    return best[-1]


def resolve(ckpt: str | Path, key: str = "ckpt") -> Resolved:
    """Turn `ckpt=` into a checkpoint file: itself, a run's best one, a sweep's best job's best one, or the shipped one.
    `key`: what the messages call it, the config key `ckpt` or a command's option (`--ckpt`)."""
    given = given_as(ckpt, key)
    if str(ckpt) == "pretrained":
        if not PRETRAINED.is_file():
            raise CheckpointError(f"{given}: {PRETRAINED} is missing; it ships with the repository (a git "
                                  "checkout has it), or make one with scripts/ship_model.py RUN_DIR.")
        note = f"the shipped model ({PRETRAINED.with_suffix('.md')})"
        log.info("%s: %s", given, note)
        return Resolved(PRETRAINED, note=note)
    if not str(ckpt).strip():  # Path('') is the current directory: refused as empty, not searched for runs
        raise CheckpointError(f"{given_as('', key).strip()} is empty; {WHAT_CKPT_IS}.")
    path = Path(ckpt).expanduser()
    if path.is_file():
        run_dir = path.parent.parent if path.parent.name == CHECKPOINT_DIR else None
        return Resolved(path, run_dir if run_dir and (run_dir / CONFIG_FILE).exists() else None)
    if not path.is_dir():
        raise CheckpointError(f"{given}: {not_a_file(path, missing='no such file or directory')}; {WHAT_CKPT_IS}.")
    record = read_record(path)
    if (path / CHECKPOINT_DIR).is_dir():
        best = best_in_run(path, key=key)
        if (record or {}).get("status") not in (None, COMPLETED):  # e.g. still training: its best may yet change
            log.warning("%s: the run's status is %s, not completed: using its best checkpoint so far, %s", path,
                        status_note(record), best.name)
        return Resolved(best, path)
    if record is not None and record.get("status"):  # a run that ended before its first checkpoint
        raise CheckpointError(f"{given}: a run directory without checkpoints (the run is {record.get('status')!r}: "
                              f"it ended before saving one); {WHAT_CKPT_IS}.")
    jobs = collect(path)
    done = jobs[(jobs.status == COMPLETED) & jobs.val_acc_best.notna()] if len(jobs) else jobs
    files = sorted(p.name for p in path.glob("*.ckpt") if p.is_file())
    if done.empty and files and not len(jobs):  # a run's checkpoints/ folder, or pretrained/
        raise CheckpointError(f"{given}: a directory of checkpoint files ({some_names(files)}), not of runs; name one "
                              f"of them ({given_as(path / files[0], key)}), or a run's directory for its best one.")
    if done.empty:
        entries = sorted(p.name for p in path.iterdir())
        found = (f"{len(jobs)} job directories, none completed with a validation accuracy" if len(jobs) else
                 f"no checkpoint, run or job ({some_names(entries)})" if entries else "nothing")
        raise CheckpointError(f"{given}: a directory holding {found}; {WHAT_CKPT_IS}.")
    data = done.train_sha1.dropna()  # a run's validation split is drawn from its training CSV
    if data.nunique() > 1:  # (seeds draw other splits of one data set, which a sweep's choice accepts)
        first, other = data.index[0], data[data != data.iloc[0]].index[0]
        raise CheckpointError(f"{given}: its completed runs trained on different CSVs ({done.job[first]}: training CSV "
                              f"SHA-1 {data[first]}, {done.job[other]}: {data[other]}): runs of two data sets, whose "
                              f"validation accuracies do not rank them; nothing was chosen. Give one run's directory, "
                              f"or a directory of runs on one data set.")
    best = done.loc[pd.to_numeric(done.val_acc_best).idxmax()]  # first of equals, in job-name order
    run_dir = path / best.job
    note = f"best of {len(done)} completed jobs by validation accuracy: {best.job} (val/acc_best {best.val_acc_best:.4f})"
    log.info("%s: %s", path, note)
    return Resolved(best_in_run(run_dir, key=key), run_dir, note)


def net_state(state_dict: dict) -> dict:
    """The network's weights in a checkpoint's `state_dict` (the LightningModule's: `net.*` and its metrics' state)."""
    return {k[len(NET_PREFIX):]: v for k, v in state_dict.items() if k.startswith(NET_PREFIX)}


@dataclass
class LoadedModel:
    """A trained classifier in eval mode with the preprocessing it was trained with."""

    net: torch.nn.Module
    path: Path
    sha256: str
    model: dict  # the checkpoint's `model` hyperparameters
    data: dict  # the checkpoint's datamodule hyperparameters (dir, normalize, eval_batch_size, ...)
    mean: float = 0.0
    std: float = 1.0
    run_dir: Path | None = None
    note: str = ""
    raw_weights: dict | None = None  # `current_model_state`: the unaveraged weights of a run trained with EMA
    tta: str = TrainConfig.tta  # the test-time augmentation the run validated and tested with
    channels_last: bool = TrainConfig.channels_last  # inputs in the memory order the run computed in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The network on a preprocessed batch, as the run computed it (fmnist.training.module.LitClassifier.forward)."""
        return self.net(memory_format_input(x, self.channels_last))

    @property
    def eval_batch_size(self) -> int:
        """The batch size the run evaluated with (checked by `load_model`): the same batches give the same numbers."""
        return self.data.get("eval_batch_size", EVAL_BATCH_SIZE)

    @property
    def normalize(self) -> bool:
        return bool(self.data.get("normalize", False))

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 pixels [N, 1, 28, 28] -> the model's input, as the datamodule computes it (`network_input`)."""
        return network_input(images, self.normalize, self.mean, self.std)

    @torch.inference_mode()
    def logits(self, images: torch.Tensor, tta: str = "none") -> torch.Tensor:
        """Logits [N, 10] of uint8 images [N, 1, 28, 28] under test-time augmentation `tta` (fmnist.models.tta_logits)."""
        return tta_logits(self.forward, self.preprocess(images), tta)

    def logits_batched(self, images: np.ndarray | torch.Tensor, batch_size: int, tta: str = "none") -> torch.Tensor:
        """`logits` of uint8 images [N, 28, 28] or [N, 1, 28, 28], `batch_size` at a time."""
        images = torch.as_tensor(images)
        images = images.unsqueeze(1) if images.dim() == 3 else images
        return torch.cat([self.logits(images[i:i + batch_size], tta) for i in range(0, len(images), batch_size)]) \
            if len(images) else torch.empty(0, NUM_CLASSES)

    def test_csv(self, data_dir: str | None, key: str = "data.dir") -> Path:
        """The test CSV of `data_dir`, or of the directory the model was trained on. `key`: how the command takes
        `data_dir` (a config key, or an option such as `--data-dir`), as its messages name it."""
        directory = data_dir if data_dir is not None else self.data.get("dir")
        if directory is None:
            raise DataError(f"{self.path}: the checkpoint does not say which data it was trained on; pass "
                            f"{given_as('DIR', key)}.")
        path = find_csv(directory, "test")
        if not path.exists():
            how = f"the directory given by {key}" if data_dir is not None else \
                "the checkpoint's training data directory"
            raise DataError(f"{path}: test CSV not found in {how}. Pass {given_as('DIR', key)} naming a directory that "
                            f"holds {CSV_NAMES['test']} (Kaggle format).")
        return path


def _standardisation(path: Path, ckpt: dict, data: dict) -> tuple[float, float]:
    """The training mean/std of a `data.normalize=true` model: stored in the checkpoint, else recomputed."""
    stored = ckpt.get(DATAMODULE_STATE_KEY) or {}
    if "mean" in stored and "std" in stored:
        return float(stored["mean"]), float(stored["std"])
    # Checkpoints written before the datamodule stored them: the same split of the same CSV gives them back.
    train_csv = find_csv(Path(data.get("dir") or DataConfig.dir), "train")
    if not train_csv.exists():
        raise DataError(f"{path}: the model standardises its inputs with its training set's mean and std, which this "
                        f"older checkpoint does not hold, and its training CSV {train_csv} is not there to recompute "
                        "them. Run from the directory it was trained in.")
    dm = training_datamodule(data)
    return dm.mean, dm.std


# The datamodule hyperparameters that decide a run's train/validation split and its standardisation.
SPLIT_KEYS = ("dir", "val_size", "normalize", "train_subset", "seed")


def training_datamodule(data: dict, data_dir: str | Path | None = None):
    """The datamodule a checkpoint was trained with (`data`: its stored hyperparameters), set up on the CPU:
    the same split of the same CSV, read from `data_dir` if given."""
    # Imported here: only the validation split and old checkpoints need it, and it imports Lightning.
    from fmnist.data.datamodule import FashionMNISTDataModule

    kwargs = {k: v for k, v in data.items() if k in SPLIT_KEYS}
    if data_dir is not None:
        kwargs["dir"] = str(data_dir)
    dm = FashionMNISTDataModule(**kwargs)
    dm.setup("fit")
    return dm


def _checked_fields(path: Path, payload: dict) -> tuple[dict, dict]:
    """(hyperparameters, datamodule hyperparameters) of a checkpoint train.py wrote, with every field that
    loading reads checked for its type, so that a damaged or foreign file is one CheckpointError, not a crash."""
    hp = payload.get("hyper_parameters")
    model = hp.get("model") if isinstance(hp, dict) else None
    state = payload.get("state_dict")
    if not isinstance(model, dict) or not isinstance(model.get("name"), str) or model["name"] not in MODELS \
            or not isinstance(state, dict):
        raise CheckpointError(f"{path}: not an fmnist checkpoint: expected `hyper_parameters.model.name` (one of "
                              f"{sorted(MODELS)}) and a `state_dict`, as train.py writes them.")
    data = payload.get("datamodule_hyper_parameters", {})
    stored = payload.get(DATAMODULE_STATE_KEY, {})
    raw = payload.get("current_model_state", {})
    fields = data if isinstance(data, dict) else {}
    dm = "datamodule_hyper_parameters"
    problems = [
        (not is_text_keyed(state), "`state_dict` with text keys (parameter names)"),
        (not is_text_keyed(raw), "`current_model_state` (the weights before averaging) with text keys"),
        (not isinstance(data, dict), f"`{dm}` as a mapping"),
        (not is_count(fields.get("eval_batch_size", EVAL_BATCH_SIZE), at_least=1),
         f"`{dm}.eval_batch_size` as a positive integer (got {fields.get('eval_batch_size')!r})"),
        # What rebuilds the run's split and standardisation (`training_datamodule`, SPLIT_KEYS).
        (fields.get("dir") is not None and not isinstance(fields["dir"], str), f"`{dm}.dir` as a path"),
        (not isinstance(fields.get("normalize", False), bool), f"`{dm}.normalize` as true or false"),
        (not is_count(fields.get("val_size", 1), at_least=1), f"`{dm}.val_size` as a positive integer"),
        (fields.get("train_subset") is not None and not is_count(fields["train_subset"], at_least=1),
         f"`{dm}.train_subset` as null or a positive integer"),
        (not is_count(fields.get("seed", 0)), f"`{dm}.seed` as a non-negative integer"),
        (not isinstance(stored, dict) or not all(is_finite_number(stored.get(k, 0.0)) for k in ("mean", "std")),
         f"`{DATAMODULE_STATE_KEY}` as a mapping whose `mean` and `std` are finite numbers"),
    ]
    wrong = [what for bad, what in problems if bad]
    if wrong:
        raise CheckpointError(f"{path}: a damaged or foreign checkpoint: expected {'; '.join(wrong)}, as train.py "
                              "writes them.")
    return hp, dict(data)


def load_model(ckpt: str | Path, key: str = "ckpt") -> LoadedModel:
    """Resolve `ckpt` (given as `key`: see `resolve`) and rebuild its model (eval mode, CPU, no torch.compile) from
    the checkpoint alone."""
    resolved = resolve(ckpt, key)
    path = resolved.path
    payload = load_checkpoint(path)
    hp, data = _checked_fields(path, payload)
    model = hp["model"]
    # Checkpoints written before the run options left `model` hold them there.
    # And those written before a model key existed lack it (`_checked_fields` checked the name).
    model = with_defaults({k: v for k, v in model.items() if k not in RUN_OPTIONS})
    options = {k: hp[k] if k in hp else hp["model"][k] for k in RUN_OPTIONS if k in hp or k in hp["model"]}
    channels_last = options.get("channels_last", TrainConfig.channels_last)
    tta = options.get("tta", ADDED_KEYS["tta"])
    if not isinstance(channels_last, bool):  # bool("no") would be True
        raise CheckpointError(f"{path}: its hyperparameter channels_last is {channels_last!r}, not true or "
                              "false: not a checkpoint train.py wrote.")
    if not isinstance(tta, str) or tta not in TTA_MODES:
        raise CheckpointError(f"{path}: its hyperparameter tta is {tta!r}, not one of {TTA_MODES}: "
                              "not a checkpoint train.py wrote.")
    try:
        check_model(model)  # as train.py checks a config: the constructor takes a NaN dropout
        net = build_model(**model)
        net = net.to(memory_format=torch.channels_last) if channels_last else net
        net.load_state_dict(net_state(payload["state_dict"]))
    except ConfigError as e:  # worded for a command line; here the values are the file's
        raise CheckpointError(f"{path}: its hyperparameters (hyper_parameters.model) describe no model this code "
                              f"builds: {e} Not a checkpoint train.py wrote, or one edited since.") from e
    except (RuntimeError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: its weights do not fit the architecture its hyperparameters describe "
                              f"({model}): {weights_error(e)}") from e
    net.eval()
    check_finite(net, path)
    loaded = LoadedModel(net, path, file_digest(path, "sha256"), dict(model), data, run_dir=resolved.run_dir,
                         note=resolved.note, raw_weights=payload.get("current_model_state"),
                         tta=tta, channels_last=channels_last)
    if loaded.normalize:
        loaded.mean, loaded.std = _standardisation(path, payload, data)
        if not (math.isfinite(loaded.mean) and math.isfinite(loaded.std) and loaded.std > 0):
            raise CheckpointError(f"{path}: its input standardisation (mean {loaded.mean}, std {loaded.std}) needs a "
                                  "finite mean and a positive std.")
    return loaded


def run_test_acc(record: dict | None) -> float | None:
    """The test accuracy a run recorded (`record`: its `read_record`), if any."""
    metrics = (record or {}).get("metrics")
    value = metrics.get("test/acc") if isinstance(metrics, dict) else None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None  # else unknown


def run_tested_on(record: dict | None, csv: Path) -> bool | None:
    """Whether a run's own test/acc was measured on the CSV `csv` (`record`: its `read_record`, whose
    `data_digest` says), None if unknown."""
    digest = (record or {}).get("data_digest")
    recorded = digest.get("test") if isinstance(digest, dict) else None
    return None if not isinstance(recorded, str) else recorded == csv_digest(csv)


def check_finite(net: torch.nn.Module, path: Path, which: str = "weights") -> None:
    """CheckpointError naming `path` if the weights loaded into `net` (its `which`: weights, raw weights) hold NaN or
    infinite values."""
    broken = non_finite(net)
    if broken:
        raise CheckpointError(f"{path}: its {which} hold NaN or infinite values ({len(broken)} tensors, e.g. "
                              f"net.{broken[0]}): {NON_FINITE_WHY}; nothing can be computed with it.")


def run_test_images(run_dir: Path | None) -> int | None:
    """How many test images the run's own test/acc counted (its confusion matrix's total: fewer than the test
    set's after `trainer.limit_test_batches`), or None if its confusion matrix is missing or damaged."""
    try:
        cm = read_confusion_matrix(run_dir) if run_dir else None
    except ConfigError:
        return None
    return None if cm is None else int(cm.sum())


