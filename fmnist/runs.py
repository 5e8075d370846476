"""The record of a run: its directory's `metrics.json` (status, final metrics, provenance: `fmnist.provenance`),
the names and columns of its other files, and the records of a sweep's jobs read into one table.

Sweeps skip FINISHED jobs when started again, and resume the others from `checkpoints/last.ckpt`.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from omegaconf import DictConfig, OmegaConf

from fmnist import NUM_CLASSES
from fmnist.config import (ADDED_KEYS, PLACEMENT_KEYS, PRECISIONS, RENAMED_KEYS, SEED_MAX, flatten, is_finite_number,
                           is_text_list)
from fmnist.errors import ConfigError, first_line
from fmnist.fsio import atomic_write, not_a_file, read_yaml, some_names
from fmnist.overrides import setting_of
from fmnist.provenance import process_gone

METRICS_FILE = "metrics.json"
CONFIG_FILE = "config.yaml"  # the run's resolved config
CONFUSION_FILE = "confusion_matrix.csv"  # the test set's confusion matrix, [true, predicted] counts
EPOCHS_FILE = "epochs.csv"  # one row per epoch: the curves, and the compute so far
JOB_LOG = "train.log"  # a run's log (Hydra's, named after the train.py script; a tune.py trial's too)
PREDICTIONS_FILE = "predictions.npz"  # every validation and test image's predicted class (results compare)
ERROR_FILE = "error.txt"  # the traceback of the error that stopped the run, while that is its state
CHECKPOINT_DIR = "checkpoints"  # best-epochNNN.ckpt (the best validation accuracy so far) and last.ckpt
BEST_CHECKPOINT_PREFIX = "best-epoch"  # followed by the epoch, counted from 1, in three digits
LAST_CHECKPOINT = "last.ckpt"  # the latest epoch's, which a resume starts from
TRIAL_DIR_PREFIX = "trial-"  # a tune.py study's trial directories: trial-NNNN, beside its summary and best.yaml
TRIAL_RECORD_KEY = "optuna"  # a trial's record: its study, trial number and sampled values under this key
NET_PREFIX = "net."  # of the network's weights in a checkpoint's state_dict (LitClassifier.net)
# epochs.csv's columns, in order (fmnist.training.epochs.EpochCSV writes them; older runs lack the last ones)
EPOCH_COLUMNS = ["epoch", "step", "train/loss", "train/acc", "val/loss", "val/acc", "val/acc_best", "lr",
                 "epoch_seconds", "train_seconds", "train_images", "train_flops"]
CURVES = ("train/loss", "val/loss", "val/acc")  # the columns every reader of epochs.csv needs, against its epoch
# `python -m fmnist.results tricks`'s table (fmnist.inference.tricks.compare), as `--csv` writes it and `--from-csv`
# reads it: here, so that reading a written table does not import the evaluation (and torch)
TRICKS_COLUMNS = ["weights", "tta", "val_acc_mean", "val_acc_std", "n", "change_mean", "change_std"]
TRICKS_WEIGHTS = ("raw", "ema")  # its rows' weights: as trained, and their average where the run kept one
TRICKS_REFERENCE = ("raw", "none")  # the (weights, tta) row every other row's change is paired against
ACCURACY_RANGE = (0.0, 1.0)  # an accuracy is a fraction, in every file a run writes
# What the other numbers of a record's `metrics` are, by the end of their key: (ends, fits, what it is).
METRIC_RULES = (("/loss", lambda v: v >= 0, "a loss (0 or more)"),
                ("_seconds", lambda v: v >= 0, "a duration (0 or more seconds)"),
                (("epochs", "best_epoch"), lambda v: v >= 0 and v == int(v),
                 "a number of epochs (a whole number, 0 or more)"))
# A run's status, as metrics.json and every summary spell it.
RUNNING, COMPLETED, FAILED, DIVERGED, INTERRUPTED = "running", "completed", "failed", "diverged", "interrupted"
PRUNED = "pruned"  # a search's trial stopped early by its pruner
STARTED = "started"  # a job directory with no record yet (in a sweep's table only)
UNREADABLE = "unreadable"  # a job whose metrics.json is not a record this code wrote (in a sweep's table only)
FINISHED = (COMPLETED, FAILED, DIVERGED)
RECORDED = (RUNNING, *FINISHED, INTERRUPTED, PRUNED)  # every status a run's metrics.json can hold
RESOLVED_PRECISIONS = tuple(p for p in PRECISIONS if p != "auto")  # what a record's precision.resolved may hold


def trial_dir(study_dir: Path, number: int) -> Path:
    """Trial `number`'s run directory in the study directory `study_dir`, where a new trial is made and a copied or
    moved study holds it (the path a trial stored in the study's database names the original's directory)."""
    return Path(study_dir) / f"{TRIAL_DIR_PREFIX}{number:04d}"


def read_record(run_dir: Path) -> dict | None:
    """The run's metrics.json, or None if it has none (or it is unreadable, or not a record: not a JSON object)."""
    try:
        record = json.loads((Path(run_dir) / METRICS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def best_checkpoint_order(path: Path) -> tuple[int, int, str]:
    """Where a best checkpoint comes in the order they were written: by its epoch (counted from 1), then by the
    version Lightning adds to a name that is taken (`best-epoch001-v1.ckpt` after `best-epoch001.ckpt`); -1 for
    a name of another kind."""
    found = re.fullmatch(rf"{BEST_CHECKPOINT_PREFIX}(\d+)(?:-v(\d+))?\.ckpt", path.name)
    return (int(found[1]), int(found[2] or 0), path.name) if found else (-1, 0, path.name)


# The sections every run's config.yaml holds: a mapping without them is no run's config.
CONFIG_SECTIONS = ("data", "model", "optim", "trainer")


def saved_config(saved: Path, then: str = "the run it belongs to cannot be compared with this command. Start a new "
                                          "run directory.") -> dict:
    """A run's saved config.yaml, flattened (`data.augment.hflip`), keys renamed since under their new names;
    ConfigError naming the file if it is not a run's config (damaged, emptied, or edited into something else),
    ending with `then`: what that means for the command."""
    try:
        loaded = OmegaConf.load(saved)
        old = flatten(OmegaConf.to_container(loaded, resolve=True)) if isinstance(loaded, DictConfig) else None
    except Exception as e:  # YAML's and OmegaConf's errors have no common base; any means the same here
        raise ConfigError(f"{saved}: cannot read it as the config a run writes ({first_line(e) or type(e).__name__}); "
                          f"{then}") from e
    lacking = [name for name in CONFIG_SECTIONS if not isinstance(loaded, DictConfig) or name not in loaded]
    if lacking:  # an empty file, a list, a word: compared, it would differ in every key
        holds = "a list" if old is None else "no config keys" if not old else f"no `{lacking[0]}` section"
        raise ConfigError(f"{saved}: holds {holds}, not the mapping of config keys a run writes; {then}")
    return {RENAMED_KEYS.get(k, k): v for k, v in old.items()}


def read_config_section(job: Path, name: str) -> dict:
    """One section (of CONFIG_SECTIONS) of a job's resolved config.yaml: {} for a run older than the file, which has
    none; ConfigError naming a damaged file. Every run writes each section, so an emptied file, or one without the
    section, is damaged: taken for an older run's, it would skip the checks that the section decides."""
    path = job / CONFIG_FILE
    if not path.exists() and not path.is_symlink():  # a link to nothing is a file lost, not a run older than it
        return {}
    if not path.exists():
        raise ConfigError(f"{path}: {not_a_file(path)}; expected the resolved config a run writes.")
    try:
        config = read_yaml(path)
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read it as YAML ({first_line(e) or type(e).__name__}); expected the resolved config "
                          "a run writes.") from e
    if not isinstance(config, dict) or not isinstance(config.get(name), dict):
        holds = "holds no config keys; " if not config else ""  # an emptied file, or `{}`
        raise ConfigError(f"{path}: {holds}expected a mapping with a `{name}` section, as a run writes it.")
    return config[name]


def computed_setting(run: Path, then: str = "nothing was evaluated.") -> dict | None:
    """What a run computes, from its config.yaml: every key but the seed and the placement keys (an experiment's
    name too: its keys are all there), keys added since at the values older runs behaved as. None without the
    file; ConfigError naming a damaged one, ending with `then`."""
    if not (run / CONFIG_FILE).exists() and not (run / CONFIG_FILE).is_symlink():  # a link to nothing is damage
        return None
    read_config_section(run, "data")  # a damaged file named as every command that reads a section names it
    return recipe(saved_config(run / CONFIG_FILE, then))  # emptied, or no run's: refused


def recipe(flat: dict) -> dict:
    """What a flattened train config computes: the seed and the placement keys left out, keys added since at
    the values older runs behaved as (`computed_setting` of a run's saved config, or of a composed one)."""
    return {k: v for k, v in {**ADDED_KEYS, **flat}.items() if k != "seed" and k not in PLACEMENT_KEYS}


def differing_keys(settings: list[dict]) -> list[str]:
    """The keys whose values are not the same in every one of `settings` (`computed_setting`s), sorted."""
    keys = sorted({key for setting in settings for key in setting})
    return [key for key in keys if len({repr(s.get(key)) for s in settings}) > 1]


def write_record(run_dir: Path, record: dict) -> None:
    """Write metrics.json atomically: a reader never sees half a file."""
    atomic_write(Path(run_dir) / METRICS_FILE, json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")


def update_record(run_dir: Path, drop: tuple[str, ...] = (), **fields) -> dict:
    """Merge `fields` into metrics.json, removing the keys in `drop` (e.g. a resumed run's old `error`)."""
    record = {k: v for k, v in (read_record(run_dir) or {}).items() if k not in drop}
    record.update(fields)
    write_record(run_dir, record)
    return record


COLUMNS = ["job", "setting", "seed", "status", "val_acc_best", "best_epoch", "test_acc", "test_loss", "epochs",
           "train_seconds", "train_images", "train_flops", "train_sha1", "test_sha1", "git_commit", "error"]
# The compute behind a job, from the last row of its epochs.csv: cumulative over every process that
# trained it, where metrics.json's fit/wall seconds cover only the process that finished it.
COMPUTE = ("train_seconds", "train_images", "train_flops")


def is_job_dir(path: Path) -> bool:
    """Whether `path` is a sweep's job directory: one holding `.hydra/` or `metrics.json` (a link to nothing too: a
    job whose record is lost, which `job_row` lists)."""
    return (path / ".hydra").is_dir() or (path / METRICS_FILE).exists() or (path / METRICS_FILE).is_symlink()


def check_one_job_per_seed(jobs: pd.DataFrame, where: Path | str,
                           advice: str = "Move the copies out of the sweep directory.") -> None:
    """ConfigError for two completed jobs of one setting and seed among `jobs` (`collect`'s rows, or those of
    several sweeps pooled, their `job` a path), such as a job directory copied inside its sweep or a sweep given
    beside its copy: a mean over seeds, or a pairing by seed, would count that seed twice. `where` names the
    jobs' sweep (or sweeps) in the message, `advice` ends it."""
    done = jobs[(jobs.status == COMPLETED) & jobs.seed.notna()]
    twice = done[done.duplicated(["setting", "seed"], keep=False)]
    if len(twice):
        first = twice.iloc[0]
        same = twice[(twice.setting == first.setting) & (twice.seed == first.seed)]
        raise ConfigError(f"{where}: jobs {', '.join(sorted(map(str, same.job)))} are the same setting with seed "
                          f"{int(first.seed)}; a mean over seeds, or a pairing by seed, counts each seed once. "
                          f"{advice}")


SHORT_DIGEST = 12  # hex digits of a data file's SHA-1 that tables and messages show and compare


def short_digest(value) -> str | None:
    """The first SHORT_DIGEST hex digits of a recorded SHA-1, or None when there is none."""
    return value[:SHORT_DIGEST] if isinstance(value, str) and value else None


def check_one_data_per_setting(jobs: pd.DataFrame, where: Path | str) -> None:
    """ConfigError for completed jobs of one setting among `jobs` (`collect`'s rows) that trained or tested on
    different CSVs (`train_sha1`, `test_sha1`, from their records' `data_digest`): a mean over their seeds would mix
    two experiments. Jobs that recorded no digest are not judged."""
    done = jobs[(jobs.status == COMPLETED) & jobs.train_sha1.notna()]
    for setting, runs in done.groupby("setting"):
        data = runs.train_sha1 + "/" + runs.test_sha1.fillna("?")
        if data.nunique() > 1:
            other = data[data != data.iloc[0]].index[0]
            raise ConfigError(f"{where}: jobs {runs.job.iloc[0]} and {runs.job[other]} are the same setting run on "
                              f"different data (the training/test CSVs' SHA-1 in their {METRICS_FILE}: {data.iloc[0]} "
                              f"and {data[other]}; other CSVs in data.dir); "
                              "a mean over seeds, or a pairing by seed, would mix two experiments. Give each data set "
                              "its own sweep directory.")


def check_one_recipe_per_setting(jobs: pd.DataFrame, sweep_dir: Path) -> None:
    """ConfigError for completed jobs of one setting among `jobs` (`collect`'s rows of `sweep_dir`) whose config.yaml
    differ in what they compute (`computed_setting`): a job is named without its experiment and preset, so a sweep of
    another experiment run into the directory, or one continued after conf/'s defaults changed, joins the setting
    of the jobs already there. Jobs without a config.yaml (older runs) are not judged."""
    done = jobs[jobs.status == COMPLETED]
    for setting, runs in done.groupby("setting"):
        if len(runs) < 2:
            continue
        settings = {job: computed_setting(Path(sweep_dir) / job, "nothing was written.") for job in runs.job}
        settings = {job: s for job, s in settings.items() if s is not None}
        differ = differing_keys(list(settings.values()))
        if differ:
            first, *others = settings
            other = next(job for job in others if repr(settings[job].get(differ[0])) != repr(settings[first].get(differ[0])))
            raise ConfigError(f"{sweep_dir}: jobs {first} and {other} are the same setting, {setting}, but their "
                              f"{CONFIG_FILE} differ in {some_names(differ)} ({differ[0]}: "
                              f"{settings[first].get(differ[0])!r} and {settings[other].get(differ[0])!r}): a job is named "
                              "without its experiment and preset, so a sweep of another experiment (or one run after "
                              "conf/'s defaults changed) joined it; a mean over seeds, or a pairing by seed, would mix "
                              "two experiments. Give each its own sweep directory.")


def check_poolable(jobs: pd.DataFrame, where: Path | str,
                   advice: str = "Move the copies out of the sweep directory.") -> None:
    """The checks before jobs are averaged or paired by seed: one job per setting and seed
    (`check_one_job_per_seed`, ending with `advice`), one data set per setting (`check_one_data_per_setting`), and
    one recipe per setting (`check_one_recipe_per_setting`)."""
    check_one_job_per_seed(jobs, where, advice)
    check_one_data_per_setting(jobs, where)
    check_one_recipe_per_setting(jobs, Path(where))


def collect(sweep_dir: Path) -> pd.DataFrame:
    """One row per job directory under `sweep_dir` (`is_job_dir`)."""
    rows = [job_row(job) for job in sorted(p for p in Path(sweep_dir).iterdir() if p.is_dir()) if is_job_dir(job)]
    return pd.DataFrame(rows, columns=COLUMNS)


def status_of(record: dict | None) -> str | None:
    """A record's status as it stands: `interrupted` for a `running` one whose process has ended (`process_gone`)."""
    status = (record or {}).get("status")
    return INTERRUPTED if status == RUNNING and process_gone(record) else status


def status_note(record: dict | None) -> str:
    """`status_of(record)` in quotes, with why where it is not the record's own (its process ended unrecorded)."""
    status = status_of(record)
    return repr(status) + (f" (its {METRICS_FILE} says {RUNNING!r}, but its process has ended)"
                           if status != (record or {}).get("status") else "")


def job_row(job: Path) -> dict:
    """`collect`'s row of one job directory: its setting, seed, status, metrics, compute and data."""
    record = read_record(job)
    problem = record_problem(job, record)
    if record is None and not problem and (job / CHECKPOINT_DIR / LAST_CHECKPOINT).exists():
        # A run writes its record before its first checkpoint: this one's is lost, not yet to come. Listed `started`,
        # the job would say nothing of how it ended, and a sweep would stop at it (a resume needs its record).
        problem = f"{job / METRICS_FILE} is gone, beside the job's {CHECKPOINT_DIR}/{LAST_CHECKPOINT}"
    if problem:  # listed, never dropped without a word, and never averaged
        overrides = (record or {}).get("overrides")
        record = {"status": UNREADABLE, "error": problem,
                  "overrides": overrides if is_text_list(overrides) else []}
    record = record or {"status": STARTED}
    status, error = status_of(record), record.get("error")
    if status != record.get("status"):  # a killed run's: shown as what a rerun of the sweep or study makes of it
        rerun = ("tune.py, run again, replaces the trial" if job.name.startswith(TRIAL_DIR_PREFIX) else
                 "the sweep command, run again, resumes it from its last finished epoch")
        error = (f"its process ({record['pid']}) ended without recording how: killed by SIGKILL or for memory, a "
                 f"DDP rank's crash took it down, or the machine restarted; {rerun}")
    metrics = record.get("metrics", {})
    return {
        "job": job.name, "setting": setting_of(record.get("overrides", [])), "seed": record.get("seed"),
        "status": status, "val_acc_best": metrics.get("val/acc_best"),
        "best_epoch": metrics.get("best_epoch"), "test_acc": metrics.get("test/acc"),
        "test_loss": metrics.get("test/loss"), "epochs": metrics.get("epochs"),
        **_compute(job), **_digests(record), "git_commit": record.get("git_commit"), "error": error,
    }


def _digests(record: dict) -> dict:
    """`train_sha1` and `test_sha1`: the CSVs a job read, short (`data_digest` in its record), None if unrecorded."""
    digest = record.get("data_digest") if isinstance(record.get("data_digest"), dict) else {}
    return {f"{split}_sha1": short_digest(digest.get(split)) for split in ("train", "test")}


def record_problem(job: Path, record) -> str | None:
    """What is wrong with a job's metrics.json (not JSON, not a record, a field of the wrong type, a metric that is
    not a number), or None. `record`: its `read_record`."""
    if record is None:
        if (job / METRICS_FILE).is_symlink() and not (job / METRICS_FILE).exists():
            return f"{job / METRICS_FILE} is a link to nothing: the run's record is lost"
        return f"{job / METRICS_FILE} is not a run record (unreadable, or not a JSON object)" \
            if (job / METRICS_FILE).exists() else None
    if record.get("status") not in RECORDED:
        return f"{job / METRICS_FILE}: status is {record.get('status')!r}, not one of {', '.join(RECORDED)}: not a run record"
    wrong = [key for key, ok in (
        ("metrics", isinstance(record.get("metrics", {}), dict)),
        ("overrides", is_text_list(record.get("overrides", []))),
        ("seed", record.get("seed") is None or (isinstance(record["seed"], int) and not isinstance(record["seed"], bool))),
        *((key, record.get(key) is None or isinstance(record[key], str)) for key in ("error", "git_commit")),
        *((key, record.get(key) is None or isinstance(record[key], dict))
          for key in ("hardware", "precision", "data_digest", "trackers")),
    ) if not ok]
    if wrong:
        return f"{job / METRICS_FILE} is not a run record: {', '.join(wrong)} of the wrong type"
    if not 0 <= (record.get("seed") or 0) <= SEED_MAX:  # as check_config allows; runs are paired by it
        return f"{job / METRICS_FILE}: seed is {record['seed']}, not a seed from 0 to {SEED_MAX}"
    resolved = (record.get("precision") or {}).get("resolved")  # what a resumed run trains in, a shipped model checks
    if resolved not in (None, *RESOLVED_PRECISIONS):
        return f"{job / METRICS_FILE}: precision.resolved is {resolved!r}, not one of {', '.join(RESOLVED_PRECISIONS)}"
    # A completed run always chose its model on validation (its test accuracy is absent with `test=false`), and
    # recorded its seed, by which runs are paired.
    if record["status"] == COMPLETED and record.get("metrics", {}).get("val/acc_best") is None:
        return f"{job / METRICS_FILE}: a completed run without metrics.val/acc_best, the accuracy that chose its model"
    if record["status"] == COMPLETED and record.get("seed") is None:
        return f"{job / METRICS_FILE}: a completed run without its seed"
    low, high = ACCURACY_RANGE
    for key, value in record.get("metrics", {}).items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            return f"{job / METRICS_FILE}: metrics.{key} is {value!r}, not a number"
        # JSON's integers have no bound: one past a float's range would make math.isfinite (and every mean) raise.
        if isinstance(value, int) and not is_finite_number(value):
            return (f"{job / METRICS_FILE}: metrics.{key} is an integer of {len(str(abs(value)))} digits, past what a "
                    "float holds")
        # `completed` promises usable numbers (a run that ends with NaN is recorded `diverged`)
        if record["status"] == COMPLETED and value is not None and not math.isfinite(value):
            return f"{job / METRICS_FILE}: metrics.{key} is {value!r} in a completed run, not a finite number"
        if key.endswith(("/acc", "/acc_best")) and value is not None and math.isfinite(value) and not low <= value <= high:
            return f"{job / METRICS_FILE}: metrics.{key} is {value!r}, not an accuracy (a fraction from {low:g} to {high:g})"
        for ends, fits, what in METRIC_RULES:
            if key.endswith(ends) and value is not None and math.isfinite(value) and not fits(value):
                return f"{job / METRICS_FILE}: metrics.{key} is {value!r}, not {what}"
    return None


def read_table(path: Path, what: str, columns: tuple[str, ...], numbers: tuple[str, ...] = (),
               counts: tuple[str, ...] = (), ranges: dict[str, tuple[float, float, str]] | None = None) -> pd.DataFrame:
    """The CSV table at `path`, or ConfigError naming the file when it is not `what` (as a message says it: `a table
    tricks --csv wrote`): it lacks one of `columns`, a cell of `numbers` is not a number (an empty cell is a missing
    value, as a diverged run's loss), a cell of `counts` is not a whole number of 0 or more, or a number of a column
    in `ranges` ({column: (low, high, what it is)}; a column of `numbers` or `counts`) lies outside low..high.
    Columns that the file lacks are not checked (older runs lack some)."""
    try:
        table = pd.read_csv(path)
    except (OSError, ValueError) as e:  # a binary file, unbalanced quotes, a ragged row
        reason = first_line(e).rstrip(".") or type(e).__name__
        raise ConfigError(f"{path}: cannot read it as a CSV table ({reason}); expected {what}.") from e
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ConfigError(f"{path}: not {what}: it lacks the columns {', '.join(missing)}.")
    for column in (c for c in (*numbers, *counts) if c in table.columns):
        values = pd.to_numeric(table[column], errors="coerce")
        bad = table[column].notna() & values.isna()  # text where a number belongs
        if column in counts:
            bad |= ~np.isfinite(values) | (values < 0) | (values != values.round())
        if bad.any():
            row = int(np.argmax(bad.to_numpy()))
            found = table[column].iloc[row]
            expected = "a whole number of 0 or more" if column in counts else "a number"
            # Line 1 is the header, so the first row of values is line 2.
            raise ConfigError(f"{path}, line {row + 2}, column {column}: expected {expected}, found {_cell(found)}.")
        table[column] = values
    for column, (low, high, expected) in (ranges or {}).items():
        if column not in table.columns:
            continue
        bad = table[column].notna() & ~table[column].between(low, high)
        if bad.any():
            row = int(np.argmax(bad.to_numpy()))
            empty = "" if column in counts else " or an empty cell"
            raise ConfigError(f"{path}, line {row + 2}, column {column}: expected {expected} ({low:g} to {high:g})"
                              f"{empty}, found {_cell(table[column].iloc[row])}.")
    return table


def _cell(value) -> str:
    """A cell as a message quotes it: text in quotes, a number as written."""
    if isinstance(value, str):
        return repr(value)
    return "an empty cell" if pd.isna(value) else str(value)


def read_epochs(path: Path) -> pd.DataFrame:
    """A run's epochs.csv, or ConfigError naming its first damaged line and column: one row per epoch, the
    curves and the compute so far numbers (an empty cell is a missing value, as a diverged run's loss)."""
    # What a run never writes: an accuracy outside 0..1, a negative loss (a diverged run's is empty or inf).
    accuracies = ("train/acc", "val/acc", "val/acc_best")
    frame = read_table(path, "an epochs.csv as a run writes it", ("epoch", *CURVES),
                       numbers=(*CURVES, *accuracies, *COMPUTE), counts=("epoch",),
                       ranges={**{acc: (*ACCURACY_RANGE, "an accuracy") for acc in accuracies},
                               **{loss: (0, math.inf, "a loss") for loss in ("train/loss", "val/loss")}})
    repeated = frame.epoch.duplicated()
    if repeated.any():  # one line per epoch, or the seeds' curves cannot be lined up
        raise ConfigError(f"{path}, line {int(np.argmax(repeated.to_numpy())) + 2}: epoch "
                          f"{frame.epoch[repeated].iloc[0]} again; expected one row per epoch, as a run writes.")
    # A run writes the whole file at once, each line ended: one cut inside its last line reads as a row whose later
    # cells are empty (no validation that epoch) and whose last number is cut short (4.95 of 4.951).
    with open(path, "rb") as f:  # its last byte: the table above read the whole file
        f.seek(-1, os.SEEK_END)
        ended = f.read(1) == b"\n"
    if not ended:
        raise ConfigError(f"{path}, line {len(frame) + 1}: cut short inside the line (no line end); expected whole "
                          "lines, as a run writes them.")
    return frame


def lacking_epochs(frame: pd.DataFrame, epochs: int) -> str | None:
    """What an epochs.csv (`read_epochs`) lacks of the rows of epochs 1 to `epochs` (`lacks the row of epoch 3 and
    1 more`), or None when it holds each: a file cut short, whose curves would end early."""
    lacking = sorted(set(range(1, epochs + 1)) - set(frame.epoch.dropna().astype(int)))
    if not lacking:
        return None
    return f"lacks the row of epoch {lacking[0]}{f' and {len(lacking) - 1} more' if len(lacking) > 1 else ''}"


MAX_COUNT = 2 ** 53  # the largest count a float64 (as np.loadtxt reads it) holds exactly


def read_confusion_matrix(job: Path) -> np.ndarray | None:
    """The job's test-set confusion matrix (confusion_matrix.csv, [true, predicted] counts), None if it has
    none, or ConfigError naming the file when it is not the 10 x 10 table of counts a run writes."""
    path = Path(job) / CONFUSION_FILE
    if not path.exists():
        return None
    try:
        with warnings.catch_warnings():  # an empty file: numpy warns, then gives a 0 x 1 table, named below
            warnings.simplefilter("ignore", UserWarning)
            cm = np.loadtxt(path, delimiter=",", ndmin=2)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot read it as a table of numbers ({str(e).rstrip('.')}); expected the confusion matrix a "
                          "run writes.") from e
    if cm.shape != (NUM_CLASSES, NUM_CLASSES):
        holds = "is empty" if cm.size == 0 else f"holds a {cm.shape[0]} x {cm.shape[1]} table"
        raise ConfigError(f"{path}: expected the {NUM_CLASSES} x {NUM_CLASSES} confusion matrix a run writes; it "
                          f"{holds}.")
    if not np.isfinite(cm).all() or (cm < 0).any() or (cm != np.round(cm)).any() or (cm > MAX_COUNT).any():
        raise ConfigError(f"{path}: expected counts (whole numbers from 0 to 2**53) in the confusion matrix "
                          "a run writes; it holds other values.")
    return cm.astype(np.int64)


def _compute(job: Path) -> dict:
    """The job's cumulative training seconds, images and FLOPs (None where epochs.csv lacks them, or holds
    something other than a number there)."""
    try:
        last = pd.read_csv(job / EPOCHS_FILE).iloc[-1]
    except (OSError, ValueError, IndexError):  # no epoch finished yet, or a damaged file
        return dict.fromkeys(COMPUTE)
    # Compute is shown beside the results, never judged: a damaged cell is missing, as in a run older than
    # the column, rather than a reason to refuse the sweep's whole table.
    numbers = {key: pd.to_numeric(last.get(key), errors="coerce") for key in COMPUTE}
    return {key: value if np.isfinite(value) else None for key, value in numbers.items()}
