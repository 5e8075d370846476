"""Reliability of `train.py`: concurrent runs, refused commands that write nothing, errors as one paragraph.

Each test reproduces one failure a user could meet; `train.py` runs in a new process where a process is the
point (a second process, signals), in this one (`run_in_process`) elsewhere.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pickle
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from fmnist.data.csv_io import cache_path, load_csv, parse_csv, write_csv
from fmnist.data.datamodule import FashionMNISTDataModule
from fmnist.errors import CheckpointError, ConfigError, DataError, DivergedError, StorageError
from fmnist.fsio import atomic_write, load_checkpoint, storage_errors
from fmnist.runs import collect, read_record
from fmnist.training.module import LitClassifier
from fmnist.training.train import run_job, train
from tests.conftest import FAST, ROOT, make_images, run_entry_point, snapshot

SIMPLE = ["model=simple", "trainer.precision=32-true"]


def ctrl_c(*args):
    raise KeyboardInterrupt


# One run per directory: a second process there is refused, naming the holder.
@pytest.mark.slow
def test_second_process_in_a_busy_run_directory_is_refused_naming_the_holder(tmp_path, data_dir, run_in_process):
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    slow = ["trainer.limit_train_batches=null", "trainer.max_epochs=2", "data.batch_size=4"]
    first = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *FAST, *SIMPLE, *slow, f"data.dir={data_dir}",
                              f"hydra.run.dir={run}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    # The first run has passed its checks, owns the directory and has begun its log.
    while not ((run / "metrics.json").exists() and (run / "train.log").exists() and (run / "train.log").stat().st_size):
        assert first.poll() is None and time.time() < deadline, first.communicate()[1][-3000:]
        time.sleep(0.05)
    # Paused while the second one tries, so that it still holds the directory however slow the machine is.
    first.send_signal(signal.SIGSTOP)
    try:
        assert first.poll() is None, "the first run must still be running for this test to mean anything"
        second = run_in_process("train.py", *FAST, *SIMPLE, *slow, f"data.dir={data_dir}", "optim.lr=0.002", f"hydra.run.dir={run}")
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 2 and f"in use by process {first.pid}" in second.stderr, second.stderr[-3000:]
    assert "Traceback" not in second.stderr
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    record = json.loads((run / "metrics.json").read_text())
    assert record["status"] == "completed" and "error" not in record
    assert "optim.lr=0.002" not in record["overrides"] and "lr: 0.002" not in (run / "config.yaml").read_text()
    assert {line.split(",")[0] for line in (run / "epochs.csv").read_text().splitlines()[1:]} == {"1", "2"}
    # The refused command added nothing to the first run's log, nor cut off what that run wrote after it.
    log = (run / "train.log").read_text()
    assert "epoch 2/2" in log and "run completed" in log and "in use by" not in log
    assert "TPU available" not in log  # Lightning's notices stay out of it, as they do when nothing is refused


def test_a_directory_that_holds_only_its_log_is_run_in_and_the_log_kept(tmp_path, data_dir, run_in_process):
    run = tmp_path / "run"  # e.g. what a job refused in a launcher's worker left, before its data was mended
    run.mkdir()
    (run / "train.log").write_text("[earlier] a refused attempt's line\n")
    result = run_in_process("train.py", *FAST, *SIMPLE, f"data.dir={data_dir}", f"hydra.run.dir={run}")
    assert result.returncode == 0, result.stderr[-3000:]
    log = (run / "train.log").read_text()
    assert log.startswith("[earlier] a refused attempt's line\n") and "run completed" in log


def test_held_log_lines_are_never_written_by_logging_itself(tmp_path):
    """Logging flushes and closes every handler at exit, and Hydra does when it sets up a sweep's next job in the
    same worker: neither writes the lines of a job that never passed its checks."""
    import logging

    from fmnist.fsio import hold_log_until_kept, write_held_logs

    root = logging.getLogger()
    before = list(root.handlers)
    log_file = logging.FileHandler(tmp_path / "train.log", delay=True)
    root.addHandler(log_file)
    try:
        hold_log_until_kept(tmp_path / "train.log")
        logging.getLogger("fmnist").warning("a line of a job that was refused")
        (held,) = [h for h in root.handlers if h not in before]
        held.flush()  # as logging.shutdown does
        held.close()
        assert not (tmp_path / "train.log").exists()
        root.handlers = list(before)
        write_held_logs()  # the checks passed after all: the line is written then, not before
        assert "a line of a job that was refused" in (tmp_path / "train.log").read_text()
    finally:
        log_file.close()
        root.handlers = before


def test_a_directory_in_use_names_the_keys_that_choose_another(make_cfg, tmp_path):
    from fmnist.training.rundir import RunDirInUse, own_run_dir

    with own_run_dir(tmp_path / "job"):  # another process's run, as far as the lock goes
        for in_sweep, keys in ((False, r"\(hydra.run.dir=\.\.\.\)"), (True, r"\(name=\.\.\. or hydra.sweep.dir=\.\.\.\)")):
            with pytest.raises(RunDirInUse, match="choose another directory " + keys):
                run_job(make_cfg(), tmp_path / "job", in_sweep=in_sweep)
    assert list((tmp_path / "job").iterdir()) == []
    (tmp_path / "job" / "notes.txt").write_text("mine")  # and a directory holding files of one's own
    for in_sweep, keys in ((False, r"\(hydra.run.dir=\.\.\.\)"), (True, r"\(name=\.\.\. or hydra.sweep.dir=\.\.\.\)")):
        with pytest.raises(RunDirInUse, match="Choose another directory " + keys):
            run_job(make_cfg(), tmp_path / "job", in_sweep=in_sweep)


@pytest.mark.slow
@pytest.mark.parametrize("entry", ["train.py", "evaluate.py ckpt=x"])
def test_default_run_directories_of_two_processes_differ(tmp_path, entry):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, *(str(ROOT / w) if w.endswith(".py") else w for w in entry.split()),
                             "--cfg", "hydra", "-p", "hydra.run.dir", "--resolve"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    run_dir = out.strip()
    assert run_dir.endswith(f"-{proc.pid}")  # two runs started in the same second have different PIDs


# A refused command leaves the run directory byte-identical.
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, data_dir) -> Path:
    """One finished run, trained once; each test refuses a command in its own copy of it."""
    run = tmp_path_factory.mktemp("finished") / "good"
    assert run_entry_point("train.py", *FAST, *SIMPLE, f"data.dir={data_dir}", f"hydra.run.dir={run}") == 0
    return run


@pytest.mark.slow
@pytest.mark.parametrize("extra", [["ckpt_path=last", "model.dropout=0.5"], ["data.batch_size=0"], ["optim.lr=0.5"],
                                   ["ckpt_path=last", "data.val_size=100000"],
                                   ["experiment=speedrun_cpu", "ckpt_path=last"]])
def test_refused_command_leaves_the_run_directory_byte_identical(tmp_path, data_dir, finished_run, run_in_process, extra):
    run = tmp_path / "good"
    shutil.copytree(finished_run, run)  # nothing in a run directory names its own path
    before = snapshot(run)
    assert ".hydra/overrides.yaml" in before and "metrics.json" in before
    refused = run_in_process("train.py", *FAST, *SIMPLE, f"data.dir={data_dir}", f"hydra.run.dir={run}", *extra)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    assert snapshot(run) == before


# A resume keeps epochs.csv's rows and adds to them: with the file gone, or a row of an epoch its last.ckpt holds,
# those epochs' curves would be lost without a word. An epoch's row is written before its last.ckpt.
@pytest.mark.slow
def test_a_resume_whose_epochs_csv_rows_or_best_checkpoint_are_gone_is_refused(make_cfg, tmp_path):
    run = tmp_path / "run"
    train(make_cfg("model=simple", "trainer.max_epochs=2"), run)
    rows = (run / "epochs.csv").read_text().splitlines(keepends=True)
    (run / "epochs.csv").unlink()
    before = snapshot(run)
    with pytest.raises(ConfigError, match="epochs.csv: missing, though the run's last.ckpt holds trained epochs"):
        train(make_cfg("model=simple", "trainer.max_epochs=3", "ckpt_path=last"), run)
    assert snapshot(run) == before
    # Nor cut short below the checkpoint's epoch (its header alone): the resume kept what was left, without a word.
    (run / "epochs.csv").write_text(rows[0])
    before = snapshot(run)
    with pytest.raises(ConfigError, match=r"epochs.csv: lacks the row of epoch 1 and 1 more, though the run's "
                                          r"last.ckpt was written after epoch 2"):
        train(make_cfg("model=simple", "trainer.max_epochs=3", "ckpt_path=last"), run)
    assert snapshot(run) == before
    # Nor without the row of the checkpoint's own epoch: the resume starts at the next, and the gap stayed.
    (run / "epochs.csv").write_text("".join(rows[:-1]))
    before = snapshot(run)
    with pytest.raises(ConfigError, match=r"epochs.csv: lacks the row of epoch 2, though the run's last.ckpt was "
                                          r"written after epoch 2"):
        train(make_cfg("model=simple", "trainer.max_epochs=3", "ckpt_path=last"), run)
    assert snapshot(run) == before
    (run / "epochs.csv").write_text("".join(rows))
    # Nor one whose best checkpoint is gone: it trained on, then failed to test it, and so did every retry.
    best = next((run / "checkpoints").glob("best-*.ckpt"))
    best.unlink()
    before = snapshot(run)
    with pytest.raises(CheckpointError, match=f"the best checkpoint it names, {best.name}, is gone"):
        train(make_cfg("model=simple", "trainer.max_epochs=3", "ckpt_path=last"), run)
    assert snapshot(run) == before
    # Unless a later epoch's best file is there: a kill -9 between that epoch's best file, which deleted the one
    # named, and its last.ckpt. The resume redoes that epoch.
    (run / "checkpoints" / "best-epoch003.ckpt").write_bytes(b"the killed epoch's")
    assert train(make_cfg("model=simple", "trainer.max_epochs=3", "ckpt_path=last"), run)["epochs"] == 3
    first = tmp_path / "first"  # after one epoch too: its row was written before its last.ckpt
    train(make_cfg("model=simple", "trainer.max_epochs=1"), first)
    (first / "epochs.csv").unlink()
    with pytest.raises(ConfigError, match="epochs.csv: missing, though the run's last.ckpt holds trained epochs"):
        train(make_cfg("model=simple", "trainer.max_epochs=2", "ckpt_path=last"), first)


# A tune.py trial is never resumed: train.py's `ckpt_path=last` had trained it on in place, so that the study's
# value, summary and best.yaml no longer described what its directory held.
@pytest.mark.slow
def test_a_tune_trial_is_not_resumed_by_train_py(make_cfg, tmp_path):
    run = tmp_path / "trial-0003"
    train(make_cfg(*SIMPLE), run, record={"optuna": {"study": "s", "trial": 3, "params": {}}})
    before = snapshot(run)
    with pytest.raises(ConfigError, match=r"it is trial 3 of tune.py's study 's'.*Run the same tune.py command"):
        train(make_cfg(*SIMPLE, "trainer.max_epochs=2", "ckpt_path=last"), run)
    assert snapshot(run) == before


# An interrupted run (Ctrl-C: exit 130) resumes, and the resume clears its error.
@pytest.mark.slow
def test_resume_clears_the_error_of_the_interruption(make_cfg, tmp_path, monkeypatch):
    run = tmp_path / "job"  # alone in its parent, so the summary below sees only this run
    cfg = make_cfg(*SIMPLE)
    train(cfg, run)
    monkeypatch.setattr(LitClassifier, "training_step", ctrl_c)
    with pytest.raises(SystemExit) as stopped:
        run_job(make_cfg(*SIMPLE, "trainer.max_epochs=2", "ckpt_path=last"), run)
    assert stopped.value.code == 130
    assert read_record(run)["status"] == "interrupted" and (run / "error.txt").exists()
    monkeypatch.undo()
    run_job(make_cfg(*SIMPLE, "trainer.max_epochs=2", "ckpt_path=last"), run)
    record = read_record(run)
    assert record["status"] == "completed" and "error" not in record and not (run / "error.txt").exists()
    error = collect(tmp_path).set_index("job").loc[run.name, "error"]
    assert error is None or pd.isna(error)  # no stale error in the summary (pandas may hold "none" as NaN)


# The printed resume command works when pasted, whatever the paths hold.
@pytest.mark.slow
def test_printed_resume_command_works_when_pasted_with_spaces_and_non_ascii(tmp_path, data_dir, monkeypatch, run_in_process):
    data = tmp_path / "my data é"
    shutil.copytree(data_dir, data)
    run = tmp_path / "run dir ü"
    overrides = [*FAST, *SIMPLE, f"data.dir='{data}'"]
    from tests.conftest import compose_cfg
    cfg = compose_cfg(*overrides)
    monkeypatch.setattr(LitClassifier, "training_step", ctrl_c)
    with pytest.raises(SystemExit):
        run_job(cfg, run, overrides=overrides)
    monkeypatch.undo()
    command = read_record(run)["error"].split("(from the first, if none finished) with: ", 1)[1]
    args = shlex.split(command)
    assert args[:2] == ["python", "train.py"]
    resumed = run_in_process("train.py", *args[2:])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert read_record(run)["status"] == "completed"


# Data files: a corrupt .csv.gz is a data error naming the file.
def test_corrupt_gzip_is_a_data_error_naming_the_file(tmp_path):
    path = tmp_path / "fashion-mnist_train.csv.gz"
    write_csv(path, *make_images(50, 0))
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2: len(raw) // 2 + 20] = b"\xff" * 20
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="fashion-mnist_train.csv.gz: could not be read"):
        load_csv(path)


# A refusal leaves none of the directories Hydra made for it, however deep; the ones the user had stay.
def test_a_refused_command_leaves_no_empty_directories_behind(tmp_path, data_dir, run_in_process, monkeypatch):
    for command in (["evaluate.py", "ckpt=missing.ckpt"], ["train.py", f"data.dir={data_dir}", "optim.lr=-1"],
                    ["train.py", f"data.dir={data_dir}", "optim.lr=-1", "hydra.run.dir=a/b/c"],
                    ["train.py", "-m", f"data.dir={data_dir}", "seed=0,1", "hydra.sweep.dir=s/t", "seed=abc,def"]):
        result = run_in_process(*command, cwd=tmp_path)
        assert result.returncode == 2, (command, result.stderr[-3000:])
        assert list(tmp_path.iterdir()) == [], (command, sorted(tmp_path.rglob("*")))
    (tmp_path / "outputs" / "mine").mkdir(parents=True)
    assert run_in_process("evaluate.py", "ckpt=missing.ckpt", cwd=tmp_path).returncode == 2
    # An empty directory of the user's stays, however the run directory came to name it (here an interpolation).
    monkeypatch.setenv("MINE", str(tmp_path / "outputs" / "mine"))
    assert run_in_process("train.py", f"data.dir={data_dir}", "optim.lr=-1", "hydra.run.dir=${oc.env:MINE}",
                          cwd=tmp_path).returncode == 2
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == [Path("outputs"), Path("outputs/mine")]
    # An empty output directory (an unset shell variable) is refused on the command line; through an
    # interpolation it names the current directory, which a refusal leaves where it was, empty or not.
    here = tmp_path / "outputs" / "mine"
    for command in (["train.py", "hydra.run.dir="], ["evaluate.py", "ckpt=x.ckpt", "hydra.run.dir=''"],
                    ["train.py", "-m", "seed=0,1", "hydra.sweep.dir="]):
        result = run_in_process(*command, cwd=here)
        assert result.returncode == 2 and "= is empty (an unset shell variable?)" in result.stderr, result.stderr
    monkeypatch.setenv("NOTHING", "")
    for command in (["train.py", f"data.dir={data_dir}", "optim.lr=-1", "hydra.run.dir=${oc.env:NOTHING}"],
                    ["evaluate.py", "ckpt=missing.ckpt", "hydra.run.dir=${oc.env:NOTHING}"]):
        assert run_in_process(*command, cwd=here).returncode == 2, command
        assert here.is_dir(), command


# Data files: a .csv and a .csv.gz of one split side by side are refused, not one of them read by a hidden rule.
def test_a_split_held_both_plain_and_gzipped_is_refused_naming_both(tmp_path, data_dir, run_in_process):
    both = tmp_path / "data"
    shutil.copytree(data_dir, both)
    write_csv(both / "fashion-mnist_train.csv.gz", *make_images(50, 3))
    result = run_in_process("train.py", f"data.dir={both}", f"hydra.run.dir={tmp_path}/run")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "holds both fashion-mnist_train.csv and fashion-mnist_train.csv.gz" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run" / "metrics.json").exists()


# A working directory deleted under the shell: relative paths name nothing; one paragraph, not Hydra's or torch's.
@pytest.mark.parametrize("command", [["train.py", "preset=smoke"], ["tune.py", "tune=x"],
                                     ["scripts/get_data.py"], ["scripts/gpu_check.py", "--dry-run"],
                                     ["-m", "fmnist.results", "summary", "x"], ["scripts/benchmark.py"],
                                     ["scripts/ship_model.py", "x"], ["-m", "fmnist.training.precision", "show"]])
def test_a_deleted_working_directory_is_one_paragraph(tmp_path, command):
    gone = tmp_path / "gone"
    gone.mkdir()
    args = [str(ROOT / a) if a.endswith(".py") else a for a in command]
    shell = f'cd {shlex.quote(str(gone))} && rmdir "$PWD" && exec "$@"'
    result = subprocess.run(["sh", "-c", shell, "sh", sys.executable, *args], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 2, result.stderr[-3000:]
    assert "started in no longer exists" in result.stderr and "Traceback" not in result.stderr


# A refusal's clean-up after the working directory was deleted under it: the empty directory it made is removed,
# and the working directory, which it must never remove, cannot be asked for.
def test_a_refusals_clean_up_survives_a_deleted_working_directory(tmp_path, monkeypatch):
    from fmnist.fsio import remove_if_empty

    made, gone = tmp_path / "made", tmp_path / "gone"
    made.mkdir()
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    remove_if_empty(made)
    assert not made.exists()


# A command stopped before its checks pass (Ctrl-C while a continued sweep's first job is checked, a failure)
# puts back what Hydra rewrote early, as a refusal does; once the checks pass, what it wrote stays.
@pytest.mark.parametrize("stop,code", [(KeyboardInterrupt, 130), (lambda: SystemExit(2), 2),
                                       (lambda: RuntimeError("a bug"), None)])
def test_a_command_stopped_before_its_checks_pass_puts_back_what_it_wrote_early(tmp_path, monkeypatch, stop, code):
    from fmnist.cli import run_cli
    from fmnist.fsio import keep_early_writes, note_early_write

    sweep_file, job_log = tmp_path / "s" / "multirun.yaml", tmp_path / "s" / "job" / "train.log"
    sweep_file.parent.mkdir()
    sweep_file.write_text("an earlier sweep's\n")
    monkeypatch.setattr(sys, "argv", ["train.py"])

    def command(checks_pass: bool):
        note_early_write(sweep_file)
        sweep_file.write_text("this sweep's\n")
        job_log.parent.mkdir(exist_ok=True)
        note_early_write(job_log)
        job_log.write_text("its first line\n")
        if checks_pass:
            keep_early_writes()
        raise stop()

    with pytest.raises(SystemExit if code else RuntimeError) as stopped:
        run_cli(lambda: command(checks_pass=False))
    assert getattr(stopped.value, "code", None) == code
    assert sweep_file.read_text() == "an earlier sweep's\n" and not job_log.parent.exists()
    with pytest.raises(SystemExit if code else RuntimeError):
        run_cli(lambda: command(checks_pass=True))
    assert sweep_file.read_text() == "this sweep's\n" and job_log.read_text() == "its first line\n"



# SIGTERM (a time limit, scancel) while a continued sweep's first job is checked: train.py stops as for Ctrl-C,
# and the earlier sweep's multirun.yaml is put back, with no job directory left, instead of SIGTERM's default kill.
SIGTERM_WHILE_CHECKED = """
import os, runpy, signal, sys
import fmnist.training.claim as claim

