"""tune.py: an Optuna study on a real database, continued, with failed and pruned trials recorded."""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from fmnist.data.csv_io import write_csv
from fmnist.errors import FmnistError
from fmnist.hardware import memory_errors
from fmnist.runs import read_record, write_record
from fmnist.sweeps.tune import Search, register_tune, run_search
from tests.conftest import CONF, FAST, ROOT, make_images, snapshot

# Small trials: the simple CNN, two epochs (two reports to the pruner), 2 batches each; FAST without its
# batch size, which the search space samples.
SMALL = [*(o for o in FAST if not o.startswith("data.batch_size=")), "model=simple", "~space.model",
         "space.batch_size.choices=[16,32]", "trainer.max_epochs=2"]


def load(out, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{out / name / 'study.db'}")


@pytest.mark.slow
def test_a_study_runs_to_n_trials_records_each_trial_and_continues(tmp_path, data_dir, run_in_process):
    args = ["study=s", f"out_dir={tmp_path}", f"data.dir={data_dir}", *SMALL]
    first = run_in_process("tune.py", *args, "n_trials=4")  # tune.py in a new process: the SIGTERM test below
    assert first.returncode == 0, first.stderr[-3000:]
    study = load(tmp_path, "s")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 4
    for trial in study.trials:  # an ordinary run directory per trial, its epochs reported to the pruner
        run_dir = tmp_path / "s" / f"trial-{trial.number:04d}"
        record = read_record(run_dir)
        assert record["status"] == "completed" and record["metrics"]["val/acc_best"] == pytest.approx(trial.value)
        assert record["optuna"]["trial"] == trial.number
        assert yaml.safe_load((run_dir / "config.yaml").read_text())["optim"]["lr"] == trial.params["lr"]  # as trained
        assert "epoch 2/2: train loss" in (run_dir / "train.log").read_text()  # a run directory's log, as train.py's
        epochs = pd.read_csv(run_dir / "epochs.csv")
        assert trial.intermediate_values == pytest.approx(dict(zip(epochs.epoch, epochs["val/acc"])), abs=1e-6)
    best = yaml.safe_load((tmp_path / "s" / "best.yaml").read_text())
    assert best["trial"] == study.best_trial.number and best["val/acc_best"] == pytest.approx(study.best_value)
    # The trained value, every digit: the one Optuna recorded.
    assert f"optim.lr={study.best_params['lr']!r}" in best["overrides"] and f"data.dir={data_dir}" in best["overrides"]
    assert f"best trial {best['trial']}: val/acc_best {study.best_value:.2%}" in first.stdout
    assert "Jobs: 4 completed." in (tmp_path / "s" / "summary.md").read_text()
    for figure in ("optimization_history.png", "param_importances.png"):
        assert (tmp_path / "s" / figure).stat().st_size > 10_000

    first_params = [t.params for t in study.trials]
    again = run_in_process("tune.py", *args, "n_trials=6")  # the same study, continued: 2 more trials
    assert again.returncode == 0, again.stderr[-3000:]
    trials = load(tmp_path, "s").trials
    # The median pruner may now stop a trial (4 have finished): finished either way, and recorded so.
    statuses = {optuna.trial.TrialState.COMPLETE: "completed", optuna.trial.TrialState.PRUNED: "pruned"}
    assert len(trials) == 6 and all(t.state in statuses for t in trials)
    assert [read_record(tmp_path / "s" / f"trial-{t.number:04d}")["status"] for t in trials] == [statuses[t.state] for t in trials]
    assert [t.params for t in trials[:4]] == first_params
    assert all(t.params["lr"] not in {p["lr"] for p in first_params} for t in trials[4:])  # no replayed start
    assert sorted(p.name for p in (tmp_path / "s").glob("trial-*")) == [f"trial-{i:04d}" for i in range(6)]


@pytest.mark.slow
def test_a_diverging_trial_is_recorded_and_the_study_goes_on(tmp_path, data_dir, run_in_process, caplog):
    # SGD with learning rates up to 1e8: the seeded sampler draws both trainable and exploding ones.
    result = run_in_process("tune.py", "study=d", "n_trials=4", f"out_dir={tmp_path}", f"data.dir={data_dir}", *SMALL, "optim=sgd",
                      "space.lr.low=1e-3", "space.lr.high=1e8", "optim.scheduler=none", "trainer.precision=32-true")
    assert result.returncode == 0, result.stderr[-3000:]
    trials = load(tmp_path, "d").trials
    assert len(trials) == 4
    states = {t.number: t.state for t in trials}
    failed = [n for n, s in states.items() if s == optuna.trial.TrialState.FAIL]
    assert failed and len(failed) < 4, states
    for n in failed:
        assert read_record(tmp_path / "d" / f"trial-{n:04d}")["status"] == "diverged"
        assert trials[n].user_attrs["status"] == "diverged"
    assert "diverged" in (tmp_path / "d" / "summary.md").read_text()
    # Each failed trial is one line (Optuna's), without our own exception's traceback.
    ends = [r for r in caplog.records if r.name.startswith("optuna") and "failed with" in r.getMessage()]
    assert len(ends) == len(failed) and not any(r.exc_info for r in ends), [r.getMessage() for r in ends]


def test_a_trial_that_crashes_says_what_crashed_in_its_one_line(tmp_path, data_dir, run_in_process, caplog,
                                                                 monkeypatch):
    def crash(cfg, run_dir, *args, **kwargs):
        (run_dir / "error.txt").write_text("Traceback ...")  # as train() records a crash
        raise KeyError("widths")

    monkeypatch.setattr("fmnist.training.train.train", crash)
    result = run_in_process("tune.py", "study=c", "n_trials=1", f"out_dir={tmp_path}", f"data.dir={data_dir}", *SMALL)
    assert result.returncode == 0, result.stderr[-3000:]
    ends = [r.getMessage() for r in caplog.records if r.name.startswith("optuna") and "failed with" in r.getMessage()]
    assert len(ends) == 1 and "KeyError: 'widths'" in ends[0], ends  # not only the key
    assert f"(traceback: {tmp_path / 'c' / 'trial-0000' / 'error.txt'})" in ends[0], ends


def test_a_trial_out_of_memory_fails_alone_and_the_study_goes_on(tmp_path, data_dir, run_in_process, caplog,
                                                                   monkeypatch):
    def too_large(cfg, run_dir, *args, **kwargs):  # as train() ends a run whose batch does not fit the memory
        with memory_errors(f"lower data.batch_size ({cfg.data.batch_size})"):
            torch.empty(1 << 62, dtype=torch.uint8)

    monkeypatch.setattr("fmnist.training.train.train", too_large)
    result = run_in_process("tune.py", "study=m", "n_trials=2", f"out_dir={tmp_path}", f"data.dir={data_dir}", *SMALL)
    assert result.returncode == 0, result.stderr[-3000:]  # not the user error that stops a study before its next trial
    trials = load(tmp_path, "m").trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.FAIL] * 2
    assert all(t.user_attrs["status"] == "failed" for t in trials)
    ends = [r.getMessage() for r in caplog.records if r.name.startswith("optuna") and "failed with" in r.getMessage()]
    assert len(ends) == 2 and all("ran out of memory" in end and "lower data.batch_size (" in end for end in ends), ends


