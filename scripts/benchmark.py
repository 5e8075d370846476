"""Training throughput of this project's Lightning loop against a minimal raw PyTorch loop, side by side.

Both loops train the same model on the same in-memory data with the same optimizer and precision;
the raw loop is what a hand-written script would do (index a batch, scale it, forward, backward,
step). Also times the data path alone and the CSV parse / cached load. Prints the hardware and a
table, and appends both to a CSV so runs can be compared over time. Run it on a quiet machine:
`make bench`.

`--infer` measures inference instead: images/s and per-image latency at batch 1 and 256 of the
PyTorch model in eager mode against onnxruntime on the exported ONNX file, alternated in one run on
the same uint8 inputs (both include the scaling from raw pixels). `--ckpt` takes a checkpoint, run
or sweep directory; without it an untrained model of `--models` is timed (weights do not change speed).
An option that only one mode reads (the help says which) is refused in the other, not ignored.

Each loop runs for about `--seconds` after a warm-up (the step count is calibrated once per row),
so every row finishes in bounded time on any machine. The default precisions are those this
hardware runs natively (fp32, plus bf16 where the CPU or GPU has it): bf16 emulated on an
AVX2-only CPU is an order of magnitude slower and would only measure that.
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import math
import statistics
import sys
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

from fmnist.cli import exit_if_no_working_directory, run_plain

exit_if_no_working_directory()  # here: torch's import fails in a deleted directory, with oneMKL's error instead

import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from fmnist import IMAGE_SIDE, console
from fmnist.errors import ConfigError
from fmnist.fsio import (atomic_write, check_folder_can_hold, dirs_made, exclusive_lock, output_path_argument,
                         path_argument, storage_errors)
from fmnist.training.callbacks import step_callbacks
from fmnist.config import ACCELERATORS, CONF_DIR, DataConfig, OptimConfig, TrainConfig
from fmnist.overrides import check_name, compose_train
from fmnist.data.csv_io import cache_path, load_csv, parse_csv
from fmnist.data.datamodule import FashionMNISTDataModule
from fmnist.data.sources import find_csv
from fmnist.hardware import check_accelerator, describe, describe_line, device_kind, native_cpu_bf16
from fmnist.models import training_flops_per_image
from fmnist.training.module import LitClassifier, fast_path_applies, fused_on, take_fast_path
from fmnist.training.precision import resolve_precision


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that a host clock reading covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer(L.Callback):
    """Wall time from the start of batch `warmup` to the end of the last batch."""

    def __init__(self, warmup: int, total: int):
        self.warmup, self.total, self.start, self.end, self.steps = warmup, total, 0.0, 0.0, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.warmup:
            synchronize(pl_module.device)
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx + 1 == self.total:  # only the last step waits for the GPU, as the raw loop does
            synchronize(pl_module.device)
        self.end, self.steps = time.perf_counter(), batch_idx + 1 - self.warmup


def model_cfg(name: str, compile: bool, fast_path: bool = False) -> dict:
    """The model's config as training gets it (conf/model/<name>.yaml), whether to compile it, and whether
    to take the fast path (on CUDA: CUDA graphs, `fast_path=true` in training)."""
    return {"model": OmegaConf.to_container(compose_train(f"model={name}").model), "compile": compile,
            "fast_path": fast_path}


def classifier(config: dict) -> LitClassifier:
    """The LightningModule both loops train: `config` from `model_cfg`, channels_last (the default)."""
    return LitClassifier(model=config["model"], optim=OPTIM, compile=config["compile"], fast_path=config["fast_path"])


# The columns of the CSVs benchmark.py writes, after the run's date and the hardware (`fmnist.hardware.describe`):
# what the training benchmark measures, and what the inference one (--infer) does.
TRAIN_CSV_COLUMNS = ["model", "batch_size", "precision", "steps", "raw_img_s", "lightning_img_s", "lightning_tflop_s",
                     "gflop_per_img", "ratio", "ratio_range", "data_img_s", "data_share_pct", "csv_parse_s",
                     "cached_load_s"]
INFER_CSV_COLUMNS = ["model", "batch_size", "runtime", "ms_per_batch", "ms_per_image", "img_s", "speedup_vs_eager",
                     "ms_range"]


def csv_columns(infer: bool) -> list[str]:
    """The header of the CSV benchmark.py writes (with --infer: `infer`)."""
    return ["date", *describe(), *(INFER_CSV_COLUMNS if infer else TRAIN_CSV_COLUMNS)]


# Both loops use plain Adam at lr 1e-3 (the default optim config).
OPTIM = asdict(OptimConfig())


def make_datamodule(data_dir: Path, batch_size: int, val_size: int, device: torch.device) -> FashionMNISTDataModule:
    """The training split as training sees it (what the validation split leaves), loaded once, on `device`."""
    dm = FashionMNISTDataModule(dir=str(data_dir), batch_size=batch_size, val_size=val_size)
    dm.setup("fit")
    dm.splits = {k: (x.to(device), y.to(device)) for k, (x, y) in dm.splits.items()}
    return dm


def lightning_throughput(dm: FashionMNISTDataModule, model: dict, batch_size: int, precision: str, steps: int,
                         warmup: int, device: torch.device) -> float:
    """Images/s of `Trainer.fit` with this project's module, datamodule and per-step callbacks."""
    timer = StepTimer(warmup, steps + warmup)
    trainer = L.Trainer(accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, precision=precision, max_epochs=1,
                        limit_train_batches=steps + warmup, limit_val_batches=0, num_sanity_val_steps=0,
                        logger=False, enable_checkpointing=False, enable_model_summary=False,
                        enable_progress_bar=console.is_terminal(),
                        # timed with the bar train.py would draw here: one in a terminal, none into a pipe or file
                        callbacks=[timer, *step_callbacks(TrainConfig.progress_bar_refresh if console.is_terminal()
                                                          else None)])
    trainer.fit(classifier(model), datamodule=dm)
    return timer.steps * batch_size / (timer.end - timer.start)


