"""Typed schema of the Hydra config, and the range checks that types cannot express.

The dataclasses hold every default, once, except the architectures' (conf/model/<name>.yaml: what
a Hydra user opens to see a model, typed by its constructor: `fmnist.models.check_model`); they are
registered in Hydra's ConfigStore (`fmnist.overrides.register`), and the other YAML files in `conf/` carry only
what differs from them. A typo'd key or a wrong-typed value (`optim.lr=abc`) fails while Hydra composes the
config, with the key's full name; `check_values` then rejects values that are well-typed but meaningless.
The lists of keys with a role (`PLACEMENT_KEYS`, `RESUMABLE_KEYS`, `RENAMED_KEYS`, `ADDED_KEYS`) are here too;
how a run is named from its overrides is `fmnist/overrides.py`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, OmegaConf

from fmnist.errors import ConfigError

# Images per forward pass when validating, testing, evaluating or exporting (no gradients: larger than training).
EVAL_BATCH_SIZE = 1000


@dataclass
class AugmentConfig:
    hflip: bool = False  # random horizontal flip (labels survive it; vertical flips would not)
    # With hflip: each image mirrored in every other epoch (a seeded half of them in even epochs, the
    # other half in odd ones) instead of by a coin per epoch: airbench's alternating flip, which
    # shows every image both ways within any two epochs.
    flip_alternate: bool = False
    shift: int = 0  # random translation by up to this many pixels, zero-padded
    erase: float = 0.0  # probability of erasing a random rectangle of each image
    # Probability of pasting a random rectangle of another training image into each one (CutMix); the
    # target then mixes the two labels by area (fmnist/data/augment.py:cutmix).
    cutmix: float = 0.0


@dataclass
class DataConfig:
    dir: str = "data"
    val_size: int = 5000
    batch_size: int = 256
    eval_batch_size: int = EVAL_BATCH_SIZE
    normalize: bool = False  # standardise with the training mean/std instead of plain [0, 1]
    train_subset: Optional[int] = None  # a stratified subset of the training split, for CPU-sized runs
    on_device: bool = True  # keep the whole dataset on the training device (no copy per step)
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class OptimConfig:
    name: str = "adam"  # adam | adamw | sgd | muon (fmnist/training/muon.py)
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9  # sgd and muon (its filters' momentum)
    nesterov: bool = False  # sgd and muon
    scheduler: str = "none"  # none | cosine | linear (both per step, after `warmup_epochs`)
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    # Exponential moving average of the weights (and batch-norm statistics), updated every step with
    # this decay; validation, checkpoints and the test use the averaged weights. 0: off.
    ema_decay: float = 0.0
    # Biases (batch-norm shifts and the classifier's) train at this multiple of `lr`, with `weight_decay`
    # divided by it so that their decoupled decay per step is unchanged: airbench's BatchNorm-bias rate.
    bias_lr_scale: float = 1.0
    # Lookahead (Zhang et al., 2019; airbench): every `lookahead_steps` optimizer steps, slow weights move
    # `lookahead_alpha` of the way to the trained ones and training restarts from them. 0: off.
    lookahead_steps: int = 0
    lookahead_alpha: float = 0.5


@dataclass
class TrainerConfig:
    """The subset of `lightning.Trainer` keyword arguments this project passes through."""

    accelerator: str = "auto"
    devices: Any = "auto"
    strategy: str = "auto"
    num_nodes: int = 1
    precision: Any = "auto"  # auto: measured on this machine (fmnist/training/precision.py); or any Lightning precision
    max_epochs: int = 20
    max_time: Optional[str] = None
    limit_train_batches: Any = None
    limit_val_batches: Any = None
    limit_test_batches: Any = None
    fast_dev_run: Any = False
    deterministic: Any = None
    benchmark: Optional[bool] = None
    gradient_clip_val: Optional[float] = None
    accumulate_grad_batches: int = 1
    check_val_every_n_epoch: int = 1
    num_sanity_val_steps: int = 2
    log_every_n_steps: int = 50
    enable_progress_bar: bool = True
    enable_model_summary: bool = True


# The trackers a run can log to (logger.backends; what each receives: fmnist/training/trackers.py), each with its name
# as printed and the package it needs beyond a base install (the extra of the same name installs it), or None.
TRACKERS = {"tensorboard": ("TensorBoard", None), "csv": ("CSV", None), "mlflow": ("MLflow", "mlflow"),
            "wandb": ("W&B", "wandb")}


@dataclass
class LoggerConfig:
    """Where the run's metrics go besides its run directory (conf/logger/*.yaml: tensorboard, csv, mlflow, wandb, many)."""

    backends: list[str] = field(default_factory=lambda: ["tensorboard"])  # any of TRACKERS, several at once
    # An MLflow tracking server (`http://host:5000`) or store (`sqlite:///path.db`); null: a local store,
    # outputs/mlflow.db with the artifacts in outputs/mlruns/. The experiment is named after the sweep.
    mlflow_tracking_uri: Optional[str] = None
    wandb_project: str = "fmnist"
    wandb_mode: str = "offline"  # offline: the run is written under its run directory's wandb/ (`wandb sync` uploads it)


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: Any = MISSING  # conf/model/<name>.yaml; its keys are its constructor's (fmnist.models.check_model)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    seed: int = 0
    name: str = "train"  # stored sweeps write to outputs/<name>/
    ckpt_path: Optional[str] = None  # `last` resumes the run directory's last checkpoint
    test: bool = True  # evaluate the best checkpoint on the test set after fitting
    progress_bar_refresh: int = 10  # training steps between progress-bar redraws
    # How the model runs, whatever the architecture (RUN_OPTIONS):
    tta: str = "none"  # test-time augmentation in validation and test: none | flip | flip_shift (fmnist.models.tta_logits)
    compile: bool = False  # torch.compile: slower on the CPUs measured, after a long warm-up
    channels_last: bool = True  # NHWC: faster convolutions on every CPU and GPU measured (docs/performance.md), same results
    # On CUDA: the network compiled with CUDA graphs (torch.compile, mode reduce-overhead): one launch per
    # step instead of one per kernel. A CPU run ignores it, saying so in one log line. Off until measured
    # on a GPU (`make gpu-check` times it on and off).
    fast_path: bool = False


