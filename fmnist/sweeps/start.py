"""A sweep's gate at its start (`CheckSweep`, a Hydra callback): every job's config, the launcher, the sweep
directory and the jobs it already holds are checked before the first job trains, so that a sweep is refused whole
(exit 2, nothing written) rather than stopped at the job that fails, after the jobs before it trained.
"""

from __future__ import annotations

import itertools
import sys
import traceback
from pathlib import Path

import pandas as pd
from hydra.core.global_hydra import GlobalHydra
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from fmnist.cli import OTHER_SWEEP_DIR, exit_with, unresolvable
from fmnist.config import PLACEMENT_KEYS, flat_config, superseded_note
from fmnist.data.sources import data_digests
from fmnist.errors import ConfigError, DataError, chained_fmnist_error
from fmnist.fsio import note_early_write, some_names
from fmnist.overrides import (SWEEP_CONFIG_FILE, check_sweep_values, composition_message, null_groups_named, override_key,
                              override_text, setting_of)
from fmnist.runs import (CHECKPOINT_DIR, COLUMNS, COMPLETED, FINISHED, INTERRUPTED, JOB_LOG, LAST_CHECKPOINT,
                         TRIAL_DIR_PREFIX, UNREADABLE, collect, computed_setting, differing_keys, is_job_dir, recipe,
                         short_digest)
from fmnist.stops import signals_leave_the_workers_to_stop
from fmnist.sweeps.placement import check_launcher, concurrent_jobs, launcher_kind


def check_sweep_dir(sweep_dir: Path) -> None:
    """ConfigError for a sweep directory that holds files but is no earlier sweep's (which a sweep continues): no
    `multirun.yaml` and no job directory (`is_job_dir`), or a tune.py study's. Its summary and Hydra's files
    would replace what is there."""
    if not sweep_dir.is_dir() or (sweep_dir / SWEEP_CONFIG_FILE).exists():
        return
    trials = sorted(p.name for p in sweep_dir.glob(f"{TRIAL_DIR_PREFIX}*") if p.is_dir())
    if trials:  # its trials are job directories too, but its summary and best.yaml are tune.py's
        raise ConfigError(f"{sweep_dir} is a tune.py study's directory ({', '.join(trials[:2])}"
                          f"{', ...' if len(trials) > 2 else ''}; no {SWEEP_CONFIG_FILE}): a sweep would replace its "
                          "summary.md and mix its jobs with the study's trials; nothing was written. Choose another "
                          f"directory ({OTHER_SWEEP_DIR}); tune.py continues the study.")
    if any(p.is_dir() and (is_job_dir(p) or (p / JOB_LOG).exists())  # a job refused in a joblib worker: its log alone
           for p in sweep_dir.iterdir()):
        return
    entries = sorted(p.name for p in sweep_dir.iterdir())
    if entries:
        raise ConfigError(f"{sweep_dir} holds files that no sweep wrote ({some_names(entries)}; no {SWEEP_CONFIG_FILE}); a sweep is written "
                          "into a new or empty directory, or into an earlier sweep's to continue it, so that nothing "
                          "of yours is replaced; nothing was written. Choose another directory "
                          f"({OTHER_SWEEP_DIR}).")


SWEEP_ELSEWHERE = (f"Give this sweep its own directory ({OTHER_SWEEP_DIR}), or the data its jobs ran on. "
                   "No job of the sweep was started.")


def sweep_jobs(sweep_dir: Path) -> pd.DataFrame:
    """`collect`'s table of a sweep directory, empty where there is none yet."""
    return collect(sweep_dir) if sweep_dir.is_dir() else pd.DataFrame(columns=COLUMNS)


def resumable(sweep_dir: Path, jobs: pd.DataFrame) -> pd.Series:
    """Which of `jobs` (its `sweep_jobs`) the sweep resumes: those stopped (`interrupted`) with a last.ckpt."""
    has_last = jobs.job.map(lambda job: (sweep_dir / job / CHECKPOINT_DIR / LAST_CHECKPOINT).is_file()).astype(bool)
    return (jobs.status == INTERRUPTED) & has_last


