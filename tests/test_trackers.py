"""Trackers beside TensorBoard: CSV, MLflow (a local store, and a real tracking server) and W&B offline."""

import json
import os
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from fmnist.errors import ConfigError
from fmnist.runs import read_record
from fmnist.training.checks import check_config
from fmnist.training.train import train
from tests.conftest import ROOT, compose_cfg

LEVELDB_BLOCK, LEVELDB_HEADER = 32768, 7


@pytest.fixture
def make_cfg(make_cfg):
    """The shared fixture's configs with the simple CNN: what a tracker is given does not depend on the network,
    and the default one costs each of these tests' trainings several times the CPU."""
    return lambda *overrides: make_cfg("model=simple", *overrides)


def wandb_records(path: Path):
    """The protobuf records of a W&B run's transaction log (`run-ID.wandb`, what `wandb sync` uploads).

    W&B's offline mode keeps config and summary only there (no wandb-summary.json or config.yaml): a
    LevelDB-style log of 32 KiB blocks whose chunks are (crc32, length, type) then bytes.
    """
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, magic, _ = struct.unpack("<4sHB", data[:7])
    assert (ident, magic) == (b":W&B", 0xBEE1)
    pos, pending = 7, b""
    while pos + LEVELDB_HEADER <= len(data):
        if LEVELDB_BLOCK - pos % LEVELDB_BLOCK < LEVELDB_HEADER:  # a block's tail too short for a header: padding
            pos += LEVELDB_BLOCK - pos % LEVELDB_BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + LEVELDB_HEADER])
        if pos + LEVELDB_HEADER + length > len(data):  # a chunk W&B is still writing: the records so far
            return
        chunk, pos = data[pos + LEVELDB_HEADER:pos + LEVELDB_HEADER + length], pos + LEVELDB_HEADER + length
        if kind == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk  # full / first, or middle / last
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def finished_records(log: Path, timeout: float = 120) -> list:
    """A W&B log's records once it holds the run's exit record: W&B's service writes the log in the
    background, and may still be writing the end of a run that `finish()` has returned from."""
    from google.protobuf.message import DecodeError

    deadline = time.time() + timeout
    while True:
        try:
            records = list(wandb_records(log))
        except DecodeError:  # read in the middle of a write: read again, until the deadline
            if time.time() > deadline:
                raise
            records = []
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.time() > deadline:
            return records
        time.sleep(0.2)


