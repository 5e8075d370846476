"""A real one-node SLURM cluster (scripts/cluster/slurm-up.sh): sweeps as job arrays, a cancelled job
resumed by the same command, and an Optuna study spread over a job array of `tune.py` workers.

Run by `make test-cluster` (which CI runs after `make test`); it needs root to install and start
the daemons, and fails, saying why, where the cluster cannot start.
"""

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest

from tests.conftest import FAST, FAST_NAMED, ROOT

pytestmark = pytest.mark.cluster

# The one-node cluster's partition (scripts/cluster/slurm-up.sh), and jobs sized for it: no GPU, one core.
SLURM = ["hydra/launcher=slurm", "hydra.launcher.partition=debug", "hydra.launcher.gpus_per_node=0",
         "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=2", "hydra.launcher.timeout_min=10"]
DEADLINE_S = 600  # for anything the scheduler does: a healthy cluster takes seconds, a loaded machine minutes


@pytest.fixture(scope="session")
def slurm():
    up = subprocess.run([str(ROOT / "scripts" / "cluster" / "slurm-up.sh")], capture_output=True, text=True)
    if up.returncode != 0:
        pytest.fail(f"the SLURM cluster did not start (scripts/cluster/slurm-up.sh, exit {up.returncode}):\n"
                    f"{up.stdout}{up.stderr}")
    return up.stdout


def test_slurm_up_on_a_running_cluster_returns_at_once(slurm):
    # The daemons it started must not hold its lock: a second call (another test run, a user) would wait forever.
    again = subprocess.run([str(ROOT / "scripts" / "cluster" / "slurm-up.sh")], capture_output=True, text=True,
                           timeout=120)
    assert again.returncode == 0 and "idle" in again.stdout + again.stderr, again.stdout + again.stderr


@pytest.fixture(scope="session")
def postgres() -> str:
    """The URL of a study database on a PostgreSQL server on this machine (scripts/cluster/postgres-up.sh)."""
    up = subprocess.run([str(ROOT / "scripts" / "cluster" / "postgres-up.sh")], capture_output=True, text=True)
    if up.returncode != 0:
        pytest.fail(f"PostgreSQL did not start (scripts/cluster/postgres-up.sh, exit {up.returncode}):\n"
                    f"{up.stdout}{up.stderr}")
    return up.stdout.strip().splitlines()[-1]


_STARTED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _no_process_outlives_its_test():
    yield
    for proc in _STARTED:  # a test that failed while waiting leaves its workers running
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    _STARTED.clear()


def _background(command: list[str], log_dir: Path) -> subprocess.Popen:
    """`command` in the background, its output in a file under `log_dir` (`.log`): a pipe that nobody reads
    while the test waits would fill, and stop the process."""
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / f"process-{uuid.uuid4().hex[:8]}.log", "w") as log:
        proc = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=log,
                                stderr=subprocess.STDOUT, text=True)
    proc.log = Path(log.name)
    _STARTED.append(proc)
    return proc


def _ended(proc: subprocess.Popen) -> tuple[int, str]:
    """Wait for `proc`; its exit code and output."""
    proc.wait(timeout=DEADLINE_S)
    return proc.returncode, proc.log.read_text()


def _sweep(log_dir: Path, *args: str) -> subprocess.Popen:
    """`python train.py -m ARGS` through the SLURM launcher, in the background."""
    return _background([sys.executable, str(ROOT / "train.py"), "-m", *args, *SLURM], log_dir)


def _record(job: Path) -> dict:
    try:
        return json.loads((job / "metrics.json").read_text())
    except (OSError, ValueError):
        return {}


def _wait_for(condition, what: str, proc: subprocess.Popen | None = None):
    deadline = time.time() + DEADLINE_S
    while (value := condition()) is None or value is False:  # a trial number may be 0
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the process ended (exit {proc.returncode}) before {what}:\n{proc.log.read_text()[-3000:]}")
        assert time.time() < deadline, f"waited {DEADLINE_S} s for {what}"
        time.sleep(0.5)
    return value


def _epochs(job: Path) -> list[int]:
    try:
        lines = (job / "epochs.csv").read_text().splitlines()
    except OSError:
        return []
    return [int(line.split(",")[0]) for line in lines[1:]]