def check_same_data(sweep_dir: Path, data_dir: str, advice: str = SWEEP_ELSEWHERE, resumed: bool = False,
                    jobs: pd.DataFrame | None = None) -> None:
    """ConfigError for a sweep continued with CSVs other than those its finished jobs ran on (their `train_sha1`,
    `test_sha1`): its summary would average them together, and a job that finished (failed or diverged too)
    would stop the sweep when its turn came, as would a stopped job it resumes (`resumed`: one with a last.ckpt).
    Found before any job trains; the data are read only when the directory holds such jobs. `jobs`: its
    `sweep_jobs`, where the caller has them."""
    jobs = sweep_jobs(sweep_dir) if jobs is None else jobs
    stopped = resumable(sweep_dir, jobs) & resumed
    done = jobs[(jobs.status.isin(FINISHED) | stopped) & jobs.train_sha1.notna()]
    if done.empty:
        return
    try:
        ours = {split: short_digest(digest) for split, digest in data_digests(data_dir).items()}
    except DataError:
        return  # the first job says what is missing
    other = done[(done.train_sha1 != ours["train"]) | (done.test_sha1.notna() & (done.test_sha1 != ours["test"]))]
    if len(other):
        job = other.iloc[0]
        raise ConfigError(f"{sweep_dir}: its {job.status} job {job.job} ran on other data (the training/test CSVs' SHA-1 "
                          f"{job.train_sha1}/{job.test_sha1}) than data.dir={data_dir} holds ({ours['train']}/"
                          f"{ours['test']}); continued here, its summary would average the two. {advice}")


def check_job_records(sweep_dir: Path, jobs: pd.DataFrame) -> None:
    """ConfigError for a sweep directory holding a job (`jobs`: its `sweep_jobs`) whose metrics.json no run would
    write (damaged, edited), or is gone beside its last.ckpt (a run writes its record first, and a resume needs
    it): found by that job when its turn came, it stopped the sweep after the jobs before it had trained (under
    joblib, with a job of those killed mid-way and left `running`)."""
    damaged = jobs[jobs.status == UNREADABLE]  # `collect` lists a record gone beside its last.ckpt among them
    if len(damaged):
        problem = damaged.iloc[0].error
        raise ConfigError(f"{problem}; the sweep would stop at that job, after the jobs before it trained. Put back "
                          "the record the run wrote, or move the job's directory out of the sweep to run it again. No "
                          "job of the sweep was started.")