def wandb_run(run_dir: Path, run_id: str) -> dict:
    """What W&B recorded for `run_id` under `run_dir`, over every process that logged it (a resume adds one)."""
    logs = sorted(run_dir.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb"))
    config, summary, names, history = {}, {}, [], []
    for log in logs:
        for record in finished_records(log):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                names.append(record.run.display_name)
            if kind == "history":
                history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                for item in record.history.item})
            items = record.config.update if kind == "config" else record.summary.update if kind == "summary" else []
            target = config if kind == "config" else summary
            for item in items:
                target[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return {"logs": logs, "config": config, "summary": summary, "names": names, "history": history}


def epoch_points(run: dict) -> list[tuple]:
    """The (epoch, validation accuracy) points a W&B run holds in its `by_epoch/` curves."""
    return [(h["by_epoch/epoch"], pytest.approx(h["by_epoch/val/acc"])) for h in run["history"] if "by_epoch/epoch" in h]


def epoch_rows(run_dir: Path) -> list[tuple]:
    """The (epoch, validation accuracy) of each row of a run's epochs.csv."""
    rows = pd.read_csv(run_dir / "epochs.csv")
    return [(int(e), float(a)) for e, a in zip(rows["epoch"], rows["val/acc"])]


def test_a_sweep_jobs_tracker_run_name_leads_with_the_keys_its_sweep_varies(tmp_path):
    from fmnist.training.trackers import run_name

    sweep = tmp_path / "study"
    (sweep / "job").mkdir(parents=True)
    overrides = ["model=simple", "data.train_subset=5000", "optim.lr=0.01", "seed=1", "data.dir=/data"]
    assert run_name(sweep / "job", overrides) == "job"  # no multirun.yaml: not known to be a sweep
    OmegaConf.save({"hydra": {"overrides": {"task": ["model=simple", "data.train_subset=5000", "optim.lr=1e-2,1e-3",
                                                     "data.dir=/data"]},
                              "sweeper": {"params": {"seed": "0,1,2"}}}}, sweep / "multirun.yaml")
    assert run_name(sweep / "job", overrides) == "optim.lr=0.01,seed=1,data.train_subset=5000,model=simple"


def test_trackers_are_checked_before_a_run_starts():
    with pytest.raises(ConfigError, match="logger.backends must list trackers among"):
        check_config(compose_cfg("logger.backends=[tensorboard,neptune]"))
    with pytest.raises(ConfigError, match="logger.wandb_mode must be offline or online"):
        check_config(compose_cfg("logger=wandb", "logger.wandb_mode=cloud"))
    with pytest.raises(ConfigError, match="logger.mlflow_tracking_uri is empty"):
        check_config(compose_cfg("logger=mlflow", "logger.mlflow_tracking_uri=''"))
    # W&B would refuse these only once the run started, and the run would go on without it
    for project in ("''", "team/fmnist", "'a#b'", "x" * 129):
        with pytest.raises(ConfigError, match="logger.wandb_project must be a W&B project's name"):
            check_config(compose_cfg("logger=wandb", f"logger.wandb_project={project}"))
    check_config(compose_cfg("logger=wandb", "logger.wandb_project=fmnist-ablations_2"))
    assert list(compose_cfg("logger=many").logger.backends) == ["tensorboard", "csv", "mlflow", "wandb"]


def test_every_list_of_trackers_names_the_same_ones():
    # the config's choices (with how the console names each), what builds each, and `logger=many`
    from fmnist.config import TRACKERS
    from fmnist.training.trackers import TRACKER_CLASSES

    assert list(TRACKERS) == list(TRACKER_CLASSES) == list(compose_cfg("logger=many").logger.backends)
    assert all(cls.name == name for name, (cls, _) in TRACKER_CLASSES.items())  # the record's `views` keys


@pytest.mark.slow
def test_wandb_offline_and_csv_get_what_the_run_directory_has_and_a_resume_continues_the_same_run(make_cfg, tmp_path,
                                                                                                   capfd):
    run_dir = tmp_path / "sweep" / "optim.lr=0.01"
    train(make_cfg("logger.backends=[csv,wandb]", "optim.lr=0.01"), run_dir)
    assert "anonymous setting" not in capfd.readouterr().err  # W&B's warning about what Lightning passes it
    record = read_record(run_dir)
    run_id = record["trackers"]["wandb_run_id"]
    wandb = wandb_run(run_dir, run_id)
    config = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"))
    assert {k: wandb["config"][k] for k in config} == config  # the resolved config, every key
    assert wandb["config"]["hparams"]["optim.lr"] == 0.01
    for key in ("val/acc_best", "test/acc", "test/loss", "epochs"):
        assert wandb["summary"][key] == pytest.approx(record["metrics"][key]), key
    assert wandb["summary"]["test/confusion_matrix/_type"] == "image-file"  # nested keys joined by /
    assert wandb["names"] == ["optim.lr=0.01"]
    assert "wandb sync" in record["trackers"]["views"]["wandb"]
    assert epoch_points(wandb) == epoch_rows(run_dir)  # one point per epoch, as TensorBoard and MLflow get
    csv_rows = (run_dir / "csv" / "metrics.csv").read_text().splitlines()
    assert "final/test/acc" in csv_rows[0] and "train/loss" in csv_rows[0]

    train(make_cfg("logger.backends=[csv,wandb]", "optim.lr=0.01", "ckpt_path=last", "trainer.max_epochs=2"), run_dir)
    assert read_record(run_dir)["trackers"]["wandb_run_id"] == run_id  # the same W&B run, continued
    resumed = wandb_run(run_dir, run_id)
    assert len(resumed["logs"]) == 2 and resumed["summary"]["epochs"] == 2
    assert epoch_points(resumed) == epoch_rows(run_dir)  # the first start's epoch, then the resume's
    # The CSV keeps the first session's rows (Lightning's writer empties it when it starts) and adds the second's.
    resumed_rows = (run_dir / "csv" / "metrics.csv").read_text().splitlines()
    assert resumed_rows[:len(csv_rows)] == csv_rows and len(resumed_rows) > len(csv_rows)


@pytest.mark.slow
def test_mlflow_without_a_server_keeps_a_local_store_and_a_resume_continues_its_run(make_cfg, tmp_path, monkeypatch):
    import mlflow

    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}"  # the default store, where the run starts
    run_dir = tmp_path / "study" / "seed=0"
    overrides = ["logger=mlflow", "optim.lr=0.002"]
    train(make_cfg(*overrides), run_dir)
    run_id = read_record(run_dir)["trackers"]["mlflow_run_id"]
    assert read_record(run_dir)["trackers"]["mlflow_tracking_uri"] == uri
    monkeypatch.chdir(tmp_path / "elsewhere")  # the resume command pasted in another directory: the same store
    train(make_cfg(*overrides, "ckpt_path=last", "trainer.max_epochs=2"), run_dir)
    assert read_record(run_dir)["trackers"]["mlflow_run_id"] == run_id
    assert not (tmp_path / "elsewhere" / "outputs").exists()
    client = mlflow.MlflowClient(uri)
    (experiment,) = [e for e in client.search_experiments() if e.name == "study"]
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [run_id] and runs[0].info.run_name == "seed=0"
    assert runs[0].data.params["optim.lr"] == "0.002"
    assert runs[0].data.metrics["final/epochs"] == 2
    artifacts = {a.path for a in client.list_artifacts(run_id, "run")} | {a.path for a in client.list_artifacts(run_id, "figures")}
    assert {"run/config.yaml", "run/metrics.json", "figures/test_confusion_matrix.png"} <= artifacts
    assert (tmp_path / "outputs" / "mlruns").is_dir()  # the artifacts beside the database, not in the working directory
    # A resume that cannot reach its tracker keeps the run's id and store in the record, for a later resume that can.
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{s.getsockname()[1]}"
    train(make_cfg(*overrides, "ckpt_path=last", "trainer.max_epochs=3", f"logger.mlflow_tracking_uri={down}"), run_dir)
    kept = read_record(run_dir)["trackers"]
    assert (kept["mlflow_run_id"], kept["mlflow_tracking_uri"]) == (run_id, uri)
    # One pointed at another store (a relative path, recorded absolute) starts a new run there.
    train(make_cfg(*overrides, "ckpt_path=last", "trainer.max_epochs=4", "logger.mlflow_tracking_uri=sqlite:///other.db"),
          run_dir)
    moved = read_record(run_dir)["trackers"]
    assert moved["mlflow_tracking_uri"] == f"sqlite:///{tmp_path / 'elsewhere' / 'other.db'}"
    assert moved["mlflow_run_id"] != run_id and moved["mlflow_run_id"] in {
        r.info.run_id for r in mlflow.MlflowClient(moved["mlflow_tracking_uri"]).search_runs(
            [e.experiment_id for e in mlflow.MlflowClient(moved["mlflow_tracking_uri"]).search_experiments()])}


