"""Print the leaderboard (markdown): published results, then each completed setting of the given sweep directories."""

import argparse
import sys
from pathlib import Path

from fmnist.results.leaderboard import markdown


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("sweep_dirs", type=Path, nargs="+", help="e.g. outputs/speedrun_cpu docs/results/report")
    args = parser.parse_args()
    missing = [d for d in args.sweep_dirs if not d.is_dir()]
    if missing:
        print(f"error: not a directory: {', '.join(map(str, missing))}", file=sys.stderr)
        return 2
    print(markdown(args.sweep_dirs), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