def test_a_sweep_runs_as_one_job_array_and_each_record_names_its_job(slurm, tmp_path, data_dir):
    sweep = tmp_path / "s"
    code, output = _ended(_sweep(tmp_path, *FAST, f"data.dir={data_dir}", "model=simple", "seed=0,1",
                                 f"hydra.sweep.dir={sweep}"))
    assert code == 0, output[-3000:]
    records = {job.name: _record(job) for job in sweep.iterdir() if (job / "metrics.json").exists()}
    assert len(records) == 2 and all(r["status"] == "completed" for r in records.values())
    jobs = [r["scheduler"] for r in records.values()]
    assert len({j["slurm_array_job_id"] for j in jobs}) == 1  # one array
    assert sorted(j["slurm_array_task_id"] for j in jobs) == ["0", "1"] and all(j["slurm_partition"] == "debug" for j in jobs)
    assert "Jobs: 2 completed." in (sweep / "summary.md").read_text()


def test_a_cancelled_job_is_interrupted_and_the_same_command_resumes_it_skipping_the_finished(slurm, tmp_path, data_dir):
    sweep = tmp_path / "s"
    # One job that finishes (1 epoch) and one that would run for a long time (1000 epochs of 2 batches).
    args = [*FAST, f"data.dir={data_dir}", "model=simple", "trainer.max_epochs=1,1000", f"hydra.sweep.dir={sweep}"]
    short, long = (sweep / f"trainer.max_epochs={n},{FAST_NAMED},model=simple" for n in (1, 1000))

    def cancel_after_epochs(proc: subprocess.Popen, after: int) -> None:
        _wait_for(lambda: len(_epochs(long)) >= after and (long / "checkpoints" / "last.ckpt").exists(),
                  f"{after} epochs of the long job", proc)
        _wait_for(lambda: _record(short).get("status") == "completed", "the short job to complete", proc)
        job = _record(long)["scheduler"]  # its array task alone: the array's own id would cancel every task
        subprocess.run(["scancel", f"{job['slurm_array_job_id']}_{job['slurm_array_task_id']}"], check=True)
        code, output = _ended(proc)
        # The sweep collects every job's outcome and exits 3: not every job completed.
        assert code == 3, output[-3000:]

    first = _sweep(tmp_path, *args)
    cancel_after_epochs(first, 2)
    assert _record(short)["status"] == "completed"
    stopped = _record(long)
    assert stopped["status"] == "interrupted" and "run the same sweep command again" in stopped["error"]
    finished, done = (short / "metrics.json").read_bytes(), _epochs(long)

    again = _sweep(tmp_path, *args)
    cancel_after_epochs(again, len(done) + 2)
    assert (short / "metrics.json").read_bytes() == finished  # skipped, not run again
    epochs = _epochs(long)
    assert epochs[:len(done)] == done and epochs == list(range(1, len(epochs) + 1))  # continued from last.ckpt
    resumed = _record(long)
    assert resumed["status"] == "interrupted" and resumed["scheduler"]["slurm_job_id"] != stopped["scheduler"]["slurm_job_id"]
    assert "resum" in (long / "train.log").read_text()


def test_one_study_spread_over_a_job_array_of_tune_workers_reaches_exactly_n_trials(slurm, tmp_path, data_dir):
    out = tmp_path / "tune"
    tune = (f"{sys.executable} {ROOT / 'tune.py'} study=array n_trials=6 out_dir={out} sampler.seed=$SLURM_ARRAY_TASK_ID "
            f"sampler.n_startup_trials=2 {' '.join(FAST)} data.dir={data_dir} model=simple '~space.model' '~space.batch_size'")
    submitted = subprocess.run(["sbatch", "--wait", "--array=0-2", "--partition=debug", "--cpus-per-task=1",
                                "--mem=2G", "--time=10", f"--output={tmp_path}/worker-%a.out", f"--chdir={ROOT}",
                                f"--export=ALL,PYTHONPATH={ROOT}", f"--wrap={tune}"],
                               capture_output=True, text=True, timeout=DEADLINE_S)
    logs = "".join(p.read_text() for p in sorted(tmp_path.glob("worker-*.out")))
    assert submitted.returncode == 0, submitted.stderr + logs[-3000:]
    study = optuna.load_study(study_name="array", storage=f"sqlite:///{out / 'array' / 'study.db'}")
    trained = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    # Workers that asked for a trial at the same moment as the last needed one stop without training.
    others = [t for t in study.trials if t.state != optuna.trial.TrialState.COMPLETE]
    assert len(trained) == 6 and all(t.user_attrs.get("status") == "surplus" and not t.params for t in others), \
        [(t.number, t.state, t.user_attrs) for t in study.trials]
    assert len({tuple(sorted(t.params.items())) for t in trained}) == 6  # no trial proposed twice
    assert len(list(out.glob("array/trial-*/metrics.json"))) == 6


