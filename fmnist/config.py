"""Typed schema of the Hydra config, and the range checks that types cannot express.

The dataclasses hold every default, once, except the architectures' (conf/model/<name>.yaml: what
a Hydra user opens to see a model, typed by its constructor: `fmnist.models.check_model`); they are
registered in Hydra's ConfigStore, and the other YAML files in `conf/` carry only what differs from them. A typo'd key or a wrong-typed value (`optim.lr=abc`) fails while Hydra composes the
config, with the key's full name; `check_values` then rejects values that are well-typed but
meaningless. A run's name comes from its overrides here too (`sweep_job_dirname`, `setting_of`):
the keys that change what it computes, without the placement keys.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from fmnist import console
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


TRACKERS = ("tensorboard", "csv", "mlflow", "wandb")  # fmnist/training/trackers.py: what each receives


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
# saved config without one compares as that value when a run is resumed or a sweep meets its finished job;
# a key added without an entry here makes older runs "another experiment" (tests/test_train.py checks).
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


def renamed_overrides(overrides: list[str]) -> list[str]:
    """`overrides` with each old key name (RENAMED_KEYS) replaced by the new one, saying so once on stderr."""
    renamed = []
    for override in overrides:
        prefix = override[:len(override) - len(override.lstrip("+~"))]
        key, equals, value = override[len(prefix):].partition("=")
        if key in RENAMED_KEYS:
            print(f"note: {key} is now {RENAMED_KEYS[key]}; `{override}` runs as `{prefix}{RENAMED_KEYS[key]}{equals}{value}`.",
                  file=sys.stderr)
            key = RENAMED_KEYS[key]
        renamed.append(f"{prefix}{key}{equals}{value}")
    return renamed


# The repository's configs: the package runs from its checkout (`pip install -e .`).
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


# Noise in Hydra's messages: its hint to add the key with `+` (which `refuse_unknown_keys` refuses),
# and where it searched for configs.
_DROPPED = ("To append to your config", "Config search path", "provider=", "full_key", "reference_type", "object_type")


def composition_message(error: BaseException, args: list[str] | None = None, entry: str | None = None,
                        help_hint: bool = True) -> str:
    """Hydra's (and OmegaConf's) account of a bad command line (`args`: the overrides, by default this
    process's; `entry`: the command whose help to suggest, by default this one; `help_hint`: whether to
    suggest its --help and --cfg job) as one paragraph."""
    texts = [str(error)] + ([str(error.__cause__)] if error.__cause__ else [])
    # Hydra lists choices one per tab-indented line: "Available options in 'model': optimized, resnet, simple".
    texts = [text.replace(":\n\t", ": ").replace("\n\t", ", ") for text in texts]
    kept = [part.strip(" \t.:") for text in texts for part in text.splitlines()
            if part.strip() and not part.strip().startswith(_DROPPED)]
    entry = entry or (Path(sys.argv[0]).name if sys.argv and sys.argv[0].endswith(".py") else "train.py")
    unreadable = _unreadable_override(sys.argv[1:] if args is None else args)
    if unreadable:
        key, _, value = unreadable.partition("=")
        if value.startswith("[") and value.endswith("]"):  # a list: each item quoted, or it is one name with brackets
            items = ",".join(f"'{item}'" for item in value[1:-1].split(","))
            example = f"\"{key}=[{items}]\" (each item of a list)"
        else:
            quoted = value.replace("'", "\\'")  # a quote inside Hydra's quotes is escaped; a shell's double quotes keep the backslash
            example = f"{key}=\"'{quoted}'\""
        kept = [f"cannot read the override `{unreadable}`: a value holding `=`, spaces, commas, brackets or letters "
                f"outside ASCII must be quoted, e.g. {example}", *(f"Hydra's parser: {k}" for k in kept[:1]), *kept[1:]]
    if not help_hint:
        return ". ".join(dict.fromkeys(kept)) + "."
    return ". ".join(dict.fromkeys(kept)) + (f". `python {entry} --help` lists what it takes; `python {entry} "
                                            "--cfg job` prints every key with its value.")


def _unreadable_override(args: list[str]) -> str | None:
    """The first command-line override that Hydra's grammar cannot parse, if any."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    for arg in args:
        if arg.startswith("-") or "=" not in arg:
            continue
        try:
            parser.parse_override(arg)
        except HydraException:
            return arg
    return None


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