def raw_throughput(dm: FashionMNISTDataModule, model: dict, batch_size: int, precision: str, steps: int,
                   warmup: int, device: torch.device) -> float:
    """Images/s of a hand-written loop over the same tensors, model and optimizer."""
    lit = classifier(model)
    net = lit.net.to(device).train()
    if model["fast_path"]:  # the treatment Lightning's module gives it in `setup`
        take_fast_path(net, device)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3, **fused_on(device))  # as LitClassifier's
    images, labels = dm.splits["train"]
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(labels), generator=generator).to(device)
    dtype = {"bf16": torch.bfloat16, "16": torch.float16}.get(precision.split("-")[0])
    scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)
    start = 0.0
    for step in range(steps + warmup):
        if step == warmup:
            synchronize(device)
            start = time.perf_counter()
        idx = order[(step * batch_size) % len(order):][:batch_size]
        x = (images[idx].float() / 255).contiguous(memory_format=torch.channels_last)
        y = labels[idx]
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = F.cross_entropy(net(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    synchronize(device)
    return steps * batch_size / (time.perf_counter() - start)


def calibrate_steps(dm: FashionMNISTDataModule, model: dict, batch_size: int, precision: str, seconds: float,
                    device: torch.device) -> int:
    """How many steps fill about `seconds` (at least 5), from a short raw-loop timing."""
    step_s = batch_size / raw_throughput(dm, model, batch_size, precision, 3, 2, device)
    return max(5, round(seconds / step_s))


def data_path_throughput(dm: FashionMNISTDataModule, batches: int, device: torch.device) -> float:
    """Images/s of cutting, converting and scaling batches (the datamodule's whole per-step work)."""
    loader = dm.train_dataloader()
    count, start = 0, time.perf_counter()
    for i, batch in enumerate(loader):
        x, _ = dm.on_after_batch_transfer(batch, 0)
        count += len(x)
        if i + 1 == batches:
            break
    synchronize(device)
    return count / (time.perf_counter() - start)


def native_precisions(kind: str) -> list[str]:
    """fp32 plus the mixed precision this hardware runs natively (none on a CPU without bf16)."""
    if kind == "cuda":
        return ["32-true", "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"]
    return ["32-true", "bf16-mixed"] if kind == "cpu" and native_cpu_bf16() else ["32-true"]


def csv_timings(data_dir: Path) -> tuple[float, float]:
    """(seconds to parse the training CSV from scratch, seconds to load it from the cache)."""
    path = find_csv(data_dir, "train")
    start = time.perf_counter()
    parse_csv(path)
    parse = time.perf_counter() - start
    if not cache_path(path).exists():
        load_csv(path)
    start = time.perf_counter()
    load_csv(path)
    return parse, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=path_argument, default=Path(DataConfig.dir),
                        help="training: the CSVs (default %(default)s)")
    # Options read by one mode only default to SUPPRESS: check_mode_options tells given from defaulted, then fills in
    # MODE_DEFAULTS, so that one given to the other mode is refused instead of silently ignored.
    quiet = argparse.SUPPRESS
    parser.add_argument("--models", nargs="+", default=quiet, help=f"models of conf/model/ ({default_of('models')})")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=quiet,
                        help=f"training ({default_of('batch_sizes')})")
    parser.add_argument("--accelerator", default=quiet,
                        help=f"training: auto | cpu | gpu ({default_of('accelerator')})")
    parser.add_argument("--precisions", nargs="+", default=quiet,
                        help="training; default: those this hardware runs natively (32-true, plus bf16-mixed where "
                             "native)")
    parser.add_argument("--seconds", type=float, default=2.0, help="timed seconds per loop and repeat (calibrated)")
    parser.add_argument("--images", type=int, default=quiet,
                        help="training: images per loop and repeat instead of --seconds")
    parser.add_argument("--repeats", type=int, default=5, help="alternating raw/Lightning repeats (median)")
    parser.add_argument("--val-size", type=int, default=quiet, help=f"training ({default_of('val_size')})")
    parser.add_argument("--compile", action="store_true", default=quiet,
                        help="training: torch.compile the model in both loops")
    parser.add_argument("--fast-path", action="store_true", default=quiet,
                        help="training: CUDA graphs in both loops (fast_path=true in training); a CPU ignores it")
    parser.add_argument("--out", type=output_path_argument, default=None,
                        help=f"CSV to append to (default {DEFAULT_OUT[False]}, with --infer {DEFAULT_OUT[True]})")
    parser.add_argument("--infer", action="store_true", help="inference: PyTorch eager vs onnxruntime (see above)")
    parser.add_argument("--ckpt", type=path_argument, default=quiet,
                        help="with --infer: a checkpoint, run or sweep directory to time")
    parser.add_argument("--infer-batch-sizes", nargs="+", type=int, default=quiet,
                        help=f"with --infer ({default_of('infer_batch_sizes')})")
    parser.add_argument("--threads", type=int, default=quiet,
                        help="with --infer: intra-op threads of both PyTorch and onnxruntime (default: torch's)")
    args = parser.parse_args()
    # The console of every command: one line per message, Lightning's notices and harmless warnings out.
    logging.basicConfig(level=logging.INFO, format=console.CONSOLE_FORMAT, datefmt=console.CONSOLE_DATEFMT)
    console.setup()
    torch.manual_seed(0)
    args.out = args.out or DEFAULT_OUT[args.infer]

    def work() -> None:
        check_mode_options(args)
        check_inputs(args)
        (infer_benchmark if args.infer else train_benchmark)(args)

    return run_plain(work)