@pytest.mark.slow
def test_a_tracker_that_cannot_be_reached_is_one_warning_and_the_run_goes_on(make_cfg, tmp_path, caplog):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    metrics = train(make_cfg("logger.backends=[tensorboard,mlflow]",
                             f"logger.mlflow_tracking_uri=http://127.0.0.1:{port}"), tmp_path / "run")
    assert 0 <= metrics["test/acc"] <= 1
    record = read_record(tmp_path / "run")
    assert record["status"] == "completed" and list(record["trackers"]["views"]) == ["tensorboard"]
    warnings = [r.getMessage() for r in caplog.records if "logger mlflow" in r.getMessage()]
    assert len(warnings) == 1 and "cannot be reached" in warnings[0] and "logs to tensorboard" in warnings[0]
    assert list((tmp_path / "run").glob("events.out.tfevents.*"))


def test_a_ddp_rank_other_than_0_keeps_its_trackers_without_a_warning(make_cfg, tmp_path, caplog, monkeypatch):
    # Lightning gives such a rank a stand-in for each tracker's client, which logs nothing: checking the stand-in
    # warned "logger mlflow cannot be reached (AttributeError ...)" in every DDP run, from rank 1, and left the
    # tracker out there.
    from lightning.pytorch.utilities import rank_zero_only

    from fmnist.training.trackers import open_trackers

    monkeypatch.setattr(rank_zero_only, "rank", 1)
    cfg = make_cfg("logger=many", f"logger.mlflow_tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}")
    trackers = open_trackers(cfg, tmp_path / "run", {})
    assert [t.name for t in trackers] == list(cfg.logger.backends)
    assert not [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]