# Options of how a model runs, not of what it is. Those that were once model keys (`model.tta`,
# `model.compile`, `model.channels_last`) still work under those names (`renamed_overrides`), which old
# run records hold.
FORMER_MODEL_KEYS = ("tta", "compile", "channels_last")
RUN_OPTIONS = (*FORMER_MODEL_KEYS, "fast_path")
RENAMED_KEYS = {f"model.{key}": key for key in FORMER_MODEL_KEYS}
# Keys added after runs were recorded, each with the value that behaves as the code did before it existed. A
# saved config without one compares as that value when a run is resumed or a sweep meets its finished job, and a
# checkpoint's model without one builds with it (`fmnist.models.with_defaults`); a key added without an entry here
# makes older runs "another experiment" (tests/test_train.py checks).
ADDED_KEYS = {"tta": "none", "fast_path": False, "data.augment.flip_alternate": False, "data.augment.cutmix": 0.0,
              "model.dirac_init": False, "model.whiten_stem": False, "model.zero_init_residual": False,
              "optim.bias_lr_scale": 1.0, "optim.ema_decay": 0.0, "optim.lookahead_steps": 0,
              "optim.lookahead_alpha": 0.5}


# The report's ablations run one way, `experiment=report` (or all factors at once: `experiment=study`);
# these earlier one-factor sweeps still run, with a note naming the way that replaces them.
SUPERSEDED_EXPERIMENTS = {
    "ablation_dropout": "experiment=report (its variants best and no_dropout)",
    "ablation_batch_size": "experiment=report (its variants best and batch_32)",
    "ablation_lr": "experiment=report (its variants best and lr_high)",
    "simple_vs_optimized": "experiment=report (its variants best and simple)",
}


def superseded_note(experiment: str | None) -> str | None:
    """The note a command using a superseded experiment prints (it still runs), or None."""
    if experiment not in SUPERSEDED_EXPERIMENTS:
        return None
    return (f"note: experiment={experiment} still runs, but the report's ablations are one sweep now: "
            f"{SUPERSEDED_EXPERIMENTS[experiment]}, or experiment=study for every factor at once.")


# The repository's configs: the package runs from its checkout (`pip install -e .`).
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def is_count(value, at_least: int = 0) -> bool:
    """A whole number (an int, not a bool) of at least `at_least`: what a count read from a file must be."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= at_least


def is_text_keyed(value) -> bool:
    """A mapping whose keys are all text: what a checkpoint's weights (parameter name -> tensor) must be."""
    return isinstance(value, dict) and all(isinstance(k, str) for k in value)