# Where the rows go without --out: training rows, and (with --infer) inference rows, whose columns differ.
DEFAULT_OUT = {False: Path("outputs/benchmarks.csv"), True: Path("outputs/benchmarks_infer.csv")}
# What the options read by one mode only default to; the other mode refuses them (check_mode_options). --models
# is read by both, but defaults the same way: beside --ckpt it is refused too.
MODE_DEFAULTS = {
    "training": {"batch_sizes": [32, 256], "accelerator": "auto", "precisions": None, "images": None, "val_size": 5000,
                 "compile": False, "fast_path": False},
    "inference": {"ckpt": None, "infer_batch_sizes": [1, 256], "threads": None},
}
DEFAULTS = {"models": ["optimized"], **MODE_DEFAULTS["training"], **MODE_DEFAULTS["inference"]}


def default_of(option: str) -> str:
    """--help's words for an option's default (DEFAULTS)."""
    value = DEFAULTS[option]
    return "default " + (" ".join(map(str, value)) if isinstance(value, list) else str(value))


def check_mode_options(args) -> None:
    """ConfigError for an option that the chosen mode would ignore (a training option with --infer, an inference one
    without it, --models beside --ckpt): its row would claim a setting that was never used. Then fills in the
    default of every option not given."""
    mode, other = ("inference", "training") if args.infer else ("training", "inference")
    given = [option for option in MODE_DEFAULTS[other] if hasattr(args, option)]
    if given:
        names = " and ".join("--" + option.replace("_", "-") for option in given)
        them, s = ("them", "") if len(given) > 1 else ("it", "s")
        raise ConfigError(f"{names} time{s} inference, which --infer measures; add --infer, or drop {them} to time "
                          "training." if mode == "training" else
                          f"{names} set{s} how training is timed, and --infer times inference; drop {them}, or drop "
                          "--infer to time training.")
    if args.infer and hasattr(args, "ckpt") and hasattr(args, "models"):
        raise ConfigError("--models names untrained models to time, and --ckpt a trained one, whose model is the one "
                          "timed; give one of them.")
    for option, default in DEFAULTS.items():
        if not hasattr(args, option):  # the other mode's too, all unset: the checks read every option
            setattr(args, option, default)