def compose_train(*overrides: str) -> DictConfig:
    """The training config as `python train.py OVERRIDES` composes it, for scripts that build models or data."""
    from hydra import compose, initialize_config_dir

    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    register()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        try:
            return compose("train", overrides=list(overrides))
        except (HydraException, OmegaConfBaseException) as e:  # a bad override: one paragraph, not Hydra's pages
            # They are train.py's overrides, whatever command passed them: its help lists their groups.
            raise ConfigError(composition_message(e, list(overrides), entry="train.py")) from e


def check_name(key: str, value, names: str = "a directory under outputs/") -> str:
    """`value` if it is a name (one directory level: letters, digits and `. _ + = , -`, not `.` or `..`),
    else ConfigError: a name becomes a directory under its root (`names` says which) and must not lead outside it.
    `key`: a config key, or a command-line option (`--name`)."""
    text = str(value)
    if not re.fullmatch(r"[\w.+=,-]+", text) or text in (".", ".."):
        raise ConfigError(f"{key if key.startswith('-') else f'config key {key}'} must be a name, not a path (letters, "
                          f"digits and . _ + = , - ; not '.' or '..'), since it names {names}; got {text!r}.")
    return text


def sweep_name(name: str, stamp: str, preset: str | None = None) -> str:
    """`outputs/<this>`: a named sweep keeps one directory (so it resumes); an ad-hoc one (`name` left at
    `train`) gets its own, stamped, so that unrelated sweeps never share a summary. A preset's sweep goes
    beside the full-size one (`-cpu`, `-smoke`), never into it."""
    base = f"{name}/{stamp}" if check_name("name", name) == TrainConfig.name else name
    return f"{base}-{preset}" if preset else base


OTHER_COMMANDS_GROUPS = ("hydra", "tune")  # config groups in conf/ that train.py does not take (tune.py's search spaces)


def train_groups_help() -> str:
    """`train.py --help`'s list of config groups and their options, as Hydra lists them, without the groups
    of other commands (Hydra would list every group under conf/)."""
    from hydra.core.global_hydra import GlobalHydra

    loader = GlobalHydra.instance().config_loader()
    groups = (g for g in sorted(loader.list_groups("")) if g not in OTHER_COMMANDS_GROUPS)
    return "\n".join(f"{g}: {', '.join(loader.get_group_options(g))}" for g in groups)


RUN_LABEL_CHARS = 100  # a directory name stays well under the file system's 255 bytes


def run_label(override_dirname: str) -> str:
    """What a single run's directory adds after its time, so that TensorBoard names it by what it is
    (`_model=simple,optim.lr=0.01`, the keys a sweep job's directory would give); a long one is cut and
    ends in a hash of the whole, so two different runs never share a label."""
    if not override_dirname:
        return ""
    if len(override_dirname) > RUN_LABEL_CHARS:
        digest = hashlib.sha1(override_dirname.encode()).hexdigest()[:8]
        override_dirname = f"{override_dirname[:RUN_LABEL_CHARS - 9]}~{digest}"
    return f"_{override_dirname}"