def is_text_list(value) -> bool:
    """A list of texts: what a run record's command-line overrides must be."""
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def is_finite_number(value) -> bool:
    """A finite int or float (not a bool, not an int too large for a float): what a measure read from a file must be."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


OPTIMIZERS = ("adam", "adamw", "sgd", "muon")  # fmnist/training/module.py maps each to its optimizer class
ADAM_FAMILY = ("adam", "adamw", "muon")  # the optimizers that divide by sqrt(v) + eps (Muon: its AdamW half)
SCHEDULERS = ("none", "cosine", "linear")  # shapes of fmnist.training.module.lr_factor
TTA_MODES = ("none", "flip", "flip_shift")  # views of fmnist.models.tta_logits
PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true")

# Keys that say where or how a job runs, not what it computes: left out of job directory names
# and setting names, and free to change when a run is resumed. (conf/train.yaml's
# `override_dirname.exclude_keys` reads this tuple through the `placement_keys` resolver.)
PLACEMENT_KEYS = ("experiment", "preset", "name", "ckpt_path", "trainer", "trainer.accelerator", "trainer.devices",
                  "trainer.strategy", "trainer.num_nodes", "trainer.enable_progress_bar",
                  "trainer.enable_model_summary", "progress_bar_refresh", "data.dir",
                  "logger", *(f"logger.{f.name}" for f in fields(LoggerConfig)))
# A run may also be extended when resumed.
RESUMABLE_KEYS = PLACEMENT_KEYS + ("trainer.max_epochs", "trainer.max_time")


ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")


def _duration_ok(text: str) -> bool:
    """A Lightning `max_time` as DD:HH:MM:SS, above zero."""
    return bool(re.fullmatch(r"\d+:\d\d:\d\d:\d\d", text)) and any(int(part) for part in text.split(":"))


def _devices_ok(devices: Any) -> bool:
    """Lightning's `devices`: `auto`, a count (-1: all), a list of indices, or indices as a string ("0,1")."""
    if isinstance(devices, bool):
        return False
    if isinstance(devices, int):
        return devices >= 1 or devices == -1
    if isinstance(devices, str):
        return devices == "auto" or bool(re.fullmatch(r"-1|\d+(,\d+)*,?", devices.replace(" ", "")))
    if OmegaConf.is_list(devices) or isinstance(devices, (list, tuple)):
        return len(devices) > 0 and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in devices)
    return False


def _fraction_or_count_ok(limit: Any) -> bool:
    """A `limit_*_batches`: null (all), a fraction of the batches in (0, 1], or a count of at least 1."""
    if limit is None:
        return True
    if isinstance(limit, bool) or not isinstance(limit, (int, float)):
        return False
    return limit >= 1 if isinstance(limit, int) else 0 < limit <= 1


def _strategies() -> tuple[str, ...]:
    """`auto` and Lightning's DDP strategies that start each rank as a new process running the command again: the
    others need packages, GPUs or a device argument these CNNs do not, and DDP's spawned or forked ranks cannot
    take the run's trackers along (ddp_spawn fails pickling them; a forked rank on a CPU was seen to hang)."""
    from lightning.pytorch.strategies import StrategyRegistry

    return ("auto", *(s for s in StrategyRegistry.available_strategies()
                      if s.startswith("ddp") and not s.startswith(("ddp_spawn", "ddp_fork", "ddp_notebook"))))


SEED_MAX = 2**32 - 1  # numpy seeds are uint32: Lightning's seed_everything and Optuna's samplers both seed numpy


def seed_check(key: str, seed: int) -> tuple[str, bool, str]:
    """The `check_keys` entry for a random seed: one range for train's `seed` and tune's `sampler.seed`."""
    return key, 0 <= seed <= SEED_MAX, f"in [0, {SEED_MAX}]"