# The precisions whose raw loop is the same computation as Lightning's: autocast, or none.
TIMED_PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")


def check_inputs(args) -> None:
    """Before any timing: the CSV to append to is new or one this script wrote, every model exists, every batch
    size and count is at least 1, the accelerator is one this machine has, each precision is one both loops
    run alike, and the data are readable with room for the validation split."""
    if args.infer:  # onnxruntime is one of the two runtimes timed: its absence named here, not as an ImportError
        from fmnist.inference.export import require_packages

        try:
            require_packages()
        except ConfigError as e:
            raise ConfigError(f"--infer times the model exported to ONNX under onnxruntime; {e}") from None
    for option in ("batch_sizes", "infer_batch_sizes"):
        bad = [b for b in getattr(args, option) if b < 1]
        if bad:
            raise ConfigError(f"--{option.replace('_', '-')}: batch sizes must be at least 1; got {bad[0]}.")
    for option, value, ok in (("--repeats", args.repeats, args.repeats >= 1),
                              ("--seconds", args.seconds, 0 < args.seconds < math.inf),  # nan fails both
                              ("--images", args.images, args.images is None or args.images >= 1),
                              ("--val-size", args.val_size, args.val_size >= 1),
                              ("--threads", args.threads, args.threads is None or args.threads >= 1)):
        if not ok:
            raise ConfigError(f"{option} must be a finite number above zero; got {value}.")
    if args.accelerator not in ACCELERATORS:
        raise ConfigError(f"--accelerator must be one of {ACCELERATORS}; got {args.accelerator!r}.")
    try:
        check_accelerator(args.accelerator)
    except ConfigError:
        raise ConfigError(f"--accelerator {args.accelerator}: torch finds no such device here; use auto or cpu.") from None
    odd = [p for p in args.precisions or [] if p not in TIMED_PRECISIONS]
    if odd:
        raise ConfigError(f"--precisions must be among {TIMED_PRECISIONS} (the raw loop runs them as Lightning does); "
                          f"got {odd[0]!r}.")
    for precision in args.precisions or []:
        try:
            check_accelerator(args.accelerator, precision=precision)
        except ConfigError:  # the row would name one precision and time another
            raise ConfigError(f"--precisions {precision}: Lightning runs it as bf16-mixed on a CPU (fp16 autocast is for "
                              "GPUs), so its row would name one precision and time another; use bf16-mixed or "
                              "32-true here.") from None
    if args.out.is_dir() or (args.out.exists() and not args.out.is_file()):
        raise ConfigError(f"--out names {args.out}, which is not a regular file; give a CSV file name.")
    # Where the rows will go must take them: else they are lost after the whole benchmark.
    check_folder_can_hold(args.out.resolve().parent, "--out", args.out, "give a CSV file name in a directory.")
    if args.out.exists():  # the rows are added to what it holds: one it cannot take would lose them after the benchmark
        try:
            history = read_history(args.out)
        except OSError as e:
            raise ConfigError(f"--out names {args.out}, which cannot be read ({e.strerror or e}); nothing was written. "
                              "Choose another file name.") from e
        check_history(args.out, history, args.infer)
    check_model_names(args.models)
    for name in args.models:
        try:
            model_cfg(name, False)
        except ConfigError as e:
            raise ConfigError(f"--models {name}: {e}") from e
    if args.infer and args.ckpt is not None:  # loaded among the checks: one that cannot be timed is refused first
        from fmnist.inference.loading import load_model

        args.loaded_ckpt = load_model(args.ckpt, key="--ckpt")  # what infer_benchmark times
    if not args.infer:  # the data read, and the validation split checked against them, as training does
        try:
            train_images = FashionMNISTDataModule(dir=str(args.data_dir), val_size=args.val_size).check()["train"]
        except ConfigError as e:
            raise ConfigError(f"--val-size {args.val_size}: {e}") from e
        # Each loop times full batches after its warm-up within one epoch (timed_steps): a batch size that leaves no
        # full batch after the warm-up would time none (or a negative number of) steps and append a row of 0 or
        # negative images/s.
        warmup = warmup_steps(args.fast_path)
        largest = train_images // (warmup + 1)  # the largest batch size giving more than `warmup` full batches
        too_large = [b for b in args.batch_sizes if timed_steps(1, train_images, b, warmup) < 1]
        if too_large:
            raise ConfigError(f"--batch-sizes {too_large[0]}: the training split's {train_images} images (what "
                              f"--val-size {args.val_size} leaves) make {train_images // too_large[0]} full "
                              f"batch(es) of it, and each loop needs more than its {warmup} warm-up steps in one epoch; "
                              + (f"give batch sizes of at most {largest}." if largest >= 1 else
                                 "give a smaller --val-size or more data."))