def override_text(value: Any) -> str:
    """A Python value as a command-line override writes it, so that Hydra reads back the same value: every digit
    of a float (the shortest text that reads back as it), None and booleans as YAML writes them (Hydra reads
    `None` as a string)."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    return repr(value) if isinstance(value, float) else str(value)


def hydra_quote(value: str) -> str:
    """`value` as a Hydra override value: as is when plain, else quoted (spaces, non-ASCII, `,` or `=`)."""
    if re.fullmatch(r"[\w/.:@+-]+", value, re.ASCII):
        return value
    # In Hydra's quoted strings a backslash escapes a quote, so a run of backslashes before a quote or at
    # the end is doubled first (`x\` would otherwise escape the closing quote).
    escaped = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, value)
    return "'" + escaped.replace("'", "\\'") + "'"


def override_key(override: str) -> str:
    """The key a command-line override sets: `optim.lr` of `optim.lr=0.01` or `+optim.lr=0.01`."""
    return override.split("=", 1)[0].lstrip("+~")


def launcher_kind(launcher: DictConfig | dict) -> str:
    """`joblib`, `submitit` or `basic`: which of Hydra's launchers `launcher` (hydra.launcher) configures."""
    target = str(launcher.get("_target_", ""))
    return "joblib" if target.endswith("JoblibLauncher") else "submitit" if "submitit" in target else "basic"


def concurrent_jobs(launcher: DictConfig | dict, cores: int) -> int:
    """How many jobs the launcher runs at once on this machine (1 for sequential launchers)."""
    if launcher_kind(launcher) == "joblib":
        n = int(launcher.get("n_jobs") or 1)
        # joblib's convention: -1 is all cores, -2 all but one, ...
        return max(1, cores + 1 + n if n < 0 else n)
    return 1


def check_launcher(launcher: DictConfig | dict) -> None:
    """ConfigError for a joblib launcher told to run no job at once (`n_jobs=0`, which joblib refuses only after
    the sweep's directory is made)."""
    if launcher_kind(launcher) == "joblib" and launcher.get("n_jobs") == 0:
        raise ConfigError("hydra.launcher.n_jobs=0 runs no job; expected how many jobs run at once: 1 or more, or -1 "
                          "for as many as the cores (joblib's convention: -2 all but one, ...). No job of the sweep "
                          "was started.")


def computing_overrides(overrides: list[str]) -> list[str]:
    """The overrides that change what a job computes: placement keys and Hydra's own left out."""
    return [o for o in overrides if override_key(o) not in PLACEMENT_KEYS and not override_key(o).startswith("hydra.")]


SWEEP_CONFIG_FILE = "multirun.yaml"  # what Hydra writes into a sweep's directory: its command line and config


def swept_keys(sweep_dir: Path) -> set[str]:
    """The keys a sweep varies, from the `multirun.yaml` Hydra writes into its directory: the command line's
    sweep overrides (`optim.lr=1e-2,1e-3`, `range(...)`) and the experiment's `hydra.sweeper.params`."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        saved = OmegaConf.load(Path(sweep_dir) / SWEEP_CONFIG_FILE)
        task = list(OmegaConf.select(saved, "hydra.overrides.task") or [])
        params = OmegaConf.select(saved, "hydra.sweeper.params") or {}
        parsed = OverridesParser.create().parse_overrides(task)
    except Exception:  # no sweep file, or one this version cannot read: no key is known to be swept
        return set()
    return {o.key_or_group for o in parsed if o.is_sweep_override()} | set(params)


def is_sweep_override(override: str) -> bool:
    """Whether a train.py override is a sweep (`a=1,2`, `a=range(3)`), as Hydra parses it; an override
    Hydra cannot parse is left to the composition that reports it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        return OverridesParser.create().parse_override(override).is_sweep_override()
    except HydraException:
        return False