class AlwaysPrune(optuna.pruners.BasePruner):
    def prune(self, study, trial) -> bool:
        return True


def test_a_pruned_trial_stops_after_its_first_report_and_is_recorded(tmp_path, data_dir):
    register_tune()
    study = optuna.create_study(direction="maximize", pruner=AlwaysPrune())
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        search = Search(compose("tune", ["study=p"]), [*FAST, f"data.dir={data_dir}", "model=simple",
                                                       "trainer.max_epochs=3"], tmp_path)
        study.optimize(search.objective, n_trials=1)
    trial = study.trials[0]
    assert trial.state == optuna.trial.TrialState.PRUNED and list(trial.intermediate_values) == [1]
    record = read_record(tmp_path / "trial-0000")
    assert record["status"] == "pruned" and "after epoch 1" in record["error"]
    assert len(pd.read_csv(tmp_path / "trial-0000" / "epochs.csv")) == 1


@pytest.mark.parametrize("args,message", [
    (["n_trials=3"], "tune.py needs a study name"),
    (["study=..", "n_trials=3"], "config key study must be a name, not a path"),
    (["study=x", "n_trials=0"], "config key n_trials must be at least 1; got 0"),
    (["study=x", "~space"], "config key space has no value (~space removed it?)"),
    (["n_trials=1", "out_dir=o/${study}"], "tune.py needs a study name"),  # not the interpolation it breaks
    (["study=x", "space.lr.key="], "search space entry space.lr needs a key"),
    (["study=x", "n_trialz=2"], "n_trialz=2). tune.py takes the keys heartbeat, n_trials,"),
    (["study=x", "out_dir="], "config key out_dir must be a directory (`.` for this one), not empty; got ''"),
    (["study=x", "pruner.n_startup_trials=-1"], "config key pruner.n_startup_trials must be 0 or more; got -1"),
    (["study=x", "pruner.prune_from_epoch=0"], "config key pruner.prune_from_epoch must be at least 1; got 0"),
    (["study=x", "sampler.seed=-1"], "config key sampler.seed must be in [0, 4294967295]; got -1"),
    (["study=x", "n_trials=abc"], "could not be converted to Integer"),  # Hydra's reason, not only its first line
    (["study=x", "space.lr.low=-1"], "search space entry space.lr needs low <= high (and low > 0 with log: true)"),
    (["study=x", "space.dropout.high=1.5"], "config key model.dropout must be in [0, 1); got 1.5"),
    (["study=x", "space.dropout.high=1.5"], "model.dropout=1.5 (space.dropout)"),  # the entry to change
    (["study=x", "space.dropout.low=-0.5"], "config key model.dropout must be in [0, 1); got -0.5"),
    # Each value of a list longer than the others is checked: the middle one, and the last one.
    (["study=x", "space.model.choices=[simple,nosuch,optimized]"], "Could not find 'model/nosuch'"),
    (["study=x", "space.batch_size.choices=[32,64,128,0]"], "config key data.batch_size must be at least 1; got 0"),
    (["study=x", "optim.lrr=1"], "Could not override 'optim.lrr'"),
    (["study=x", "space.model.key=model.channels", "space.model.choices=[[8,16,32,64],[16,32,64,64]]"],
     "search space entry space.model has the choice [8, 16, 32, 64]; choices are numbers, strings"),
    (["study=x", "+optim.lrr=1"], "config key optim.lrr does not exist, so nothing would read it"),
    # Each value is fine alone; a trial that samples alternating flips without flips is not.
    (["study=x", "space.batch_size.key=data.augment.hflip", "space.batch_size.choices=[true,false]",
      "space.weight_decay.key=data.augment.flip_alternate", "space.weight_decay.low=null", "space.weight_decay.high=null",
      "space.weight_decay.choices=[true,false]"],
     "data.augment.hflip=false data.augment.flip_alternate=true, which a trial "
     "may sample: config key data.augment.flip_alternate must be false unless data.augment.hflip is true"),
    (["study=x", "trainer=ddp"], "tune.py trains each trial in its own process on one device"),
    (["study=x", "ckpt_path=last"], "ckpt_path=last resumes one run of train.py; every trial of a study trains in a new "
                                    "directory"),
    (["study=x", "optim.lr=0.5"], "the train override optim.lr=0.5 sets optim.lr, which the search space samples "
                                  "(space.lr): every trial would replace it"),
    (["study=x", "data.dir=/nonexistent"], "fashion-mnist_train.csv: file not found"),
    # What only the data shows: found before the study is written, not in its first trial.
    (["study=x", "data.val_size=100000"], "config key data.val_size must be between 1 and"),
    (["study=x", "data.val_size=100", "space.batch_size.key=data.train_subset", "space.batch_size.choices=[100,1000]"],
     "data.train_subset=1000 (space.batch_size)"),
    (["study=x", "data.val_size=100", "space.batch_size.key=data.train_subset", "space.batch_size.choices=[100,1000]"],
     "config key data.train_subset must be at most 500"),
    (["study=x", "data.val_size=100", "storage=garbage://x"], "cannot open the study storage 'garbage://x'"),
    (["study=x", "heartbeat.grace_s=30", "heartbeat.interval_s=60"], "need 1 <= interval_s < grace_s"),
    # int(0.5) is 0, which a log scale cannot start from
    (["study=x", "space.dropout.key=optim.lookahead_steps", "space.dropout.low=0.5", "space.dropout.high=2",
      "space.dropout.log=true", "space.dropout.integer=true"],
     "space.dropout has integer: true, so low and high are whole numbers; got low=0.5, high=2.0"),
    (["study=x", "space.dropout.key=optim.lr"], "entries space.lr and space.dropout both sample optim.lr"),
    (["study=x", "+space.mom.key=optim.momentum"], "+space.mom.key=optim.momentum: a search space entry cannot be "
                                                   "added on the command line"),
    (["study=x", "++space.mom.key=optim.momentum"], "++space.mom.key=optim.momentum: a search space entry cannot be"),
    (["study=x", "space.lr.key=hydra.run.dir"], "space.lr has key=hydra.run.dir: a search samples train keys"),
])
def test_bad_input_stops_before_the_study_is_created(tmp_path, data_dir, args, message):
    with pytest.raises(FmnistError) as error:
        run_search(CONF, [f"out_dir={tmp_path}", f"data.dir={data_dir}", *args])
    assert message in str(error.value)
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_a_refused_study_removes_the_directories_it_made_and_keeps_ones_own_files(tmp_path, data_dir):
    with pytest.raises(FmnistError, match="cannot open the study storage 'garbage://x'"):
        run_search(CONF, [f"out_dir={tmp_path / 'new' / 'studies'}", f"data.dir={data_dir}", "data.val_size=100", "study=x", "storage=garbage://x"])
    (tmp_path / "afile").write_text("x")
    with pytest.raises(FmnistError, match=f"names {tmp_path}/afile/x.db, whose directory {tmp_path}/afile is not an "
                                          "existing directory"):
        run_search(CONF, [f"out_dir={tmp_path / 'new'}", f"data.dir={data_dir}", "data.val_size=100", "study=x",
                          f"storage=sqlite:///{tmp_path}/afile/x.db"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]
    # A study directory holding files no study wrote: its summary.md would be replaced.
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "summary.md").write_text("mine")
    with pytest.raises(FmnistError, match=f"{tmp_path}/x holds files that no study wrote \\(summary.md\\)"):
        run_search(CONF, [f"out_dir={tmp_path}", f"data.dir={data_dir}", "data.val_size=100", "study=x"])
    assert [p.name for p in (tmp_path / "x").iterdir()] == ["summary.md"]
    # A study directory holding the storage file the command names is the study's own (a second worker's start).
    (tmp_path / "x" / "summary.md").unlink()
    journal = tmp_path / "x" / "journal.log"
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    optuna.create_study(study_name="x", storage=storage, direction="maximize").add_trial(
        optuna.trial.create_trial(params={}, distributions={}, value=0.5))
    run_search(CONF, [f"out_dir={tmp_path}", f"data.dir={data_dir}", "data.val_size=100", "study=x", "n_trials=1", f"storage=journal:{journal}"])