@pytest.mark.slow
def test_a_tracker_that_fails_during_the_run_is_one_warning_and_the_run_completes(make_cfg, tmp_path, caplog,
                                                                                  monkeypatch):
    import mlflow

    calls = []

    def log_batch_then_fail(self, *args, **kwargs):  # the server goes away after the run's first writes
        calls.append(1)
        if len(calls) > 2:
            raise ConnectionError("the tracking server went away")
        return original(self, *args, **kwargs)

    original = mlflow.MlflowClient.log_batch
    monkeypatch.setattr(mlflow.MlflowClient, "log_batch", log_batch_then_fail)
    metrics = train(make_cfg("logger.backends=[tensorboard,mlflow]", f"logger.mlflow_tracking_uri=sqlite:///"
                             f"{tmp_path / 'mlflow.db'}", "trainer.max_epochs=2"), tmp_path / "run")
    assert read_record(tmp_path / "run")["status"] == "completed" and metrics["epochs"] == 2
    warnings = [r.getMessage() for r in caplog.records if r.getMessage().startswith("logger mlflow failed")]
    assert len(warnings) == 1 and "went away" in warnings[0] and len(calls) == 3  # later calls skipped, not retried
    assert len(pd.read_csv(tmp_path / "run" / "epochs.csv")) == 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server (SQLite backend store, local artifact root) on a free port."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    log = open(root / "server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                               "--artifacts-destination", str(root / "artifacts"), "--workers", "1"],
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        assert server.poll() is None, (root / "server.log").read_text()[-3000:]
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            time.sleep(0.5)
    else:
        raise TimeoutError(f"the MLflow server did not start: {(root / 'server.log').read_text()[-3000:]}")
    yield url
    os.killpg(server.pid, 15)
    server.wait(timeout=60)
    log.close()


@pytest.mark.cluster
def test_a_sweep_logs_one_run_per_job_under_an_experiment_named_after_the_sweep(mlflow_server, data_dir, tmp_path):
    import mlflow

    from tests.conftest import FAST

    sweep = tmp_path / "lr_study"
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "-m", *FAST, f"data.dir={data_dir}",
                             "logger=mlflow", f"logger.mlflow_tracking_uri={mlflow_server}", "optim.lr=0.01,0.001",
                             "seed=0,1", f"hydra.sweep.dir={sweep}"], capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    mlflow.set_tracking_uri(mlflow_server)
    runs = mlflow.search_runs(experiment_names=["lr_study"])
    assert len(runs) == 4 and set(runs["status"]) == {"FINISHED"}
    # Named by the keys the sweep varies first (the job directories sort them: `data.dir=...,optim.lr=...`).
    fixed = ",".join(sorted(o for o in FAST if not o.startswith(("preset=", "logger="))))  # placement keys are left out
    assert sorted(runs["tags.mlflow.runName"]) == [f"optim.lr={lr},seed={s},{fixed}"
                                                   for lr in ("0.001", "0.01") for s in (0, 1)]
    assert sorted(runs["params.optim.lr"]) == ["0.001", "0.001", "0.01", "0.01"]  # the swept column
    for _, run in runs.iterrows():
        record = read_record(Path(run["tags.run_dir"]))
        assert record["trackers"]["mlflow_run_id"] == run["run_id"]
        assert run["metrics.final/test/acc"] == pytest.approx(record["metrics"]["test/acc"])
        artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run["run_id"], "run")}
        assert {"run/config.yaml", "run/metrics.json", "run/epochs.csv"} <= artifacts


