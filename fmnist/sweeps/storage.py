"""A study's storage: the study directory's own SQLite file or a database URL (`storage=`), checked before Optuna
opens it, and the trials it holds whose process died, recorded `interrupted`."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import sqlite3
import time
import warnings
from pathlib import Path

import optuna
import sqlalchemy

from fmnist.errors import ConfigError, first_line
from fmnist.provenance import now, process_gone
from fmnist.runs import INTERRUPTED, METRICS_FILE, RUNNING, read_record, trial_dir, update_record

log = logging.getLogger(__name__)

STUDY_DB = "study.db"  # a study's database without storage=: SQLite, in its directory


def _optuna_tables_or_none(path: Path) -> bool:
    """Whether a SQLite file holds Optuna's tables, or no table yet (read only; another tool's database, such as
    an MLflow store, holds its own and must not get Optuna's beside them); sqlite3.Error where it cannot be read."""
    with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as db:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    return not tables or {"studies", "version_info"} <= tables


def storage_file(url: str) -> Path | None:
    """The file a journal or SQLite storage URL names, or None (a database server)."""
    if url.startswith("journal:"):
        return Path(url[len("journal:"):])
    return Path(url[len("sqlite:///"):]) if url.startswith("sqlite:///") else None


def check_storage_file(url: str, default: bool = False) -> None:
    """ConfigError for a journal or SQLite storage naming an existing file of another kind (Optuna would append
    to a user's file, or fail on it with pages of SQL). `default`: the study directory's own study.db, used
    when no storage= is given."""
    if re.fullmatch(r"sqlite(\+\w+)?://(/(:memory:)?)?", url):  # SQLAlchemy's forms of an in-memory database
        raise ConfigError(f"storage={url} is an in-memory SQLite database, which ends with this process: the study "
                          "could not be continued, nor its trials read by another worker; nothing was written. Name a "
                          "file (storage=sqlite:///PATH), or leave storage= out for the study's own study.db.")
    path = storage_file(url)
    if path is None or (default and not path.exists()):
        return
    kind = "journal" if url.startswith("journal:") else "sqlite"
    if not path.parent.is_dir():
        raise ConfigError(f"storage={url} names {path}, whose directory {path.parent} is not an existing directory; "
                          "nothing was written. Name a file in an existing directory.")
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb") as f:
        head = f.read(4096)
    if kind == "sqlite":
        try:
            optunas = head.startswith(b"SQLite format 3\x00") and _optuna_tables_or_none(path)
        except sqlite3.Error as e:  # a SQLite file by its header that cannot be read: cut short, or damaged
            raise study_storage_error(url, e, "open") from None
    else:  # a journal is one JSON object per line, each with the operation it records
        try:
            optunas = b"op_code" in head and isinstance(json.loads(head.split(b"\n", 1)[0]), dict)
        except ValueError:
            optunas = False
    if not optunas:
        what = "journal" if kind == "journal" else "SQLite database"
        if default:
            raise ConfigError(f"{path}, where the study keeps its database, is not an Optuna {what}; nothing was "
                              "written. Start the study under another name (study=...) or out_dir.")
        raise ConfigError(f"storage={url} names {path}, which is not an Optuna {what}; nothing was written. Name a "
                          "new file, or the study's own storage.")


def default_storage(study_dir: Path) -> str:
    """The storage of a study without storage=."""
    return f"sqlite:///{study_dir.resolve() / STUDY_DB}"


def open_storage(url: str | None, heartbeat, study_dir: Path) -> optuna.storages.BaseStorage:
    """The study's storage: `url` (a database, or `journal:FILE`), or the study directory's own SQLite file when
    None, with `heartbeat` (interval_s, grace_s) for a database's trials; ConfigError when it cannot be opened."""
    url = url or default_storage(study_dir)
    # SQLite serialises writers with a lock; several processes wait for it instead of failing.
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    for attempt in range(5):
        try:
            # The heartbeat marks a trial whose process died (killed, node lost) as failed, so that
            # its slot is not held as "running" forever.
            with warnings.catch_warnings():  # "experimental" since optuna 2.9, and what distributed studies need
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                if url.startswith("journal:"):  # a file on a shared file system: no database server
                    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(url[len("journal:"):]))
                return optuna.storages.RDBStorage(url, engine_kwargs=engine, heartbeat_interval=heartbeat.interval_s,
                                                  grace_period=heartbeat.grace_s)
        except Exception as e:
            if _lost_the_race_to_make_tables(e):
                # Processes started together race to create the new database's tables (seen with two
                # tune.py on one SQLite file): the loser finds them made on a second try.
                time.sleep(1 + attempt)
                continue
            # a malformed URL, a missing driver, a database that cannot be reached, a damaged database file
            raise study_storage_error(url, e, "open") from e
    raise ConfigError(f"cannot open the study storage {url!r}: its tables could not be created (5 tries).")