def check_data(cfg):  # the signal arrives while the run's checks read the data
    os.kill(os.getpid(), signal.SIGTERM)

claim.check_data = check_data
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path("train.py", run_name="__main__")
"""


@pytest.mark.slow
def test_sigterm_before_a_runs_checks_pass_puts_back_what_hydra_wrote(tmp_path, data_dir):
    sweep = tmp_path / "s"
    (sweep / "earlier").mkdir(parents=True)
    (sweep / "multirun.yaml").write_text("an earlier sweep's\n")
    before = snapshot(sweep), sorted(sweep.rglob("*"))
    done = subprocess.run([sys.executable, "-c", SIGTERM_WHILE_CHECKED, "-m", *FAST, f"data.dir={data_dir}",
                           f"hydra.sweep.dir={sweep}"], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 143 and "stopped by SIGTERM" in done.stderr, (done.returncode, done.stderr[-3000:])
    assert "Traceback" not in done.stderr
    assert (snapshot(sweep), sorted(sweep.rglob("*"))) == before


# An empty path (an unset shell variable) is refused, not read as the current directory.
def test_an_empty_data_dir_is_refused_not_taken_for_the_current_directory(tmp_path, data_dir, run_in_process):
    here = shutil.copytree(data_dir, tmp_path / "here")  # CSVs in the current directory, which data.dir= would read
    for command in (["train.py", "preset=smoke", "data.dir="], ["evaluate.py", "ckpt=pretrained", "data.dir="]):
        result = run_in_process(*command, cwd=here)
        assert result.returncode == 2 and "data.dir is empty (an unset shell variable?)" in result.stderr, command
    assert sorted(p.name for p in here.iterdir()) == sorted(p.name for p in data_dir.iterdir())


def test_a_data_dir_that_is_a_file_is_called_one(data_dir):
    from fmnist.data.sources import split_csvs

    with pytest.raises(DataError, match="fashion-mnist_train.csv: a file, not a directory; data.dir"):
        split_csvs(data_dir / "fashion-mnist_train.csv")  # the CSV itself named instead of its directory


def test_an_empty_path_is_refused_not_taken_for_the_current_directory(tmp_path, capsys):
    from fmnist.inference.loading import resolve
    from fmnist.results.__main__ import parse_args

    for argv in (["summary", ""], ["report", "a", ""], ["changes", "", "b"], ["images", "a", ""], ["tricks", ""],
                 ["tricks", "--from-csv", ""], ["tricks", "a", "--csv", ""], ["tricks", "a", "--data-dir", ""]):
        with pytest.raises(SystemExit) as exited:
            parse_args(argv)
        assert exited.value.code == 2 and "an empty path" in capsys.readouterr().err, argv

    made = subprocess.run([sys.executable, str(ROOT / "scripts" / "get_data.py"), "--data-dir", "", "--no-download"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120, env={**os.environ,
                                                                                         "PYTHONPATH": str(ROOT)})
    assert made.returncode == 2 and "--data-dir: an empty path" in made.stderr and list(tmp_path.iterdir()) == []
    planned = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--dry-run", "--results", ""],
                             cwd=tmp_path, capture_output=True, text=True, timeout=120,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert planned.returncode == 2 and "--results: an empty path" in planned.stderr and list(tmp_path.iterdir()) == []
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "summary.md").write_text("mine")  # a folder of one's own, which a check would write into
    planned = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--dry-run", "--results", "notes"],
                             cwd=tmp_path, capture_output=True, text=True, timeout=120,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert planned.returncode == 2 and "holds files that no check wrote (no env.json)" in planned.stderr
    with pytest.raises(CheckpointError, match="ckpt= is empty"):
        resolve("")


# Checkpoints: resuming from another architecture's checkpoint is refused.
@pytest.mark.slow
def test_resume_from_another_architectures_checkpoint_is_refused(make_cfg, tmp_path):
    train(make_cfg(*SIMPLE), tmp_path / "simple")
    train(make_cfg("model=optimized", "trainer.precision=32-true"), tmp_path / "optimized")
    own = (tmp_path / "simple" / "checkpoints" / "last.ckpt").read_bytes()
    shutil.copy(tmp_path / "optimized" / "checkpoints" / "last.ckpt", tmp_path / "simple" / "checkpoints" / "last.ckpt")
    before = snapshot(tmp_path / "simple")
    with pytest.raises(CheckpointError, match="last.ckpt: cannot resume from it: its weights are not those of the "
                                              r"configured model \(model.name=simple\)"):
        run_job(make_cfg(*SIMPLE, "trainer.max_epochs=2", "ckpt_path=last"), tmp_path / "simple")
    assert snapshot(tmp_path / "simple") == before
    # A last.ckpt whose weights are not keyed by name (damaged, or not train.py's) is refused as well.
    # So is one whose other fields Lightning restores have the wrong type: refused before the record changes.
    last = tmp_path / "simple" / "checkpoints" / "last.ckpt"
    good = load_checkpoint(last)

    def refused_unchanged(checkpoint: dict, damage, words: str) -> None:  # the record stays `completed`
        payload = {**checkpoint, "state_dict": dict(checkpoint["state_dict"])}
        damage(payload)
        torch.save(payload, last)
        before = snapshot(tmp_path / "simple")
        with pytest.raises(CheckpointError, match=f"last.ckpt: cannot resume from it: {words}"):
            run_job(make_cfg(*SIMPLE, "trainer.max_epochs=2", "ckpt_path=last"), tmp_path / "simple")
        assert snapshot(tmp_path / "simple") == before and read_record(tmp_path / "simple")["status"] == "completed"

    for damage, words in [(lambda p: p["state_dict"].update({1: torch.zeros(1)}), "its `state_dict` is not a mapping"),
                          (lambda p: p.update(hyper_parameters={**p["hyper_parameters"],
                                                                "optim": {**p["hyper_parameters"]["optim"], "name": "sgd"}}),
                           "it was trained with optim.name=sgd, and this run uses adam"),
                          (lambda p: p.update(optimizer_states="x"), "`optimizer_states` should be a list of mappings"),
                          (lambda p: p.update(loops=[1]), "`loops` should be a mapping"),
                          (lambda p: p.update(loops={}), "`loops` should be a mapping holding the `fit_loop` mapping")]:
        refused_unchanged(good, damage, words)
    # Deeper in the run's own checkpoint: each part Lightning restores is tried on a fresh copy first.
    last.write_bytes(own)
    own_payload = load_checkpoint(last)
    checkpoint_key = next(k for k in own_payload["callbacks"] if "ModelCheckpoint{" in k)
    moment = next(iter(own_payload["optimizer_states"][0]["state"]))

    def optimizer_moment(p, value):  # the first parameter's first moment (AdamW's exp_avg) replaced by `value`
        p["optimizer_states"] = [{**p["optimizer_states"][0], "state": {**p["optimizer_states"][0]["state"], moment: {
            **p["optimizer_states"][0]["state"][moment], "exp_avg": value}}}]

    for damage, words in [(lambda p: p.update(optimizer_states=[{"state": {}, "param_groups": "x"}]),
                           r"its `optimizer_states\[0\]` cannot be restored \(TypeError"),
                          (lambda p: optimizer_moment(p, torch.zeros(3)),
                           r"its `optimizer_states\[0\]` cannot be restored \(ValueError: its exp_avg has shape \(3,\)"),
                          (lambda p: optimizer_moment(p, torch.full_like(
                              p["optimizer_states"][0]["state"][moment]["exp_avg"], float("nan"))),
                           r"its `optimizer_states\[0\]` cannot be restored \(ValueError: its exp_avg holds NaN"),
                          (lambda p: p.update(lr_schedulers=[{}]), r"its `lr_schedulers\[0\]` cannot be restored \(KeyError"),
                          (lambda p: p.pop("lr_schedulers"), r"`lr_schedulers` is missing"),
                          (lambda p: p.update(lr_schedulers=[{"lr_lambdas": [None], "last_epoch": "x", "base_lrs": [1e-3]}]),
                           r"its `lr_schedulers\[0\]` cannot be restored \(ValueError: its last_epoch should be a step count"),
                          (lambda p: p.update(callbacks={1: {}}), r"`callbacks` should be a mapping keyed by the callbacks'"),
                          (lambda p: p.update(callbacks={**p["callbacks"], checkpoint_key: {
                              **p["callbacks"][checkpoint_key], "best_model_score": "x"}}),
                           r"its callback state `SafeModelCheckpoint` cannot be restored \(TypeError: its paths should "
                           r"be text and its scores numbers"),
                          (lambda p: p.update(callbacks={**p["callbacks"], checkpoint_key: {
                              **p["callbacks"][checkpoint_key], "best_k_models": [1]}}),
                           r"its callback state `SafeModelCheckpoint` cannot be restored \(AttributeError"),
                          (lambda p: p["state_dict"].update({k: torch.full_like(v, float("nan"))
                                                             for k, v in p["state_dict"].items() if k.endswith("weight")}),
                           r"its `state_dict` holds NaN or infinite weights \(e.g. net\..*\): the run diverged before "
                           "this checkpoint, or the file was damaged since; start a new run directory")]:
        refused_unchanged(own_payload, damage, words)
    # A config.yaml that is not a run's config (damaged, or edited into a list) is named, not a YAML traceback.
    torch.save(good, last)
    config = (tmp_path / "simple" / "config.yaml").read_text()
    for text, words in [("model: [", "cannot read it as the config a run writes"), ("- a\n- b\n", "holds a list")]:
        (tmp_path / "simple" / "config.yaml").write_text(text)
        with pytest.raises(ConfigError, match=f"config.yaml: {words}"):
            run_job(make_cfg(*SIMPLE, "trainer.max_epochs=2", "ckpt_path=last"), tmp_path / "simple")
    # So is a damaged epochs.csv, which the resumed run would keep and add to: named, the directory unchanged.
    (tmp_path / "simple" / "config.yaml").write_text(config)
    last.write_bytes(own)
    rows = (tmp_path / "simple" / "epochs.csv").read_text()
    for damaged, words in [(rows.replace("\n1,", "\nx,", 1), r"epochs.csv, line 2, column epoch: expected a whole "
                            r"number of 0 or more, found 'x'\. Resuming keeps"),
                           (rows.replace("\n", ",0\n").replace(",0\n", ",note\n", 1),
                            r"epochs.csv: holds columns a run does not write \(note\)")]:
        (tmp_path / "simple" / "epochs.csv").write_text(damaged)
        before = snapshot(tmp_path / "simple")
        with pytest.raises(ConfigError, match=words):
            run_job(make_cfg(*SIMPLE, "trainer.max_epochs=2", "ckpt_path=last"), tmp_path / "simple")
        assert snapshot(tmp_path / "simple") == before
    # And a damaged record, which the resume reads (its epochs, precision, trackers) and then rewrites `running`:
    # named, the completed record left as it was.
    (tmp_path / "simple" / "epochs.csv").write_text(rows)
    record = json.loads((tmp_path / "simple" / "metrics.json").read_text())
    for damage, words in [({"precision": "32-true"}, "is not a run record: precision of the wrong type"),
                          ({"precision": {**record["precision"], "resolved": "64-bogus"}},
                           "precision.resolved is '64-bogus', not one of 32-true, "),
                          ({"trackers": [1]}, "is not a run record: trackers of the wrong type"),
                          ({"metrics": {**record["metrics"], "epochs": "1"}}, "metrics.epochs is '1', not a number"),
                          ({"metrics": [1]}, "is not a run record: metrics of the wrong type")]:
        (tmp_path / "simple" / "metrics.json").write_text(json.dumps({**record, **damage}))
        before = snapshot(tmp_path / "simple")
        with pytest.raises(ConfigError, match=rf"cannot resume .*simple: .*metrics.json.*{re.escape(words)}.*nothing was "
                                              "written"):
            run_job(make_cfg(*SIMPLE, "trainer.max_epochs=2", "ckpt_path=last"), tmp_path / "simple")
        assert snapshot(tmp_path / "simple") == before


# Values Lightning or torch would reject later are refused first, naming the key.
@pytest.mark.slow
@pytest.mark.parametrize("override,key", [
    (["seed=-1"], "seed"),
    (["trainer.precision=16x"], "trainer.precision"),
    (["optim=sgd", "optim.momentum=-1"], "optim.momentum"),
    (["optim=sgd", "optim.momentum=inf"], "optim.momentum"),
    (["optim.warmup_epochs=inf"], "optim.warmup_epochs"),  # int(inf) mid-fit
    (["optim.weight_decay=inf"], "optim.weight_decay"),
    (["optim.bias_lr_scale=inf"], "optim.bias_lr_scale"),
    (["model=simple", "model.channels=[8]"], "model.channels"),
    (["model=optimized", "model.kernel_sizes=[3,3]"], "model.kernel_sizes"),
    (["trainer.max_epochs=-1", "optim.scheduler=cosine"], "trainer.max_epochs"),
    (["trainer.max_epochs=-1"], "trainer.max_epochs"),  # without trainer.max_time: a run that never ends
    pytest.param(["trainer.accelerator=gpu"], "trainer.accelerator",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")),
])
def test_values_lightning_or_torch_would_reject_are_refused_first(make_cfg, tmp_path, override, key):
    with pytest.raises(ConfigError, match=rf"config keys? (\S+ and )?{key} must"):
        run_job(make_cfg(*override), tmp_path)
    assert list(tmp_path.iterdir()) == []


# Config errors that Hydra finds exit 2 too; `+unknown.key` is refused.
@pytest.mark.parametrize("override,message", [
    ("optim.lrr=0.1", "optim.lrr"),
    ("optim.lr=abc", "optim.lr"),
    ("model=nosuch", "model/nosuch"),
    ("+optim.lrr=0.1", "config key optim.lrr does not exist"),
    ("+optim.lrr.x=0.1", "config key optim.lrr does not exist"),  # a key under the unknown one: refused at it
    ("+nosuch.x=1", "config key nosuch does not exist"),
    ("++model.foo=1", "config key model.foo is not a key of model optimized"),
])
def test_config_errors_found_by_hydra_exit_2(tmp_path, data_dir, run_in_process, override, message):
    # With data: a command without it is refused for that first (before Lightning's import), whatever else it holds.
    result = run_in_process("train.py", override, f"data.dir={data_dir}", f"hydra.run.dir={tmp_path}/run")
    assert result.returncode == 2, result.stderr[-3000:]
    assert message in result.stderr and "Traceback" not in result.stderr
    assert "To append to your config use +" not in result.stderr
    run = tmp_path / "run"
    assert not run.exists() or [p.name for p in run.iterdir()] == ["train.log"]  # Hydra's log, nothing of a run


# Storage: a read-only directory or a full disk is one paragraph, and the checkpoints survive.
def test_a_file_written_to_a_full_disk_is_named_with_the_key_that_chose_it(tmpfs):
    full = tmpfs("size=8k")
    with pytest.raises(StorageError) as error, storage_errors(key="out"):
        atomic_write(full / "predictions.csv", b"x" * 100_000)
    assert f"cannot write {full / 'predictions.csv'}: the disk is full" in str(error.value)
    assert "(out=...)" in str(error.value) and list(full.iterdir()) == []  # no temporary left behind


def test_a_file_written_to_a_read_only_file_system_is_named_not_its_temporary(tmpfs):
    read_only = tmpfs("ro,size=8k")
    with pytest.raises(StorageError) as error, storage_errors(key="out"):
        atomic_write(read_only / "predictions.csv", b"x")
    assert f"cannot write {read_only / 'predictions.csv'}: the file system is read-only" in str(error.value)


@pytest.mark.parametrize("script,key,target", [
    ("train.py", "hydra.run.dir", "{file}"), ("train.py", "hydra.run.dir", "{file}/run"),
    ("train.py", "hydra.run.dir", "{dir}/" + "x" * 300), ("predict.py", "out", "{file}/predictions.csv"),
])
def test_an_output_path_that_cannot_be_made_is_one_paragraph_naming_the_key(tmp_path, data_dir, run_in_process,
                                                                             script, key, target):
    (tmp_path / "a-file").write_text("mine")
    target = target.format(file=tmp_path / "a-file", dir=tmp_path)
    args = ([*FAST, f"data.dir={data_dir}"] if script == "train.py" else
            ["ckpt=pretrained", f"inputs=[{data_dir / 'fashion-mnist_test.csv'}]"])
    result = run_in_process(script, *args, f"{key}={target}")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    error = result.stderr.splitlines()[-1]  # after what the command logged (ckpt=pretrained: which model)
    assert error.startswith("error: cannot write ") and f"({key}=...)" in error, result.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"] and (tmp_path / "a-file").read_text() == "mine"


def test_a_sweep_directory_on_a_full_disk_is_named(tmpfs, data_dir, run_in_process):
    disk = tmpfs("size=64k")
    (disk / "filler").write_bytes(b"\0" * (os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize))
    result = run_in_process("train.py", "-m", *FAST, f"data.dir={data_dir}", f"hydra.sweep.dir={disk / 'sweep'}")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"error: cannot write a file in {disk / 'sweep'}: the disk is full" in result.stderr
    assert [p.name for p in disk.iterdir()] == ["filler"]


# /proc exists on Linux and refuses to create anything, with ENOENT: an output there is not a missing input.
@pytest.mark.parametrize("script,args,key", [
    ("train.py", [*FAST, "data.dir={data}", "hydra.run.dir=/proc/fmnist-run"], "hydra.run.dir"),
    ("train.py", ["-m", *FAST, "data.dir={data}", "hydra.sweep.dir=/proc/fmnist-sweep"], "hydra.sweep.dir"),
    ("evaluate.py", ["ckpt=pretrained", "data.dir={data}", "hydra.run.dir=/proc/fmnist-eval"], "hydra.run.dir"),
    ("predict.py", ["ckpt=pretrained", "inputs=[{data}/fashion-mnist_test.csv]", "out=/proc/fmnist-predictions.csv"],
     "out"),
    ("export.py", ["ckpt=pretrained", "data.dir={data}", "out=/proc/fmnist-model.onnx"], "out"),
    ("tune.py", ["study=s", "n_trials=1", "out_dir=/proc", "preset=smoke", "data.val_size=100", "data.dir={data}"], "out_dir"),
])
def test_an_output_where_the_file_system_makes_no_files_is_one_paragraph(data_dir, run_in_process, script, args,
                                                                        key):
    result = run_in_process(script, *(arg.format(data=data_dir) for arg in args))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    error = result.stderr.splitlines()[-1]
    assert error.startswith("error: cannot write /proc") and "does not let files be created there" in error, error
    assert f"({key}=...)" in error


def test_a_name_as_long_as_the_file_system_takes_is_written(tmp_path):
    # The temporary file beside it gets a shorter name of its own, not 20 more characters than the limit.
    for name in ("a" * 251 + ".csv", "é" * 123 + ".csv"):  # 255 bytes each
        atomic_write(tmp_path / name, b"x")
        assert (tmp_path / name).read_bytes() == b"x"
    assert len(list(tmp_path.iterdir())) == 2  # no temporary left


def test_a_missing_input_is_not_taken_for_a_place_that_cannot_be_written(tmp_path):
    missing = FileNotFoundError(2, os.strerror(2), str(tmp_path / "missing.csv"))
    with pytest.raises(FileNotFoundError), storage_errors(key="out"):
        raise missing
    assert list(tmp_path.iterdir()) == []  # the check made nothing that stayed


@pytest.mark.slow
def test_read_only_output_directory_is_one_paragraph(make_cfg, tmpfs):
    read_only = tmpfs("ro,size=1m")
    for run in (read_only, read_only / "run"):
        with pytest.raises(StorageError, match=f"cannot write {run}: the file system is read-only"):
            run_job(make_cfg(*SIMPLE), run)


@pytest.mark.slow
def test_a_run_directory_on_a_disk_made_read_only_is_one_paragraph_and_left_as_it_was(make_cfg, data_dir, tmpfs,
                                                                                      run_in_process):
    run = tmpfs("size=16m") / "run"
    train(make_cfg(*SIMPLE), run)
    before = snapshot(run)
    subprocess.run(["mount", "-o", "remount,ro", str(run.parent)], check=True)
    for resume in ([], ["ckpt_path=last", "trainer.max_epochs=2"]):  # refused as another run's, and as unwritable
        result = run_in_process("train.py", *FAST, *SIMPLE, f"data.dir={data_dir}", f"hydra.run.dir={run}", *resume)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
        assert result.stderr.splitlines()[-1].startswith("error: "), result.stderr[-3000:]
    assert snapshot(run) == before


@pytest.mark.slow
def test_a_run_started_again_from_its_first_epoch_keeps_no_best_checkpoint_of_the_attempt_before(make_cfg, tmp_path):
    from fmnist.inference.loading import best_in_run
    from fmnist.runs import update_record

    run = tmp_path / "run"
    train(make_cfg(*SIMPLE), run)
    # As a disk that filled up while the first last.ckpt was written leaves it: a best checkpoint, a failed record.
    (run / "checkpoints" / "last.ckpt").unlink()
    update_record(run, drop=("metrics",), status="failed")
    (run / "checkpoints" / "best-epoch001.ckpt").write_bytes(b"the earlier attempt's")
    train(make_cfg(*SIMPLE, "ckpt_path=last"), run)
    assert [p.name for p in (run / "checkpoints").glob("best-*")] == ["best-epoch001.ckpt"]
    assert load_checkpoint(best_in_run(run))["epoch"] == 0  # this attempt's weights
    # A run stopped by a signal finished its epoch's end, last.ckpt included: without it, it is not started again
    # over its record (its record counts no epochs, its epochs.csv one).
    (run / "checkpoints" / "last.ckpt").unlink()
    update_record(run, drop=("metrics",), status="interrupted")
    before = snapshot(run)
    with pytest.raises(ConfigError, match="last.ckpt is gone, though the run trained 1 epoch"):
        train(make_cfg(*SIMPLE, "ckpt_path=last"), run)
    assert snapshot(run) == before


def test_a_resume_that_cannot_rewrite_its_epochs_csv_keeps_every_row_it_had(tmp_path, monkeypatch):
    import csv
    import errno
    from types import SimpleNamespace

    from fmnist.training.epochs import EpochCSV

    epochs = EpochCSV(tmp_path / "epochs.csv")
    for epoch in (1, 2, 3):
        epochs._write([{"epoch": epoch, "step": 10 * epoch}], mode="a")
    before = (tmp_path / "epochs.csv").read_bytes()
    assert len(before.splitlines()) == 4  # the header and three epochs

    def disk_full_after_one_row(self, rows):
        self.writerow(rows[0])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    # A resume from epoch 2's checkpoint drops epoch 3's row: the disk fills up while the file is rewritten.
    monkeypatch.setattr(csv.DictWriter, "writerows", disk_full_after_one_row)
    with pytest.raises(OSError, match="No space left"):
        epochs.on_train_start(SimpleNamespace(current_epoch=2), None)
    assert (tmp_path / "epochs.csv").read_bytes() == before and sorted(os.listdir(tmp_path)) == ["epochs.csv"]


def test_a_test_confusion_matrix_that_cannot_be_written_whole_is_not_left_half_written(tmp_path, monkeypatch):
    import errno
    from types import SimpleNamespace

    from fmnist.runs import CONFUSION_FILE
    from fmnist.training import callbacks

    cm = torch.eye(10, dtype=torch.long) * 100
    module = SimpleNamespace(test_confusion=SimpleNamespace(compute=lambda: cm, reset=lambda: None))
    savetxt = np.savetxt

    def disk_full_after_one_row(path, rows, **kwargs):
        savetxt(path, rows[:1], **kwargs)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(callbacks.np, "savetxt", disk_full_after_one_row)
    with pytest.raises(OSError, match="No space left"):
        callbacks.TestArtifacts(tmp_path).on_test_epoch_end(None, module)
    assert not (tmp_path / CONFUSION_FILE).exists() and list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_resume_removes_what_a_kill_during_the_checkpoint_writes_left(make_cfg, tmp_path):
    run = tmp_path / "run"
    train(make_cfg(*SIMPLE, "trainer.max_epochs=2"), run)
    # As a kill between epoch 3's best file and its last.ckpt leaves them: a best file that last.ckpt does not
    # know of, and the temporary file of the cut-off write.
    (run / "checkpoints" / "best-epoch003.ckpt").write_bytes(b"the stopped attempt's")
    (run / "checkpoints" / ".last.ckpt.4242-0a1b2c3d.tmp").write_bytes(b"half a checkpoint")
    train(make_cfg(*SIMPLE, "trainer.max_epochs=3", "ckpt_path=last"), run)
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert len(names) == 2 and names[1] == "last.ckpt" and names[0].startswith("best-epoch"), names
    assert load_checkpoint(run / "checkpoints" / names[0])["epoch"] >= 0  # a real checkpoint, not the stale bytes


@pytest.mark.slow
def test_a_resumed_run_keeps_the_precision_its_start_chose(make_cfg, tmp_path, monkeypatch):
    from fmnist.training import train as train_module

    run = tmp_path / "run"
    train(make_cfg("model=simple", "trainer.precision=auto"), run)
    chosen = read_record(run)["precision"]
    other = "bf16-mixed" if chosen["resolved"] == "32-true" else "32-true"
    # What `auto` would decide on the day of the resume (a probe on a quieter machine, another run's cached verdict).
    monkeypatch.setattr(train_module, "resolve_precision", lambda *args: (other, {"requested": "auto",
                                                                                 "resolved": other, "reason": "now"}))
    train(make_cfg("model=simple", "trainer.precision=auto", "trainer.max_epochs=2", "ckpt_path=last"), run)
    record = read_record(run)
    assert record["status"] == "completed" and record["metrics"]["epochs"] == 2
    assert record["precision"] == chosen


def test_of_several_best_checkpoints_the_one_written_last_is_used(tmp_path, caplog):
    from fmnist.inference.loading import best_in_run

    (tmp_path / "checkpoints").mkdir()
    for name in ("best-epoch002.ckpt", "best-epoch003.ckpt", "best-epoch003-v1.ckpt", "best-epoch003-v2.ckpt"):
        (tmp_path / "checkpoints" / name).write_bytes(b"")
    assert best_in_run(tmp_path).name == "best-epoch003-v2.ckpt"  # not best-epoch003.ckpt, last in name order
    assert "holds 4 best checkpoints: using the latest, best-epoch003-v2.ckpt" in caplog.text


@pytest.mark.slow
def test_full_disk_is_one_paragraph_and_keeps_the_checkpoints(make_cfg, tmpfs):
    run = tmpfs("size=16m") / "run"
    train(make_cfg(*SIMPLE), run)
    last = (run / "checkpoints" / "last.ckpt").read_bytes()
    free = os.statvfs(run).f_bavail * os.statvfs(run).f_frsize
    (run.parent / "filler").write_bytes(b"\0" * (free - 300_000))  # room for the small files, not a checkpoint
    with pytest.raises(StorageError, match="cannot write .*last.ckpt.*: the disk is full"):
        run_job(make_cfg(*SIMPLE, "trainer.max_epochs=2", "ckpt_path=last"), run)
    assert (run / "checkpoints" / "last.ckpt").read_bytes() == last
    assert load_checkpoint(run / "checkpoints" / "last.ckpt")["epoch"] == 0


# Divergence: a step too large for float32 (torch refuses its scale before any loss is infinite) is `diverged` too.
@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_a_step_that_overflows_the_weights_dtype_is_diverged_not_a_crash(make_cfg, tmp_path, optimizer):
    with pytest.raises(DivergedError, match="an optimizer step does not fit in the weights' number type"):
        train(make_cfg(*SIMPLE, f"optim.name={optimizer}", "optim.lr=1e39"), tmp_path)
    assert read_record(tmp_path)["status"] == "diverged"


# Out of memory: a batch too large for the device is one paragraph naming the batch sizes, and the run is `failed`.
def test_a_batch_too_large_for_memory_is_one_paragraph_and_recorded_failed(tmp_path, data_dir, run_in_process,
                                                                           monkeypatch):
    def allocate_too_much(self, batch, batch_idx):
        return torch.empty(1 << 62, dtype=torch.uint8)  # the CPU allocator's own refusal, as a huge batch meets it

    monkeypatch.setattr(LitClassifier, "training_step", allocate_too_much)
    run = tmp_path / "run"
    result = run_in_process("train.py", *FAST, *SIMPLE, f"data.dir={data_dir}", f"hydra.run.dir={run}",
                            "data.batch_size=8")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    message = ("this machine ran out of memory (an allocation of 4.00 EiB failed): lower data.batch_size (8), or "
               "data.eval_batch_size (")
    assert message in result.stderr
    record = read_record(run)
    assert record["status"] == "failed" and record["error"].startswith(message)
    assert "can't allocate memory" in (run / "error.txt").read_text()  # torch's own words, kept for a bug report


# Divergence: a NaN validation loss is `diverged`, never `completed`.
@pytest.mark.slow
def test_nan_validation_loss_is_diverged_not_completed(make_cfg, tmp_path):
    cfg = make_cfg(*SIMPLE, "optim=sgd", "optim.lr=1e8")
    with pytest.raises(DivergedError, match="optim.lr"):
        run_job(cfg, tmp_path)
    record = read_record(tmp_path)
    assert record["status"] == "diverged" and "nan" in record["error"].lower()


# Ctrl-C during fit: the step it lands in finishes, then the run stops (never inside a library's code).
def test_ctrl_c_during_fit_stops_after_the_step_it_lands_in(make_cfg, tmp_path):
    import lightning as L

    class CtrlC(L.Callback):
        ended: list[int] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 2:
                os.kill(os.getpid(), signal.SIGINT)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.ended.append(batch_idx)

    signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (the fixture puts it back)
    ctrl_c = CtrlC()
    with pytest.raises(KeyboardInterrupt):
        train(make_cfg(*SIMPLE, "trainer.limit_train_batches=6"), tmp_path / "run", callbacks=[ctrl_c])
    assert ctrl_c.ended == [0, 1, 2]
    record = read_record(tmp_path / "run")
    assert record["status"] == "interrupted" and "ckpt_path=last" in record["error"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# SIGTERM before fit starts: recorded `interrupted`, with its resume command.
@pytest.mark.slow
def test_sigterm_before_fit_is_recorded_with_its_resume_command(tmp_path, data_dir, run_in_process):
    run = tmp_path / "run"
    args = [*FAST, *SIMPLE, f"data.dir={data_dir}", f"hydra.run.dir={run}"]
    # SIGTERM arrives right after the run's record is written, while the model is being built.
    code = ("import os, signal, runpy, sys, lightning\n"
            "lightning.seed_everything = lambda *a, **k: os.kill(os.getpid(), signal.SIGTERM)\n"
            f"sys.argv = ['train.py', *{args!r}]\n"
            f"runpy.run_path({str(ROOT / 'train.py')!r}, run_name='__main__')\n")
    stopped = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    record = read_record(run)
    assert record["status"] == "interrupted" and "ckpt_path=last" in record["error"]
    resumed = run_in_process("train.py", *args, "ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert read_record(run)["status"] == "completed"


# Data files: a cache whose digest matches but whose arrays are wrong is parsed again.
@pytest.mark.parametrize("corrupt", ["labels", "images", "version", "digest"])
def test_cache_with_wrong_contents_is_parsed_again(tmp_path, corrupt):
    path = tmp_path / "fashion-mnist_train.csv"
    write_csv(path, *make_images(50, 0))
    images, labels = load_csv(path)
    with np.load(cache_path(path)) as z:
        saved = dict(z)
    saved[corrupt] = {"labels": np.full_like(labels, 42), "images": images[:10], "version": np.array([1, 1]),
                      "digest": np.array([1j])}[corrupt]  # values, and fields that are not what a cache holds
    np.savez(cache_path(path), **saved)
    again_images, again_labels = load_csv(path)
    assert np.array_equal(again_images, images) and np.array_equal(again_labels, labels)


# Messages: precise, printed once; a training set of one class warns.
def test_carriage_return_inside_a_cell_is_reported_as_found(tmp_path):
    path = tmp_path / "fashion-mnist_train.csv"
    path.write_bytes(("label," + ",".join(f"pixel{i}" for i in range(1, 785)) + "\n1\r2," + ",".join(["0"] * 784)
                      + "\n").encode())
    with pytest.raises(DataError, match="line 2, column 1 \\(label\\): expected an integer 0-9, found a carriage "
                                        "return inside the cell"):
        parse_csv(path)


class Payload:
    pass


def test_pickle_refusal_names_the_class_and_does_not_advise_unsafe_loading(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": Payload()}, path)
    with pytest.raises(CheckpointError) as refused:
        load_checkpoint(path)
    assert f"class {__name__}.Payload" in str(refused.value) and "weights_only" not in str(refused.value)


def test_a_checkpoint_path_that_is_a_directory_is_called_one_not_missing(tmp_path):
    (tmp_path / "last.ckpt").mkdir()
    with pytest.raises(CheckpointError, match="last.ckpt: a directory, not a checkpoint file"):
        load_checkpoint(tmp_path / "last.ckpt")
    with pytest.raises(CheckpointError, match="gone.ckpt: checkpoint not found"):
        load_checkpoint(tmp_path / "gone.ckpt")


def test_single_class_training_set_warns(tmp_path, caplog):
    images, labels = make_images(200, 0)
    write_csv(tmp_path / "fashion-mnist_train.csv", images, np.full_like(labels, 3))
    write_csv(tmp_path / "fashion-mnist_test.csv", images, labels)
    with caplog.at_level(logging.WARNING):
        FashionMNISTDataModule(dir=str(tmp_path), val_size=20).check()
    assert "only class(es) [3]" in caplog.text


def test_a_library_error_while_writing_keeps_its_own_message(tmp_path):
    from fmnist.fsio import atomic_output

    with pytest.raises(OSError, match="^Cannot save file into a non-existent directory$"):
        with atomic_output(tmp_path / "out.csv"):
            raise OSError("Cannot save file into a non-existent directory")  # as pandas raises it: no errno
    with pytest.raises(OSError, match=r"No such file or directory: '.*missing/out.csv'"):  # ours: the user's name
        with atomic_output(tmp_path / "missing" / "out.csv") as tmp:
            open(tmp, "w")
    assert list(tmp_path.iterdir()) == []


def test_an_output_that_appears_while_a_command_runs_is_kept_unless_replacing_is_asked(tmp_path):
    from fmnist.fsio import atomic_output

    out = tmp_path / "model.onnx"
    with pytest.raises(ConfigError, match="model.onnx was created by another process while this command ran"):
        with atomic_output(out, replace=False) as tmp:
            tmp.write_bytes(b"ours")
            out.write_bytes(b"theirs")  # another export to the same out=, finished first
    assert out.read_bytes() == b"theirs" and sorted(tmp_path.iterdir()) == [out]
    with atomic_output(out, replace=True) as tmp:  # overwrite=true: the command's own output replaces it
        tmp.write_bytes(b"ours")
    assert out.read_bytes() == b"ours" and sorted(tmp_path.iterdir()) == [out]
    with atomic_output(tmp_path / "new.csv", replace=False) as tmp:  # nothing there: written as usual
        tmp.write_bytes(b"rows")
    assert (tmp_path / "new.csv").read_bytes() == b"rows"


# SIGTERM (a time limit, scancel) or Ctrl-C during a command that writes a file: its temporary file is removed.
SIGNAL_WHILE_WRITING = """
import os, signal, sys, time
from pathlib import Path
from fmnist.cli import run_plain
from fmnist.fsio import atomic_output