def test_a_storage_refused_for_the_trials_it_lacks_is_not_created(tmp_path, data_dir):
    (tmp_path / "x" / "trial-0000").mkdir(parents=True)  # a study's trials, run with another storage
    before = snapshot(tmp_path)
    for storage in (f"sqlite:///{tmp_path}/new.db", f"journal:{tmp_path}/new.log"):
        with pytest.raises(FmnistError, match=f"the storage {storage} names no file yet"):
            run_search(CONF, [f"out_dir={tmp_path}", f"data.dir={data_dir}", "data.val_size=100", "study=x",
                              f"storage={storage}"])
        assert snapshot(tmp_path) == before, storage
    with pytest.raises(FmnistError, match="config key storage must be null .* not empty; got ''"):
        run_search(CONF, [f"out_dir={tmp_path}", f"data.dir={data_dir}", "study=x", "storage="])
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("made_first", ["a row", "a table"])
def test_a_process_that_loses_the_race_to_make_a_new_databases_tables_opens_it_when_made(tmp_path, monkeypatch,
                                                                                         made_first):
    import sqlite3

    import sqlalchemy

    from fmnist.sweeps import storage as storage_module
    from fmnist.sweeps.storage import open_storage

    # What two tune.py started together on one new SQLite study got, one of them: the other made it first.
    lost = (sqlalchemy.exc.IntegrityError("INSERT INTO version_info", {}, sqlite3.IntegrityError("UNIQUE constraint"))
            if made_first == "a row" else
            sqlalchemy.exc.OperationalError("CREATE TABLE alembic_version", {},
                                            sqlite3.OperationalError("table alembic_version already exists")))
    real, tries = optuna.storages.RDBStorage, []

    def made_by_another_process_first(*args, **kwargs):
        tries.append(1)
        if len(tries) == 1:
            raise lost
        return real(*args, **kwargs)

    monkeypatch.setattr(optuna.storages, "RDBStorage", made_by_another_process_first)
    monkeypatch.setattr(storage_module.time, "sleep", lambda seconds: None)
    heartbeat = OmegaConf.create({"interval_s": 60, "grace_s": 180})
    assert isinstance(open_storage(None, heartbeat, tmp_path), real) and len(tries) == 2


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:", "sqlite+pysqlite://"])
def test_an_in_memory_storage_is_refused_before_a_trial(tmp_path, data_dir, url):
    # It ran the study, kept no database, and could never be continued.
    with pytest.raises(FmnistError, match=f"storage={re.escape(url)} is an in-memory SQLite database"):
        run_search(CONF, ["study=m", f"out_dir={tmp_path}", f"storage={url}", f"data.dir={data_dir}", *SMALL])
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("scheme,kind,database", [("journal:", "journal", False),
                                                  ("sqlite:///", "SQLite database", False),
                                                  ("sqlite:///", "SQLite database", True)])