# A trial of a few seconds: the simple CNN, 2 batches per epoch; the learning rate and dropout searched.
TRIAL = [*FAST, "model=simple", "~space.model", "~space.batch_size", "~space.weight_decay", "sampler.n_startup_trials=2"]


def _tune(data_dir: Path, out: Path, *args: str) -> subprocess.Popen:
    """A `tune.py` worker in the background."""
    return _background([sys.executable, str(ROOT / "tune.py"), f"out_dir={out}", f"data.dir={data_dir}", *TRIAL, *args],
                       out.parent / "logs")


def _finish(*workers: subprocess.Popen) -> None:
    for worker in workers:
        code, output = _ended(worker)
        assert code == 0, output[-3000:]


def _trials(study: str, storage) -> tuple[list, list]:
    """(the trials that trained and finished, the others) of `study`."""
    trials = optuna.load_study(study_name=study, storage=storage).trials
    trained = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    return trained, [t for t in trials if t.state != optuna.trial.TrialState.COMPLETE]


def _journal(path: Path):
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))


@pytest.mark.parametrize("storage_kind", ["postgresql", "journal"])
def test_two_workers_on_one_study_end_with_exactly_n_trials_and_a_continuation_adds_the_difference(
        request, tmp_path, data_dir, storage_kind):
    study = f"pair_{uuid.uuid4().hex[:8]}"
    if storage_kind == "postgresql":
        url = request.getfixturevalue("postgres")
        storage, reader = f"storage={url}", url
    else:  # a file on a shared file system, no server
        storage, reader = f"storage=journal:{tmp_path / 'journal.log'}", _journal(tmp_path / "journal.log")
    out = tmp_path / "tune"
    _finish(*(_tune(data_dir, out, f"study={study}", "n_trials=5", storage, f"sampler.seed={i}") for i in range(2)))
    trained, others = _trials(study, reader)
    assert len(trained) == 5 and all(t.user_attrs.get("status") == "surplus" and not t.params for t in others), \
        [(t.number, t.state, t.user_attrs) for t in others]
    assert len({tuple(sorted(t.params.items())) for t in trained}) == 5  # no duplicate parameters

    _finish(_tune(data_dir, out, f"study={study}", "n_trials=7", storage, "sampler.seed=2"))
    assert len(_trials(study, reader)[0]) == 7 and len(list(out.glob(f"{study}/trial-*/metrics.json"))) == 7


def test_a_worker_killed_mid_trial_is_replaced_through_the_heartbeat(postgres, tmp_path, data_dir):
    study = f"kill_{uuid.uuid4().hex[:8]}"
    out = tmp_path / "tune"
    args = [f"study={study}", "n_trials=3", f"storage={postgres}", "heartbeat.interval_s=1", "heartbeat.grace_s=3"]
    # The victim's trial would never end by itself (its process's own train override); the survivor's
    # trials are 2 epochs. Whatever the machine's speed, the survivor fills the places the victim's
    # running trial leaves, then waits for it: only the heartbeat lets the study finish.
    victim = _tune(data_dir, out, *args, "sampler.seed=0", "trainer.max_epochs=100000")

    def trial_of(worker: subprocess.Popen, training: bool):
        def number():
            for t in optuna.load_study(study_name=study, storage=postgres).trials if _has_study(study, postgres) else []:
                if t.user_attrs.get("process", {}).get("pid") == worker.pid:
                    if not training or len(_epochs(Path(t.user_attrs["run_dir"]))) >= 1:
                        return t.number
            return None
        return number
    killed = _wait_for(trial_of(victim, training=True), "the first worker's trial to train", victim)
    survivor = _tune(data_dir, out, *args, "sampler.seed=1", "trainer.max_epochs=2")
    # Killed once the survivor has a trial: its start-up check (a dead process's trials on this host) saw
    # the victim alive, so only the heartbeat can find the victim's trial.
    _wait_for(trial_of(survivor, training=False), "the second worker's first trial", survivor)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    _finish(survivor)
    trained, others = _trials(study, postgres)
    assert len(trained) == 3, [(t.number, t.state, t.user_attrs.get("status")) for t in trained + others]
    dead = next(t for t in others if t.number == killed)
    assert dead.state == optuna.trial.TrialState.FAIL and "status" not in dead.user_attrs  # failed by the heartbeat


def _has_study(study: str, storage: str) -> bool:
    return study in optuna.study.get_all_study_names(storage)
