"""`make gpu-check` and `make gpu-records`: what this project claims for GPUs, measured in one command each
(about 8 minutes on one H100-class GPU, installation included).

`make gpu-check` (the default) steps, each bounded in time, each writing under one results folder (printed at the end):
  env.json            GPU, driver, CUDA, cuDNN, torch, and the hardware line
  smoke/              experiment=speedrun_gpu, seed 0, alone on the GPU: the whole pipeline (the dataset held on
                      the GPU, fit, test), and the record recipe's time with the code as it is now
  smoke_fast_path/    the same with fast_path=true: CUDA graphs, compiled before training (warmup_seconds)
  bench.csv           scripts/benchmark.py on the GPU: raw PyTorch vs Lightning, fp32 vs bf16, batch 32 and 256,
                      then the same with CUDA graphs in both loops (--fast-path: fast_path=true in training),
                      then the speedrun's ResNet (model=resnet) at its batch size, 256
  report/             experiment=report at full size (20 epochs), seeds as parallel processes, + figures/;
                      100 s of it at most (the aim is 60 s): else how far its runs got in that time
  study/              experiment=study (48 runs), 8 jobs at once on one GPU (the joblib launcher), for the
                      time that is left: the runs it finished, and how far the others got
  ddp/                2-process DDP on 2 GPUs (skipped with a message on a 1-GPU machine)
  summary.md          what ran, how long (runs per hour, GPU utilisation and memory from nvidia-smi), and the tables

`make gpu-records` (`--records`): the record recipes, in docs/results/gpu/records/<date>/ by default:
  speedrun_gpu/       experiment=speedrun_gpu, 5 seeds (aim: >= 94.0% mean test accuracy in <= 3.0 s of training)
  speedrun_gpu_95/    experiment=speedrun_gpu_95, 3 seeds (aim: >= 95.0% in <= 10 s)
  best/               experiment=best, 3 seeds, as many as the budget leaves time for (aim: >= 96.4%)
  leaderboard.md      those sweeps next to the published results (images, FLOPs, seconds, GPU)
  summary.md          what ran, how long, time to accuracy per job
`--archive FILE` also writes the results folder as one .tar.gz after every step (without checkpoints,
TensorBoard event files and predictions), for a machine whose files are fetched as a few files or lost
when a window ends: a cut-short window still leaves the archive of its finished steps.
Run again with the same --results folder, it continues where the last run stopped: sweeps skip their
finished jobs and resume the others (from their last checkpoint where the machine still has it); a step
whose jobs have all finished is not started. Without --results, `--records` continues the newest folder
of docs/results/gpu/records/ measured on the same GPU model while its recipes have not all finished (a
later window, another day), and otherwise starts a folder named after the date.

`--dry-run` composes the config of every training command (so a typo fails here, on any machine)
and prints the commands without running them. `--smoke` runs every step on a few batches: a check
of this script itself, on any machine. The report's runs share the GPU, so their seconds are not
timings; the benchmark runs alone. The record recipes (speedrun_gpu, best) are `--records`' own: there
they run alone on the GPU, and a later window continues them.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import NamedTuple

from fmnist.errors import ConfigError, StorageError
from fmnist.fsio import (atomic_output, atomic_write, check_folder_can_hold, check_working_directory,  # the standard
                         check_writable, not_a_directory, output_path_argument, path_argument,
                         storage_errors)  # library only, as above

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
ENV_FILE = "env.json"  # what every check writes first: a results folder holding it is a check's own
RECORDS_DIR = "docs/results/gpu/records"  # --records' folders, one per date (in the repository)
# --smoke: every run on a few batches, and a speedrun's or a record's ResNet small, on small batches: a check of
# this script, not of the recipes (their own test trains each for a few batches).
SMOKE_BATCHES = ["trainer.limit_train_batches=3", "trainer.limit_val_batches=2", "trainer.limit_test_batches=2",
                 "trainer.max_epochs=2"]
SMOKE_RESNET = ["data.batch_size=32", "model.widths=[8,16,32]"]
THRESHOLDS = (0.94, 0.95)  # validation accuracy marks for time-to-accuracy
STUDY_JOBS_PER_GPU = 8  # experiment=study's jobs at once on one GPU: each small CNN leaves most of it idle
# The packed report's time box: its aim is 60 s. Past that, how far its runs got says enough, and the study after it
# needs the rest of the budget (on an H200 the report's batch-32 runs alone take minutes).
REPORT_TIMEOUT_S = 100


@dataclass
class Step:
    name: str
    commands: list[list[str]]  # run in parallel; the step ends when all have
    timeout_s: float
    train: bool = True  # the commands are train.py runs (their configs are composed by --dry-run)
    notes: list[str] = field(default_factory=list)
    sweep: Path | None = None  # where its jobs write (runs per hour); with `jobs`, not started once all have finished
    jobs: int = 0


def train_cmd(*overrides: str) -> list[str]:
    return [PY, "train.py", *overrides]


class SingleRun(NamedTuple):
    """A step that trains the speedrun recipe once, seed 0, alone on the GPU, before the rest of the check."""

    step: str
    overrides: tuple[str, ...]  # beyond the recipe's
    timeout_s: int
    title: str  # in the summary


SINGLE_RUNS = (
    # `make gpu-records` continues its records where they stopped, so this is where each window times the recipe's
    # steps with the code as it is now.
    SingleRun("smoke", (), 120, "experiment=speedrun_gpu"),
    # The forward and backward passes in CUDA graphs; their compilation runs before training and is reported apart
    # (metrics.json: warmup_seconds), as airbench reports its compile warm-up.
    SingleRun("smoke_fast_path", ("fast_path=true",), 150, "the same with fast_path=true"),
)


def plan(results: Path, data_dir: Path, smoke: bool, gpus: int) -> list[Step]:
    """The steps, in order of importance: a budget cut hits the last ones. `smoke`: a few batches, any device."""
    accelerator = "auto" if smoke else "gpu"
    common = [f"data.dir={data_dir}", f"trainer.accelerator={accelerator}", "trainer.devices=1"]
    tiny = SMOKE_BATCHES if smoke else []
    report = [*common, *tiny, "experiment=report", f"hydra.sweep.dir={results / 'report'}",
              "trainer.enable_progress_bar=false"]
    study_smoke = ["model=simple", "data.batch_size=256", "seed=0"] if smoke else []  # 4 of the 48 runs
    speedrun = [*common, *tiny, *([*SMOKE_RESNET, "trainer.max_epochs=1"] if smoke else []), "experiment=speedrun_gpu",
                "seed=0"]
    report_seeds = ["0"] if smoke else [str(seed) for seed in range(5)]  # conf/experiment/report.yaml's 5 seeds

    def bench(*options: str, repeats: int = 3) -> list[str]:
        """scripts/benchmark.py with `options`, about a second per loop and `repeats` repeats (less of both when
        smoke-testing), its rows into bench.csv."""
        return [PY, "scripts/benchmark.py", "--data-dir", str(data_dir), "--accelerator", accelerator, *options,
                "--seconds", "0.2" if smoke else "1", "--repeats", "1" if smoke else str(repeats),
                "--out", str(results / "bench.csv")]

    steps = [
        *(Step(run.step, [train_cmd(*speedrun, *run.overrides, f"hydra.run.dir={results / run.step}",
                                    "trainer.enable_progress_bar=false")], run.timeout_s)
          for run in SINGLE_RUNS),
        Step("bench", [bench("--batch-sizes", "32", "256")], 150, train=False),
        # The same with CUDA graphs in both loops (fast_path=true): compiles once per shape and precision.
        Step("bench_fast_path", [bench("--batch-sizes", "32", "256", "--fast-path", repeats=1)], 120, train=False),
        # The speedrun's ResNet (conf/model/resnet.yaml: speedrun_cpu's and speedrun_gpu's net) at their batch size.
        Step("bench_resnet", [bench("--models", "resnet", "--batch-sizes", "256")], 90, train=False),
        # One process per seed for the cheap settings, one per seed for batch 32 (8x the steps):
        # the GPU is far from full with one small CNN, so parallel processes cut the wall time.
        Step("report", [train_cmd("-m", *report, f"seed={seed}", f"variant={variants}")
                        for seed in report_seeds for variants in ("best,no_dropout,lr_high,simple", "batch_32")],
             330 if smoke else REPORT_TIMEOUT_S, sweep=results / "report"),  # a smoke run's CPU is no GPU: untimed
        Step("report_figures", [[PY, "-m", "fmnist.results", "report", str(results / "report")]], 60, train=False),
        # The 48-run study packed onto the GPU by the joblib launcher (fmnist/sweeps/placement.py: every job
        # on GPU 0 with its share of the CPU threads); a timed part of it when the budget ends first.
        Step("study", [train_cmd("-m", *common, *tiny, "experiment=study", *study_smoke, "hydra/launcher=joblib",
                                 f"hydra.launcher.n_jobs={2 if smoke else STUDY_JOBS_PER_GPU}",
                                 f"hydra.sweep.dir={results / 'study'}", "trainer.enable_progress_bar=false")], 180,
             sweep=results / "study"),
    ]
    if gpus >= 2:
        steps.append(Step("ddp", [train_cmd(f"data.dir={data_dir}", *tiny, "trainer=ddp", "trainer.devices=2",
                                            "trainer.max_epochs=2", f"hydra.run.dir={results / 'ddp'}",
                                            "trainer.enable_progress_bar=false")], 120))
    else:
        steps.append(Step("ddp", [], 0, notes=[f"skipped: DDP needs 2 GPUs, this machine has {gpus}"]))
    return steps


RECORD_RECIPES = (("speedrun_gpu", 5), ("speedrun_gpu_95", 3), ("best", 3))  # priority order; seeds: their configs'


def plan_records(results: Path, data_dir: Path, smoke: bool, budget_s: float) -> list[Step]:
    """The record recipes, most important first; the last one gets what the budget leaves. `smoke`: a few batches."""
    accelerator = "auto" if smoke else "gpu"
    tiny = [*SMOKE_BATCHES, *SMOKE_RESNET, "data.eval_batch_size=100", "trainer.precision=32-true"] if smoke else []
    timeouts = {"speedrun_gpu": 150, "speedrun_gpu_95": 120, "best": budget_s}  # best: all the budget leaves
    steps = []
    for recipe, seeds in RECORD_RECIPES:
        seed_list = ",".join(str(s) for s in range(1 if smoke else seeds))
        steps.append(Step(recipe, [train_cmd("-m", f"experiment={recipe}", f"seed={seed_list}", f"data.dir={data_dir}",
                                             f"trainer.accelerator={accelerator}", "trainer.devices=1", *tiny,
                                             f"hydra.sweep.dir={results / recipe}", "trainer.enable_progress_bar=false")],
                          timeouts[recipe], sweep=results / recipe, jobs=1 if smoke else seeds))
    return steps


def records_folder(records: Path, gpu: str | None, today: str) -> Path:
    """Where `--records` writes without --results: the newest folder under `records` (by name, a date) measured on
    the GPU model `gpu` (its env.json), if its recipes have not all finished, so that a later window continues it;
    else `records`/`today`. Seeds of one recipe measured on two GPU models would make no record of either."""
    measured = sorted((p for p in records.iterdir() if (p / ENV_FILE).is_file()), reverse=True) if records.is_dir() else []
    for folder in measured:
        try:
            measured_on = json.loads((folder / ENV_FILE).read_text())["hardware"]["gpu"]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not a check's env.json: not a folder to continue
        if gpu is not None and measured_on == gpu:
            unfinished = any(finished_jobs(folder / recipe) < seeds for recipe, seeds in RECORD_RECIPES)
            return folder if unfinished else records / today
    return records / today


def finished_jobs(sweep: Path) -> int:
    """Jobs of `sweep` whose metrics.json says they finished (a sweep started again skips them)."""
    from fmnist.runs import FINISHED, read_record

    jobs = [p for p in sweep.iterdir() if p.is_dir()] if sweep.is_dir() else []
    return sum((read_record(job) or {}).get("status") in FINISHED for job in jobs)


def compose_all(steps: list[Step]) -> None:
    """Compose every train.py command's config as train.py would: raises on any bad key or value."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from hydra.core.global_hydra import GlobalHydra

    from fmnist.cli import check_given_config
    from fmnist.overrides import check_sweep_values, null_groups_named, register
    from fmnist.training.checks import check_config

    register()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        for step in steps:
            for command in step.commands if step.train else []:
                overrides = [o for o in command[2:] if o != "-m" and not o.startswith(("hydra.", "hydra/"))]
                check_sweep_values(overrides, GlobalHydra.instance().config_loader())  # an empty one has no first value
                # A sweep (`seed=0,1,2`, `range(...)`): compose its first value, as Hydra parses it (every value
                # goes through train.py alike); a list value (`model.widths=[8,16,32]`) is not a sweep.
                parsed = OverridesParser.create().parse_overrides(overrides)
                first = [f"{o.get_key_element()}={next(o.sweep_string_iterator())}" if o.is_sweep_override()
                         else o.input_line for o in parsed]
                with null_groups_named(first, "train.py"):  # `model=null`
                    cfg = compose("train", overrides=first)
                check_given_config(cfg, required=True, overrides=first)  # `+optim.foo=1`, `~name`, as train.py
                check_config(cfg)


