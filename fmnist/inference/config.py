"""Typed schemas of `conf/evaluate.yaml`, `conf/predict.yaml` and `conf/export.yaml`.

Registered in Hydra's ConfigStore like the training schema (`fmnist/config.py`): a typo'd key or a
wrong-typed value fails while Hydra composes the config; `check_*` reject well-typed nonsense.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from fmnist import NUM_CLASSES
from fmnist.config import CONF_DIR, TTA_MODES, TrainConfig, check_keys
from fmnist.errors import ConfigError
from fmnist.overrides import OTHER_COMMANDS_GROUPS, override_key, register_resolvers
from fmnist.runs import BEST_CHECKPOINT_PREFIX, CHECKPOINT_DIR

# What `ckpt=` takes, as every message about it says it.
CKPT_FORMS = (f"a .ckpt file, a run directory (holding {CHECKPOINT_DIR}/{BEST_CHECKPOINT_PREFIX}*.ckpt), a sweep "
              "directory (holding job directories with metrics.json) or `pretrained`")


@dataclass
class InferenceDataConfig:
    dir: Optional[str] = None  # directory holding fashion-mnist_test.csv; null: the one the model was trained on
    # null: evaluate.py uses the run's data.eval_batch_size (the batches of its own test: the same numbers), the
    # export's self-check fmnist.config.EVAL_BATCH_SIZE
    batch_size: Optional[int] = None


@dataclass
class EvaluateConfig:
    # a .ckpt file, a run directory (its best checkpoint), a sweep directory (its best job by validation accuracy)
    # or `pretrained` (the shipped model)
    ckpt: str = MISSING
    data: InferenceDataConfig = field(default_factory=InferenceDataConfig)
    # none | flip | flip_shift (fmnist.models.tta_logits); null: as the run validated and tested (its tta)
    tta: Optional[str] = None


@dataclass
class PredictConfig:
    ckpt: str = MISSING  # as for evaluate.py
    # image files (PNG/JPEG/BMP), directories of them, Kaggle-format CSVs (label optional): a path or a list
    inputs: Any = MISSING
    top_k: int = 3  # classes (with probabilities) per input
    out: Optional[str] = None  # FILE.csv or FILE.json for every row; null: print the table only
    overwrite: bool = False  # replace `out` if it exists (only a file predict.py wrote)
    batch_size: int = 256  # images per forward pass


@dataclass
class ExportConfig:
    ckpt: str = MISSING  # as for evaluate.py
    out: str = "outputs/model.onnx"  # one self-contained file: input `images` uint8 [N,1,28,28], output `logits` [N,10]
    overwrite: bool = False  # replace `out` if it exists (only a file export.py wrote)
    data: InferenceDataConfig = field(default_factory=InferenceDataConfig)  # the test set of the self-check


def training_key_message(error: BaseException, args: list[str], entry: str) -> str | None:
    """The paragraph for evaluate.py, predict.py or export.py given a key or config group that only training takes
    (`model=simple`, `optim.lr=0.01`, `seed=1`), or None for another error: Hydra's own words would send the user
    to `+model=simple`, which fails differently. A key one of these commands takes (`data.dir`) keeps Hydra's."""
    text = "\n".join([str(error), str(error.__cause__ or "")])
    taken = {f.name for schema in (EvaluateConfig, PredictConfig, ExportConfig) for f in fields(schema)}
    groups = {p.name for p in CONF_DIR.iterdir() if p.is_dir()} - set(OTHER_COMMANDS_GROUPS)
    training = ({f.name for f in fields(TrainConfig)} | groups) - taken
    for arg in args:
        key = override_key(arg)
        top = re.split(r"[./]", key)[0]
        # Hydra's two ways of saying that this command's config has no such key or group
        refused = (f"Key '{top}' not in '" in text
                   or f"Could not override '{top}'. No match in the defaults list" in text)
        if top in training and refused:
            return (f"{entry} takes no `{key}`: it is set when training (python train.py {arg.lstrip('+')}), and "
                    f"{entry} uses the model as its run trained it (ckpt=...). `python {entry} --help` lists what "
                    "it takes.")
    return None


def register() -> None:
    """Put the evaluate, predict and export schemas in Hydra's ConfigStore (their YAML files pick them)."""
    register_resolvers()
    cs = ConfigStore.instance()
    cs.store(name="evaluate_schema", node=EvaluateConfig)
    cs.store(name="predict_schema", node=PredictConfig)
    cs.store(name="export_schema", node=ExportConfig)


def require(cfg: DictConfig, *keys: str) -> None:
    """ConfigError for a mandatory key left unset (`???`), with what it takes."""
    what = {"ckpt": f"{CKPT_FORMS} (ckpt=PATH)",
            "inputs": "image files, directories of them or CSVs (inputs=[a.png,photos/])"}
    for key in keys:
        if OmegaConf.is_missing(cfg, key):
            raise ConfigError(f"config key {key} is required: {what.get(key, 'a value')}.")


def check_evaluate(cfg: DictConfig) -> None:
    """ConfigError naming the key for an evaluate config that makes no sense (export's shares these keys)."""
    require(cfg, "ckpt")
    check_keys(cfg, (("tta", cfg.get("tta") is None or cfg.tta in TTA_MODES, f"null (the run's own) or one of {TTA_MODES}"),
                     ("data.batch_size", cfg.data.batch_size is None or cfg.data.batch_size >= 1, "null or at least 1")))


def check_predict(cfg: DictConfig) -> list[str]:
    """Validate a predict config; return its inputs as a list of paths."""
    require(cfg, "ckpt", "inputs")
    inputs = OmegaConf.to_container(cfg, resolve=True)["inputs"]
    inputs = [inputs] if isinstance(inputs, (str, int, float)) else inputs
    paths = isinstance(inputs, list) and inputs and not any(isinstance(i, (dict, list)) or i is None for i in inputs)
    check_keys(cfg, (("inputs", paths, "a path or a non-empty list of paths (inputs=[a.png,photos/,more.csv])"),
                     ("inputs", paths and all(str(i).strip() for i in inputs), "paths that are not empty (`.` for this "
                                                                                "directory)"),
                     ("top_k", 1 <= cfg.top_k <= NUM_CLASSES, f"between 1 and {NUM_CLASSES}"),
                     ("batch_size", cfg.batch_size >= 1, "at least 1"),
                     ("out", cfg.out is None or _suffix(cfg.out) in (".csv", ".json"),
                      "null or a file name ending in .csv or .json, with a name before it (out=predictions.csv)")))
    return [str(i) for i in inputs]


def check_export(cfg: DictConfig) -> None:
    """ConfigError naming the key for an export config that makes no sense."""
    check_evaluate(cfg)
    check_keys(cfg, (("out", _suffix(cfg.out) == ".onnx", "a file name ending in .onnx, with a name before it"),))


def _suffix(out) -> str:
    """The suffix that decides what `out` is written as; none for `.csv` alone, which names a hidden file."""
    return Path(str(out)).suffix.lower()