def check_values(cfg: DictConfig) -> None:
    """Raise ConfigError naming the key for values that are well-typed but make no sense.

    Also what Lightning or torch would reject later with a traceback (seed range, momentum). The `model`
    keys are checked against their architecture by `fmnist.models.check_model`; whether this machine
    has the accelerator, by `hardware.check_accelerator`.
    """
    checks = [
        seed_check("seed", cfg.seed),
        ("optim.momentum", 0 <= cfg.optim.momentum < math.inf, "non-negative and finite"),
        ("optim.nesterov", not (cfg.optim.nesterov and cfg.optim.momentum == 0), "false when optim.momentum is 0"),
        ("trainer.accelerator", cfg.trainer.accelerator in ACCELERATORS, f"one of {ACCELERATORS}"),
        ("trainer.max_epochs", cfg.trainer.max_epochs != -1 or (cfg.optim.scheduler == "none" and cfg.optim.warmup_epochs == 0),
         "at least 1 when optim.scheduler or optim.warmup_epochs is set (a schedule needs the run's length)"),
        ("data.batch_size", cfg.data.batch_size >= 1, "at least 1"),
        ("data.eval_batch_size", cfg.data.eval_batch_size >= 1, "at least 1"),
        ("data.val_size", cfg.data.val_size >= 1, "at least 1 (model selection needs a validation split)"),
        ("data.train_subset", cfg.data.train_subset is None or cfg.data.train_subset >= 1, "null or at least 1"),
        ("data.augment.shift", 0 <= cfg.data.augment.shift <= 8, "between 0 and 8 pixels"),
        ("data.augment.erase", 0.0 <= cfg.data.augment.erase <= 1.0, "a probability in [0, 1]"),
        ("data.augment.cutmix", 0.0 <= cfg.data.augment.cutmix <= 1.0, "a probability in [0, 1]"),
        ("data.augment.flip_alternate", cfg.data.augment.hflip or not cfg.data.augment.flip_alternate,
         "false unless data.augment.hflip is true (it decides how the flips are drawn)"),
        ("optim.name", cfg.optim.name in OPTIMIZERS, f"one of {OPTIMIZERS}"),
        ("optim.lr", 0 < cfg.optim.lr < math.inf, "positive and finite"),
        ("optim.weight_decay", 0 <= cfg.optim.weight_decay < math.inf, "non-negative and finite"),
        ("optim.scheduler", cfg.optim.scheduler in SCHEDULERS, f"one of {SCHEDULERS}"),
        ("optim.warmup_epochs", 0 <= cfg.optim.warmup_epochs < math.inf, "non-negative and finite"),
        ("optim.label_smoothing", 0.0 <= cfg.optim.label_smoothing < 1.0, "in [0, 1)"),
        ("optim.ema_decay", 0.0 <= cfg.optim.ema_decay < 1.0, "in [0, 1) (0: no weight averaging)"),
        ("optim.bias_lr_scale", 0 < cfg.optim.bias_lr_scale < math.inf,
         "positive and finite (1: biases train like the other weights)"),
        ("optim.lookahead_steps", cfg.optim.lookahead_steps >= 0, "a non-negative number of optimizer steps (0: no lookahead)"),
        ("optim.lookahead_alpha", 0.0 < cfg.optim.lookahead_alpha <= 1.0, "in (0, 1] (1: no slow weights)"),
        ("tta", cfg.tta in TTA_MODES, f"one of {TTA_MODES}"),
        ("trainer.precision", str(cfg.trainer.precision) in PRECISIONS, f"one of {PRECISIONS}"),
        # Adam's eps (1e-8) rounds to 0 in float16, so a weight whose gradient's square underflows takes m / 0: NaN
        # at the first steps, whatever the learning rate. SGD has no such term; mixed precision keeps fp32 weights.
        ("trainer.precision", not (str(cfg.trainer.precision) == "16-true" and cfg.optim.name in ADAM_FAMILY),
         f"other than 16-true with optim.name={cfg.optim.name}: its eps (1e-8) is 0 in float16 weights, so its first "
         "steps divide by zero and the run diverges at any learning rate; take 16-mixed (on a GPU), bf16-true, "
         "bf16-mixed, or optim=sgd"),
        ("trainer.max_epochs", cfg.trainer.max_epochs >= 1 or (cfg.trainer.max_epochs == -1 and cfg.trainer.max_time),
         "at least 1, or -1 (no limit) with trainer.max_time set (else the run never ends)"),
        ("ckpt_path", cfg.ckpt_path in (None, "last"), "null or `last`"),
        ("progress_bar_refresh", cfg.progress_bar_refresh >= 1, "at least 1"),
        # What Lightning would reject (or divide by) only once the run directory is written.
        ("trainer.devices", _devices_ok(cfg.trainer.devices),
         "`auto`, a number of devices (at least 1, or -1 for all), or device indices (`[0, 1]`, `\"0,1\"`)"),
        ("trainer.num_nodes", cfg.trainer.num_nodes >= 1, "at least 1"),
        # `auto` without asking Lightning's registry: a sweep's start checks its jobs before Lightning is imported.
        ("trainer.strategy", cfg.trainer.strategy == "auto" or cfg.trainer.strategy in _strategies(),
         "`auto` or `ddp` (or ddp_find_unused_parameters_true/false); not the spawned or forked DDPs (ddp_spawn, "
         "ddp_fork, ddp_notebook), whose ranks cannot take the run's trackers along"),
        ("trainer.fast_dev_run", isinstance(cfg.trainer.fast_dev_run, bool) or is_count(cfg.trainer.fast_dev_run),
         "true, false or a number of batches (0 or more)"),
        ("trainer.deterministic", cfg.trainer.deterministic in (None, True, False, "warn"), "null, true, false or `warn`"),
        ("trainer.max_time", cfg.trainer.max_time is None or _duration_ok(str(cfg.trainer.max_time)),
         "null or a time above zero as DD:HH:MM:SS (e.g. 00:00:30:00 for 30 minutes)"),
        ("trainer.limit_train_batches", _fraction_or_count_ok(cfg.trainer.limit_train_batches),
         "null, a fraction in (0, 1] or a number of batches (at least 1)"),
        ("trainer.limit_val_batches", _fraction_or_count_ok(cfg.trainer.limit_val_batches),
         "null, a fraction in (0, 1] or a number of batches (at least 1: model selection needs validation)"),
        ("trainer.limit_test_batches", _fraction_or_count_ok(cfg.trainer.limit_test_batches),
         "null, a fraction in (0, 1] or a number of batches (at least 1)"),
        ("trainer.accumulate_grad_batches", cfg.trainer.accumulate_grad_batches >= 1, "at least 1"),
        # Refused wherever it runs, so that a config that trains on a CPU does not stop (or go wrong) on a GPU.
        ("trainer.accumulate_grad_batches", not (cfg.fast_path and cfg.trainer.accumulate_grad_batches > 1),
         "1 with fast_path=true: a CUDA graph's backward hands its gradients out in buffers that its next replay "
         "overwrites, so gradients summed over several batches come out wrong or the run stops with an error "
         "(pytorch/pytorch#169545); take fast_path=false to accumulate gradients"),
        ("trainer.check_val_every_n_epoch", cfg.trainer.check_val_every_n_epoch >= 1, "at least 1"),
        ("trainer.check_val_every_n_epoch",
         cfg.trainer.max_epochs == -1 or cfg.trainer.check_val_every_n_epoch <= cfg.trainer.max_epochs,
         f"at most trainer.max_epochs ({cfg.trainer.max_epochs}): a run that never validates has no best checkpoint"),
        ("trainer.gradient_clip_val", cfg.trainer.gradient_clip_val is None or 0 <= cfg.trainer.gradient_clip_val < math.inf,
         "null or non-negative and finite (0 or null: no clipping)"),
        ("trainer.num_sanity_val_steps", cfg.trainer.num_sanity_val_steps >= -1, "at least 0 (or -1: the whole split)"),
        ("trainer.log_every_n_steps", cfg.trainer.log_every_n_steps >= 1, "at least 1"),
    ]
    check_keys(cfg, checks)


def check_keys(cfg: DictConfig, checks) -> None:
    """ConfigError for the first `(key, ok, expected)` of `checks` whose `ok` is false: one sentence naming the key,
    what it must be, and the value it has. Every entry point's checks of its keys say it this way."""
    for key, ok, expected in checks:
        if not ok:
            raise ConfigError(f"config key {key} must be {expected}; got {OmegaConf.select(cfg, key)!r}.")


def flatten(d: dict, prefix: str = "") -> dict:
    """A nested dict as one level of dotted keys: `{"data": {"augment": {"hflip": True}}}` -> `{"data.augment.hflip": True}`."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(flatten(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def flat_config(cfg: DictConfig) -> dict:
    """`cfg` resolved and flattened: `{"data.augment.hflip": True, ...}`."""
    return flatten(OmegaConf.to_container(cfg, resolve=True))
