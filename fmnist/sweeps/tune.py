"""Hyperparameter search with Optuna: `python tune.py study=NAME n_trials=N [train overrides...]`.

The study lives in a database (SQLite at `outputs/tune/<study>/study.db` unless `storage=` names
another SQLAlchemy URL), so a rerun with a larger `n_trials` continues it, several processes on
the same storage share it (Optuna's own mechanism: each asks the database for its next trial),
and `optuna-dashboard` can browse it. Each trial is an ordinary run directory
(`outputs/tune/<study>/trial-NNNN/`: metrics.json, epochs.csv, TensorBoard, checkpoints), so
`python -m fmnist.results summary` and `report` work on a study directory as on a sweep.

Trials are sampled by a seeded TPE sampler and stopped early by a median pruner that sees each
epoch's validation accuracy. A diverged or crashed trial is recorded (FAIL in the study, its
status in its run directory) and the study goes on; a user error (bad key, missing data) stops it.

Lightning, which the trials train with, is imported only by the last of the study's checks before its directory
and storage are made (its data's, read through the datamodule) and by its trials: a study refused for its config,
search space, directory or storage is refused in seconds, without that import.
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
import signal
import threading
import time
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import optuna
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fmnist import console
from fmnist.cli import check_resolvable, refuse_unknown_keys
from fmnist.config import PLACEMENT_KEYS, RENAMED_KEYS, RESUMABLE_KEYS, check_keys, flat_config, seed_check
from fmnist.data.sources import split_csvs
from fmnist.errors import ConfigError, FmnistError, OutOfMemory
from fmnist.fsio import atomic_write, check_not_directories, missing_dirs, remove_if_empty, some_names
from fmnist.overrides import (check_name, composition_message, null_group_message, override_key, override_text, register,
                              renamed_overrides)
from fmnist.results.sweep import SUMMARY_FILES, summarize
from fmnist.sweeps.start import check_same_data, every_combination
from fmnist.provenance import this_process
from fmnist.runs import (DIVERGED, ERROR_FILE, FAILED, INTERRUPTED, JOB_LOG, METRICS_FILE, TRIAL_DIR_PREFIX,
                         TRIAL_RECORD_KEY, trial_dir)
from fmnist.sweeps.storage import (STUDY_DB, check_storage_file, default_storage, fail_dead_trials, open_storage,
                                   record_stale_trials, storage_file, study_storage_errors_named, trial_run_dir)
from fmnist.training.checks import check_config

log = logging.getLogger(__name__)

METRIC = "val/acc_best"  # what the study maximises: model selection is on validation, never on test
BEST_FILE = "best.yaml"  # a study's best trial: its value, parameters and the train.py command that reproduces it
# A study's figures, by file name: the optuna.visualization.matplotlib function that draws each.
FIGURES = {"optimization_history.png": "plot_optimization_history", "param_importances.png": "plot_param_importances"}
# An interrupted trial is not resumed: the study goes on with new trials (Optuna marks it failed).
RESUME_HINT = "a trial is not resumed: the same tune.py command continues the study with a new trial in its place"


@dataclass
class ParamSpec:
    """One searched value: `key` (a train override: `optim.lr`, or a group such as `model`) and its range."""

    key: str = MISSING
    low: Optional[float] = None
    high: Optional[float] = None
    log: bool = False  # sample log-uniformly (learning rates, weight decay)
    integer: bool = False  # sample integers in [low, high]
    choices: Optional[List[Any]] = None  # a categorical instead of a range


@dataclass
class SamplerConfig:
    seed: int = 0  # TPE's seed; several processes starting together need different seeds
    n_startup_trials: int = 5  # random trials before TPE models the results


@dataclass
class PrunerConfig:
    n_startup_trials: int = 4  # trials that must finish before any is pruned (the median needs a few)
    prune_from_epoch: int = 2  # a trial is never pruned before this epoch's validation


@dataclass
class HeartbeatConfig:  # database storages: how a trial whose process died is found and marked failed
    interval_s: int = 60  # each running trial writes a heartbeat this often
    grace_s: int = 180  # a running trial without one for this long died with its process: marked failed, and replaced


@dataclass
class TuneConfig:
    study: str = MISSING  # the study's name: <out_dir>/<study>/ and the name in the database
    n_trials: int = 20  # trials in the study in total, counting earlier runs and other processes: a rerun with a
    # larger number continues it
    # any SQLAlchemy URL (postgresql://..., mysql://...), or journal:FILE (a file on a shared file system, no
    # server); null: sqlite:///<out_dir>/<study>/study.db
    storage: Optional[str] = None
    out_dir: str = "outputs/tune"  # trial run directories go to <out_dir>/<study>/
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    pruner: PrunerConfig = field(default_factory=PrunerConfig)
    heartbeat: HeartbeatConfig = field(default_factory=HeartbeatConfig)
    space: Dict[str, ParamSpec] = field(default_factory=dict)  # Optuna parameter name -> spec


# Before the user's overrides (which may pick another single device): `devices=auto` on a
# multi-GPU machine would start DDP over all GPUs inside the trial.
ONE_DEVICE = ["trainer.devices=1"]

# A study's user attributes: what every trial computes with before its sampled values (flattened train
# config), and the train overrides that gave it (for messages). A continuation must compute the same, its
# budget (trainer.max_epochs, max_time) aside: as a resumed run, a study may go on with longer trials.
SETTING_ATTR, OVERRIDES_ATTR = "train_setting", "train_overrides"

# Command-line keys that configure the search; every other override is a train override.
TUNE_KEYS = {f.name for f in fields(TuneConfig)} | {"tune"}  # `tune`: the search space's file (conf/tune/)


def register_tune() -> None:
    """Put the train schemas and tune.py's (`tune_schema`, picked by conf/tune.yaml) in Hydra's ConfigStore."""
    register()
    ConfigStore.instance().store(name="tune_schema", node=TuneConfig)


def split_overrides(args: list[str]) -> tuple[list[str], list[str]]:
    """(tune overrides, train overrides) of a `tune.py` command line."""
    def root(arg: str) -> str:
        return override_key(arg).split(".", 1)[0]

    return [a for a in args if root(a) in TUNE_KEYS], [a for a in args if root(a) not in TUNE_KEYS]


def _compose(name: str, overrides: list[str]) -> DictConfig:
    try:
        return compose(name, overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        # Hydra's own words and the reason under them ("could not be converted to Integer"), as train.py gives them
        reason = composition_message(e, overrides, help_hint=False)
        given = [o for o in overrides if o not in ONE_DEVICE]  # as typed: tune.py adds its placement itself
        unknown = re.search(r"Could not override '([^'.]+)'", reason) if name == "train" else None
        hint = (f" tune.py takes the keys {', '.join(sorted(TUNE_KEYS))} (and those under them); every other key "
                "goes to training." if unknown else "")
        added = next((o for o in given if o.startswith("+") and o.lstrip("+").startswith("space.")), None)
        if name == "tune" and added and "is not a subclass of ParamSpec" in reason:
            reason = (f"{added}: a search space entry cannot be added on the command line (Hydra cannot give it "
                      "its type); point an entry at the key instead (space.dropout.key=optim.label_smoothing "
                      "space.dropout.high=0.2), or write a search space file "
                      "conf/tune/NAME.yaml and pick it with tune=NAME")
        raise ConfigError(f"{'tune.py' if name == 'tune' else 'train'} config: {reason} (overrides: "
                          f"{' '.join(given)}).{hint}") from e
    except ValueError as e:  # `model=null`: a config group given no option
        message = null_group_message(e, overrides, "tune.py" if name == "tune" else "train.py")
        if message is None:
            raise
        raise ConfigError(f"{'tune.py' if name == 'tune' else 'train'} config: {message}") from e


def _check_tune_config(cfg: DictConfig) -> None:
    if OmegaConf.is_missing(cfg, "study"):  # first: a value that names it cannot be resolved either
        raise ConfigError("tune.py needs a study name: python tune.py study=NAME n_trials=N [train overrides]")
    check_resolvable(cfg)  # a key removed with `~space`, a value that cannot be resolved: named, before it is read
    check_name("study", cfg.study, names=f"the study's directory under out_dir ({cfg.out_dir})")
    # Optuna would refuse the sampler's and pruner's numbers with a traceback, after the study's storage was made.
    check_keys(cfg, (("n_trials", cfg.n_trials >= 1, "at least 1"),
                     ("out_dir", str(cfg.out_dir).strip() != "", "a directory (`.` for this one), not empty"),
                     ("storage", cfg.storage is None or str(cfg.storage).strip() != "",
                      "null (the study directory's own study.db) or a storage URL, not empty"),
                     seed_check("sampler.seed", cfg.sampler.seed),
                     ("sampler.n_startup_trials", cfg.sampler.n_startup_trials >= 0, "0 or more"),
                     ("pruner.n_startup_trials", cfg.pruner.n_startup_trials >= 0, "0 or more"),
                     ("pruner.prune_from_epoch", cfg.pruner.prune_from_epoch >= 1, "at least 1")))
    if not 1 <= cfg.heartbeat.interval_s < cfg.heartbeat.grace_s:
        raise ConfigError(f"config keys heartbeat.interval_s and heartbeat.grace_s need 1 <= interval_s < grace_s "
                          f"(a living trial must beat before it counts as dead); got {cfg.heartbeat.interval_s} and "
                          f"{cfg.heartbeat.grace_s}.")
    if not cfg.space:
        raise ConfigError("the search space is empty: choose one with tune=NAME (conf/tune/*.yaml).")
    entry_of_key: dict[str, str] = {}
    for name, spec in cfg.space.items():
        if OmegaConf.is_missing(spec, "key") or not str(spec.key or "").strip():
            raise ConfigError(f"search space entry space.{name} needs a key: the train override it sets (e.g. optim.lr).")
        if str(spec.key).startswith("hydra.") or spec.key == "hydra":
            raise ConfigError(f"search space entry space.{name} has key={spec.key}: a search samples train keys, and "
                              "Hydra's own (hydra.*) say where and how a job runs, not what it trains.")
        if spec.key in entry_of_key:
            raise ConfigError(f"search space entries space.{entry_of_key[spec.key]} and space.{name} both sample "
                              f"{spec.key}, which a trial sets once; drop one (~space.{name}).")
        entry_of_key[spec.key] = name
        ranged = spec.low is not None and spec.high is not None
        if bool(spec.choices) == ranged:
            raise ConfigError(f"search space entry space.{name} needs either choices or low and high; got {OmegaConf.to_container(spec)}.")
        odd = [c for c in spec.choices or [] if not (c is None or isinstance(c, (bool, int, float, str)))]
        if odd:  # Optuna's categorical values; a list of widths is a key's value, not a choice it can record
            raise ConfigError(f"search space entry space.{name} has the choice {OmegaConf.to_container(odd[0])}; "
                              "choices are numbers, strings, booleans or null (Optuna records them). To search "
                              "over lists, search a group whose options hold them (e.g. key=model).")
        if ranged and (spec.low > spec.high or (spec.log and spec.low <= 0)):
            raise ConfigError(f"search space entry space.{name} needs low <= high (and low > 0 with log: true); "
                              f"got low={spec.low}, high={spec.high}.")
        if ranged and spec.integer and not (float(spec.low).is_integer() and float(spec.high).is_integer()):
            raise ConfigError(f"search space entry space.{name} has integer: true, so low and high are whole numbers; "
                              f"got low={spec.low}, high={spec.high}.")


def _distribution(spec: DictConfig) -> optuna.distributions.BaseDistribution:
    """What a search space entry samples from, as Optuna records it with each trial."""
    if spec.choices:
        return optuna.distributions.CategoricalDistribution(list(spec.choices))
    if spec.integer:
        return optuna.distributions.IntDistribution(int(spec.low), int(spec.high), log=spec.log)
    return optuna.distributions.FloatDistribution(spec.low, spec.high, log=spec.log)


def _described(sampled: optuna.distributions.BaseDistribution) -> str:
    if isinstance(sampled, optuna.distributions.CategoricalDistribution):
        return f"the choices {list(sampled.choices)}"
    kind = "whole numbers" if isinstance(sampled, optuna.distributions.IntDistribution) else "numbers"
    return f"{kind} from {sampled.low} to {sampled.high}" + (" (log scale)" if sampled.log else "")


def _suggest(trial: optuna.Trial, name: str, spec: DictConfig) -> Any:
    sampled = _distribution(spec)
    if isinstance(sampled, optuna.distributions.CategoricalDistribution):
        return trial.suggest_categorical(name, sampled.choices)
    if isinstance(sampled, optuna.distributions.IntDistribution):
        return trial.suggest_int(name, sampled.low, sampled.high, log=sampled.log)
    return trial.suggest_float(name, sampled.low, sampled.high, log=sampled.log)


class TrialFailed(Exception):
    """A trial diverged or crashed: recorded, and the study goes on."""


class TrialSurplus(TrialFailed):
    """A trial started after the trials before it (finished or still running) had filled `n_trials`, as
    happens when several processes ask for a trial at once: it never trains, is not counted, and its
    process stops."""


class TrialInterrupted(Exception):
    """Ctrl-C or SIGTERM stopped a trial: recorded `interrupted` (an Optuna FAIL that `n_trials` does not
    count, so the next run of the command replaces it), and the study stops; tune.py exits 130 or 143. A SIGTERM
    that came between trials, or after a trial's last check for it, stops the study before its next trial."""

    def __init__(self, signal_number: int):
        super().__init__(f"stopped by signal {signal_number}")
        self.signal_number = signal_number