def test_mlflows_info_lines_are_left_out_and_its_warnings_kept(make_cfg, tmp_path, monkeypatch):
    # "2026/12/04 02:36:03 INFO mlflow.store.db.utils: Creating initial MLflow database tables...": a new local
    # store's first lines, in MLflow's own format, nothing a user acts on.
    import logging

    from mlflow.utils.logging_utils import _configure_mlflow_loggers

    from fmnist.training.trackers import _mlflow

    monkeypatch.delenv("MLFLOW_LOGGING_LEVEL", raising=False)
    mlflow_logger = logging.getLogger("mlflow")
    monkeypatch.setattr(mlflow_logger, "handlers", list(mlflow_logger.handlers))  # put back after the test
    monkeypatch.setattr(mlflow_logger, "level", mlflow_logger.level)
    _mlflow(make_cfg("logger=mlflow", f"logger.mlflow_tracking_uri=sqlite:///{tmp_path / 'm.db'}"), tmp_path / "run",
            {}, "run")
    _configure_mlflow_loggers("mlflow")  # as `import mlflow` configures its loggers, reading the environment
    assert mlflow_logger.getEffectiveLevel() == logging.WARNING


def test_a_figure_is_drawn_only_for_a_tracker_that_shows_it_and_closed_after_it_is_logged(tmp_path):
    import matplotlib.pyplot as plt
    from lightning.pytorch.loggers import CSVLogger

    from fmnist.training.trackers import CSV, MLflow, log_figure

    class Shows(MLflow):  # a tracker that takes figures, without a server
        def figure(self, tag, figure, step):
            shown.append((tag, plt.fignum_exists(figure.number), step))

    drawn, shown = [], []

    def draw():
        drawn.append(plt.figure())
        return drawn[-1]

    csv_only = [CSV(CSVLogger(tmp_path))]
    log_figure(csv_only, "test/confusion_matrix", draw, 3)
    assert drawn == []  # the CSV tracker shows no figures: none is drawn
    log_figure([*csv_only, Shows(CSVLogger(tmp_path))], "test/confusion_matrix", draw, 3)
    assert len(drawn) == 1 and shown == [("test/confusion_matrix", True, 3)]
    assert not plt.fignum_exists(drawn[0].number)  # closed once logged: a process of many runs holds none


@pytest.mark.parametrize("stop, status, record_status", [("signal", "KILLED", "interrupted"),
                                                          ("error", "FAILED", "failed"),
                                                          ("before validation", "FAILED", "failed")])
def test_a_run_stopped_by_a_signal_ends_killed_in_mlflow_and_one_that_failed_ends_failed(make_cfg, tmp_path, stop,
                                                                                         status, record_status):
    import lightning as L
    import mlflow
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    class StopAtTheFirstStep(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            if stop == "signal":  # what Ctrl-C and SIGTERM do: Lightning's flag, which it checks after the step
                trainer._signal_connector.received_sigterm = True
            elif stop == "error":
                raise RuntimeError("a bug in the run")
            else:  # as a time limit that runs out before the first validation: the run fails after Lightning's fit
                trainer.should_stop = True

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    raised = {"signal": SIGTERMException, "error": RuntimeError, "before validation": ConfigError}[stop]
    with pytest.raises(raised):
        train(make_cfg("logger=mlflow", f"logger.mlflow_tracking_uri={uri}", "trainer.max_epochs=2",
                       "trainer.check_val_every_n_epoch=2"), tmp_path / "run", callbacks=[StopAtTheFirstStep()])
    record = read_record(tmp_path / "run")
    assert record["status"] == record_status
    run = mlflow.MlflowClient(uri).get_run(record["trackers"]["mlflow_run_id"])
    assert run.info.status == status


def test_the_command_that_shows_a_run_in_tensorboard_can_be_pasted_whatever_its_directory(tmp_path):
    import shlex

    from fmnist.training.trackers import TensorBoard

    run_dir = tmp_path / "lr=0.01 seed=1"
    command = TensorBoard.view(None, run_dir)
    assert shlex.split(command) == ["tensorboard", "--logdir", str(run_dir)]
