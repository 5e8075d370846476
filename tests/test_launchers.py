"""Sweeps through other launchers: joblib (parallel local jobs), submitit (local processes, SLURM)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import joblib
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from fmnist.sweeps.placement import plan
from tests.conftest import CONF, FAST, FAST_NAMED

JOBLIB = {"_target_": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher", "n_jobs": 2}
BASIC = {"_target_": "hydra._internal.core_plugins.basic_launcher.BasicLauncher"}


@pytest.mark.parametrize("launcher,job,cores,gpus,devices,threads,device", [
    (JOBLIB, 3, 2, 0, "auto", 1, None),                    # 2 jobs on 2 cores: one thread each
    (JOBLIB, 3, 16, 0, "auto", 8, None),
    ({**JOBLIB, "n_jobs": -1}, 0, 8, 0, "auto", 1, None),  # joblib's -1: as many jobs as cores
    ({**JOBLIB, "n_jobs": 4}, 5, 32, 4, "auto", 8, 1),     # job i on GPU i mod G
    ({**JOBLIB, "n_jobs": 4}, 5, 32, 4, [2], 8, None),     # a job pinned by the user stays pinned
    (BASIC, 5, 32, 4, "auto", None, None),                 # sequential: torch's defaults
    ({"_target_": "x.submitit_launcher.SlurmLauncher", "cpus_per_task": 6}, 1, 64, 8, "auto", 6, None),
])
def test_placement_shares_cores_and_gpus(launcher, job, cores, gpus, devices, threads, device):
    placement = plan(launcher, job, cores, gpus, "auto", devices)
    assert (placement.threads, placement.device) == (threads, device)


def test_more_jobs_than_cores_is_noted_on_a_cpu_only():
    crowded = {**JOBLIB, "n_jobs": 4}
    assert plan(crowded, 0, 2, 0, "auto", "auto").reason == (
        "up to 4 jobs at once on 2 cores: 1 torch thread each (hydra.launcher.n_jobs allows more jobs at once than "
        "cores: on a CPU, jobs past 2 take turns on them and add no compute)")
    assert "than cores" not in plan(crowded, 0, 2, 1, "auto", "auto").reason  # packed onto a GPU
    assert "than cores" not in plan(JOBLIB, 0, 2, 0, "auto", "auto").reason


def _records(sweep: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sweep.glob("*/metrics.json")}


@pytest.mark.slow
def test_joblib_sweep_runs_jobs_in_parallel_each_with_its_share_of_the_cores(tmp_path, data_dir, run_in_process):
    sweep, meeting = tmp_path / "s", tmp_path / "meeting"
    result = run_in_process("train.py", "-m", *FAST, f"data.dir={data_dir}", "model=simple", "seed=0,1,2,3",
                         "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={sweep}",
                         "+hydra.callbacks.meet._target_=tests.rendezvous.Rendezvous",
                         f"+hydra.callbacks.meet.directory={meeting}")
    assert result.returncode == 0, result.stderr[-3000:]
    records = _records(sweep)
    assert sorted(r["seed"] for r in records.values()) == [0, 1, 2, 3]
    assert all(r["status"] == "completed" and r["metrics"]["test/acc"] > 0 for r in records.values())
    assert "Jobs: 4 completed." in (sweep / "summary.md").read_text()
    threads = max(1, joblib.cpu_count() // 2)  # the count placement uses (affinity and cgroup quota)
    for job in records:
        assert "2 jobs at once" in (sweep / job / "train.log").read_text()
        assert f"(torch threads: {threads})" in (sweep / job / "train.log").read_text()
    # Two jobs ran at the same time: each waited at its start until a job in another process arrived.
    outcomes = {p.name: p.read_text() for p in meeting.glob("outcome-*")}
    assert len(outcomes) == 4 and set(outcomes.values()) == {"met"}, outcomes


@pytest.mark.slow
def test_a_parallel_sweep_with_a_job_that_did_not_complete_keeps_its_multirun_yaml(tmp_path, data_dir, run_in_process):
    sweep = tmp_path / "s"  # the jobs' checks ran in the workers: the sweep's own file is not put back on exit 3
    result = run_in_process("train.py", "-m", *FAST, f"data.dir={data_dir}", "model=simple", "optim.lr=1e-3,1e12",
                            "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={sweep}")
    assert result.returncode == 3, result.stderr[-3000:]
    assert {r["status"] for r in _records(sweep).values()} == {"completed", "diverged"}
    assert "optim.lr=1e-3,1e12" in (sweep / "multirun.yaml").read_text()


# Several training processes at once, as the engines in test_cluster.py: run with them by `make test-cluster`.
@pytest.mark.slow
@pytest.mark.cluster
def test_submitit_local_sweep_records_and_summarizes_its_jobs(tmp_path, data_dir, run_in_process):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="the slurm extra is not installed")
    sweep = tmp_path / "s"
    result = run_in_process("train.py", "-m", *FAST, f"data.dir={data_dir}", "model=simple", "optim.lr=1e-3,3e-3",
                         "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5", f"hydra.sweep.dir={sweep}")
    assert result.returncode == 0, result.stderr[-3000:]
    records = _records(sweep)
    assert sorted(records) == [f"optim.lr=0.001,{FAST_NAMED},model=simple", f"optim.lr=0.003,{FAST_NAMED},model=simple"]
    assert all(r["status"] == "completed" and r["metrics"]["val/acc_best"] > 0 for r in records.values())
    table = pd.read_csv(sweep / "summary.csv")
    assert sorted(table.status) == ["completed", "completed"] and table.setting.nunique() == 2
    assert "Jobs: 2 completed." in (sweep / "summary.md").read_text()
    assert list((sweep / ".submitit").glob("*/*_log.out")), "submitit kept no job logs"


def test_slurm_launcher_config_composes_with_its_resources():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="the slurm extra is not installed")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=a100"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.partition, launcher.gpus_per_node, launcher.tasks_per_node, launcher.cpus_per_task) == ("a100", 1, 1, 8)
    assert (launcher.timeout_min, launcher.array_parallelism, launcher.max_num_timeout) == (120, 16, 0)


@pytest.mark.slow
def test_slurm_sweep_submits_one_job_array_with_the_configured_resources(tmp_path, data_dir, monkeypatch,
                                                                         run_in_process):
    """The real launcher and submitit write the sbatch script; a stand-in `sbatch` records it."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="the slurm extra is not installed")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text('#!/bin/sh\ncp "$1" "$SBATCH_RECORD"\necho "sbatch: recorded" >&2\nexit 1\n')
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")  # submitit checks that it is on a cluster
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    record = tmp_path / "submitted.sh"
    monkeypatch.setenv("SBATCH_RECORD", str(record))
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    result = run_in_process("train.py", "-m", *FAST, f"data.dir={data_dir}", "seed=0,1,2", "hydra/launcher=slurm",
                         "hydra.launcher.partition=a100", "hydra.launcher.array_parallelism=2",
                         "hydra.launcher.timeout_min=30", f"hydra.sweep.dir={tmp_path}/s")
    assert result.returncode != 0 and "sbatch: recorded" in result.stderr  # nothing ran: no cluster here
    script = record.read_text()
    for line in ["#SBATCH --partition=a100", "#SBATCH --gpus-per-node=1", "#SBATCH --ntasks-per-node=1",
                 "#SBATCH --cpus-per-task=8", "#SBATCH --mem=32GB", "#SBATCH --time=30",
                 "#SBATCH --array=0-2%2", "#SBATCH --job-name=train"]:
        assert line in script.splitlines(), f"{line} not in:\n{script}"
    assert f"-m submitit.core._submit {tmp_path}/s/.submitit/" in script


