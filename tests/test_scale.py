"""Paths past one process: Lightning DDP (2 CPU processes, gloo) and the benchmark script."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import ROOT, import_script

pytestmark = pytest.mark.slow


# Several training processes at once, as the engines in test_cluster.py: run with them by `make test-cluster`.
@pytest.mark.cluster
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


def running_in_group(pgid: int) -> list[int]:
    """The processes of process group `pgid` that have not ended (a zombie has: only its parent's wait is left)."""
    running = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _, group = stat.read_text().rsplit(")", 1)[1].split()[:3]  # after the command's name, in brackets
        except (OSError, ValueError):  # ended meanwhile
            continue
        if int(group) == pgid and state != "Z":
            running.append(int(stat.parent.name))
    return running


# A signal to the whole process group (`timeout`, `scancel`, a closed terminal, Ctrl-C) reaches every rank, and
# rank 1 a second time through rank 0: every rank stops after the same step, once, with nothing left waiting.
@pytest.mark.cluster
@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_to_a_ddp_runs_process_group_stops_every_rank_after_one_step(tmp_path, data_dir, signum, code):
    run, out = tmp_path / "run", tmp_path / "out.txt"
    with open(out, "w") as log:
        ranks = subprocess.Popen(
            [sys.executable, str(ROOT / "train.py"), "preset=smoke", f"data.dir={data_dir}", "data.val_size=100",
             "data.batch_size=8", "trainer.strategy=ddp", "trainer.devices=2", "trainer.max_epochs=1000",
             "trainer.limit_train_batches=null", f"hydra.run.dir={run}"],
            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as a terminal's
        try:
            deadline = time.monotonic() + 240
            while "epochs x" not in out.read_text():  # the forecast: both ranks are taking steps
                assert ranks.poll() is None and time.monotonic() < deadline, out.read_text()[-3000:]
                time.sleep(0.2)
            os.killpg(ranks.pid, signum)
            ranks.wait(timeout=120)  # before the change: waiting forever in a broadcast, or a rank's traceback
            while running_in_group(ranks.pid):  # rank 1 too: waiting for rank 0 alone would miss it left hanging
                assert time.monotonic() < deadline + 120, out.read_text()[-3000:]
                time.sleep(0.2)
        finally:
            if running_in_group(ranks.pid):
                os.killpg(ranks.pid, signal.SIGKILL)
    text = out.read_text()
    assert ranks.returncode == code and "Traceback" not in text, text[-3000:]
    assert text.count("stopped by a signal; resume") == 1  # said once, by rank 0
    assert json.loads((run / "metrics.json").read_text())["status"] == "interrupted"


# Rank 0 records how the run ended slower than Lightning's watch on the other ranks looks (every 5 s): a tracker's
# server, a slow disk. Before, a rank that had ended with a non-zero code got rank 0 SIGKILLed meanwhile, leaving
# its record `running`.
RECORDED_SLOWLY = """
import time
from lightning.fabric.utilities.rank_zero import rank_zero_only
from fmnist.training import train as train_module
recorded = train_module.record_failure
def record_failure_slowly(*args, **kwargs):
    time.sleep(7 if rank_zero_only.rank == 0 else 0)
    recorded(*args, **kwargs)
train_module.record_failure = record_failure_slowly
"""
# As `python train.py` runs it, with the patched script still sys.argv[0]: Lightning starts rank 1 with it too.
RUN_TRAIN = """
exec(compile(open({train!r}).read(), {train!r}, "exec"), {{"__name__": "__main__", "__file__": {train!r}}})
"""


def ddp_run_patched(tmp_path, data_dir, patch: str, *overrides: str, slow_record: bool = False):
    """A 2-process DDP run of train.py into tmp_path/run, every rank running `patch` (Python) first: its
    CompletedProcess."""
    script = tmp_path / "train_patched.py"
    script.write_text(patch + (RECORDED_SLOWLY if slow_record else "") + RUN_TRAIN.format(train=str(ROOT / "train.py")))
    return subprocess.run(
        [sys.executable, str(script), "preset=smoke", f"data.dir={data_dir}", "data.val_size=100",
         "data.batch_size=32", "trainer.strategy=ddp", "trainer.devices=2", *overrides,
         f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)


# After the last training step no step is left to stop at: a signal to one rank during the final validation or
# the test still stops every rank (at the end of fit, or of the test), and the run is `interrupted`, not `completed`.
# Rank 1 sends the SIGTERM to itself from a hook, so the signal lands in that phase every time.
SIGNALLED_IN = """
import os, signal
from fmnist.training.signals import StopTogether
def signalled(self, trainer, pl_module):
    if trainer.global_rank == 1 and not trainer.sanity_checking:
        os.kill(os.getpid(), signal.SIGTERM)  # as a SIGTERM to rank 1 alone
taken = StopTogether.on_test_start
def on_test_start(self, trainer, pl_module):
    taken(self, trainer, pl_module)
    if {hook!r} == "on_test_start":
        signalled(self, trainer, pl_module)
StopTogether.on_test_start = on_test_start
if {hook!r} == "on_validation_start":
    StopTogether.on_validation_start = signalled
"""


@pytest.mark.cluster
@pytest.mark.parametrize("hook, slow_record", [("on_validation_start", False), ("on_test_start", False),
                                               ("on_validation_start", True)])
def test_a_signal_to_one_ddp_rank_after_the_last_training_step_still_stops_the_run(tmp_path, data_dir, hook,
                                                                                   slow_record):
    result = ddp_run_patched(tmp_path, data_dir, SIGNALLED_IN.format(hook=hook), slow_record=slow_record)
    assert result.returncode == 143 and "Traceback" not in result.stderr, result.stderr[-4000:]
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert record["status"] == "interrupted" and "ckpt_path=last" in record["error"], record
    assert (result.stdout + result.stderr).count("stopped by a signal; resume") == 1


# One rank's training loss turns NaN (a batch that overflows on that rank alone): every rank stops at that step, and
# the run is `diverged`, said once, as in one process. Before, rank 1 stopped alone and rank 0 failed in the next
# step's gradient all-reduce (gloo's "Connection closed by peer" traceback, recorded `failed`).
NAN_ON_RANK_1 = """
from lightning.fabric.utilities.rank_zero import rank_zero_only
from fmnist.training import callbacks
step_loss = callbacks.step_loss
callbacks.step_loss = lambda outputs: step_loss(outputs) * (float("nan") if rank_zero_only.rank == 1 else 1.0)
"""


@pytest.mark.cluster
def test_a_nan_loss_on_one_ddp_rank_stops_every_rank_as_diverged(tmp_path, data_dir):
    result = ddp_run_patched(tmp_path, data_dir, NAN_ON_RANK_1, slow_record=True)
    assert result.returncode == 3 and "Traceback" not in result.stderr, result.stderr[-4000:]
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert record["status"] == "diverged" and "loss is nan at epoch 1, step 1" in record["error"], record
    assert (result.stdout + result.stderr).count("training diverged") == 1


# trainer.max_time ends a DDP fit before its first validation (the time is up before the first step: Lightning's
# Timer reads a clock that says so): the run is `failed` with the one paragraph, said once, exit 2. Before, every
# rank printed it.
TIME_UP = """
from lightning.pytorch.callbacks import Timer
Timer.time_elapsed = lambda self, stage="train": 1e6
"""


@pytest.mark.cluster
def test_a_ddp_run_out_of_time_before_its_first_validation_is_recorded_and_said_once(tmp_path, data_dir):
    result = ddp_run_patched(tmp_path, data_dir, TIME_UP, "trainer.max_time=00:00:10:00", "trainer.max_epochs=2",
                             "trainer.check_val_every_n_epoch=2", slow_record=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-4000:]
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert record["status"] == "failed" and "before its first validation" in record["error"], record
    assert record["stopped_by"].startswith("stopped by trainer.max_time (00:00:10:00) at step 0 of 4")
    assert result.stderr.count("before its first validation") == 1


# The first lines of the CSVs benchmark.py writes: the date, the hardware, then what each benchmark measures.
TRAIN_BENCHMARK_HEADER = (b"date,cpu,isa,cores,torch_threads,gpu,torch,model,batch_size,precision,steps,raw_img_s,"
                          b"lightning_img_s,lightning_tflop_s,gflop_per_img,ratio,ratio_range,data_img_s,"
                          b"data_share_pct,csv_parse_s,cached_load_s\n")
INFER_BENCHMARK_HEADER = (b"date,cpu,isa,cores,torch_threads,gpu,torch,model,batch_size,runtime,ms_per_batch,"
                          b"ms_per_image,img_s,speedup_vs_eager,ms_range\n")


def tiny_benchmark(run_in_process, data_dir, out, images: int):
    """benchmark.py on the simple model, one batch size and precision, one repeat, `images` timed, rows into `out`."""
    return run_in_process("scripts/benchmark.py", "--data-dir", str(data_dir), "--images", str(images), "--repeats",
                          "1", "--val-size", "100", "--batch-sizes", "32", "--precisions", "32-true", "--models",
                          "simple", "--out", str(out))


def test_benchmark_prints_and_appends_a_row(tmp_path, data_dir, run_in_process):
    out = tmp_path / "bench.csv"
    result = tiny_benchmark(run_in_process, data_dir, out, images=64)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "lightning_img_s" in result.stdout and result.stdout.startswith("hardware: ")
    # The console train.py has: no Lightning notices or warnings a user cannot act on, no bar into a pipe.
    for noise in ("litlogger", "TPU available", "LeafSpec", "it/s]", "srun"):
        assert noise not in result.stdout + result.stderr, noise
    assert out.read_bytes().startswith(TRAIN_BENCHMARK_HEADER)
    row = pd.read_csv(out).iloc[0]
    assert row.raw_img_s > 0 and row.lightning_img_s > 0 and row.ratio > 0 and row.csv_parse_s > 0
    assert row.cores >= 1 and row.torch_threads >= 1 and isinstance(row.isa, str) and row.gflop_per_img > 0


def test_benchmark_times_only_full_batches(tmp_path, data_dir, run_in_process):
    # More images than an epoch: the loops time its full batches after the warm-up, never its last, smaller batch
    # (500 training images: 15 full batches of 32 and one of 20), whose new shape recompiles a CUDA-graphed step.
    out = tmp_path / "bench.csv"
    result = tiny_benchmark(run_in_process, data_dir, out, images=100000)
    assert result.returncode == 0, result.stderr[-3000:]
    assert pd.read_csv(out).steps.tolist() == [500 // 32 - 3]  # 3 warm-up steps


def test_benchmark_appends_after_the_rows_there_leaving_them_byte_for_byte(tmp_path, data_dir, run_in_process):
    out = tmp_path / "bench.csv"  # a row without its step count (blank), numbers as written by hand, no final newline
    before = (TRAIN_BENCHMARK_HEADER
              + b"2026-11-26T01:29:52+00:00,Intel(R) Xeon(R) Processor,avx2,16,16,,2.11.0,optimized,256,32-true,251,"
                b"10057,7156,3.672,0.513,0.70,0.706-0.723,38703,18.49,2.33,0.149\n"
              + b"2026-11-26T01:30:00+00:00,Intel(R) Xeon(R) Processor,avx2,16,16,,2.11.0,optimized,256,32-true,,"
                b"10057,7156,3.672,0.513,0.70,0.706-0.723,38703,18.49,2.33,0.149")
    out.write_bytes(before)
    result = tiny_benchmark(run_in_process, data_dir, out, images=64)
    assert result.returncode == 0, result.stderr[-3000:]
    assert out.read_bytes().startswith(before + b"\n")  # not 256.0, 251.0 or 0.7: the rows are not read and rewritten
    table = pd.read_csv(out)
    assert list(table.batch_size) == [256, 256, 32] and table.model.iloc[-1] == "simple" and table.steps.iloc[-1] > 0


def test_two_benchmarks_that_end_together_keep_both_rows(tmp_path, monkeypatch):
    benchmark = import_script("benchmark")
    out, read, first_has_read = tmp_path / "bench.csv", benchmark.read_history, threading.Event()

    def read_then_wait(path):  # the first benchmark reads the CSV, the second ends meanwhile, then the first writes
        history = read(path)
        if threading.current_thread().name == "first":
            first_has_read.set()
            time.sleep(0.5)
        return history

    monkeypatch.setattr(benchmark, "read_history", read_then_wait)
    first = threading.Thread(target=benchmark.append_rows, args=(out, [{"date": "d", "cpu": "first"}], False),
                             name="first")
    first.start()
    assert first_has_read.wait(30)
    benchmark.append_rows(out, [{"date": "d", "cpu": "second"}], False)
    first.join()
    assert sorted(pd.read_csv(out).cpu) == ["first", "second"] and sorted(os.listdir(tmp_path)) == ["bench.csv"]


def test_benchmark_refuses_an_out_it_did_not_write_and_a_bad_model_before_timing(tmp_path, data_dir, run_in_process):
    victim = tmp_path / "fashion-mnist_test.csv"  # a data CSV given as --out by mistake: appending would rewrite it
    victim.write_bytes((data_dir / "fashion-mnist_test.csv").read_bytes())
    before = victim.read_bytes()
    damaged = tmp_path / "bench.csv"  # benchmark.py's header, then a row cut short: the new rows could not be added
    damaged.write_bytes(TRAIN_BENCHMARK_HEADER + b"2026-01-01,\"x\n")
    short = tmp_path / "short.csv"  # a row of fewer values than the header has columns: the new ones would not line up
    short.write_bytes(TRAIN_BENCHMARK_HEADER + b"2026-01-01,x,avx2\n")
    other = tmp_path / "other.csv"  # begins as benchmark.py's do, but other columns: rows would go under a wrong header
    other.write_bytes(b"date,cpu,notes\n2026-01-01,x,mine\n")
    inference = tmp_path / "infer.csv"  # what benchmark.py --infer writes: the training rows have other columns
    inference.write_bytes(INFER_BENCHMARK_HEADER)
    kept = {path: path.read_bytes() for path in (damaged, short, other, inference)}
    common = ["--data-dir", str(data_dir), "--images", "64", "--repeats", "1", "--val-size", "100",
              "--batch-sizes", "32", "--precisions", "32-true"]
    for args, message in [
        (["--models", "simple", "--out", str(victim)], f"--out names {victim}, which benchmark.py did not write"),
        (["--models", "simple", "--out", str(tmp_path)], f"--out names {tmp_path}, which is not a regular file"),
        (["--models", "simple", "--out", str(victim / "b.csv")], f"but {victim} is a file, not a directory"),
        # A path that Hydra would find (conf/model/../model/optimized.yaml), a list it would read as a sweep of both.
        (["--models", "../model/optimized", "--out", str(tmp_path / "b.csv")],
         "--models must be a name, not a path (letters, digits and . _ + = , - ; not '.' or '..'), since it names a "
         "model in conf/model/ (optimized, resnet, simple); got '../model/optimized'."),
        (["--models", "simple,resnet", "--out", str(tmp_path / "b.csv")],
         "--models simple,resnet: no such model; expected one of optimized, resnet, simple"),
        (["--models", "nosuch", "--out", str(tmp_path / "b.csv")],
         "--models nosuch: no such model; expected one of optimized, resnet, simple (conf/model/NAME.yaml), "
         "several separated by spaces."),
        (["--models", "simple", "--batch-sizes", "0", "--out", str(tmp_path / "b.csv")],
         "--batch-sizes: batch sizes must be at least 1; got 0"),
        (["--models", "simple", "--out", str(damaged)], f"--out names {damaged}, which cannot be read as the CSV"),
        (["--models", "simple", "--out", str(short)],
         f"--out names {short}, which cannot be read as the CSV benchmark.py writes (line 2: 3 values for its 21 "
         "columns)"),
        (["--models", "simple", "--out", str(other)],
         f"--out names {other}, which benchmark.py did not write: its first line is not the header benchmark.py writes "
         f"({TRAIN_BENCHMARK_HEADER.decode().strip()})"),
        (["--models", "simple", "--out", str(inference)],
         f"--out names {inference}, which benchmark.py did not write: its first line is not the header benchmark.py "
         f"writes ({TRAIN_BENCHMARK_HEADER.decode().strip()}); it is that of benchmark.py --infer, whose rows have "
         "other columns; nothing was written. Choose a new file name."),
        (["--models", "simple", "--repeats", "0", "--out", str(tmp_path / "b.csv")],
         "--repeats must be a finite number above zero; got 0"),
        (["--models", "simple", "--seconds", "inf", "--out", str(tmp_path / "b.csv")],
         "--seconds must be a finite number above zero; got inf"),
        (["--models", "simple", "--precisions", "bogus", "--out", str(tmp_path / "b.csv")],
         "--precisions must be among ('32-true', 'bf16-mixed', '16-mixed')"),
        (["--models", "simple", "--precisions", "16-mixed", "--accelerator", "cpu", "--out", str(tmp_path / "b.csv")],
         "--precisions 16-mixed: Lightning runs it as bf16-mixed on a CPU"),
        (["--models", "simple", "--accelerator", "mps", "--out", str(tmp_path / "b.csv")],  # no Apple GPU on Linux
         "--accelerator mps: torch finds no such device here"),
        (["--models", "simple", "--val-size", "100000", "--out", str(tmp_path / "b.csv")],
         "--val-size 100000: config key data.val_size must be between 1 and"),
        # 500 training images in 3 full batches of 128 (and a smaller one): none left to time after the 3 warm-up steps.
        (["--models", "simple", "--batch-sizes", "32", "128", "--out", str(tmp_path / "b.csv")],
         "--batch-sizes 128: the training split's 500 images (what --val-size 100 leaves) make 3 full batch(es) of "
         "it, and each loop needs more than its 3 warm-up steps in one epoch; give batch sizes of at most 125."),
        (["--models", "simple", "--ckpt", "pretrained", "--threads", "1", "--out", str(tmp_path / "b.csv")],
         "--ckpt and --threads time inference, which --infer measures"),
    ]:
        result = run_in_process("scripts/benchmark.py", *common, *args)
        assert result.returncode == 2 and message in result.stderr, result.stderr[-3000:]
        assert "Traceback" not in result.stderr and "hardware:" not in result.stdout  # refused before any timing
    assert victim.read_bytes() == before and all(path.read_bytes() == text for path, text in kept.items())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([victim.name, *(path.name for path in kept)])


def test_benchmark_infer_without_onnxruntime_is_one_paragraph_before_timing(tmp_path, run_in_process, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `pip install -e .` without the export extra
    result = run_in_process("scripts/benchmark.py", "--infer", "--out", str(tmp_path / "b.csv"))
    assert result.returncode == 2 and "Traceback" not in result.stderr and "hardware:" not in result.stdout
    assert "--infer times the model exported to ONNX under onnxruntime; export needs the optional packages " \
           'onnxruntime: install them with pip install -e ".[export]"' in result.stderr, result.stderr[-3000:]
    assert list(tmp_path.iterdir()) == []


def test_benchmark_infer_refuses_a_bad_ckpt_naming_the_option_before_timing(tmp_path, run_in_process):
    failed = tmp_path / "failed"  # a run that ended before its first checkpoint
    failed.mkdir()
    (failed / "metrics.json").write_text('{"status": "failed", "error": "DataError: ..."}')
    stopped = tmp_path / "stopped"  # a run with its last checkpoint but no best one yet
    (stopped / "checkpoints").mkdir(parents=True)
    (stopped / "checkpoints" / "last.ckpt").write_bytes(b"")
    damaged = tmp_path / "damaged.ckpt"
    damaged.write_bytes(b"not a checkpoint")
    for ckpt, message in [(tmp_path / "nope", f"--ckpt {tmp_path / 'nope'}: no such file or directory; expected"),
                          (failed, f"--ckpt {failed}: a run directory without checkpoints (the run is 'failed'"),
                          (stopped, f"pass --ckpt {stopped / 'checkpoints' / 'last.ckpt'} to use its last checkpoint"),
                          (damaged, f"{damaged}: ")]:
        result = run_in_process("scripts/benchmark.py", "--infer", "--ckpt", str(ckpt),
                                "--out", str(tmp_path / "b.csv"))
        assert result.returncode == 2 and message in result.stderr, result.stderr[-3000:]
        assert "ckpt=" not in result.stderr and "Traceback" not in result.stderr  # the option typed, not train.py's key
        assert "hardware:" not in result.stdout  # refused before any timing
    assert not (tmp_path / "b.csv").exists()


def test_benchmark_refuses_an_option_its_mode_would_ignore_before_timing(tmp_path, data_dir, run_in_process):
    out = tmp_path / "b.csv"  # each would be ignored, and the row would seem to have used it
    for args, message in [
        (["--infer-batch-sizes", "8"], "--infer-batch-sizes times inference, which --infer measures; add --infer, or "
                                       "drop it to time training."),
        (["--ckpt", "pretrained", "--threads", "1"], "--ckpt and --threads time inference, which --infer measures"),
        (["--infer", "--batch-sizes", "64", "--precisions", "bf16-mixed"],
         "--batch-sizes and --precisions set how training is timed, and --infer times inference; drop them, or drop "
         "--infer to time training."),
        (["--infer", "--compile"], "--compile sets how training is timed"),
        (["--infer", "--fast-path"], "--fast-path sets how training is timed"),
        (["--infer", "--accelerator", "cpu"], "--accelerator sets how training is timed"),
        (["--infer", "--val-size", "100"], "--val-size sets how training is timed"),
        (["--infer", "--images", "64"], "--images sets how training is timed"),
        (["--infer", "--ckpt", "pretrained", "--models", "simple"],
         "--models names untrained models to time, and --ckpt a trained one, whose model is the one timed; give one "
         "of them."),
    ]:
        result = run_in_process("scripts/benchmark.py", "--data-dir", str(data_dir), *args, "--out", str(out))
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr[-3000:])
        assert "Traceback" not in result.stderr and "hardware:" not in result.stdout  # refused before any timing
    assert list(tmp_path.iterdir()) == []


def test_benchmark_refuses_an_out_it_cannot_write_before_timing(data_dir, run_in_process, tmpfs):
    read_only = tmpfs("ro,size=8k")  # the rows would be lost after the whole benchmark
    result = run_in_process("scripts/benchmark.py", "--data-dir", str(data_dir), "--models", "simple",
                            "--out", str(read_only / "bench.csv"))
    assert result.returncode == 2 and "Traceback" not in result.stderr and "hardware:" not in result.stdout
    assert f"cannot write {read_only}: the file system is read-only" in result.stderr and "(--out=...)" in result.stderr
    result = run_in_process("scripts/benchmark.py", "--data-dir", str(data_dir), "--models", "simple",
                            "--out", "/proc/fmnist-bench.csv")  # /proc makes no files, and says ENOENT
    assert result.returncode == 2 and "hardware:" not in result.stdout
    assert "cannot write /proc: its file system does not let files be created there" in result.stderr


def test_gpu_check_dry_run_composes_every_command(run_in_process):
    result = run_in_process("scripts/gpu_check.py", "--dry-run")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    steps = [line[1:].split(",")[0] for line in lines if line.startswith("[")]
    assert list(dict.fromkeys(steps)) == ["smoke", "smoke_fast_path", "bench", "bench_fast_path", "bench_resnet", "report",
                                          "report_figures", "study", "ddp"]  # in priority order; records: --records' own
    assert "experiment=report" in result.stdout and "seed=2" in result.stdout and "trainer.accelerator=gpu" in result.stdout
    assert "--models resnet --batch-sizes 256" in result.stdout
    assert "experiment=speedrun_gpu seed=0" in lines[0]  # the smoke step times the speedrun recipe, one seed
    assert "experiment=speedrun_gpu seed=0 fast_path=true" in lines[1]  # and with CUDA graphs
    assert lines[-1].startswith("dry run: 18 commands composed")


def test_gpu_check_sh_refuses_a_python_it_cannot_use_in_one_line_and_runs_the_check_with_one_it_can(tmp_path):
    old = tmp_path / "python2"  # an interpreter too old for the project, as `python2 --version` answers
    old.write_text('#!/bin/sh\n[ "$1" = --version ] && echo "Python 2.7.18" >&2\nexit 1\n')
    old.chmod(0o755)
    for python, found in ((tmp_path / "nosuch", "no such command"), (old, "`--version` says Python 2.7.18")):
        result = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run"], capture_output=True,
                                text=True, timeout=60, env={**os.environ, "PYTHON": str(python)})
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr  # one line, not pip's pages
        assert result.stderr.startswith(f"gpu-check: PYTHON={python}: {found}; expected Python 3.10 or later"), \
            result.stderr
    # With one it can, the check starts under it, importing the project (its --dry-run is tested in-process, above).
    result = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--help"], capture_output=True,
                            text=True, timeout=300, env={**os.environ, "PYTHON": sys.executable})
    assert result.returncode == 0 and result.stdout.startswith("usage: gpu_check.py"), result.stderr[-3000:]


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="on a GPU machine gpu_check.sh installs instead")
def test_gpu_check_sh_tells_a_python_without_the_packages_from_one_with_them_and_installs_nothing_on_a_cpu(tmp_path):
    """A Python that lacks the packages (a bare virtual environment) is told apart from the project's own, whose
    run is tested above, and on a machine without a GPU nothing is installed into it."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "bare")], check=True, timeout=120)
    bare = tmp_path / "bare" / "bin" / "python"
    # WHEELS= (set, empty): a checkout's .whl/ is not installed into it.
    result = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run"], capture_output=True,
                            text=True, timeout=60, env={**os.environ, "PYTHON": str(bare), "WHEELS": ""})
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"gpu-check: {bare} lacks the project's packages and this machine has no NVIDIA "
                                    "GPU; nothing was installed."), result.stderr
    assert not list((tmp_path / "bare" / "lib").rglob("site-packages/*")), "something was installed"


def test_gpu_wheels_sh_refuses_a_python_it_cannot_use_in_one_line_before_making_its_folder(tmp_path):
    result = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_wheels.sh"), str(tmp_path / "wheels")],
                            capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHON": str(tmp_path / "nosuch")})
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr  # not the shell's exit 127
    assert result.stderr.startswith(f"gpu_wheels: PYTHON={tmp_path / 'nosuch'}: no such command; expected Python 3.10 "
                                    "or later"), result.stderr
    assert list(tmp_path.iterdir()) == []


def test_gpu_check_lists_the_dependencies_but_torch_on_python_3_10_too():
    """What gpu_check.sh installs beside an image's CUDA torch: pyproject's list less torch, also where tomllib (3.11+)
    is missing, as on Python 3.10."""
    import tomllib

    listed = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    expected = [d for d in listed if not d.startswith("torch==")]
    assert len(expected) == len(listed) - 1 and any(d.startswith("torchmetrics") for d in expected)
    without_tomllib = ("import runpy, sys; sys.modules['tomllib'] = None; "
                       "runpy.run_path('scripts/deps_without_torch.py', run_name='__main__')")
    for command in (["scripts/deps_without_torch.py"], ["-c", without_tomllib]):
        result = subprocess.run([sys.executable, *command], capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert result.returncode == 0 and result.stdout.splitlines() == expected, result.stderr


def test_gpu_check_sh_refuses_a_wheels_folder_without_wheels_in_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    for wheels in (tmp_path / "empty", tmp_path / "nosuch"):
        result = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run"], capture_output=True,
                                text=True, timeout=60,
                                env={**os.environ, "PYTHON": sys.executable, "WHEELS": str(wheels)})
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert result.stderr.startswith(f"gpu-check: WHEELS={wheels} holds no .whl files; expected the folder "
                                        "scripts/gpu_wheels.sh writes"), result.stderr


def test_gpu_records_dry_run_composes_the_record_recipes(run_in_process):
    result = run_in_process("scripts/gpu_check.py", "--records", "--dry-run")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert [line.split(",")[0] for line in lines[:-1]] == ["[speedrun_gpu", "[speedrun_gpu_95", "[best"]
    assert "seed=0,1,2,3,4" in lines[0] and "trainer.accelerator=gpu" in lines[0]
    assert lines[-1].startswith("dry run: 3 commands composed")


def test_gpu_records_continues_the_unfinished_folder_of_this_gpu_model_else_starts_one_for_today(tmp_path):
    gpu_check = import_script("gpu_check")

    def measured(name: str, gpu: str, finished: dict[str, int]) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "env.json").write_text(json.dumps({"hardware": {"gpu": gpu}, "hardware_line": gpu}))
        for recipe, jobs in finished.items():
            for seed in range(jobs):
                (folder / recipe / f"seed={seed}").mkdir(parents=True)
                (folder / recipe / f"seed={seed}" / "metrics.json").write_text('{"status": "completed"}')
        return folder

    all_but_best = {"speedrun_gpu": 5, "speedrun_gpu_95": 3, "best": 1}
    older = measured("2026-11-26", "NVIDIA H100 80GB HBM3", all_but_best)
    newer = measured("2026-12-04", "NVIDIA H200", all_but_best)
    (tmp_path / "notes").mkdir()  # not a check's folder: passed over
    choose = gpu_check.records_folder
    assert choose(tmp_path, "NVIDIA H200", "2026-12-09") == newer  # another day's window continues it
    assert choose(tmp_path, "NVIDIA H100 80GB HBM3", "2026-12-09") == older
    assert choose(tmp_path, "NVIDIA A100", "2026-12-09") == tmp_path / "2026-12-09"  # no seeds mixed across GPUs
    assert choose(tmp_path, None, "2026-12-09") == tmp_path / "2026-12-09"
    for seed in (1, 2):  # best's three seeds finished: the next window starts a new folder
        (newer / "best" / f"seed={seed}").mkdir()
        (newer / "best" / f"seed={seed}" / "metrics.json").write_text('{"status": "completed"}')
    assert choose(tmp_path, "NVIDIA H200", "2026-12-09") == tmp_path / "2026-12-09"
    assert choose(tmp_path / "absent", "NVIDIA H200", "2026-12-09") == tmp_path / "absent" / "2026-12-09"


def test_a_typo_in_override_stops_gpu_check_before_any_step(tmp_path, run_in_process):
    # The smoke plan's own list values (model.widths=[8,16,32]) compose; the misspelt key does not.
    result = run_in_process("scripts/gpu_check.py", "--records", "--smoke", "--results", str(tmp_path / "r"),
                            "--override", "optim.lrr=1")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "does not compose with --override optim.lrr=1: Could not override 'optim.lrr'." in result.stderr
    assert not (tmp_path / "r").exists()
    # A key train.py refuses as added (`+`), and a config group given null, are refused here as train.py would.
    for override, words in (("+optim.foo=1", "config key optim.foo does not exist"),
                            ("~name", "config key name has no value (~name removed it?)"),
                            ("model=null", "`model=null`: a config group takes the name of one of its options")):
        refused = run_in_process("scripts/gpu_check.py", "--dry-run", "--override", override)
        assert refused.returncode == 2 and words in refused.stderr and "Traceback" not in refused.stderr, refused.stderr
    # Added to every command, a sweep would give a step that is none several values: one value each.
    for swept in ("seed=range(0,0)", "optim.lr=1,2"):
        refused = run_in_process("scripts/gpu_check.py", "--records", "--smoke", "--results", str(tmp_path / "r"),
                                 "--override", swept)
        assert refused.returncode == 2 and f"--override {swept} is a sweep (`,`, range, choice or glob)" in refused.stderr
    assert "To append to your config" not in run_in_process(  # Hydra's advice, which would be refused too
        "scripts/gpu_check.py", "--records", "--dry-run", "--override", "trainer.bogus=1").stderr
    # Places the run would meet only once started are refused by a dry run too: not in the GPU window.
    (tmp_path / "afile").write_text("mine")
    for args, words in ((["--data-dir", str(tmp_path / "afile")], "a file, not a directory"),
                        (["--idx-dir", str(tmp_path / "none")], "--idx-dir " + str(tmp_path / "none") + ": no such"),
                        (["--results", str(tmp_path / "afile" / "r")], "afile is a file, not a directory")):
        refused = run_in_process("scripts/gpu_check.py", "--records", "--dry-run", *args)
        assert refused.returncode == 2 and words in refused.stderr and "Traceback" not in refused.stderr, refused.stderr
    nan = run_in_process("scripts/gpu_check.py", "--records", "--dry-run", "--budget-s", "nan")
    assert nan.returncode == 2 and "--budget-s must be a positive number of seconds; got nan" in nan.stderr
    assert not (tmp_path / "r").exists()
    # A key the plan sets itself (seeds, where results go), and results into a file, are refused up front too.
    for override in ("seed=5", "hydra.sweep.dir=/x"):
        clash = run_in_process("scripts/gpu_check.py", "--dry-run", "--override", override)
        assert clash.returncode == 2 and f"--override {override}: the step " in clash.stderr
    into_file = run_in_process("scripts/gpu_check.py", "--dry-run", "--results", str(tmp_path / "afile"))
    assert into_file.returncode == 2 and "a file, not a directory" in into_file.stderr
    # An archive would replace a file of the user's: refused before any step, the file kept.
    mine = run_in_process("scripts/gpu_check.py", "--records", "--smoke", "--results", str(tmp_path / "r"),
                          "--archive", str(tmp_path / "afile"))
    assert mine.returncode == 2 and "--archive names " in mine.stderr and "not an archive a check wrote" in mine.stderr
    assert (tmp_path / "afile").read_text() == "mine" and not (tmp_path / "r").exists()
    # ... and by a dry run, as an archive that cannot be written: refused before a GPU window, not in it.
    for archive, words in ((tmp_path / "afile", "not an archive a check wrote"), ("/proc/x.tgz", "cannot write /proc")):
        refused = run_in_process("scripts/gpu_check.py", "--dry-run", "--archive", str(archive))
        assert refused.returncode == 2 and words in refused.stderr and "Traceback" not in refused.stderr, refused.stderr


def test_gpu_records_smoke_writes_its_results_and_a_second_run_continues(tmp_path, data_dir, run_in_process):
    results = tmp_path / "records"
    results.mkdir()  # empty: a check's to fill, and where its archive is kept
    archive = results / "records.tgz"
    first = run_in_process("scripts/gpu_check.py", "--records", "--smoke", "--results", str(results),
                           "--data-dir", str(data_dir), "--override", "data.val_size=100", "--archive", str(archive))
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    # The archive holds the folder, its env.json first, without the checkpoints a window's files need not carry,
    # and without itself: rewritten after every step inside the folder it holds, it never holds its former copy.
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    assert names[0] == "records/env.json" and names.count("records/env.json") == 1
    assert "records/summary.md" in names and "records/leaderboard.md" in names
    assert any(n.startswith("records/best/") and n.endswith("/metrics.json") for n in names)
    assert not any("/checkpoints" in n or n.endswith("predictions.npz") for n in names), names
    assert "records/records.tgz" not in names
    for recipe in ("speedrun_gpu", "speedrun_gpu_95", "best"):
        job = next(path.parent for path in (results / recipe).glob("*/metrics.json"))
        assert json.loads((job / "metrics.json").read_text())["status"] == "completed"
        assert f"name: {recipe}\n" in (job / "config.yaml").read_text()
    board = (results / "leaderboard.md").read_text()
    assert all(f"| {recipe}: " in board for recipe in ("speedrun_gpu", "speedrun_gpu_95", "best"))
    assert "## experiment=best" in (results / "summary.md").read_text()
    # Started again on the same folder, it trains nothing (every recipe's jobs have finished), and replaces the
    # archive the earlier check wrote.
    second = run_in_process("scripts/gpu_check.py", "--records", "--smoke", "--results", str(results),
                            "--data-dir", str(data_dir), "--override", "data.val_size=100", "--archive", str(archive))
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count("skipped in 0 s all 1 jobs finished in an earlier run") == 3, second.stdout[-3000:]
    with tarfile.open(archive) as tar:
        assert tar.getnames()[0] == "records/env.json" and "records/records.tgz" not in tar.getnames()
    # A check of another folder does not replace it, nor one of a new folder of the same name (a later window on a
    # fresh machine, the same date): it may be the only copy of its runs. Refused before any step.
    kept = archive.read_bytes()
    with tarfile.open(archive) as tar:
        records = sum(name.endswith("/metrics.json") for name in tar.getnames())
    for folder, is_not in ((tmp_path / "later", "is not"), (tmp_path / "fresh machine" / "records", "lacks")):
        other = run_in_process("scripts/gpu_check.py", "--records", "--smoke", "--results", str(folder), "--data-dir",
                               str(data_dir), "--override", "data.val_size=100", "--archive", str(archive))
        assert other.returncode == 2, other.stdout[-2000:]
        assert f"holds the {records} run record(s) of records, which the results folder {folder} {is_not}; it is not " \
               "replaced" in other.stderr and "tar -xzf" in other.stderr
        assert archive.read_bytes() == kept and not folder.exists()
    # A tarball whose first member is another folder's env.json, not a check's, is not replaced.
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "env.json").write_text("{}")
    with tarfile.open(tmp_path / "other.tgz", "w:gz") as tar:
        tar.add(tmp_path / "other" / "env.json", arcname="other/env.json")
    foreign = run_in_process("scripts/gpu_check.py", "--records", "--dry-run", "--archive", str(tmp_path / "other.tgz"))
    assert foreign.returncode == 2 and "not an archive a check wrote" in foreign.stderr


def test_a_runs_process_group_lives_through_the_fit_and_is_released_at_its_end(make_cfg, tmp_path):
    # Lightning releases an NCCL group at exit but not a gloo one (DDP on CPUs): the run does, once it ends.
    import lightning as L
    import torch.distributed as dist

    from fmnist.training.train import train

    class SeesTheGroup(L.Callback):
        during: list[bool] = []

        def on_train_epoch_end(self, trainer, pl_module):
            self.during.append(dist.is_initialized())

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # as DDP's launcher leaves it
    try:
        train(make_cfg("model=simple"), tmp_path, callbacks=[SeesTheGroup()])
        assert SeesTheGroup.during == [True] and not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_parallel_sweep_timing_refuses_bad_options_in_its_own_words(tmp_path, run_in_process, tmpfs):
    # The script's own keys (a later value would win and time other sweeps) and sweeps of a train key too.
    for args, words in ((["--bogus"], "unrecognized option --bogus: the options are --data-dir, --n-jobs and --out"),
                        (["--n-jobs", "0"], "--n-jobs must be at least 1; got 0"),
                        (["seed=5"], "seed=5: the script sets seed itself"),
                        (["hydra.sweep.dir=/x"], "hydra.sweep.dir=/x: the script sets hydra.sweep.dir itself"),
                        (["hydra/launcher=basic"], "the script sets hydra/launcher itself"),
                        (["model=simple,resnet"], "model=simple,resnet is a sweep"),
                        (["experiment=ablation_dropout"], "experiment=ablation_dropout: an experiment brings sweeps")):
        result = run_in_process("scripts/parallel_sweep_timing.py", *args, "--out", str(tmp_path / "t"))
        assert result.returncode == 2 and words in result.stderr and "train.py" not in result.stderr, result.stderr
    assert not (tmp_path / "t").exists()
    # Where nothing can be written: one paragraph naming --out, not a traceback.
    read_only = tmpfs("ro,size=1m")
    result = run_in_process("scripts/parallel_sweep_timing.py", "--out", str(read_only / "t"))
    assert result.returncode == 2 and "the file system is read-only" in result.stderr and "(--out=...)" in result.stderr
    assert "Traceback" not in result.stderr
