"""Time one 4-job sweep run sequentially (basic launcher) and with the joblib launcher, side by side.

    python scripts/parallel_sweep_timing.py --data-dir data [--n-jobs 2] [train overrides...]

Both sweeps run the same jobs (seeds 0-3 of one setting) into fresh directories under --out, one
after the other in this one invocation, so that they see the same machine; the table gives each
sweep's total wall time (process start to summary, as a user waits for it). The setting is DEFAULT
(a small, short one) with the train overrides given added after it; the seeds, the data, where the
sweeps go and their launchers are the script's own.
"""

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from fmnist.cli import run_plain
from fmnist.config import DataConfig
from fmnist.fsio import dirs_made, path_argument, storage_errors
from fmnist.overrides import SWEEP_FORMS, first_sweep, override_key

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ["model=simple", "data.train_subset=1000", "trainer.max_epochs=1", "trainer.enable_progress_bar=false",
           "trainer.enable_model_summary=false"]


def sweep(out: Path, data_dir: Path, overrides: list[str], launcher: list[str]) -> float:
    cmd = [sys.executable, str(ROOT / "train.py"), "-m", f"data.dir={data_dir}", *overrides, "seed=0,1,2,3",
           f"hydra.sweep.dir={out}", *launcher]
    started = time.perf_counter()
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    seconds = time.perf_counter() - started
    if result.returncode == 2:  # refused (a bad override, no data): train.py's own paragraph, nothing written
        sys.stderr.write(result.stderr[-3000:])
        raise SystemExit(2)
    summary = out / "summary.md"
    if result.returncode != 0 or not summary.is_file() or "Jobs: 4 completed." not in summary.read_text():
        sys.exit(f"sweep into {out} failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=path_argument, default=Path(DataConfig.dir))
    parser.add_argument("--n-jobs", type=int, default=2)
    parser.add_argument("--out", type=path_argument, default=Path("outputs/parallel_timing"))
    args, overrides = parser.parse_known_args()
    options = [o for o in overrides if o.startswith("-")]  # else train.py's parser would name itself and our overrides
    if options:
        parser.error(f"unrecognized option {options[0]}: the options are --data-dir, --n-jobs and --out; other "
                     "arguments are train overrides (key=value)")
    if args.n_jobs < 1:
        parser.error(f"--n-jobs must be at least 1; got {args.n_jobs}")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out}: a file, not a directory; nothing was run")
    for override in overrides:  # a later value of the script's own keys would win, and time other sweeps
        key = override_key(override)
        if key in ("seed", "data.dir") or key.startswith("hydra"):
            parser.error(f"{override}: the script sets {key} itself (both sweeps run seeds 0-3 of one setting, on "
                         "--data-dir, into --out, each with its launcher); give other train overrides")
        if key in ("experiment", "preset"):  # an experiment sweeps keys of its own, which would add jobs
            parser.error(f"{override}: an {key} brings sweeps and settings of its own, and both sweeps here run "
                         "seeds 0-3 of one setting; give the train keys you want to time instead")
        if first_sweep([override]):
            parser.error(f"{override} is {SWEEP_FORMS}: both sweeps run seeds 0-3 of one setting, so each train "
                         "override sets one value")
    data_dir = Path(args.data_dir).resolve()  # the sweeps run from the repository: relative to where this one runs
    out = args.out.resolve() / time.strftime("%Y-%m-%d_%H-%M-%S")
    overrides = [*DEFAULT, *overrides]  # the ones given come last, so they win

    def timed() -> None:
        with storage_errors(key="--out"), dirs_made(out):  # removed again if a sweep is refused and leaves them empty
            seq = sweep(out / "sequential", data_dir, overrides, [])
            par = sweep(out / f"joblib-{args.n_jobs}", data_dir, overrides,
                        ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={args.n_jobs}"])
        print(f"4 jobs ({' '.join(overrides)}) on {os.cpu_count()} cores, {platform.processor() or platform.machine()}")
        print("| launcher | total wall time (s) |\n|---|---|")
        print(f"| basic (sequential) | {seq:.1f} |\n| joblib, n_jobs={args.n_jobs} | {par:.1f} |")
        print(f"speed-up: {seq / par:.2f}x  (run directories: {out})")

    return run_plain(timed)


if __name__ == "__main__":
    sys.exit(main())