def test_a_storage_naming_a_file_of_ones_own_is_refused_and_the_file_kept(tmp_path, data_dir, scheme, kind, database):
    import contextlib
    import sqlite3

    notes = tmp_path / "notes.txt"
    if database:  # another tool's database (an MLflow store): Optuna would add its tables beside its own
        with contextlib.closing(sqlite3.connect(notes)) as db:
            db.execute("CREATE TABLE experiments (id INTEGER)")
            db.commit()
    else:
        notes.write_text("my notes\n")
    before = notes.read_bytes()
    with pytest.raises(FmnistError, match=f"names {notes}, which is not an Optuna {kind}; nothing was written"):
        run_search(CONF, [f"out_dir={tmp_path / 'studies'}", f"data.dir={data_dir}", "data.val_size=100", "study=x",
                          f"storage={scheme}{notes}"])
    assert notes.read_bytes() == before and sorted(tmp_path.iterdir()) == [notes]


def test_a_database_of_ones_own_where_the_study_keeps_its_database_is_refused_and_kept(tmp_path, data_dir):
    import contextlib
    import sqlite3

    (tmp_path / "x").mkdir()
    with contextlib.closing(sqlite3.connect(tmp_path / "x" / "study.db")) as db:
        db.execute("CREATE TABLE mine (id INTEGER)")
        db.commit()
    before = (tmp_path / "x" / "study.db").read_bytes()
    with pytest.raises(FmnistError, match=f"{tmp_path}/x/study.db, where the study keeps its database, is not an "
                                          "Optuna SQLite database; nothing was written"):
        run_search(CONF, [f"out_dir={tmp_path}", f"data.dir={data_dir}", "data.val_size=100", "study=x", "n_trials=1"])
    assert (tmp_path / "x" / "study.db").read_bytes() == before and sorted(tmp_path.rglob("*")) == [
        tmp_path / "x", tmp_path / "x" / "study.db"]


