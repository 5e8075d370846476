"""Draw the report's figures for a sweep into SWEEP_DIR/figures/ (and refresh its summary)."""

import argparse
import sys
from pathlib import Path

from fmnist.results.report import write_report
from fmnist.results.sweep import summarize


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("sweep_dir", type=Path, help="a sweep directory, e.g. outputs/study-cpu")
    args = parser.parse_args()
    if not args.sweep_dir.is_dir():
        print(f"error: {args.sweep_dir}: not a directory", file=sys.stderr)
        return 2
    summarize(args.sweep_dir)
    for path in write_report(args.sweep_dir):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