class _TrialEndsInOneLine(logging.Filter):
    """Optuna logs the exception that ended a trial with its traceback, then a second line "failed with value
    None". The ends this code raises on purpose are already recorded and said: a failed trial keeps Optuna's one
    line, without the traceback of our own exception; an interrupted one (by a signal during training, or Ctrl-C
    before it), and one that stops the study with the user's error to fix, are told by tune.py's closing paragraph."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, (TrialInterrupted, KeyboardInterrupt, FmnistError)) or record.getMessage().endswith("failed with value None."):
            return False
        if isinstance(error, TrialFailed):
            record.exc_info, record.exc_text = None, None
        return True


# How a failed trial ended, in its `status` user attribute (the run record's words): the failures `n_trials`
# counts, beside the completed and pruned trials (`counted`).
COUNTED_FAILURES = (FAILED, DIVERGED)
SURPLUS = "surplus"  # the status of a `TrialSurplus`
SURPLUS_POLL_S = 1.0  # how often a trial that may not be needed looks again at the ones before it


def counted(trial: optuna.trial.FrozenTrial) -> bool:
    """Whether a trial used up one of `n_trials`: it finished on its own (completed, pruned, failed or diverged),
    not stopped by a signal or a killed process."""
    state = optuna.trial.TrialState
    return trial.state in (state.COMPLETE, state.PRUNED) or (
        trial.state == state.FAIL and trial.user_attrs.get("status") in COUNTED_FAILURES)


class StopAtNTrials:
    """Optuna callback: stop this process once the study (every process's trials) has `n` counted trials,
    or once it was handed a trial that others had made surplus (the rest are theirs to finish)."""

    def __init__(self, n: int):
        self.n = n

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if trial.user_attrs.get("status") == SURPLUS or sum(counted(t) for t in study.get_trials(deepcopy=False)) >= self.n:
            study.stop()


@dataclass
class Search:
    """A study's search: the tune config, the train overrides every trial shares, and where its trials go. It
    checks the space (and a continuation of the study) before the first trial, and its `objective` trains a trial."""

    cfg: DictConfig  # the tune config
    train_overrides: list[str]
    study_dir: Path
    heartbeat: bool = False  # whether the storage marks the trials of dead processes failed (database storages)
    _base: DictConfig | None = field(default=None, init=False, repr=False)

    def check_space(self) -> dict[tuple[str, ...], DictConfig]:
        """Compose the train config at each end of each range (and with each choice), so that a typo'd key
        or an impossible value stops the study before its first trial, not in the middle. Returns the
        compositions, by the sampled values they hold, for `check_data`.

        The searched keys are checked together, as a trial sets them: the k-th composition takes the k-th
        value of every key (low/high, or its choices, the last repeated), so every value is checked in as
        many compositions as the longest list has values (a composition takes a fraction of a second). Then
        every combination of those values of the keys that are not config groups is set and checked in each
        choice of config groups, for the rules between keys (`data.augment.flip_alternate` needs `hflip`).
        """
        for name, spec in self.cfg.space.items():
            fixed = [o for o in self.train_overrides if override_key(o) == spec.key]
            if fixed:
                raise ConfigError(f"the train override {fixed[0]} sets {spec.key}, which the search space samples "
                                  f"(space.{name}): every trial would replace it with its sampled value. Drop the "
                                  f"override to search {spec.key}, or drop the search (~space.{name}) to fix it.")
        base = self._base_config()
        refuse_unknown_keys(base, self.train_overrides)  # `+optim.lrr=1`: as train.py refuses it
        if base.ckpt_path is not None:  # train.py would refuse it in the first trial, naming a key tune.py lacks
            raise ConfigError(f"ckpt_path={base.ckpt_path} resumes one run of train.py; every trial of a study trains "
                              "in a new directory, and the study continues by itself when this command is run again "
                              "(a stopped trial is replaced). Drop ckpt_path.")
        check_config(base)
        self._check_placement(base)
        split_csvs(base.data.dir)
        values = {spec.key: [int(v) if spec.integer else v for v in spec.choices or [spec.low, spec.high]]
                  for spec in self.cfg.space.values()}
        groups = {key for key in values if isinstance(OmegaConf.select(base, key), DictConfig)}  # e.g. `model`
        composed = {}  # a composition per choice of the searched config groups
        ends = {(): base}  # and one per value of every searched key, for the data's own checks
        for k in range(max((len(v) for v in values.values()), default=0)):
            extremes = [f"{key}={override_text(v[min(k, len(v) - 1)])}" for key, v in values.items()]
            cfg = _compose("train", [*ONE_DEVICE, *self.train_overrides, *extremes])
            with self._named_ends(extremes):
                check_config(cfg)
            ends[tuple(extremes)] = cfg
            composed.setdefault(tuple(o for o in extremes if override_key(o) in groups), cfg.copy())  # changed below
        plain = {key: vs for key, vs in values.items() if key not in groups}
        for sampled, cfg in every_combination(composed, plain):
            try:
                check_config(cfg)
            except ConfigError as e:
                raise ConfigError(f"the search space holds {' '.join(sampled)}, which a trial may sample: {e} "
                                  "No trial was started.") from None
        return ends

    def check_data(self, ends: dict[tuple[str, ...], DictConfig]) -> None:
        """Check the data of each composition `check_space` returned: a bad CSV, or data.val_size above its rows,
        stops the study here, not in a trial. Through the datamodule, which imports Lightning: the last check
        before the study's directory and storage are made."""
        from fmnist.training.claim import check_data

        console.setup()  # importing Lightning gave it a console handler of its own (each line came out twice)
        for extremes, cfg in ends.items():
            with self._named_ends(extremes):
                check_data(cfg)

    @contextlib.contextmanager
    def _named_ends(self, extremes):
        """A ConfigError inside names the search space entries whose ends (`extremes`, overrides) it checked."""
        try:
            yield
        except ConfigError as e:
            if not extremes:
                raise
            entry = {spec.key: name for name, spec in self.cfg.space.items()}
            reached = ", ".join(f"{o} (space.{entry[override_key(o)]})" for o in extremes)
            raise ConfigError(f"the search space's ends reach {reached}, which a trial may sample: {e} Change the "
                              "entry's low, high or choices; no trial was started.") from None

    def _base_config(self) -> DictConfig:
        """The train config composed with this command's train overrides (before any sampled value), once."""
        if self._base is None:
            self._base = _compose("train", [*ONE_DEVICE, *self.train_overrides])
        return self._base

    def setting(self, train_overrides: list[str] | None = None) -> dict:
        """What every trial computes with before its sampled values: the train config composed with the train
        overrides, flattened, without placement keys (data.dir, devices, trackers) and the searched keys."""
        cfg = (self._base_config() if train_overrides is None
               else _compose("train", [*ONE_DEVICE, *train_overrides]))
        searched = self.searched_keys()
        return {key: value for key, value in flat_config(cfg).items()
                if key not in PLACEMENT_KEYS and not any(key == s or key.startswith(f"{s}.") for s in searched)}

    def searched_keys(self) -> set[str]:
        """The train keys the search space samples (`optim.lr`, or a group such as `model`)."""
        return {spec.key for spec in self.cfg.space.values()}

    def check_continuation(self, study: optuna.Study) -> None:
        """Refuse to add trials of another setting to `study` (its earlier trials' train overrides computed
        something else: a dropped `preset=cpu`, another model width); a new study records its setting."""
        setting, saved = self.setting(), study.user_attrs.get(SETTING_ATTR)
        first = list(self.train_overrides)  # the train overrides of the study's first trials
        earlier = next((t.user_attrs["overrides"] for t in study.trials if "overrides" in t.user_attrs), None)
        if saved is None and earlier is not None:  # a study from before settings were recorded: its first trial's
            try:
                legacy = renamed_overrides([o for o in earlier if override_key(o) not in self.searched_keys()])
                saved, first = self.setting(legacy), legacy
            except ConfigError as e:  # keys since removed: nothing to compare with
                log.warning("study %s: its first trial's train overrides no longer compose (%s); continuing "
                            "without checking that this command trains the same setting", study.study_name, e)
        differ = [] if saved is None else sorted(k for k in set(saved) | set(setting) if saved.get(k) != setting.get(k))
        changed = [key for key in differ if key not in RESUMABLE_KEYS]
        if changed:
            before = study.user_attrs.get(OVERRIDES_ATTR)
            raise ConfigError(
                f"study {study.study_name} has trials of another setting"
                + (f" (train overrides: {' '.join(before) or 'none'})" if before is not None else "")
                + f": this command differs in {changed} (was {[saved.get(k) for k in changed]}, now "
                f"{[setting.get(k) for k in changed]}), so its trials could not be compared with the earlier ones; "
                "nothing was written. Continue the study with the same train overrides (placement keys such as "
                "data.dir, and the trials' trainer.max_epochs or max_time, may differ), or start another one "
                "(study=NAME).")
        self._check_same_space(study)
        for key in differ:  # a longer (or shorter) budget: allowed, and said
            log.info("study %s: new trials train with %s=%s, its first ones with %s", study.study_name, key,
                     setting.get(key), saved.get(key))
        if SETTING_ATTR not in study.user_attrs:
            study.set_user_attr(SETTING_ATTR, setting if saved is None else saved)
            study.set_user_attr(OVERRIDES_ATTR, first)

    def _check_same_space(self, study: optuna.Study) -> None:
        """Refuse a search space entry whose kind or choices differ from what the study's earlier trials sampled
        (Optuna fails such a trial, after its record was written); a float or integer range may move."""
        for name, spec in self.cfg.space.items():
            earlier = next((t.distributions[name] for t in study.trials if name in t.distributions), None)
            if earlier is None:
                continue
            sampled = _distribution(spec)
            try:
                optuna.distributions.check_distribution_compatibility(earlier, sampled)
            except ValueError:
                raise ConfigError(
                    f"study {study.study_name} sampled space.{name} from {_described(earlier)}; this command's "
                    f"space.{name} is {_described(sampled)}, and Optuna cannot mix the two in one study; "
                    "nothing was written. Continue with the same choices (a range's low and high may change), or "
                    "start another study (study=NAME).") from None

    @staticmethod
    def _check_placement(cfg: DictConfig) -> None:
        devices = cfg.trainer.devices
        one = devices in (1, "1") or (OmegaConf.is_list(devices) and len(devices) == 1)
        if "ddp" in str(cfg.trainer.strategy) or cfg.trainer.num_nodes != 1 or not one:
            raise ConfigError("tune.py trains each trial in its own process on one device; got "
                              f"trainer.strategy={cfg.trainer.strategy} trainer.devices={cfg.trainer.devices} "
                              f"trainer.num_nodes={cfg.trainer.num_nodes}. To use several GPUs, start one tune.py "
                              "per GPU on the same study (CUDA_VISIBLE_DEVICES=i python tune.py study=NAME ...).")

    def objective(self, trial: optuna.Trial) -> float:
        """Optuna's objective: wait while the trials before this one may yet fill `n_trials` (a surplus trial stops
        untrained), sample the space, train the trial as a run in its own directory, and return its best validation
        accuracy; a pruned, diverged, out-of-memory or stopped trial is recorded and raised as Optuna expects."""
        from fmnist.sweeps.pruning import ReportToTrial
        from fmnist.training.signals import SIGTERM_RECEIVED, stopping_signal
        from fmnist.training.train import RunPruned, failure_of, train

        # Trial numbers are handed out by the storage one at a time: the trials numbered before this one
        # that finished (counted) or are still running decide, in the same way in every process, whether
        # this one is still needed.
        # While the finished ones fall short of n_trials but the running ones would fill it, wait: if one of
        # them dies (its process killed: the heartbeat marks it failed), this trial takes its place. Without
        # a heartbeat (a journal file) a dead process's trial would run forever: this one is not needed.
        while True:
            before = [t for t in trial.study.get_trials(deepcopy=False) if t.number < trial.number]
            done = sum(counted(t) for t in before)
            running = sum(t.state == optuna.trial.TrialState.RUNNING for t in before)
            if done >= self.cfg.n_trials or (done + running >= self.cfg.n_trials and not self.heartbeat):
                trial.set_user_attr("status", SURPLUS)  # and StopAtNTrials stops this process
                raise TrialSurplus(f"trial {trial.number} is not needed: the {done} trials before it fill "
                                   f"n_trials={self.cfg.n_trials}")
            if done + running < self.cfg.n_trials:
                break
            time.sleep(SURPLUS_POLL_S)
            with warnings.catch_warnings():  # "experimental" since optuna 2.9
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(trial.study)
            record_stale_trials(trial.study, self.study_dir)
        if SIGTERM_RECEIVED.is_set():  # it came after the previous trial's last check: stop before training
            trial.set_user_attr("status", INTERRUPTED)
            raise TrialInterrupted(signal.SIGTERM)
        params = {name: _suggest(trial, name, spec) for name, spec in self.cfg.space.items()}
        # Every digit of a float: the trial trains exactly the value Optuna records, and best.yaml's command reproduces it.
        overrides = [*self.train_overrides,
                     *(f"{spec.key}={override_text(params[name])}" for name, spec in self.cfg.space.items())]
        cfg = _compose("train", [*ONE_DEVICE, *overrides])
        run_dir = trial_dir(self.study_dir, trial.number)
        trial.set_user_attr("run_dir", str(run_dir))
        trial.set_user_attr("overrides", overrides)
        trial.set_user_attr("process", this_process())  # see `fail_dead_trials`
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            with console.logged_to(run_dir / JOB_LOG):  # a trial directory is a run directory: it has one too
                metrics = train(cfg, run_dir, overrides, callbacks=[ReportToTrial(trial)], resume_hint=RESUME_HINT,
                                record={TRIAL_RECORD_KEY: {"study": self.cfg.study, "trial": trial.number, "params": params}},
                                storage_key="out_dir")  # a trial's directory is under out_dir; tune.py has no hydra.*
        except RunPruned as e:
            raise optuna.TrialPruned(str(e)) from e
        except Exception as e:
            # The message names the error's type where it is not ours (a KeyError's message is only its key).
            status, message = failure_of(e)
            if isinstance(e, FmnistError) and status == FAILED and not isinstance(e, OutOfMemory):
                raise  # the user's to fix (data, config): stop the study
            trial.set_user_attr("status", status)  # diverged, or out of memory at one batch size: this trial only
            if not isinstance(e, FmnistError) and (run_dir / ERROR_FILE).is_file():  # a crash: where to look
                message += f" (traceback: {run_dir / ERROR_FILE})"
            raise TrialFailed(message) from e
        except BaseException as e:
            if stopping_signal(e) is None:
                raise
            trial.set_user_attr("status", INTERRUPTED)
            raise TrialInterrupted(stopping_signal(e)) from e  # an Exception: Optuna marks the trial FAIL
        for key in ("test/acc", "test/loss", "best_epoch"):
            if key in metrics:
                trial.set_user_attr(key, metrics[key])
        return metrics[METRIC]


def _orphan_trials(study_dir: Path, trials: list[str], why: str) -> ConfigError:
    return ConfigError(f"{study_dir} holds trials of a study ({', '.join(trials[:3])}{', ...' if len(trials) > 3 else ''}) "
                       f"but {why}, so they cannot be continued and would be mixed with new ones; nothing was "
                       "written. Continue with the storage they were run with (storage=...), or start the study "
                       "under another name (study=...) or out_dir.")


def check_trial_places(study_dir: Path, entries: list[Path], study: optuna.Study) -> None:
    """ConfigError for an entry named as a trial's directory (`entries`, found before the study's trials were read)
    that no trial of the study made: a file, or a directory of a trial number not yet given. A new trial would
    fail on it, counted as a failed trial, or be refused inside its trial, with advice tune.py does not take."""
    given = {trial_dir(study_dir, trial.number).name for trial in study.trials}
    strays = [entry.name for entry in entries if not entry.is_dir() or entry.name not in given]
    if strays:
        raise ConfigError(f"{study_dir}: holds {some_names(strays)}, named as the study's trials are, which no trial "
                          f"of study {study.study_name} made; its next trials would fail on them or be refused; "
                          "nothing was written. Move them out of the study's directory.")


def check_result_places(study_dir: Path) -> None:
    """ConfigError for a directory where the study writes one of its results (summary.csv/.md, best.yaml, a
    figure): found when they are written, after the trials had trained, it left them out of date."""
    try:
        check_not_directories(study_dir / name for name in (*SUMMARY_FILES, BEST_FILE, *FIGURES))
    except IsADirectoryError as e:
        raise ConfigError(f"{e.filename} is a directory, where the study writes its {Path(e.filename).name}; no "
                          "trial was started and nothing was written. Move that directory out of the study's "
                          "directory; the same command then continues the study.") from None


def _holds_a_study(study_dir: Path, storage: optuna.storages.BaseStorage | None, study: str, own: bool) -> bool:
    """Whether the study directory a refused worker made holds the study after all: one a worker started with it
    made there meanwhile (its trials, or, in the directory's own database (`own`), the study), which the refusal
    must not remove. A storage elsewhere (storage=) holds other studies too: only the trials tell."""
    if any(study_dir.glob(f"{TRIAL_DIR_PREFIX}*")):
        return True
    if not own:
        return False
    try:
        return storage is not None and study in optuna.study.get_all_study_names(storage)
    except Exception:  # a storage that cannot be read now: kept, as it may be another worker's
        return True


def run_search(conf_dir: Path, args: list[str]) -> optuna.Study:
    """`tune.py`'s work: compose, validate, run the study to `n_trials`, write best.yaml and figures."""
    register_tune()
    tune_overrides, train_overrides = split_overrides(args)
    train_overrides = renamed_overrides(train_overrides)
    hydra_keys = [o for o in train_overrides if re.split(r"[./]", override_key(o))[0] == "hydra"]
    if hydra_keys:  # each trial's place is the study's; a trial would ignore it, and its record repeat it
        raise ConfigError(f"{hydra_keys[0]}: tune.py places each trial itself (out_dir/study/trial-NNNN) and takes no "
                          "hydra.* key; choose where the study goes with out_dir= and study=.")
    with initialize_config_dir(config_dir=str(Path(conf_dir).resolve()), version_base="1.3", job_name="tune"):
        cfg = _compose("tune", tune_overrides)
        _check_tune_config(cfg)
        study_dir = Path(cfg.out_dir).expanduser() / cfg.study
        for spec in cfg.space.values():  # a search space may still name a key by its old name
            spec.key = RENAMED_KEYS.get(spec.key, spec.key)
        search = Search(cfg, train_overrides, study_dir)
        ends = search.check_space()
        check_same_data(study_dir, str(search._base_config().data.dir),  # its best trial would be chosen across both
                        advice="Start another study (study=NAME), or give the data its trials ran on; nothing was written.")
        check_storage_file(cfg.storage or default_storage(study_dir), default=not cfg.storage)
        made = missing_dirs(study_dir)  # removed again if the study is refused
        trials_here = sorted(p.name for p in study_dir.glob(f"{TRIAL_DIR_PREFIX}*"))
        own = storage_file(cfg.storage) if cfg.storage else study_dir / STUDY_DB  # a study's own database
        if trials_here and own is not None and (not own.exists() or own.stat().st_size == 0):  # opening it would
            # create an empty database, or fill the empty file with one
            gone = not own.exists()
            state = "is gone" if gone else "is an empty file"
            raise _orphan_trials(study_dir, trials_here, f"its database {STUDY_DB} {state}" if cfg.storage is None
                                 else f"the storage {cfg.storage} {'names no file yet' if gone else state} ({own})")
        theirs = [] if made or trials_here or (own is not None and own.parent.resolve() == study_dir.resolve()
                                               and own.exists()) else sorted(p.name for p in study_dir.iterdir())
        if theirs:  # its summary.md and best.yaml would replace theirs
            raise ConfigError(f"{study_dir} holds files that no study wrote ({', '.join(theirs[:3])}"
                              f"{', ...' if len(theirs) > 3 else ''}); a study is written into a new directory, or into "
                              "its own to continue it, so that nothing of yours is replaced; nothing was written. "
                              "Choose another study name (study=...) or out_dir.")
        check_result_places(study_dir)
        search.check_data(ends)
        study_dir.mkdir(parents=True, exist_ok=True)
        storage = None
        try:
            trials_now = sorted(study_dir.glob(f"{TRIAL_DIR_PREFIX}*"))  # before the study's trials are read
            storage = open_storage(cfg.storage, cfg.heartbeat, study_dir)
            with study_storage_errors_named(cfg.storage or default_storage(study_dir)):
                if trials_here and cfg.study not in optuna.study.get_all_study_names(storage):
                    raise _orphan_trials(study_dir, trials_here,
                                         f"the storage {cfg.storage or own} holds no study {cfg.study}")
                study = optuna.create_study(
                    study_name=cfg.study, storage=storage, direction="maximize", load_if_exists=True,
                    pruner=optuna.pruners.MedianPruner(n_startup_trials=cfg.pruner.n_startup_trials,
                                                       n_warmup_steps=cfg.pruner.prune_from_epoch))
                search.check_continuation(study)
                check_trial_places(study_dir, trials_now, study)
        except ConfigError:  # a refusal leaves nothing behind: not even the study's directory
            if made and not _holds_a_study(study_dir, storage, cfg.study, own=cfg.storage is None):
                shutil.rmtree(study_dir, ignore_errors=True)
                for parent in made[1:]:  # out_dir's, while still empty (another worker may have started there)
                    remove_if_empty(parent)
            raise
        fail_dead_trials(study, storage, study_dir)
        search.heartbeat = isinstance(storage, optuna.storages.RDBStorage)
        # Seeded by (sampler.seed, the trials already in the study): a continued study must not replay the
        # first run's random start, and processes starting together with distinct sampler.seed must not meet
        # on one seed (a sum would: 0 + 1 trial = 1 + 0 trials).
        seed = int(np.random.SeedSequence([cfg.sampler.seed, len(study.trials)]).generate_state(1)[0])
        study.sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=cfg.sampler.n_startup_trials)
        done = sum(counted(t) for t in study.trials)
        remaining = cfg.n_trials - done
        log.info("study %s (%s): %d trials so far, %d to run", cfg.study, study_dir, done, max(remaining, 0))
        if remaining > 0:
            optimize_log = logging.getLogger("optuna.study._optimize")  # where Optuna logs a trial's end
            if not any(isinstance(f, _TrialEndsInOneLine) for f in optimize_log.filters):
                optimize_log.addFilter(_TrialEndsInOneLine())
            # StopAtNTrials counts every process's trials: together they stop at n_trials.
            with _sigterm_noted() as sigterm_received:
                study.optimize(search.objective, catch=(TrialFailed,), callbacks=[StopAtNTrials(cfg.n_trials)])
                # optimize returns only once n_trials are done (a signal a trial stopped for raises out of it): a
                # SIGTERM the last trial did not stop for still ends the command with 143, and the next run, having
                # nothing to train, writes the results.
                if sigterm_received.is_set():
                    raise TrialInterrupted(signal.SIGTERM)
    write_results(study, study_dir)
    return study