def check_model_names(names: list[str]) -> None:
    """ConfigError for a --models value that is not the name of a model config (conf/model/NAME.yaml): Hydra would
    compose a path (`../model/optimized`) as the file it leads to, and read `simple,resnet` as a sweep."""
    known = ", ".join(sorted(path.stem for path in (CONF_DIR / "model").glob("*.yaml")))
    for name in names:
        check_name("--models", name, names=f"a model in conf/model/ ({known})")
        if not (CONF_DIR / "model" / f"{name}.yaml").is_file():
            raise ConfigError(f"--models {name}: no such model; expected one of {known} (conf/model/NAME.yaml), "
                              "several separated by spaces.")


def warmup_steps(fast_path: bool) -> int:
    """Untimed steps before each loop's timing: with CUDA graphs (--fast-path) they are compiled, warmed up, then
    recorded."""
    return 12 if fast_path else 3


def read_history(out: Path) -> bytes:
    """The CSV `out` that new rows are added to, as it is (empty if it does not exist yet)."""
    return out.read_bytes() if out.exists() else b""


def check_history(out: Path, history: bytes, infer: bool) -> None:
    """ConfigError unless `history` (the CSV `out`) is one benchmark.py (with --infer: `infer`) wrote: its header
    the columns the new rows have, then rows of one value per column. Rows are added after its last line, so under
    another header they would be misread, and after a row cut short they would become part of it."""
    columns, header = csv_columns(infer), history.split(b"\n", 1)[0].rstrip(b"\r")
    if header != ",".join(columns).encode():
        other = ",".join(csv_columns(not infer)).encode() == header  # a training CSV for --infer, or the reverse
        raise ConfigError(f"--out names {out}, which benchmark.py did not write: its first line is not the header "
                          f"benchmark.py{' --infer' if infer else ''} writes ({','.join(columns)})"
                          + (f"; it is that of benchmark.py{'' if infer else ' --infer'}, whose rows have other columns"
                             if other else "") + "; nothing was written. Choose a new file name.")
    reader = csv.reader(io.StringIO(history.decode(errors="replace"), newline=""), strict=True)
    try:
        for row in reader:
            if row and len(row) != len(columns):
                raise csv.Error(f"{len(row)} values for its {len(columns)} columns")
    except csv.Error as e:
        raise ConfigError(f"--out names {out}, which cannot be read as the CSV benchmark.py writes (line "
                          f"{reader.line_num}: {e}); nothing was written. Mend it, or choose a new file name."
                          ) from None


