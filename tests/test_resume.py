"""Interrupted runs: SIGKILL mid-epoch, SIGINT and SIGTERM, then resume (real subprocess trainings)."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow

# Epochs of 63 steps (500 training images in batches of 8), so a signal lands inside one; deterministic, so reruns
# match exactly.
SETTINGS = ["trainer.accelerator=cpu", "trainer.devices=1", "trainer.precision=32-true", "trainer.deterministic=true",
            "trainer.max_epochs=3", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
            "trainer.num_sanity_val_steps=0", "model=simple", "model.dropout=0.3", "data.val_size=100",
            "data.batch_size=8"]


# A run stopped by the test is started with more epochs than it can finish before the signal, however busy
# the machine; it is then resumed (max_epochs may change on resume) to one epoch past where it stopped.
UNFINISHABLE = "trainer.max_epochs=200"


def start(run_dir: Path, data_dir: Path, *extra: str) -> subprocess.Popen:
    """train.py as a terminal starts it, Ctrl-C included.

    A process inherits an ignored SIGINT, and Python keeps ignoring it; a test suite started in the
    background of a script (`make test &`, `nohup make test &`) has it ignored, so the run would
    rightly ignore the test's Ctrl-C too. The run is therefore started with SIGINT handled here, which
    exec resets to the default in the child.
    """
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *SETTINGS, f"data.dir={data_dir}",
                                 f"hydra.run.dir={run_dir}", *extra], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    finally:
        signal.signal(signal.SIGINT, previous)


def ignores(pid: int, sig: int) -> bool:
    """Whether process `pid` ignores `sig` (its SigIgn mask in /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigIgn:"):
            return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False


def wait_for_epochs(run_dir: Path, n: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    """Until `n` epochs are in epochs.csv and the last checkpoint is written (it follows the epoch's row: a
    signal between the two stops a run that has no checkpoint to resume yet)."""
    deadline = time.time() + timeout
    path, last = run_dir / "epochs.csv", run_dir / "checkpoints" / "last.ckpt"
    while time.time() < deadline:
        if path.exists() and len(path.read_text().strip().splitlines()) > n and last.exists():
            return
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.02)
    raise TimeoutError(f"{run_dir} did not finish {n} epoch(s)")


def finish_here(run_in_process, run_dir: Path, data_dir: Path, *extra: str) -> None:
    """Run train.py with the same settings to the end, in this process (what needs no signal needs no new one)."""
    result = run_in_process("train.py", *SETTINGS, f"data.dir={data_dir}", f"hydra.run.dir={run_dir}", *extra)
    assert result.returncode == 0, result.stderr[-3000:]


def record(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def curve(run_dir: Path) -> list[dict]:
    """The per-epoch metrics without the wall-time columns."""
    with open(run_dir / "epochs.csv") as f:
        return [{k: v for k, v in row.items() if "seconds" not in k} for row in csv.DictReader(f)]


def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(tmp_path, data_dir, run_in_process):
    killed = tmp_path / "killed"
    proc = start(killed, data_dir, UNFINISHABLE)
    wait_for_epochs(killed, 1, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert record(killed)["status"] == "running"  # killed before it could finish
    epochs = len(curve(killed)) + 1  # one more than it finished, however late the kill came
    finish_here(run_in_process, killed, data_dir, "ckpt_path=last", f"trainer.max_epochs={epochs}")
    reference = tmp_path / "reference"
    finish_here(run_in_process, reference, data_dir, f"trainer.max_epochs={epochs}")

    assert record(killed)["status"] == "completed"
    assert curve(killed) == curve(reference)
    for key in ("val/acc_best", "test/acc", "test/loss", "epochs"):
        assert record(killed)["metrics"][key] == record(reference)["metrics"][key], key


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_cleanly_records_how_to_resume_and_resume_finishes(tmp_path, data_dir, sig, run_in_process):
    run = tmp_path / "run"
    proc = start(run, data_dir, UNFINISHABLE)
    wait_for_epochs(run, 1, proc)
    assert not ignores(proc.pid, sig), f"the run was started with signal {sig} ignored: it cannot be stopped by it"
    proc.send_signal(sig)
    try:
        out, err = proc.communicate(timeout=300)  # seconds of work, minutes on an overloaded machine
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()  # the run's log lines are on stdout, tracebacks on stderr
        pytest.fail(f"no exit within 300 s of the signal; its stdout:\n{out[-3000:]}\nits stderr:\n{err[-3000:]}")
    assert proc.returncode == 128 + sig, err[-3000:]  # 130 for Ctrl-C, 143 for SIGTERM: not 1, a crash
    # One line says it, with the command that resumes: not Lightning's "[rank: 0] Received SIGTERM: 15" before it.
    assert (out + err).count("stopped by a signal; resume") == 1 and "Received SIGTERM" not in out + err
    rec = record(run)
    assert rec["status"] == "interrupted", rec
    assert "ckpt_path=last" in rec["error"] and f"hydra.run.dir={run}" in rec["error"]
    assert (run / "checkpoints" / "last.ckpt").exists()
    assert not list((run / "checkpoints").glob(".*.tmp"))
    epochs = len(curve(run)) + 1
    finish_here(run_in_process, run, data_dir, "ckpt_path=last", f"trainer.max_epochs={epochs}")
    assert record(run)["status"] == "completed" and record(run)["metrics"]["epochs"] == epochs


# With validation every third epoch, last.ckpt is still each epoch's, and a resume starts at the next epoch: the
# saved epoch's epochs.csv row (training figures, times) stays as it was written.
def test_epochs_without_validation_are_checkpointed_and_resumed_after(tmp_path, data_dir, run_in_process):
    from lightning.pytorch.callbacks import model_checkpoint

    from fmnist.fsio import load_checkpoint
    from tests.conftest import FAST

    run = tmp_path / "run"
    args = [*FAST, f"data.dir={data_dir}", "model=simple", "trainer.check_val_every_n_epoch=3", f"hydra.run.dir={run}"]
    first = run_in_process("train.py", *args, "trainer.max_epochs=4")
    assert first.returncode == 0, first.stderr[-3000:]
    assert load_checkpoint(run / "checkpoints" / "last.ckpt")["epoch"] == 3  # the fourth epoch's, not the third's
    rows = (run / "epochs.csv").read_text().splitlines()
    model_checkpoint.warning_cache.clear()  # Lightning warns of a message once per process
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        resumed = run_in_process("train.py", *args, "trainer.max_epochs=5", "ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = (run / "epochs.csv").read_text().splitlines()
    assert after[:5] == rows and len(after) == 6  # the resumed epoch does not validate either
    record = json.loads((run / "metrics.json").read_text())
    train_seconds = [float(row["train_seconds"]) for row in csv.DictReader(after)]
    assert record["metrics"]["train_seconds"] == train_seconds[-1] and train_seconds == sorted(train_seconds)
    # The record's last validation loss is the third epoch's, which the resumed process did not validate.
    validated = [row for row in csv.DictReader(after) if row["val/loss"]]
    assert record["metrics"]["val/loss"] == float(validated[-1]["val/loss"]) and validated[-1]["epoch"] == "3"
    # An epoch without validation has no score to rank, and is not warned of (Lightning: "could not find the
    # monitored key") when a resume starts in one.
    assert not [w for w in warned if "could not find the monitored key" in str(w.message)]
