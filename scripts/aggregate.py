"""Rebuild SWEEP_DIR/summary.csv and summary.md from the jobs' metrics.json (finished or not)."""

import argparse
import sys
from pathlib import Path

from fmnist.results.sweep import summarize


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("sweep_dirs", type=Path, nargs="+", help="sweep directories, e.g. outputs/ablation_lr-cpu")
    args = parser.parse_args()
    for sweep_dir in args.sweep_dirs:
        if not sweep_dir.is_dir():
            print(f"error: {sweep_dir}: not a directory", file=sys.stderr)
            return 2
        table = summarize(sweep_dir)
        print((sweep_dir / "summary.md").read_text())
        print(f"wrote {sweep_dir / 'summary.csv'} ({len(table)} jobs) and {sweep_dir / 'summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
