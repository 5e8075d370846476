"""The command line of a run: Hydra's override grammar, the names runs and sweep jobs take from their overrides,
and the registration that lets Hydra compose train.py's config.

`fmnist/config.py` says what the keys are and what values they take; this module reads overrides (`override_key`,
`is_sweep_override`, `hydra_quote` to write one back), words Hydra's account of a bad command line as one paragraph
(`composition_message`), and names what runs: a sweep job's directory (`sweep_job_dirname`, from the keys that
change what it computes: `computing_overrides`, without `PLACEMENT_KEYS`), a setting (`setting_of`), a single run's
label and a sweep's directory (`run_label`, `sweep_name`). `register` puts the schema and these resolvers where
Hydra finds them; `compose_train` composes as `python train.py OVERRIDES` does.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from fmnist import console
from fmnist.config import CONF_DIR, PLACEMENT_KEYS, RENAMED_KEYS, TrainConfig
from fmnist.errors import ConfigError
from fmnist.fsio import NAME_MAX, read_yaml


# Reading and writing overrides.

def override_key(override: str) -> str:
    """The key a command-line override sets: `optim.lr` of `optim.lr=0.01`, `+optim.lr=0.01` or `~optim.lr`, and
    `model` of a group's `model@pkg=resnet` (its package aside)."""
    return override.split("=", 1)[0].lstrip("+~").split("@", 1)[0]


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


def is_sweep_override(override: str) -> bool:
    """Whether a train.py override is a sweep (`a=1,2`, `a=range(3)`), as Hydra parses it; an override
    Hydra cannot parse is left to the composition that reports it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        return OverridesParser.create().parse_override(override).is_sweep_override()
    except HydraException:
        return False


# How a command that takes one value of each key names the sweep it was given.
SWEEP_FORMS = "a sweep (`,`, range, choice or glob)"


def first_sweep(overrides: list[str]) -> str | None:
    """The first of `overrides` that is a sweep (`is_sweep_override`), if any: for a command that takes one value
    of each key, whose message says `{override} is {SWEEP_FORMS}`."""
    return next((o for o in overrides if "=" in o and is_sweep_override(o)), None)


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


# A bad command line, as one paragraph.

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


def null_group_message(error: BaseException, args: list[str], entry: str) -> str | None:
    """The paragraph for a config group given `null` (`experiment=null`, or among a sweep's values:
    `model=simple,null`), or None for another error: Hydra raises a bare ValueError for it that names neither the
    group nor what to type instead."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if not (isinstance(error, ValueError) and str(error).startswith("Config group override must be")):
        return None
    groups = {p.relative_to(CONF_DIR).as_posix() for p in CONF_DIR.rglob("*") if p.is_dir()}
    nulls = []
    for arg in args:
        try:
            override = OverridesParser.create().parse_override(arg)
        except Exception:  # not an override Hydra reads (a mode flag): not the null
            continue
        key = override.key_or_group
        values = list(override.sweep_iterator()) if override.is_sweep_override() else [override.value()]
        if (key in groups or key.startswith("hydra/")) and None in values:
            nulls.append(arg)
    if not nulls:  # another value Hydra cannot take as a group's option: its own words
        return None
    named = ", ".join(f"`{arg}`" for arg in nulls)
    return (f"{named}: a config group takes the name of one of its options, and null names none. Leave the override "
            f"out to keep the group's default, or name an option: `python {entry} --help` lists them.")


@contextmanager
def null_groups_named(args: list[str], entry: str):
    """Within the block, Hydra's ValueError for a config group given null is ConfigError(`null_group_message`)."""
    try:
        yield
    except ValueError as e:
        message = null_group_message(e, args, entry)
        if message is None:
            raise
        raise ConfigError(message) from None  # the paragraph says it all: not Hydra's words after it


def quoted_paths(args: list[str]) -> list[str]:
    """`args` with each override Hydra cannot parse whose value names an existing file or directory quoted for it:
    a sweep job's directory (`optim.lr=0.01,seed=1`) holds `=` and `,`, and `ckpt=` is given such paths."""
    quoted = []
    for arg in args:
        key, _, value = arg.partition("=")
        if arg == _unreadable_override([arg]) and os.path.exists(value):
            arg = f"{key}={hydra_quote(value)}"
        quoted.append(arg)
    return quoted


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


# Names from overrides: a sweep job's directory, a setting, a single run's label, a sweep's directory.

NAME_MAX_BYTES = NAME_MAX - 55  # of a name check_name passes: room for what commands add (`.replaced-`, `.onnx`)