out = Path(sys.argv[1])
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, whatever this test's process ignores

def work():
    with atomic_output(out, suffix=".onnx") as tmp:
        tmp.write_bytes(b"half of a model")
        os.kill(os.getpid(), signal.{signal_name})  # as a time limit or Ctrl-C would, in the middle of the write
        time.sleep(60)

sys.exit(run_plain(work, unwind_on_sigterm={unwind}))
"""


@pytest.mark.parametrize("signal_name,unwind", [("SIGTERM", True), ("SIGTERM", False), ("SIGINT", False)])
def test_a_signal_while_a_command_writes_leaves_no_temporary_file(tmp_path, signal_name, unwind):
    out = tmp_path / "out" / "model.onnx"
    out.parent.mkdir()
    script = SIGNAL_WHILE_WRITING.format(unwind=unwind, signal_name=signal_name)
    done = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    left = sorted(p.name for p in out.parent.iterdir())
    if signal_name == "SIGINT":  # every plain command: one line, no traceback
        assert done.returncode == 130 and done.stderr.startswith("error: stopped by Ctrl-C;"), done.stderr
        assert "Traceback" not in done.stderr and left == []
    elif unwind:  # what evaluate, predict, export, get_data and the results verbs do
        assert done.returncode == 143 and "stopped by SIGTERM" in done.stderr and left == []
    else:  # SIGTERM's default action, in a command that does not unwind: the file stays behind
        assert done.returncode == -signal.SIGTERM and len(left) == 1 and left[0].startswith(".model.onnx.")


def test_ctrl_c_inside_a_lightning_fit_is_a_stop_not_a_failure(capsys):
    from fmnist.cli import run_plain

    def fit_stopped_by_ctrl_c():
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            sys.exit(1)  # what Lightning's fit does with Ctrl-C

    assert run_plain(fit_stopped_by_ctrl_c) == 130 and "stopped by Ctrl-C" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # any other exit is the work's own
        run_plain(lambda: sys.exit(1))


def test_directories_made_for_an_output_are_removed_when_it_fails(tmp_path):
    from fmnist.fsio import dirs_made

    with pytest.raises(OSError):  # mkdir fails partway: `new` was made, the long name was not
        with dirs_made(tmp_path / "new" / ("x" * 300)):
            pass
    with pytest.raises(RuntimeError):
        with dirs_made(tmp_path / "a" / "b"):
            raise RuntimeError("the export failed")
    (tmp_path / "kept").mkdir()
    with pytest.raises(RuntimeError):
        with dirs_made(tmp_path / "kept" / "c"):
            raise RuntimeError("the export failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"] and not any((tmp_path / "kept").iterdir())


@pytest.mark.parametrize("content", [b"hello\n", bytes(range(256)) * 4, b"PK\x03\x04" + b"\x00" * 100,
                                     pickle.dumps({"args": argparse.Namespace()}, protocol=4)])  # pickled by hand
def test_a_file_that_is_not_a_checkpoint_is_one_paragraph_not_a_pickle_warning(tmp_path, content):
    path = tmp_path / "model.ckpt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as refused, warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        load_checkpoint(path)
    assert "not a" in str(refused.value) and "pickled Python objects" not in str(refused.value)
    assert not warned, [str(w.message) for w in warned]


@pytest.mark.parametrize("entry", ["train.py", "evaluate.py", "predict.py", "export.py"])
def test_an_entry_points_own_imports_leave_torch_to_its_ctrl_c_handling(entry):
    # What an entry point imports before `run_cli` takes over Ctrl-C: torch takes seconds to import, and a
    # Ctrl-C during that import would print a traceback instead of one line.
    source = (ROOT / entry).read_text()
    top = "\n".join(line for line in source.splitlines() if line.startswith(("import ", "from ")))
    loaded = subprocess.run([sys.executable, "-c", f"{top}\nimport sys\nprint('torch' in sys.modules)"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert loaded.returncode == 0 and loaded.stdout.strip() == "False", loaded.stdout + loaded.stderr[-2000:]


def test_train_without_data_is_refused_before_lightning_is_imported(tmp_path):
    # A newcomer's first run before `make data`: the message, without the seconds of importing Lightning first.
    code = ("import runpy, sys\nsys.argv = ['train.py', 'data.dir=" + str(tmp_path / "none") + "']\n"
            "try:\n    runpy.run_path('train.py', run_name='__main__')\n"
            "except SystemExit as e:\n    print(e.code, 'lightning' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["2", "False"], result.stdout + result.stderr[-2000:]
    assert f"{tmp_path / 'none'}/fashion-mnist_train.csv: file not found" in result.stderr


@pytest.mark.parametrize("command, said", [
    (["train.py", "-m", "optim.lr=1e-3,-1"], "the sweep's job optim.lr=-1: config key optim.lr must be positive"),
    (["train.py", "optim.lr=-1"], "error: config key optim.lr must be positive"),
    (["tune.py", "study=s", "optim.lr=-1", "~space.lr"], "error: config key optim.lr must be positive"),
    (["tune.py", "study=s", "space.lr.low=-1"], "error: search space entry space.lr needs low <= high"),
], ids=["sweep", "single run", "study", "search space"])
def test_a_bad_value_is_refused_before_lightning_is_imported(tmp_path, data_dir, command, said):
    # A sweep checks every job before the first trains, a single run its config before it imports the training
    # code, a study its config and search space before its trials: none takes Lightning, nor its seconds of import,
    # nor those of SciPy's statistics, which only results need.
    script, *args = command
    where = ([*FAST, *SIMPLE, f"hydra.sweep.dir={tmp_path / 'sweep'}", f"hydra.run.dir={tmp_path / 'run'}"]
             if script == "train.py" else [f"out_dir={tmp_path / 'tune'}"])  # a study samples the model and batch size
    argv = [script, *args, f"data.dir={data_dir}", *where]
    code = (f"import runpy, sys\nsys.argv = {argv!r}\n"
            f"try:\n    runpy.run_path({script!r}, run_name='__main__')\n"
            "except SystemExit as e:\n    print(e.code, 'lightning' in sys.modules, 'scipy.stats' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["2", "False", "False"], result.stdout + result.stderr[-2000:]
    assert said in result.stderr
    assert sorted(tmp_path.iterdir()) == []


def test_a_sweep_directory_under_a_file_is_one_paragraph_without_a_false_alarm(tmp_path, data_dir):
    # Hydra wrote nothing there (it could not): nothing to put back, and no line saying that something could not be.
    (tmp_path / "afile").write_text("mine")
    result = subprocess.run([sys.executable, "train.py", "-m", *FAST, *SIMPLE, f"data.dir={data_dir}", "seed=0,1",
                             f"hydra.sweep.dir={tmp_path / 'afile' / 'sub'}"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2 and "a part of the path is a file" in result.stderr, result.stderr[-3000:]
    assert "could not put" not in result.stdout + result.stderr and (tmp_path / "afile").read_text() == "mine"