def append_rows(out: Path, rows: list[dict], infer: bool) -> None:
    """Add `rows` (of the benchmark --infer or not: `infer`) to the CSV `out`, atomically, after the bytes it holds:
    the rows there are not read and written again, which would change how their values are written (an integer
    column with a blank cell read as floats, 256 written back as 256.0). Under a lock on its directory: two
    benchmarks that end together (one per GPU, or a CPU and a GPU one) would each write what they read, and the
    first one's rows would be lost."""
    columns, lines = csv_columns(infer), io.StringIO()
    csv.DictWriter(lines, columns, lineterminator="\n").writerows(rows)  # a key not among `columns` raises
    with storage_errors(key="--out"), dirs_made(out.parent), exclusive_lock(out.parent):
        history = read_history(out)
        if history:  # checked again: another benchmark may have made it since (of the other kind)
            check_history(out, history, infer)
        else:
            history = (",".join(columns) + "\n").encode()
        if not history.endswith(b"\n"):  # a last row without its line end: the first new row would join it
            history += b"\n"
        atomic_write(out, history + lines.getvalue().encode())
    print(f"\nappended {len(rows)} rows to {out}")


def timed_steps(requested: int, train_images: int, batch_size: int, warmup: int) -> int:
    """The steps each loop times: `requested`, cut to the full batches of one epoch left after the warm-up. The
    epoch's last, smaller batch is never timed: its new shape makes a CUDA-graphed step (--fast-path) compile and
    capture again, seconds that would count as training."""
    return min(requested, train_images // batch_size - warmup)


def train_benchmark(args) -> None:
    """Raw PyTorch vs Lightning training throughput; prints the hardware and a table, appends to --out."""
    kind = device_kind(args.accelerator)
    device = torch.device("cuda" if kind == "cuda" else "cpu")
    hardware = describe()
    print(f"hardware: {describe_line(hardware)}")
    precisions = args.precisions or native_precisions(kind)

    parse_s, cached_s = csv_timings(args.data_dir)
    rows = []
    total = len(args.models) * len(args.batch_sizes) * len(precisions)
    for model in args.models:
        config = model_cfg(model, args.compile, args.fast_path)
        flops = training_flops_per_image(classifier(config).net)
        for batch_size in args.batch_sizes:
            auto, _ = resolve_precision("auto", kind, {**config["model"], "channels_last": True}, batch_size)
            dm = make_datamodule(args.data_dir, batch_size, args.val_size, device)
            data_ips = data_path_throughput(dm, 50, device)
            for precision in precisions:
                warmup = warmup_steps(args.fast_path)
                steps = (max(4, args.images // batch_size) if args.images else
                         calibrate_steps(dm, config, batch_size, precision, args.seconds, device))
                steps = timed_steps(steps, len(dm.splits["train"][1]), batch_size, warmup)
                print(f"row {len(rows) + 1}/{total}: {model}, batch {batch_size}, {precision}: {steps} steps, "
                      f"{args.repeats} x (raw, Lightning)", flush=True)
                raw, lit = [], []
                for _ in range(args.repeats):  # alternate, so drifting machine load hits both alike
                    raw.append(raw_throughput(dm, config, batch_size, precision, steps, warmup, device))
                    lit.append(lightning_throughput(dm, config, batch_size, precision, steps, warmup, device))
                raw_ips, lit_ips = statistics.median(raw), statistics.median(lit)
                # Each repeat's two loops ran back to back: their ratio cancels slow drifts in machine speed.
                ratios = sorted(l_ / r_ for l_, r_ in zip(lit, raw))
                rows.append({
                    "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), **hardware,
                    "model": model + ("+compile" if args.compile else "")
                    + ("+fast_path" if args.fast_path and fast_path_applies(device) else ""),
                    "batch_size": batch_size, "precision": precision + (" (auto)" if precision == auto else ""),
                    "steps": steps, "raw_img_s": round(raw_ips), "lightning_img_s": round(lit_ips),
                    "lightning_tflop_s": round(lit_ips * flops / 1e12, 3), "gflop_per_img": round(flops / 1e9, 3),
                    "ratio": round(statistics.median(ratios), 3), "ratio_range": f"{ratios[0]:.3f}-{ratios[-1]:.3f}",
                    "data_img_s": round(data_ips), "data_share_pct": round(100 * lit_ips / data_ips, 2),
                    "csv_parse_s": round(parse_s, 2), "cached_load_s": round(cached_s, 3),
                })
    print_table(rows, TRAIN_CSV_COLUMNS)
    append_rows(args.out, rows, infer=False)


def seconds_per_call(fn, seconds: float) -> float:
    """Median wall time of one call of `fn`, over calls filling about `seconds` (after 3 warm-up calls)."""
    for _ in range(3):
        fn()
    times, deadline = [], time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 5:
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def infer_benchmark(args) -> None:
    """PyTorch eager vs onnxruntime, batch 1 and 256, alternated; prints the hardware and a table."""
    import tempfile

    import numpy as np

    from fmnist.inference.export import INPUT_NAME, require_packages, to_onnx
    from fmnist.inference.loading import LoadedModel

    require_packages()
    import onnxruntime as ort
    if args.threads:
        torch.set_num_threads(args.threads)
    hardware = describe()
    print(f"hardware: {describe_line(hardware)}, onnxruntime {ort.__version__}")
    targets = [args.loaded_ckpt] if args.ckpt else [
        LoadedModel(classifier(model_cfg(name, False)).eval(), Path("untrained"), "",
                    model_cfg(name, False)["model"], {}) for name in args.models]
    rows = []
    for loaded in targets:
        name = loaded.model["name"] + ("" if args.ckpt else " (untrained)")
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.onnx"
            to_onnx(loaded, path)
            options = ort.SessionOptions()
            options.intra_op_num_threads = torch.get_num_threads()  # the same threads as PyTorch
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        for batch_size in args.infer_batch_sizes:
            images = torch.randint(0, 256, (batch_size, 1, IMAGE_SIDE, IMAGE_SIDE), dtype=torch.uint8)
            feed = {INPUT_NAME: np.ascontiguousarray(images.numpy())}
            runs = {"pytorch eager": lambda: loaded.logits(images), "onnxruntime": lambda: session.run(None, feed)}
            per_call = {k: [] for k in runs}
            for _ in range(args.repeats):  # alternate, so drifting machine load hits both alike
                for runtime, fn in runs.items():
                    per_call[runtime].append(seconds_per_call(fn, args.seconds / 2))
            eager = statistics.median(per_call["pytorch eager"])
            for runtime, times in per_call.items():
                t = statistics.median(times)
                rows.append({"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), **hardware,
                             "model": name, "batch_size": batch_size, "runtime": runtime,
                             "ms_per_batch": round(t * 1e3, 3), "ms_per_image": round(t * 1e3 / batch_size, 4),
                             "img_s": round(batch_size / t), "speedup_vs_eager": round(eager / t, 2),
                             "ms_range": f"{min(times) * 1e3:.3f}-{max(times) * 1e3:.3f}"})
    print_table(rows, INFER_CSV_COLUMNS)
    append_rows(args.out, rows, infer=True)


def print_table(rows: list[dict], columns: list[str]) -> None:
    """The rows as a table of `columns`, as they go into the CSV (the same columns, in the same order)."""
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in columns]
    print(" | ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("-|-".join("-" * w for w in widths))
    for r in rows:
        print(" | ".join(str(r[c]).ljust(w) for c, w in zip(columns, widths)))


if __name__ == "__main__":
    sys.exit(main())