def check_sweep_jobs(config: DictConfig, config_loader) -> dict[str, dict]:
    """ConfigError for a sweep that holds a job `check_config` refuses, before its first job starts: found by
    that job, it would stop the sweep after the jobs before it had trained. Returns what each of its settings
    computes: {setting (`setting_of`): its `recipe`}.

    `config`: the sweep's config as Hydra gives it to a callback. As many jobs are composed as the longest list
    of swept values has values: the k-th takes the k-th value of every swept key (the last repeated), so every
    value is checked, in a job as the sweep composes it (a composition takes a fraction of a second). Rules
    between keys (`data.augment.flip_alternate` needs `hflip`, `optim.nesterov` a momentum) hold or fail per
    combination: in each composed job, every combination of the swept values of keys that are not config
    groups is then set and checked too (milliseconds each, without composing).
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import QuotedString
    from hydra.errors import HydraException

    from fmnist.cli import check_given_config
    from fmnist.training.checks import check_config  # here: `python -m fmnist.results` needs no torch

    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    parsed = OverridesParser.create(config_loader=config_loader).parse_overrides(
        [*(f"{key}={value}" for key, value in params.items()), *OmegaConf.to_container(config.hydra.overrides.task)])
    values: dict[str, list[str]] = {}  # as Hydra's basic sweeper reads them: a later override of a key wins
    plain: dict[str, list] = {}  # the swept values of keys that are not config groups, as Python values
    for override in parsed:
        key = override.get_key_element()
        plain.pop(override.key_or_group, None)
        if override.is_discrete_sweep():
            values[key] = [f"{key}={value}" for value in override.sweep_string_iterator()]
            if not (key.startswith("hydra.") or config_loader.repository.group_exists(override.key_or_group)):
                plain[override.key_or_group] = [v.text if isinstance(v, QuotedString) else v
                                                for v in override.sweep_iterator()]
        elif not override.is_sweep_override():
            values[key] = [f"{key}={override.get_value_element_as_str()}"]

    def refused(job: list[str], error: ConfigError) -> ConfigError:
        where = f"the sweep's job {' '.join(job)}" if job else "the sweep"
        return ConfigError(f"{where}: {error} No job of the sweep was started.")

    for key, choices in values.items():  # a job is named, and grouped into its setting, without placement keys
        key = override_key(key)  # `+experiment` is experiment
        if key in PLACEMENT_KEYS and len(set(choices)) > 1:
            shown = ", ".join(dict.fromkeys(c.split("=", 1)[1] for c in choices))
            raise ConfigError(
                f"the sweep varies {key} ({shown}), which is not part of a job's name: a job is named by "
                "the overrides that change what it computes within its experiment and placement, so these jobs would "
                "share one directory, where one of them would run and the others be refused or skipped. Run one sweep "
                "for each value. No job of the sweep was started.")

    composed: dict[tuple[str, ...], DictConfig] = {}  # a composed job per choice of the swept config groups
    fixed = [v[0] for v in values.values() if len(v) == 1]  # the overrides every job has
    recipes: dict[str, dict] = {}

    def note(job: list[str], cfg: DictConfig) -> None:  # now: every_combination changes `cfg` for the next one
        recipes.setdefault(setting_of(list(dict.fromkeys([*fixed, *job]))), recipe(flat_config(cfg)))
    for k in range(max((len(v) for v in values.values()), default=0)):
        job = [v[min(k, len(v) - 1)] for v in values.values()]
        swept = [o for o, v in zip(job, values.values()) if len(v) > 1]
        try:
            try:
                with null_groups_named(job, "train.py"):  # `model=simple,null`: a group given null among its values
                    cfg = config_loader.load_sweep_config(config, job)
            except (HydraException, OmegaConfBaseException) as e:  # e.g. seed=abc: as train.py reports it
                raise ConfigError(composition_message(e)) from None
            with open_dict(cfg):
                del cfg["hydra"]
            check_given_config(cfg, required=True, overrides=job)
            check_config(cfg)
        except ConfigError as e:
            raise refused(swept, e) from None
        composed.setdefault(tuple(o for o in swept if override_key(o) not in plain), cfg)
        note(job, cfg)
    if len(plain) < 2 and len(composed) < 2:  # no combination that the jobs above left out
        return recipes
    for job, cfg in every_combination(composed, plain):
        try:
            check_config(cfg)
        except ConfigError as e:
            raise refused(job, e) from None
        note(job, cfg)
    return recipes


def check_same_recipe(sweep_dir: Path, recipes: dict[str, dict], jobs: pd.DataFrame) -> None:
    """ConfigError for a sweep whose settings (`recipes`: `check_sweep_jobs`') are those of jobs in its directory
    (`jobs`: its `sweep_jobs`; completed, or stopped with a last.ckpt to resume) that computed something else: jobs
    are named without their experiment and preset, so `-m preset=cpu seed=2` into a `preset=smoke` sweep, or a sweep
    continued after conf/'s defaults changed, would be averaged with the jobs there (or stop at a resume's check,
    after the jobs before it trained). Jobs without a config.yaml (older runs) are not judged."""
    kept = jobs[(jobs.status == COMPLETED) | resumable(sweep_dir, jobs)]
    for job, setting, status in zip(kept.job, kept.setting, kept.status):
        ours = recipes.get(setting)
        theirs = None if ours is None else computed_setting(sweep_dir / job, "No job of the sweep was started.")
        differ = differing_keys([ours, theirs]) if theirs is not None else []
        if differ:
            raise ConfigError(
                f"{sweep_dir}: its {status} job {job} computes something other than this sweep's jobs of the same "
                f"setting, {setting}: they differ in {some_names(differ)} ({differ[0]}: {theirs.get(differ[0])!r} "
                f"there, {ours.get(differ[0])!r} here). A job is named without its experiment and preset, so the "
                f"sweep's summary would average the two. Give this sweep its own directory ({OTHER_SWEEP_DIR}). No job "
                "of the sweep was started.")


def every_combination(composed: dict[tuple[str, ...], DictConfig], plain: dict[str, list]):
    """Each config of `composed` (keyed by the overrides that chose its config groups) with every combination of
    the values of `plain` (keys that are not config groups) set on it: yield the overrides that name the
    combination (as `override_text` writes them) and the config, which the next combination changes. Setting values
    takes milliseconds where composing takes a fraction of a second, so a sweep's or a search's start can check
    every combination for the rules between keys, having composed once per value."""
    for groups, cfg in composed.items():
        for combination in itertools.product(*plain.values()):
            for key, value in zip(plain, combination):
                OmegaConf.update(cfg, key, value, merge=True)  # each value composed before: its type fits
            yield [*groups, *(f"{key}={override_text(value)}" for key, value in zip(plain, combination)
                              if len(plain[key]) > 1)], cfg


class CheckSweep(Callback):
    """Hydra callback (`conf/train.yaml`): at a multirun's start, refuse a sweep with a job that `check_config`
    refuses, a launcher or a directory it cannot use, or other data than the sweep it continues, before anything
    is written (exit 2)."""

    def on_multirun_start(self, config, **kwargs) -> None:
        try:
            self._check(config)
        except Exception:  # a fault in the checks themselves: Hydra would only warn, and run the sweep unchecked
            traceback.print_exc()
            sys.exit(1)

    def _check(self, config) -> None:
        note = superseded_note(OmegaConf.select(config, "hydra.runtime.choices.experiment"))
        if note:
            print(note, file=sys.stderr)
        params = OmegaConf.select(config, "hydra.sweeper.params") or {}
        try:  # before Hydra makes the sweep directory: a refusal writes nothing
            try:
                sweep_dir = Path(config.hydra.sweep.dir)  # `name=a/b`: refused by its resolver's check
            except OmegaConfBaseException as e:  # Hydra would only warn of it, and go on
                raise chained_fmnist_error(e) or e
            loader = GlobalHydra.instance().config_loader()
            check_launcher(config.hydra.launcher)
            typed = OmegaConf.to_container(config.hydra.overrides.task)  # as typed: `${oc.env:X}` unresolved
            check_sweep_values([*typed, *(f"{k}={v}" for k, v in params.items())], loader)
            recipes = check_sweep_jobs(config, loader)  # every swept value, before the first job trains
            check_sweep_dir(sweep_dir)
            jobs = sweep_jobs(sweep_dir)  # every job's record read once, for the checks below
            check_job_records(sweep_dir, jobs)
            check_same_data(sweep_dir, str(config.data.dir), resumed=True, jobs=jobs)
            check_same_recipe(sweep_dir, recipes, jobs)
        except OmegaConfBaseException as e:  # `data.dir=${oc.env:UNSET}`: Hydra would only warn, and rewrite multirun.yaml
            exit_with(unresolvable(e))
        except ConfigError as e:
            exit_with(e)
        # Hydra rewrites multirun.yaml before the first job's checks; a refused sweep puts it back (fmnist.cli), and
        # so does one stopped before its first job's checks pass, where they run in this process.
        launcher = launcher_kind(config.hydra.launcher)
        note_early_write(sweep_dir / SWEEP_CONFIG_FILE, refused_only=launcher != "basic")
        if launcher == "joblib":
            from fmnist.hardware import usable_cores

            if concurrent_jobs(config.hydra.launcher, usable_cores()) > 1:  # with 1, its jobs run in this process
                signals_leave_the_workers_to_stop()