def environment(results: Path) -> dict:
    import torch

    from fmnist.hardware import describe, describe_line

    env = {"hardware": describe(), "hardware_line": describe_line(), "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
           "gpus": torch.cuda.device_count(), "date": datetime.now().isoformat(timespec="seconds")}
    try:
        env["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                            "--format=csv,noheader"], capture_output=True, text=True,
                                           timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        env["nvidia_smi"] = f"unavailable: {e}"
    atomic_write(results / ENV_FILE, json.dumps(env, indent=2) + "\n")
    return env


def run_step(step: Step, results: Path, deadline: float) -> dict:
    """Run a step's commands in parallel with its timeout (cut to the overall deadline); log to <name>.log."""
    timeout = min(step.timeout_s, deadline - time.time())
    finished_before = finished_jobs(step.sweep) if step.sweep is not None else 0
    if step.jobs and finished_before >= step.jobs:
        return {"step": step.name, "status": "skipped", "seconds": 0,
                "note": f"all {step.jobs} jobs finished in an earlier run ({step.sweep})"}
    if not step.commands or timeout < 10:
        return {"step": step.name, "status": "skipped", "seconds": 0,
                "note": "; ".join(step.notes) or "skipped: the time budget is spent"}
    log = open(results / f"{step.name}.log", "w")
    start = time.time()
    sampler = gpu_sampler(results / f"{step.name}.gpu.csv")
    procs = [subprocess.Popen(c, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT) for c in step.commands]
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(timeout=max(1.0, start + timeout - time.time())))
        except subprocess.TimeoutExpired:
            proc.terminate()  # SIGTERM: runs record `interrupted` and keep their checkpoints
            try:
                codes.append(proc.wait(timeout=30))
            except subprocess.TimeoutExpired:
                proc.kill()
                codes.append(proc.wait())
            codes[-1] = f"timeout ({codes[-1]})"
    log.close()
    seconds = time.time() - start
    ok = all(c == 0 for c in codes)
    runs = finished_jobs(step.sweep) - finished_before if step.sweep is not None else None
    return {"step": step.name, "status": "ok" if ok else "failed", "seconds": round(seconds, 1),
            "runs_finished": runs, "runs_per_hour": None if runs is None else round(runs * 3600 / seconds),
            **gpu_utilisation(sampler, results / f"{step.name}.gpu.csv"),
            "note": "" if ok else f"exit codes {codes}; see {step.name}.log"}