# With one job at a time, joblib runs the jobs in the sweep's own process: Ctrl-C and SIGTERM stop them as they stop
# a run (recorded `interrupted`), not as a sweep whose workers would record their own jobs.
def test_a_joblib_sweep_of_one_job_at_a_time_leaves_its_signals_to_the_jobs(tmp_path, data_dir, run_in_process,
                                                                             monkeypatch):
    import fmnist.training.claim as claim
    from fmnist.errors import ConfigError

    handlers = {}

    def check_data(cfg):  # what the job's own checks see, then a refusal: nothing trains
        handlers.update(sigint=signal.getsignal(signal.SIGINT), sigterm=signal.getsignal(signal.SIGTERM))
        raise ConfigError("refused here")

    monkeypatch.setattr(claim, "check_data", check_data)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (the fixture puts it back)
    result = run_in_process("train.py", "-m", *FAST, f"data.dir={data_dir}", "hydra/launcher=joblib",
                            "hydra.launcher.n_jobs=1", f"hydra.sweep.dir={tmp_path}/s")
    assert result.returncode == 2 and "refused here" in result.stderr, result.stderr[-3000:]
    assert handlers["sigint"] is signal.default_int_handler
    assert handlers["sigterm"].__module__ == "fmnist.stops"  # train.py's: unwinds until the run's checks pass