def check_name(key: str, value, names: str = "a directory under outputs/") -> str:
    """`value` if it is a name (one directory level: letters, digits and `. _ + = , -`, not `.` or `..`),
    else ConfigError: a name becomes a directory under its root (`names` says which) and must not lead outside it.
    `key`: a config key, or a command-line option (`--name`)."""
    text = str(value)
    what = key if key.startswith('-') else f'config key {key}'
    if not re.fullmatch(r"[\w.+=,-]+", text) or text in (".", ".."):
        raise ConfigError(f"{what} must be a name, not a path (letters, digits and . _ + = , - ; not '.' or '..'), "
                          f"since it names {names}; got {text!r}.")
    if len(text.encode()) > NAME_MAX_BYTES:
        raise ConfigError(f"{what} is {len(text.encode())} bytes long; it names {names}, and must be at most "
                          f"{NAME_MAX_BYTES} bytes, so that a file name made from it (suffixes added) stays within the "
                          f"{NAME_MAX} a file system takes.")
    return text


def computing_overrides(overrides: list[str]) -> list[str]:
    """The overrides that change what a job computes: placement keys and Hydra's own left out."""
    return [o for o in overrides if override_key(o) not in PLACEMENT_KEYS and not override_key(o).startswith("hydra.")]


SWEEP_CONFIG_FILE = "multirun.yaml"  # what Hydra writes into a sweep's directory: its command line and config


def swept_keys(sweep_dir: Path) -> set[str]:
    """The keys a sweep varies, from the `multirun.yaml` Hydra writes into its directory: the command line's
    sweep overrides (`optim.lr=1e-2,1e-3`, `range(...)`) and the experiment's `hydra.sweeper.params`."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        hydra_cfg = (read_yaml(Path(sweep_dir) / SWEEP_CONFIG_FILE) or {}).get("hydra") or {}
        task = list((hydra_cfg.get("overrides") or {}).get("task") or [])
        params = (hydra_cfg.get("sweeper") or {}).get("params") or {}
        parsed = OverridesParser.create().parse_overrides(task)
    except Exception:  # no sweep file, or one this version cannot read: no key is known to be swept
        return set()
    return {o.key_or_group for o in parsed if o.is_sweep_override()} | set(params)


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


DEFAULTS_JOB = "defaults"  # the directory of a sweep's job that no computing override names (`-m preset=smoke`)


def sweep_job_dirname(sweep_dir: str, overrides: list[str]) -> str:
    """A sweep job's directory under `sweep_dir` (`hydra.sweep.subdir`): `job_name`, unless the sweep
    directory already has this job under the same overrides in another order (a job of an earlier sweep
    that varied other keys, or one named before names led with the swept keys), so that running a sweep
    again still skips its finished jobs and resumes the others in place. A job without a name is `DEFAULTS_JOB`:
    a sweep's directory holds its jobs' directories, never a job itself."""
    items = sorted(computing_overrides(list(overrides)))
    name = job_name(items, swept_keys(Path(sweep_dir))) or DEFAULTS_JOB
    if not items or (Path(sweep_dir) / name).is_dir():
        return name
    for existing in Path(sweep_dir).glob("*/"):
        if len(existing.name) == len(name) and sorted(name_items(existing.name)) == items:
            return existing.name
    return name


def setting_of(overrides: list[str]) -> str:
    """The overrides that define a job's setting (seed and placement removed), e.g. `optim.lr=0.01`."""
    return ",".join(sorted(o for o in computing_overrides(overrides) if override_key(o) != "seed")) or "(defaults)"


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


def sweep_name(name: str, stamp: str, preset: str | None = None) -> str:
    """`outputs/<this>`: a named sweep keeps one directory (so it resumes); an ad-hoc one (`name` left at
    `train`) gets its own, stamped, so that unrelated sweeps never share a summary. A preset's sweep goes
    beside the full-size one (`-cpu`, `-smoke`), never into it."""
    base = f"{name}/{stamp}" if check_name("name", name) == TrainConfig.name else name
    return f"{base}-{preset}" if preset else base


# Where Hydra finds the schema and the resolvers.

OTHER_COMMANDS_GROUPS = ("hydra", "tune")  # config groups in conf/ that train.py does not take (tune.py's search spaces)


def train_groups_help() -> str:
    """`train.py --help`'s list of config groups and their options, as Hydra lists them, without the groups
    of other commands (Hydra would list every group under conf/)."""
    from hydra.core.global_hydra import GlobalHydra

    loader = GlobalHydra.instance().config_loader()
    groups = (g for g in sorted(loader.list_groups("")) if g not in OTHER_COMMANDS_GROUPS)
    return "\n".join(f"{g}: {', '.join(loader.get_group_options(g))}" for g in groups)


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