def check_places(data_dir: Path, idx_dir: Path | None, results: Path) -> None:
    """ConfigError (or StorageError) for a --data-dir that is a file, an --idx-dir that is no directory, or a
    --results folder that cannot be made where it is named."""
    if data_dir.exists() and not data_dir.is_dir():
        raise ConfigError(f"--data-dir {data_dir}: a file, not a directory; nothing was run.")
    if idx_dir is not None and not idx_dir.is_dir():
        raise ConfigError(f"--idx-dir {idx_dir}: {not_a_directory(idx_dir)}; expected the folder holding Zalando's "
                          "four IDX files (.gz); nothing was run.")
    check_folder_can_hold(results, "--results", results, "nothing was run.")


def check_archive(path: Path) -> list[str] | None:
    """ConfigError for an --archive path that cannot be written, or that holds a file no check wrote (an archive
    begins with its results folder's ENV_FILE), which the archive would replace. Else the members of an earlier
    check's archive there (None: no file there), for `check_archive_continued`."""
    if not path.parent.is_dir():
        raise ConfigError(f"--archive names {path}, in {path.parent}, which is not an existing directory; nothing "
                          "was run. Create the directory, or choose a file in one that exists.")
    check_writable(path.parent, key="--archive")
    if not path.exists() and not path.is_symlink():
        return None
    try:
        with tarfile.open(path, "r:gz") as tar:
            first = tar.next()
            env = tar.extractfile(first) if first is not None and first.isfile() else None
            written = (len(Path(first.name).parts) == 2 and Path(first.name).name == ENV_FILE and env is not None
                       and "hardware_line" in json.loads(env.read(1 << 20)))
            members = tar.getnames() if written else []
        if path.is_file() and written:
            return members
    except (tarfile.TarError, OSError, EOFError, ValueError, TypeError):
        pass
    raise ConfigError(f"--archive names {path}, which exists and is not an archive a check wrote (one begins with "
                      f"its folder's {ENV_FILE}), so it is not replaced; nothing was run. Choose a new file name.")