def study_storage_error(url: str, error: Exception, doing: str) -> ConfigError:
    """The paragraph for a storage that Optuna could not open or read (`doing`): the cause its StorageInternalError
    wraps (whose own words say only that a commit failed), and, for a damaged SQLite file, how to go on."""
    cause = error.__cause__ if isinstance(error, optuna.exceptions.StorageInternalError) and error.__cause__ else error
    reason = first_line(cause)  # not SQLAlchemy's link to its docs
    # "malformed", "not a database", through SQLAlchemy or read with sqlite3 itself; not a lock
    damaged = url.startswith("sqlite") and isinstance(cause, (sqlalchemy.exc.DatabaseError, sqlite3.DatabaseError)) \
        and not isinstance(cause, (sqlalchemy.exc.OperationalError, sqlite3.OperationalError))
    advice = (" The database file is damaged; nothing was written. Restore it from a copy, or start the study under "
              "another name (study=...) or out_dir." if damaged else "")
    return ConfigError(f"cannot {doing} the study storage {url!r}: {type(cause).__name__}: {reason}.{advice}")


@contextlib.contextmanager
def study_storage_errors_named(url: str):
    """`study_storage_error` for what Optuna raises when it cannot read a storage it opened, instead of its chained
    tracebacks."""
    try:
        yield
    except (optuna.exceptions.StorageInternalError, sqlalchemy.exc.DatabaseError) as e:
        raise study_storage_error(url, e, "read") from e


def _lost_the_race_to_make_tables(error: Exception) -> bool:
    """Whether `error` is what opening a new database gives a process while another one, started with it, creates
    the tables: a row the other inserted first (IntegrityError), or a table it made between this one's look and its
    CREATE TABLE (SQLite's OperationalError "table alembic_version already exists")."""
    return isinstance(error, sqlalchemy.exc.IntegrityError) or (
        isinstance(error, sqlalchemy.exc.OperationalError) and "already exists" in str(error))


def trial_run_dir(study_dir: Path, trial: optuna.trial.FrozenTrial) -> Path | None:
    """Where `trial`'s run directory is: in `study_dir` (`trial_dir`), which a copied or moved study holds; else where
    the trial recorded it, where that is a directory (a process of the study with another out_dir, such as another
    machine sharing its database and a file system); None where neither is."""
    here = trial_dir(study_dir, trial.number)
    recorded = trial.user_attrs.get("run_dir")
    if here.is_dir() or not recorded:
        return here if here.is_dir() else None
    return Path(recorded) if Path(recorded).is_dir() else None


def fail_dead_trials(study: optuna.Study, storage: optuna.storages.BaseStorage, study_dir: Path) -> None:
    """Mark `interrupted` (an Optuna FAIL, not counted) each RUNNING trial whose process on this machine is gone:
    killed with SIGKILL, or its machine restarted (see `process_gone`), and its record (`trial_run_dir`), if there.
    Trials of other machines are left to the storage's heartbeat (a FAIL without a status after `grace_period`, not
    counted either)."""
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        process = trial.user_attrs.get("process") or {}
        if not process_gone(process):
            continue
        # As Optuna's own fail_stale_trials does it: a FrozenTrial's id is `_trial_id`.
        storage.set_trial_user_attr(trial._trial_id, "status", INTERRUPTED)
        storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
        run_dir = trial_run_dir(study_dir, trial)
        if run_dir is not None and (run_dir / METRICS_FILE).exists():
            update_record(run_dir, status=INTERRUPTED, finished_at=now(),
                          error=f"its process ({process.get('pid')}) was killed; the study replaces the trial")
        log.warning("trial %d: its process %s is gone; recorded interrupted, to be replaced", trial.number,
                    process.get("pid"))


def record_stale_trials(study: optuna.Study, study_dir: Path) -> None:
    """Record `interrupted` each trial the storage's heartbeat failed (a FAIL without a status: its process stopped
    beating, killed on this machine or another) whose run record (`trial_run_dir`) still says `running`, as the study
    has it."""
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,)):
        run_dir = trial_run_dir(study_dir, trial)
        if trial.user_attrs.get("status") or run_dir is None or not (run_dir / METRICS_FILE).is_file():
            continue
        if (read_record(run_dir) or {}).get("status") == RUNNING:
            update_record(run_dir, status=INTERRUPTED, finished_at=now(),
                          error="its process stopped beating (heartbeat.grace_s passed); the study replaces the trial")
