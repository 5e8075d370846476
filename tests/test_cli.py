"""`python train.py ...` as a user runs it, in a subprocess."""

import os
import subprocess
import sys

import pandas as pd
import pytest

from tests.conftest import FAST, ROOT


def run_cli(*args: str, cwd=None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True,
                          cwd=cwd or ROOT, env=env, timeout=timeout)


@pytest.mark.parametrize("override,message", [
    ("optim.lr=abc", "optim.lr"),
    ("model=vgg", "model"),
    ("optim.lrr=0.1", "lrr"),
])
def test_bad_config_fails_before_training(tmp_path, override, message):
    result = run_cli(override, f"hydra.run.dir={tmp_path}/run")
    assert result.returncode != 0 and message in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("override,message", [
    ("data.batch_size=0", "config key data.batch_size must be at least 1; got 0"),
    ("model.dropout=1.5", "config key model.dropout must be in [0, 1); got 1.5"),
    ("data.val_size=100000", "config key data.val_size must be between 1 and 599"),
])
def test_nonsense_values_exit_2_with_one_paragraph(tmp_path, data_dir, override, message):
    result = run_cli(*FAST, f"data.dir={data_dir}", override, f"hydra.run.dir={tmp_path}/run")
    assert result.returncode == 2 and message in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_csv_exits_2_naming_file_line_and_column(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    header = "label," + ",".join(f"pixel{i}" for i in range(1, 785))
    (data / "fashion-mnist_train.csv").write_text(header + "\n" + "3," + ",".join(["0"] * 783) + ",x\n")
    (data / "fashion-mnist_test.csv").write_text(header + "\n")
    result = run_cli(*FAST, f"data.dir={data}", f"hydra.run.dir={tmp_path}/run")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "fashion-mnist_train.csv, line 2, column 785 (pixel784): expected an integer 0-255, found 'x'" in result.stderr


def test_multirun_writes_one_directory_per_job_and_a_summary(tmp_path, data_dir):
    result = run_cli("-m", *FAST, f"data.dir={data_dir}", "model=simple", "optim.lr=1e-2,1e-4",
                     f"hydra.sweep.dir={tmp_path}/sweep")
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = tmp_path / "sweep"
    assert {p.name for p in sweep.iterdir() if p.is_dir()} >= {
        "data.batch_size=32,data.val_size=100,model=simple,optim.lr=0.01",
        "data.batch_size=32,data.val_size=100,model=simple,optim.lr=0.0001"}
    table = pd.read_csv(sweep / "summary.csv")
    assert len(table) == 2 and set(table.status) == {"completed"} and table.test_acc.between(0, 1).all()
    assert "optim.lr=0.01" in (sweep / "summary.md").read_text()