def check_archive_continued(path: Path, members: list[str], results: Path) -> None:
    """ConfigError unless `results` holds the runs an earlier check's archive at `path` holds (`members`, from
    `check_archive`): the same folder continued. A new folder (a later window's, on a new machine or date) would
    replace the archive, which may be the only copy of those runs."""
    from fmnist.runs import METRICS_FILE

    folder = Path(members[0]).parts[0]
    records = [m for m in members if Path(m).name == METRICS_FILE]
    lacking = [m for m in records if not (results.parent / folder / Path(m).relative_to(folder)).is_file()]
    if folder != results.name or lacking:
        held = f"the {len(records)} run record(s) of {folder}" if records else f"the results of {folder}"
        raise ConfigError(f"--archive {path}: holds {held}, which the results folder {results} "
                          f"{'lacks' if folder == results.name else 'is not'}; it is not replaced, as it may be their "
                          f"only copy; nothing was run. Restore them first (tar -xzf {path} -C DIR, then --results "
                          f"DIR/{folder}), or choose a new file name.")


def archive(results: Path, path: Path) -> None:
    """The results folder as a .tar.gz at `path` (ENV_FILE first), replaced whole: without checkpoints, TensorBoard
    event files and predictions, which are large; the records, tables, curves, logs and figures are all there."""
    from fmnist.runs import CHECKPOINT_DIR, PREDICTIONS_FILE

    top = f"{results.name}/{ENV_FILE}"

    inside = path.relative_to(results.parent).as_posix() if path.is_relative_to(results) else None

    def kept(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        name = Path(info.name).name
        if info.name == inside:  # an earlier write of this archive, kept in its own folder: not nested
            return None
        skipped = name in (CHECKPOINT_DIR, PREDICTIONS_FILE) or name.startswith("events.out.tfevents")
        return None if skipped or info.name == top else info

    with atomic_output(path) as tmp, tarfile.open(tmp, "w:gz") as tar:
        tar.add(results / ENV_FILE, arcname=top)
        tar.add(results, arcname=results.name, filter=kept)


def gpu_sampler(path: Path) -> subprocess.Popen | None:
    """`nvidia-smi` sampling GPU utilisation and memory every 500 ms into `path`, or None without one."""
    with open(path, "w") as out:  # the child writes through its own copy of the descriptor
        try:
            return subprocess.Popen(["nvidia-smi", "--query-gpu=index,utilization.gpu,memory.used",
                                     "--format=csv,noheader,nounits", "-lms", "500"],
                                    stdout=out, stderr=subprocess.DEVNULL)
        except OSError:
            return None


NO_GPU_SAMPLES = dict.fromkeys(("gpu_util_mean_pct", "gpu_util_max_pct", "gpu_mem_max_mib"))


def gpu_utilisation(sampler: subprocess.Popen | None, path: Path) -> dict:
    """Mean and peak GPU utilisation (%) and peak memory (MiB) over a step's samples; empty without nvidia-smi."""
    if sampler is None:
        return NO_GPU_SAMPLES
    sampler.terminate()
    sampler.wait()
    samples = [[float(v) for v in line.split(",")[1:]] for line in path.read_text().splitlines()
               if line.count(",") == 2 and "N/A" not in line]
    if not samples:
        return NO_GPU_SAMPLES
    util = [u for u, _ in samples]
    return {"gpu_util_mean_pct": round(sum(util) / len(util)), "gpu_util_max_pct": round(max(util)),
            "gpu_mem_max_mib": round(max(m for _, m in samples))}


def time_to_accuracy(sweep: Path) -> list[dict]:
    """Per job: test accuracy, and the first epoch reaching each validation threshold (seconds, images, FLOPs)."""
    jobs = sorted(p for p in sweep.iterdir() if (p / "epochs.csv").exists()) if sweep.is_dir() else []
    return [run_row(job) for job in jobs]


def run_row(job: Path) -> dict:
    """One run's row of `time_to_accuracy` (its epochs.csv must exist)."""
    import pandas as pd

    epochs = pd.read_csv(job / "epochs.csv")
    record = json.loads((job / "metrics.json").read_text()) if (job / "metrics.json").exists() else {}
    test_acc = record.get("metrics", {}).get("test/acc")
    row = {"job": job.name, "status": record.get("status"), "test_acc": test_acc and round(test_acc, 4),
           "val_acc_best": epochs["val/acc"].max(), "epochs": len(epochs),
           "train_seconds": epochs["train_seconds"].iloc[-1],
           "warmup_seconds": record.get("metrics", {}).get("warmup_seconds")}  # a compiled network's, else None
    for t in THRESHOLDS:
        hit = epochs[epochs["val/acc"] >= t]
        first = hit.iloc[0] if len(hit) else None
        row[f"s_to_{t:.0%}"] = None if first is None else round(float(first["train_seconds"]), 1)
        row[f"images_to_{t:.0%}"] = None if first is None else int(first["train_images"])
        row[f"tflop_to_{t:.0%}"] = None if first is None else round(float(first["train_flops"]) / 1e12, 1)
    return row


def markdown_table(rows: list[dict]) -> str:
    if not rows:
        return "(no rows)\n"
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join("" if r.get(c) is None else str(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_summary(results: Path, env: dict, outcomes: list[dict]) -> str:
    import pandas as pd

    parts = [f"# GPU check, {env['date']}", "", f"Hardware: {env['hardware_line']}; CUDA {env['cuda']}, "
             f"cuDNN {env['cudnn']}; nvidia-smi: {env['nvidia_smi']}", "", "## Steps", "", markdown_table(outcomes)]
    if (results / "bench.csv").exists():
        bench = pd.read_csv(results / "bench.csv")
        keep = ["model", "batch_size", "precision", "steps", "raw_img_s", "lightning_img_s", "ratio", "ratio_range",
                "lightning_tflop_s", "data_share_pct"]
        parts += ["## Benchmark (raw PyTorch vs Lightning, alone on the GPU)", "",
                  markdown_table(bench[[c for c in keep if c in bench]].to_dict("records"))]
    for run in SINGLE_RUNS:
        if (results / run.step / "epochs.csv").exists():
            parts += [f"## {run.step}: {run.title}, seed 0 (alone on the GPU)", "",
                      markdown_table([run_row(results / run.step)])]
    parts += ["## experiment=report (seeds in parallel processes: seconds are not timings)", "",
              markdown_table(time_to_accuracy(results / "report"))]
    if (results / "report" / "summary.md").exists():
        parts += [(results / "report" / "summary.md").read_text()]
    parts += [f"## experiment=study ({STUDY_JOBS_PER_GPU} jobs at once on one GPU: seconds are not timings)", "",
              markdown_table(time_to_accuracy(results / "study"))]
    text = "\n".join(parts)
    atomic_write(results / "summary.md", text)  # rewritten after every step: never half of one
    return text


def write_records_summary(results: Path, env: dict, outcomes: list[dict]) -> str:
    """summary.md and leaderboard.md of a records run, from what its sweeps hold so far."""
    from fmnist.results.leaderboard import markdown as leaderboard

    parts = [f"# GPU records, {env['date']}", "", f"Hardware: {env['hardware_line']}; CUDA {env['cuda']}, "
             f"cuDNN {env['cudnn']}; nvidia-smi: {env['nvidia_smi']}", "", "## Steps", "", markdown_table(outcomes)]
    for recipe, _ in RECORD_RECIPES:
        parts += [f"## experiment={recipe} (alone on the GPU)", "", markdown_table(time_to_accuracy(results / recipe))]
    sweeps = [results / recipe for recipe, _ in RECORD_RECIPES if (results / recipe).is_dir()]
    if sweeps:
        atomic_write(results / "leaderboard.md", leaderboard(sweeps))
        parts += ["## Leaderboard", "", (results / "leaderboard.md").read_text()]
    text = "\n".join(parts)
    atomic_write(results / "summary.md", text)  # rewritten after every step: never half of one
    return text


def main() -> int:
    """Plan the steps, check every command and place, then run them within the budget (or print them: --dry-run)."""
    from fmnist.config import DataConfig
    from fmnist.overrides import override_key

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", action="store_true", help="run the record recipes (make gpu-records)")
    parser.add_argument("--results", type=output_path_argument, default=None,
                        help="default: outputs/gpu-check/<time>; with --records, the folder of docs/results/gpu/records/ "
                             "this GPU model has not finished, else docs/results/gpu/records/<date>")
    parser.add_argument("--data-dir", type=path_argument, default=Path(DataConfig.dir))
    parser.add_argument("--idx-dir", type=path_argument, default=None, help="make the CSVs from Zalando's IDX files here")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="wall-time budget for all steps (default 450 s; 420 s with --records): "
                             "8 minutes with installing")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="added to every train.py command (repeatable), e.g. trainer.precision=32-true")
    parser.add_argument("--dry-run", action="store_true", help="compose every command's config and print the commands")
    parser.add_argument("--smoke", action="store_true", help="every step on a few batches (checks this script)")
    parser.add_argument("--archive", type=output_path_argument, default=None, metavar="FILE",
                        help="also write the results folder as FILE (.tar.gz) after every step")
    args = parser.parse_args()
    archived = None  # the members of an earlier check's archive at --archive
    try:
        check_working_directory()
        if args.archive is not None:  # a dry run checks it too: refused here, not in the GPU window
            archived = check_archive(args.archive.resolve())
    except (ConfigError, StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.budget_s is not None and not 0 < args.budget_s < math.inf:  # nan fails both
        parser.error(f"--budget-s must be a positive number of seconds; got {args.budget_s:g}")
    from fmnist.overrides import SWEEP_FORMS, first_sweep

    swept = first_sweep(args.override)
    if swept:  # added to every command: a step that is no sweep would get several values, a sweep more jobs
        parser.error(f"--override {swept} is {SWEEP_FORMS}; each --override sets one value")
    budget_s = args.budget_s or (420 if args.records else 450)
    if args.results is not None:
        results = args.results.resolve()
    elif args.records and not args.smoke:  # a smoke run's jobs are not records to continue
        from fmnist.hardware import describe

        results = records_folder(ROOT / RECORDS_DIR, describe()["gpu"], datetime.now().strftime("%Y-%m-%d"))
    else:
        results = (Path("outputs/gpu-check") / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")).resolve()
    if results.exists() and not results.is_dir():
        parser.error(f"--results {args.results}: a file, not a directory; nothing was run")
    if results.is_dir() and any(results.iterdir()) and not (results / ENV_FILE).is_file():
        parser.error(f"--results {results}: holds files that no check wrote (no {ENV_FILE}), which its summary.md and "
                     f"{ENV_FILE} could replace; nothing was run. Name a new folder, or one an earlier check wrote.")
    data_dir = args.data_dir.resolve()
    try:  # what the run would meet only once it starts: refused here, by a dry run too
        if archived is not None:
            check_archive_continued(args.archive, archived, results)
        check_places(data_dir, args.idx_dir, results)
    except (ConfigError, StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    def steps_for(gpus: int) -> list[Step]:
        steps = (plan_records(results, data_dir, args.smoke, budget_s) if args.records
                 else plan(results, data_dir, args.smoke, gpus))
        for step in steps:
            for command in step.commands if step.train else []:
                own = {override_key(o) for o in command[2:] if "=" in o}
                clash = [o for o in args.override if override_key(o) in own]
                if clash:  # the later value would win: the step would measure something else than planned
                    parser.error(f"--override {clash[0]}: the step {step.name} sets {clash[0].split('=', 1)[0]} "
                                 "itself (where results go, seeds, data and devices are the plan's); nothing was run")
                command.extend(args.override)
        return steps

    if args.dry_run or args.override:  # a typo in --override must not cost a GPU window step by step
        from hydra.errors import HydraException
        from omegaconf.errors import OmegaConfBaseException

        from fmnist.errors import FmnistError

        steps = steps_for(gpus=2)
        try:
            compose_all(steps)
        except (HydraException, OmegaConfBaseException, FmnistError) as e:
            from fmnist.overrides import composition_message

            with_override = f" with --override {' '.join(args.override)}" if args.override else ""
            print(f"gpu-check: a train.py command does not compose{with_override}: "
                  f"{composition_message(e, args=args.override, help_hint=False)}", file=sys.stderr)
            return 2
    if args.dry_run:
        for step in steps:
            for command in step.commands:
                print(f"[{step.name}, <= {step.timeout_s:.0f} s] {shlex.join(command)}")
        print(f"dry run: {sum(len(s.commands) for s in steps)} commands composed; nothing was run")
        return 0

    import torch

    if not torch.cuda.is_available() and not args.smoke:
        print("gpu-check: torch sees no CUDA GPU here (use --smoke to check the script on a CPU)", file=sys.stderr)
        return 2
    deadline = time.time() + budget_s
    get_data = [PY, "scripts/get_data.py", "--data-dir", str(data_dir)]  # from the repository: paths resolved
    got = subprocess.run(get_data + (["--idx-dir", str(args.idx_dir.resolve())] if args.idx_dir else []), cwd=ROOT)
    if got.returncode:  # its paragraph is printed; nothing was run, and no results folder made
        return got.returncode
    with storage_errors(key="--results"):
        results.mkdir(parents=True, exist_ok=True)
    env = environment(results)
    command = "gpu-records" if args.records else "gpu-check"
    summarize = write_records_summary if args.records else write_summary
    print(f"{command}: {env['hardware_line']}\n  results: {results}", flush=True)

    def saved() -> None:
        """The archive, if asked for; one that cannot be written is said, and the steps go on."""
        if args.archive is None:
            return
        try:
            archive(results, args.archive.resolve())
        except (OSError, tarfile.TarError) as e:
            print(f"gpu-check: could not write the archive {args.archive} ({e}); the steps go on, "
                  f"their results in {results}", file=sys.stderr, flush=True)

    saved()
    outcomes = []
    for step in steps_for(env["gpus"]):
        outcome = run_step(step, results, deadline)
        outcomes.append(outcome)
        print(f"  {step.name}: {outcome['status']} in {outcome['seconds']} s {outcome['note']}", flush=True)
        summarize(results, env, outcomes)  # after every step: a window cut short still leaves its summary
        saved()
    print(summarize(results, env, outcomes))
    print(f"{command} results: {results}" + (f" (and {args.archive})" if args.archive is not None else ""))
    return 0 if all(o["status"] in ("ok", "skipped") for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
