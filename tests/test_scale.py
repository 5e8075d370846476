"""Paths past one process: Lightning DDP (2 CPU processes, gloo) and the benchmark script."""

import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def test_ddp_with_two_processes_trains_and_records_once(tmp_path, data_dir):
    run = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "preset=smoke", f"data.dir={data_dir}", "data.val_size=100",
         "data.batch_size=32", "trainer.strategy=ddp", "trainer.devices=2", "trainer.limit_train_batches=4",
         f"hydra.run.dir={run}"],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    record = json.loads((run / "metrics.json").read_text())
    assert record["status"] == "completed" and 0 <= record["metrics"]["test/acc"] <= 1
    assert (run / "checkpoints" / "last.ckpt").exists()
    assert len((run / "epochs.csv").read_text().splitlines()) == 2  # header + one epoch, written by rank 0 only


def test_benchmark_prints_and_appends_a_row(tmp_path, data_dir):
    out = tmp_path / "bench.csv"
    result = subprocess.run(
        [sys.executable, "scripts/benchmark.py", "--data-dir", str(data_dir), "--images", "64", "--repeats", "1", "--val-size", "100",
         "--batch-sizes", "32", "--precisions", "32-true", "--models", "simple", "--out", str(out)],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "lightning_img_s" in result.stdout
    row = pd.read_csv(out).iloc[0]
    assert row.raw_img_s > 0 and row.lightning_img_s > 0 and row.ratio > 0 and row.csv_parse_s >= 0