# Several training processes at once, as the engines in test_cluster.py: run with them by `make test-cluster`.
@pytest.mark.slow
@pytest.mark.cluster
@pytest.mark.parametrize("stop", ["kill", "ctrl_c", "sigterm", "hangup"])
def test_joblib_workers_stop_when_the_sweep_process_is_killed(tmp_path, data_dir, stop):
    """The sweep's process killed or sent SIGTERM (a time limit, `kill`), a terminal's Ctrl-C (SIGINT to the
    sweep and its workers), or the terminal closed (SIGHUP to them all): each job is recorded `interrupted`, not
    left `running` by workers ended before they could write."""
    sweep = tmp_path / "s"
    env = {**os.environ, "PYTHONPATH": str(CONF.parent)}
    # Far more epochs than they can finish before the kill and the test's deadline, however fast the machine:
    # orphans that trained on would end `completed` (or still `running`), never `interrupted`.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as a terminal starts it (exec resets it)
    try:
        with (tmp_path / "stderr").open("w") as stderr:  # the child holds its own copy
            proc = subprocess.Popen([sys.executable, str(CONF.parent / "train.py"), "-m", *FAST, f"data.dir={data_dir}",
                                     "model=simple", "seed=0,1", "trainer.max_epochs=5000", "hydra/launcher=joblib",
                                     "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={sweep}"], start_new_session=True,
                                    cwd=CONF.parent, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    finally:
        signal.signal(signal.SIGINT, previous)
    deadline = time.time() + 240
    while len([p for p in sweep.glob("*/epochs.csv") if len(p.read_text().splitlines()) > 1]) < 2:
        assert proc.poll() is None and time.time() < deadline, "both jobs should be training"
        time.sleep(0.05)
    if stop == "kill":
        proc.kill()
    elif stop == "sigterm":
        proc.terminate()  # the sweep's process alone: its workers find it gone
    else:  # the terminal's process group: the sweep and its workers
        os.killpg(proc.pid, signal.SIGINT if stop == "ctrl_c" else signal.SIGHUP)
    assert proc.wait(timeout=120) == {"kill": -signal.SIGKILL, "ctrl_c": 130, "sigterm": 143, "hangup": 143}[stop]
    if stop != "kill":  # the sweep's own process says what happens next
        assert "each running job stops at its next step" in (tmp_path / "stderr").read_text()
    deadline = time.time() + 120
    while [p for p in sweep.glob("*/metrics.json") if json.loads(p.read_text())["status"] == "running"]:
        assert time.time() < deadline, "the orphaned workers kept training"
        time.sleep(0.2)
    # Each job stopped as SIGTERM stops a run: recorded, resumable by the same sweep command.
    records = [json.loads(p.read_text()) for p in sweep.glob("*/metrics.json")]
    assert len(records) == 2 and all(r["status"] == "interrupted" and "sweep command" in r["error"] for r in records)
    # ... and each worker process ends with its job, instead of idling on as an orphan.
    deadline = time.time() + 60
    while alive := [r["pid"] for r in records if Path(f"/proc/{r['pid']}").exists()]:
        assert time.time() < deadline, f"worker processes {alive} outlived their stopped jobs"
        time.sleep(0.2)