def test_a_cut_short_study_database_is_called_damaged_not_another_kind_of_file(tmp_path, data_dir):
    database = tmp_path / "x" / "study.db"
    database.parent.mkdir()
    optuna.create_study(study_name="x", storage=f"sqlite:///{database}")
    database.write_bytes(database.read_bytes()[:database.stat().st_size // 2])  # as a full disk or a killed copy ends it
    before = database.read_bytes()
    with pytest.raises(FmnistError, match=r"database disk image is malformed\. The database file is damaged; nothing "
                                          "was written. Restore it from a copy"):
        run_search(CONF, [f"out_dir={tmp_path}", f"data.dir={data_dir}", "data.val_size=100", "study=x", "n_trials=1"])
    assert database.read_bytes() == before and sorted(tmp_path.rglob("*")) == [database.parent, database]


def test_a_continuation_that_samples_other_choices_is_refused_before_a_trial(tmp_path, data_dir):
    # The study's first trial sampled the model from both choices; a continuation offering one cannot join it.
    (tmp_path / "c").mkdir()
    storage = f"sqlite:///{tmp_path / 'c' / 'study.db'}"
    models = optuna.distributions.CategoricalDistribution(["simple", "optimized"])
    optuna.create_study(study_name="c", storage=storage, direction="maximize").add_trial(
        optuna.trial.create_trial(params={"model": "simple"}, distributions={"model": models}, value=0.5))
    before = (tmp_path / "c" / "study.db").read_bytes()
    base = [f"out_dir={tmp_path}", f"data.dir={data_dir}", "data.val_size=100", "study=c", "n_trials=2", "~space.lr", "~space.dropout",
            "~space.batch_size", "~space.weight_decay"]
    with pytest.raises(FmnistError, match=r"study c sampled space.model from the choices \['simple', 'optimized'\]; "
                                          r"this command's space.model is the choices \['simple'\]"):
        run_search(CONF, [*base, "space.model.choices=[simple]"])
    assert (tmp_path / "c" / "study.db").read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["study.db"]


def test_bad_input_exits_2_with_one_paragraph(tmp_path, run_in_process):
    result = run_in_process("tune.py", "study=x", "space.lr.low=-1", f"out_dir={tmp_path}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == ["error: search space entry space.lr needs low <= high (and low > 0 "
                                                  "with log: true); got low=-1.0, high=0.01."]


@pytest.mark.slow
def test_a_trial_that_fills_the_disk_names_out_dir_the_key_that_moves_the_study(tmpfs, data_dir):
    disk = tmpfs("size=400k")  # room for the study's database and a trial's small files, not for its checkpoint
    # In a process of its own: the study's database, left open in this one, would keep the disk from being unmounted.
    result = subprocess.run([sys.executable, "tune.py", "study=full", "n_trials=1", f"out_dir={disk}",
                             f"data.dir={data_dir}", *SMALL, "trainer.max_epochs=1"], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith(f"error: cannot write {disk / 'full' / 'trial-0000'}/") and "the disk is full" in error, error
    assert "(out_dir=...)" in error and "hydra." not in error, error
    # Lightning's lines once each, without its notices: importing it gives it a console handler of its own.
    said = result.stdout + result.stderr
    assert said.count("GPU available") == 1 and "TPU available" not in said, said[-3000:]


@pytest.mark.slow
def test_a_refused_rerun_leaves_the_finished_trials_as_they_were(tmp_path, data_dir, run_in_process):
    import contextlib
    import sqlite3

    args = ["study=r", "n_trials=1", f"out_dir={tmp_path}", f"data.dir={data_dir}", *SMALL, "trainer.max_epochs=1"]
    run_search(CONF, args)
    study_dir = tmp_path / "r"
    database = study_dir / "study.db"
    good = database.read_bytes()
    database.unlink()  # lost, or the study continued with another storage=
    before = snapshot(study_dir)
    for extra in ([], [f"storage=sqlite:///{tmp_path / 'other.db'}"]):
        refused = run_in_process("tune.py", *args, *extra)
        assert refused.returncode == 2 and "holds trials of a study (trial-0000)" in refused.stderr, refused.stderr[-2000:]
        assert snapshot(study_dir) == before  # the finished trial's record untouched, no error.txt, no new study.db
    # An empty file in its place is as good as gone (not filled with a new database); a damaged one is named.
    database.write_bytes(good)
    with contextlib.closing(sqlite3.connect(database)) as db:  # the page that lists the studies, wherever it lies
        page = db.execute("SELECT rootpage FROM sqlite_master WHERE name = 'studies'").fetchone()[0]
        size = db.execute("PRAGMA page_size").fetchone()[0]
    damaged, start = bytearray(good), (page - 1) * size
    damaged[start:start + size] = bytes(b ^ 0x5A for b in good[start:start + size])
    for content, words in ((b"", "but its database study.db is an empty file"),
                           (bytes(damaged), f"the study storage 'sqlite:///{database}': DatabaseError: ")):
        database.write_bytes(content)
        before = snapshot(study_dir)
        refused = run_in_process("tune.py", *args)
        assert refused.returncode == 2 and words in refused.stderr, refused.stderr[-2000:]
        assert "Traceback" not in refused.stderr and snapshot(study_dir) == before
    assert "The database file is damaged; nothing was written." in refused.stderr
    # A file, or a directory no trial made, where the next trial goes: it failed that trial, counted, with exit 0
    # (a file), or was refused inside the trial with advice tune.py does not take.
    database.write_bytes(good)
    for stray in ("file", "dir"):
        place = study_dir / "trial-0001"
        place.write_text("mine") if stray == "file" else shutil.copytree(study_dir / "trial-0000", place)
        before = snapshot(study_dir)
        refused = run_in_process("tune.py", *args[:1], "n_trials=2", *args[2:])
        assert refused.returncode == 2 and "holds trial-0001, named as the study's trials are, which no trial of " \
            "study r made" in refused.stderr, refused.stderr[-2000:]
        assert snapshot(study_dir) == before and len(load(tmp_path, "r").trials) == 1
        shutil.rmtree(place) if place.is_dir() else place.unlink()


@pytest.mark.slow
def test_a_continuation_that_trains_another_setting_is_refused_and_writes_nothing(tmp_path, data_dir, run_in_process,
                                                                                   monkeypatch):
    import shutil
    import sqlite3

    from fmnist.sweeps import tune

    args = ["study=c", f"out_dir={tmp_path}", *SMALL, "trainer.max_epochs=1"]
    first = run_in_process("tune.py", *args, "n_trials=1", f"data.dir={data_dir}")
    assert first.returncode == 0, first.stderr[-3000:]
    study_dir = tmp_path / "c"
    with sqlite3.connect(study_dir / "study.db") as db:  # as a study from before settings were recorded
        db.execute("DELETE FROM study_user_attributes")
    before = snapshot(study_dir)
    # The continuation command without the first one's model: the trials would train another network.
    other = [o for o in args if o != "model=simple"]
    refused = run_in_process("tune.py", *other, "n_trials=2", f"data.dir={data_dir}")
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "study c has trials of another setting: this command differs in ['model." in refused.stderr
    assert "'model.name'" in refused.stderr and "'simple'" in refused.stderr and "nothing was written" in refused.stderr
    assert snapshot(study_dir) == before
    # The same refusal in a worker started with the first one, both finding no study directory: the study the
    # other made there meanwhile is not its to remove (it removed the directory, database and all).
    with monkeypatch.context() as patch:
        patch.setattr(tune, "missing_dirs", lambda path: [Path(path)])
        raced = run_in_process("tune.py", *other, "n_trials=2", f"data.dir={data_dir}")
    assert raced.returncode == 2 and "has trials of another setting" in raced.stderr
    assert snapshot(study_dir) == before
    # Other CSVs: its best trial would be chosen across two data sets.
    changed = shutil.copytree(data_dir, tmp_path / "changed", ignore=shutil.ignore_patterns(".*"))
    write_csv(changed / "fashion-mnist_train.csv", *make_images(600, 7))
    elsewhere = run_in_process("tune.py", *args, "n_trials=2", f"data.dir={changed}")
    assert elsewhere.returncode == 2 and "trial-0000 ran on other data" in elsewhere.stderr, elsewhere.stderr[-3000:]
    assert "Start another study (study=NAME)" in elsewhere.stderr and snapshot(study_dir) == before
    moved = tmp_path / "moved"  # placement keys may differ (the same data elsewhere), and so may the budget
    shutil.copytree(data_dir, moved, ignore=shutil.ignore_patterns(".*"))
    again = run_in_process("tune.py", *args, "n_trials=2", f"data.dir={moved}", "trainer.max_epochs=2")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "study c: new trials train with trainer.max_epochs=2, its first ones with 1" in again.stdout + again.stderr
    study = load(tmp_path, "c")
    # The setting recorded is the first trial's (data.dir and the epochs as it trained them).
    assert len(study.trials) == 2 and study.user_attrs["train_overrides"][-2:] == ["trainer.max_epochs=1",
                                                                                   f"data.dir={data_dir}"]
    refused = run_in_process("tune.py", *args, "n_trials=3", f"data.dir={data_dir}", "data.train_subset=300")
    assert refused.returncode == 2 and "(train overrides: preset=smoke" in refused.stderr, refused.stderr[-3000:]
    assert "differs in ['data.train_subset'] (was [None], now [300])" in refused.stderr


@pytest.mark.slow
def test_a_stopped_trial_is_recorded_and_replaced_so_the_study_still_reaches_n_trials(tmp_path, data_dir,
                                                                                     run_in_process):
    args = ["study=k", "n_trials=1", f"out_dir={tmp_path}", f"data.dir={data_dir}", *SMALL]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # More epochs than it can finish before the signal, however busy the machine.
    proc = subprocess.Popen([sys.executable, str(ROOT / "tune.py"), *args, "trainer.max_epochs=200"], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    epochs = tmp_path / "k" / "trial-0000" / "epochs.csv"
    deadline = time.time() + 240
    while not (epochs.exists() and len(epochs.read_text().splitlines()) > 1):  # inside the trial's fit
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143 and "recorded `interrupted`" in err, err[-3000:]
    assert "Traceback" not in err and "TrialInterrupted" not in err, err[-3000:]  # the paragraph alone
    stopped = read_record(tmp_path / "k" / "trial-0000")
    assert stopped["status"] == "interrupted" and "resume from" not in stopped["error"]  # a new trial takes its place
    assert stopped["error"].endswith("continues the study with a new trial in its place")
    again = run_in_process("tune.py", *args)  # the same command: the stopped trial does not count
    assert again.returncode == 0, again.stderr[-3000:]
    trials = load(tmp_path, "k").trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.COMPLETE]
    assert trials[0].user_attrs["status"] == "interrupted"
    assert read_record(tmp_path / "k" / "trial-0001")["status"] == "completed"


@pytest.mark.slow
def test_a_sigterm_the_trial_did_not_stop_for_stops_the_study_before_its_next_trial(tmp_path, data_dir):
    # Sent as the trial's test ends: Lightning's handler takes it, and no training step is left to stop at.
    args = ["study=t", "n_trials=3", f"out_dir={tmp_path}", f"data.dir={data_dir}", *SMALL]
    script = ("import os, runpy, signal, sys\n"
              "from fmnist.sweeps.pruning import ReportToTrial\n"
              "ReportToTrial.on_test_end = lambda self, trainer, module: os.kill(os.getpid(), signal.SIGTERM)\n"
              "sys.argv = sys.argv[1:]\n"
              "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    done = subprocess.run([sys.executable, "-c", script, str(ROOT / "tune.py"), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 143 and "stopped by a signal" in done.stderr, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    trials = load(tmp_path, "t").trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL]
    assert trials[1].user_attrs["status"] == "interrupted" and "run_dir" not in trials[1].user_attrs  # never trained


def test_a_trial_whose_process_was_killed_is_marked_and_replaced(tmp_path, data_dir, run_in_process):
    gone = subprocess.Popen(["true"])
    gone.wait()  # a process id that no longer runs: what SIGKILL leaves behind
    (tmp_path / "z").mkdir()
    study = optuna.create_study(study_name="z", storage=f"sqlite:///{tmp_path / 'z' / 'study.db'}", direction="maximize")
    zombie = study.ask()  # RUNNING in the database, as the killed trial left it
    zombie.set_user_attr("process", {"host": socket.gethostname(), "pid": gone.pid})
    zombie.set_user_attr("run_dir", str(tmp_path / "z" / "trial-0000"))
    (tmp_path / "z" / "trial-0000").mkdir()
    (tmp_path / "z" / "trial-0000" / "metrics.json").write_text('{"status": "running"}')
    again = run_in_process("tune.py", "study=z", "n_trials=1", f"out_dir={tmp_path}", f"data.dir={data_dir}", *SMALL)
    assert again.returncode == 0, again.stderr[-3000:]
    trials = load(tmp_path, "z").trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.COMPLETE]
    assert trials[0].user_attrs["status"] == "interrupted"
    assert read_record(tmp_path / "z" / "trial-0000")["status"] == "interrupted"
    assert read_record(tmp_path / "z" / "trial-0001")["status"] == "completed"
    from fmnist.provenance import pid_namespace  # what a later run judges the trial's process by: see process_gone

    assert trials[1].user_attrs["process"]["pid_namespace"] == pid_namespace() is not None


def _finished_and_killed(study_dir: Path) -> None:
    """A study `s` in `study_dir`, as a killed tune.py leaves it: trial 0 completed, trial 1 still RUNNING in the
    database and in its record, its process gone; each trial's run_dir stored as tune.py stores it."""
    gone = subprocess.Popen(["true"])
    gone.wait()
    study_dir.mkdir(parents=True)
    study = optuna.create_study(study_name="s", storage=f"sqlite:///{study_dir / 'study.db'}", direction="maximize")
    for number, status in enumerate(("completed", "running")):
        (study_dir / f"trial-{number:04d}").mkdir()
        write_record(study_dir / f"trial-{number:04d}", {"status": status, "seed": 0, "metrics": {"val/acc_best": 0.5}})
        trial = study.ask()
        trial.set_user_attr("run_dir", str(study_dir / f"trial-{number:04d}"))
    trial.set_user_attr("process", {"host": socket.gethostname(), "pid": gone.pid})
    study.tell(0, 0.5)


def test_a_copied_study_writes_and_names_only_its_own_trial_directories(tmp_path, data_dir, run_in_process):
    # The database holds each trial's run_dir as it was when the trial ran: in a copy, the original's directories.
    original, copy = tmp_path / "a" / "s", tmp_path / "b" / "s"
    _finished_and_killed(original)
    shutil.copytree(original, copy)
    before = snapshot(original)
    args = ["study=s", "n_trials=1", f"out_dir={tmp_path / 'b'}", f"data.dir={data_dir}", *SMALL]  # no trial to train
    result = run_in_process("tune.py", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert snapshot(original) == before
    assert read_record(copy / "trial-0001")["status"] == "interrupted"
    assert yaml.safe_load((copy / "best.yaml").read_text())["run_dir"] == str(copy / "trial-0000")
    assert f"({copy / 'trial-0000'})" in result.stdout
    # Not in this study's directory: where the trial ran, if that is a directory (another out_dir sharing the
    # database, as another machine's), else said to be not found, not named as if it were there.
    shutil.rmtree(copy / "trial-0000")
    result = run_in_process("tune.py", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert yaml.safe_load((copy / "best.yaml").read_text())["run_dir"] == str(original / "trial-0000")
    assert snapshot(original) == before
    moved = original.parent.rename(tmp_path / "a-moved")
    result = run_in_process("tune.py", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    best = (copy / "best.yaml").read_text()
    assert yaml.safe_load(best)["run_dir"] is None
    assert f"# Its run directory is not found ({copy / 'trial-0000'}: moved or removed, or on another machine)" in best
    assert f"best trial 0: its directory is not found, neither {copy / 'trial-0000'} nor where it ran" in result.stderr
    assert snapshot(moved / "s") == before


@pytest.mark.parametrize("name", ["summary.md", "best.yaml", "param_importances.png"])
def test_a_directory_where_a_result_goes_is_refused_before_a_trial_trains(tmp_path, data_dir, run_in_process, name):
    # Found when the results were written, it left them out of date after a trial had trained, with advice
    # (another out_dir) that starts a new study.
    _finished_and_killed(tmp_path / "s")
    (tmp_path / "s" / name).mkdir()
    before = snapshot(tmp_path)
    result = run_in_process("tune.py", "study=s", "n_trials=2", f"out_dir={tmp_path}", f"data.dir={data_dir}", *SMALL)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert (f"error: {tmp_path / 's' / name} is a directory, where the study writes its {name}; no trial was started "
            "and nothing was written. Move that directory out of the study's directory") in result.stderr
    assert snapshot(tmp_path) == before and not (tmp_path / "s" / "trial-0002").exists()


def test_a_trial_asked_for_after_others_filled_n_trials_stops_without_training(tmp_path):
    from omegaconf import OmegaConf

    from fmnist.sweeps.tune import Search, TrialSurplus

    study = optuna.create_study(direction="maximize")
    first, second = study.ask(), study.ask()  # two trials of other processes, still running
    study.tell(first, 0.5)
    third = study.ask()
    search = Search(OmegaConf.create({"n_trials": 2, "space": {}}), [], tmp_path)
    with pytest.raises(TrialSurplus, match="not needed"):
        search.objective(third)
    assert third.user_attrs["status"] == "surplus" and not list(tmp_path.iterdir())
    assert second.number < third.number


@pytest.mark.parametrize("key,value", [("data.train_subset", None), ("data.augment.hflip", True),
                                       ("data.augment.hflip", False), ("data.train_subset", 2000), ("optim.lr", 0.1 + 0.2)])
def test_a_sampled_value_reaches_the_train_config_as_itself(key, value):
    from fmnist.overrides import override_text
    with initialize_config_dir(str(CONF), version_base=None):
        cfg = compose("train", overrides=[f"{key}={override_text(value)}"])
    assert OmegaConf.select(cfg, key) == value and type(OmegaConf.select(cfg, key)) is type(value)


def test_an_option_is_refused_in_one_line_before_anything_is_written(tmp_path, data_dir, run_in_process):
    # train.py's `--cfg job` given to tune.py: not passed on to Hydra's override grammar as a train override
    result = run_in_process("tune.py", "study=x", f"out_dir={tmp_path}", f"data.dir={data_dir}", "--cfg", "job")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "error: tune.py takes no option but --help; got --cfg." in result.stderr
    assert not list(tmp_path.iterdir())
    # A hydra.* key: each trial's place is the study's, and the key went into every trial's record unused.
    for given in (f"hydra.run.dir={tmp_path}/elsewhere", "hydra/launcher=joblib"):
        result = run_in_process("tune.py", "study=x", f"out_dir={tmp_path}", f"data.dir={data_dir}", given)
        assert result.returncode == 2 and f"{given}: tune.py places each trial itself" in result.stderr
        assert not list(tmp_path.iterdir())


def test_ctrl_c_before_a_trial_trains_is_one_paragraph_and_the_same_command_continues(tmp_path, data_dir,
                                                                                      run_in_process, monkeypatch):
    from fmnist.sweeps.tune import Search

    args = ["study=c", f"out_dir={tmp_path}", f"data.dir={data_dir}", *SMALL, "n_trials=1"]
    objective = Search.objective

    def ctrl_c(self, trial):  # as the first trial composes its config, before its training's own signal handling
        raise KeyboardInterrupt

    monkeypatch.setattr(Search, "objective", ctrl_c)
    stopped = run_in_process("tune.py", *args)
    assert stopped.returncode == 130 and "Traceback" not in stopped.stdout + stopped.stderr
    assert "stopped by Ctrl-C outside a trial's training" in stopped.stderr
    monkeypatch.setattr(Search, "objective", objective)
    again = run_in_process("tune.py", *args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert [t.state for t in load(tmp_path, "c").trials] == [optuna.trial.TrialState.FAIL,
                                                              optuna.trial.TrialState.COMPLETE]


def test_a_trial_the_heartbeat_failed_is_recorded_interrupted_not_left_running(tmp_path):
    from fmnist.runs import update_record
    from fmnist.sweeps.storage import record_stale_trials

    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'study.db'}")
    for number, status in enumerate(("running", "completed")):
        run_dir = tmp_path / f"trial-{number:04d}"
        run_dir.mkdir()
        update_record(run_dir, status=status)
        trial = study.ask()
        trial.set_user_attr("run_dir", str(run_dir))
        # As the storage's heartbeat leaves the trial of a process that stopped beating: FAIL, without a status.
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
    record_stale_trials(study, tmp_path)
    stale = read_record(tmp_path / "trial-0000")
    assert stale["status"] == "interrupted" and "heartbeat" in stale["error"]
    assert read_record(tmp_path / "trial-0001")["status"] == "completed"  # a record that says how it ended stays


def test_the_help_names_each_tune_key_and_no_other():
    # tune.py --help lists the tune keys by hand (importing fmnist.sweeps.tune would import torch first):
    # each field of TuneConfig, the groups with `.*`, `tune=NAME`, and no key that is not one.
    import dataclasses
    import tune
    from fmnist.sweeps.tune import TUNE_KEYS, TuneConfig
    listed = [k.strip() for k in re.search(r"Tune keys \([^)]*\): (.*?)\.\n", tune.__doc__, re.S)
              .group(1).replace("\n", " ").split(",")]
    assert {re.sub(r"(\.\*|=NAME)$", "", k) for k in listed} == TUNE_KEYS
    groups = {f.name for f in dataclasses.fields(TuneConfig) if f.default_factory is not dataclasses.MISSING}
    assert {k[:-2] for k in listed if k.endswith(".*")} == groups
