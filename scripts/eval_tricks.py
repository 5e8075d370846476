"""Score finished runs' best checkpoints on their validation split with raw and EMA weights, under each TTA mode.

`python scripts/eval_tricks.py outputs/speedrun_cpu`: a markdown table of validation accuracy and
its paired change against the raw weights without TTA (fmnist/results/tricks.py); `--csv` saves it.
"""

import argparse
import sys
from pathlib import Path

from fmnist.inference.tricks import compare, markdown


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dirs", type=Path, nargs="+", help="sweep directories of runs trained with EMA")
    parser.add_argument("--data-dir", help="where the training CSV is, if not where the runs were trained")
    parser.add_argument("--csv", type=Path, help="also write the table here")
    args = parser.parse_args()
    missing = [d for d in args.sweep_dirs if not d.is_dir()]
    if missing:
        print(f"error: not a directory: {', '.join(map(str, missing))}", file=sys.stderr)
        return 2
    table = compare(args.sweep_dirs, args.data_dir)
    if args.csv:
        table.to_csv(args.csv, index=False)
    print(markdown(table), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