def check_sweep_values(overrides: list[str], config_loader=None) -> None:
    """ConfigError for a sweep override that cannot be expanded (`seed=range(0,1,0)`) or gives no value at all
    (`seed=range(0,0)`, `model=glob(zzz*)`): a sweep holding one would crash, or run no job and exit 0.
    Globs are expanded only with Hydra's `config_loader` (they match a group's options)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create(config_loader=config_loader)
    for text in overrides:
        try:
            override = parser.parse_overrides([text])[0]
            if not override.is_discrete_sweep():
                continue
            values = list(override.sweep_string_iterator())
        except HydraException:  # not readable here (Hydra reports it), or a glob without the config to expand it
            continue
        except ValueError as e:
            raise ConfigError(f"the sweep override {text} cannot be expanded ({e}); nothing was written.") from None
        if not values:
            hint = " A range's end is exclusive: seed=range(0,3) runs seeds 0, 1 and 2." if "range(" in text else ""
            raise ConfigError(f"the sweep override {text} gives no value, so the sweep would run no job and write "
                              f"an empty summary; nothing was written.{hint}")


def job_name(overrides: list[str], swept: set[str]) -> str:
    """A sweep job's name: its computing overrides, the keys its sweep varies first, each group sorted
    (`optim.lr=0.01,seed=1,data.train_subset=5000`), so that where a long name is cut (TensorBoard's run
    list, MLflow, W&B) the keys that differ between the jobs are still seen."""
    return ",".join(sorted(computing_overrides(overrides), key=lambda o: (override_key(o) not in swept, o)))


# Where one override ends in a job name: a comma followed by the next `key=` (values may hold commas: `[32,64]`).
_NAME_ITEM_START = re.compile(r",(?=[+~]*[\w.\-/@]+=)")


def name_items(name: str) -> list[str]:
    """The overrides of a job name or a setting: `model.widths=[8,16],seed=0` -> [`model.widths=[8,16]`, `seed=0`]."""
    return _NAME_ITEM_START.split(name)


def sweep_job_dirname(sweep_dir: str, overrides: list[str]) -> str:
    """A sweep job's directory under `sweep_dir` (`hydra.sweep.subdir`): `job_name`, unless the sweep
    directory already has this job under the same overrides in another order (a job of an earlier sweep
    that varied other keys, or one named before names led with the swept keys), so that running a sweep
    again still skips its finished jobs and resumes the others in place."""
    items = sorted(computing_overrides(list(overrides)))
    name = job_name(items, swept_keys(Path(sweep_dir)))
    if not name or (Path(sweep_dir) / name).is_dir():
        return name
    for existing in Path(sweep_dir).glob("*/"):
        if len(existing.name) == len(name) and sorted(name_items(existing.name)) == items:
            return existing.name
    return name


def setting_of(overrides: list[str]) -> str:
    """The overrides that define a job's setting (seed and placement removed), e.g. `optim.lr=0.01`."""
    return ",".join(sorted(o for o in computing_overrides(overrides) if override_key(o) != "seed")) or "(defaults)"


def register_resolvers() -> None:
    """The `${...:}` functions the YAML files use for output paths (every entry point's config)."""
    if not OmegaConf.has_resolver("placement_keys"):
        OmegaConf.register_new_resolver("placement_keys", lambda: list(PLACEMENT_KEYS))
        OmegaConf.register_new_resolver("sweep_name", sweep_name)
        OmegaConf.register_new_resolver("train_groups_help", train_groups_help)
        OmegaConf.register_new_resolver("run_label", run_label)
        OmegaConf.register_new_resolver("sweep_job_dirname", sweep_job_dirname)
        # The console's line format, for the YAML logging configs (fmnist/console.py holds it).
        OmegaConf.register_new_resolver("console_format", lambda: console.CONSOLE_FORMAT)
        OmegaConf.register_new_resolver("console_datefmt", lambda: console.CONSOLE_DATEFMT)
        OmegaConf.register_new_resolver("file_log_format", lambda: console.FILE_FORMAT)
        # This process's id, so two runs started in the same second get distinct default directories
        # (cached: every read of `hydra.run.dir` gives the same path).
        OmegaConf.register_new_resolver("run_suffix", lambda: str(os.getpid()), use_cache=True)


def register() -> None:
    """Put the schema and the resolvers where Hydra finds them (called before Hydra composes)."""
    register_resolvers()
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)


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
        ("trainer.strategy", cfg.trainer.strategy in _strategies(), "`auto` or `ddp` (or ddp_find_unused_parameters_"
         "true/false); not the spawned or forked DDPs (ddp_spawn, ddp_fork, ddp_notebook), whose ranks cannot take the "
         "run's trackers along"),
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