@contextlib.contextmanager
def _sigterm_noted():
    """Between trials a SIGTERM sets SIGTERM_RECEIVED (the next trial then stops before it trains), instead of
    killing the process in the middle of the storage's writes; during a trial the run's own handling applies.
    Yields that event."""
    from fmnist.training.signals import SIGTERM_RECEIVED

    SIGTERM_RECEIVED.clear()
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: SIGTERM_RECEIVED.set()) if main else None
    try:
        yield SIGTERM_RECEIVED
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def best_overrides(study: optuna.Study, study_dir: Path) -> dict | None:
    """The best finished trial: its number, value, run directory (`trial_run_dir`: None where it is not found) and
    overrides; None when no trial has finished."""
    try:
        best = study.best_trial
    except ValueError:
        return None
    run_dir = trial_run_dir(study_dir, best)
    return {"study": study.study_name, "trial": best.number, METRIC: best.value,
            "test/acc": best.user_attrs.get("test/acc"), "run_dir": None if run_dir is None else str(run_dir),
            "params": dict(best.params), "overrides": list(best.user_attrs.get("overrides", []))}


def write_results(study: optuna.Study, study_dir: Path) -> None:
    """best.yaml, summary.csv/.md over the trial directories, the two figures; print the best trial."""
    states = {s.name.lower(): sum(t.state == s for t in study.trials) for s in optuna.trial.TrialState}
    print(f"study {study.study_name}: {len(study.trials)} trials ("
          + ", ".join(f"{n} {s}" for s, n in states.items() if n) + ")")
    if any((d / METRICS_FILE).exists() for d in study_dir.glob(f"{TRIAL_DIR_PREFIX}*")):
        record_stale_trials(study, study_dir)
        summarize(study_dir)
    best = best_overrides(study, study_dir)
    if best is None:
        print(f"no trial has finished yet: no {BEST_FILE}")
        return
    command = "python train.py " + " ".join(best["overrides"])
    text = (f"# Best trial of Optuna study {study.study_name} ({len(study.trials)} trials), by {METRIC}.\n"
            f"# Train it again (or with other seeds) with:\n#   {command}\n")
    if best["run_dir"] is None:  # its value and command are the database's, its files are not found
        gone = trial_dir(study_dir, best["trial"])
        log.warning("best trial %d: its directory is not found, neither %s nor where it ran (moved or removed, or on "
                    "another machine); %s gives its value and command from the study's database", best["trial"], gone,
                    BEST_FILE)
        text += f"# Its run directory is not found ({gone}: moved or removed, or on another machine).\n"
    atomic_write(study_dir / BEST_FILE, text + OmegaConf.to_yaml(OmegaConf.create(best)))
    print(f"best trial {best['trial']}: {METRIC} {best[METRIC]:.2%}"
          + (f", test/acc {best['test/acc']:.2%}" if best["test/acc"] is not None else "")
          + f" ({best['run_dir'] or 'its directory is not found'})\n  params: {best['params']}\n  {command}\n"
          f"  written to {study_dir / BEST_FILE}")
    _figures(study, study_dir)


def _figures(study: optuna.Study, study_dir: Path) -> None:
    from optuna.visualization import matplotlib as ovm

    from fmnist.training.figures import save_png  # matplotlib, headless

    for name, plot in FIGURES.items():
        try:
            with warnings.catch_warnings():  # "experimental" since optuna 2.2: noise at every run
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                # Too few trials, or too alike: Optuna would draw every importance equal; no figure says more.
                warnings.filterwarnings("error", message=".*Parameter importances will be equal")
                ax = getattr(ovm, plot)(study)
        except (ValueError, RuntimeError, UserWarning) as e:  # importances need two finished trials that differ
            log.warning("no %s: %s", name, e)
            continue
        fig = ax.figure
        fig.set_size_inches(7, 4.5)
        fig.tight_layout()
        save_png(fig, study_dir / name, dpi=120)
        print(f"  figure: {study_dir / name}")
