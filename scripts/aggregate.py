"""Rebuild SWEEP_DIR/summary.csv and summary.md from the jobs' metrics.json (finished or not): the older name of `python -m fmnist.results summary`, kept working."""

import sys

from fmnist.results.__main__ import main

if __name__ == "__main__":
    print("note: scripts/aggregate.py is now `python -m fmnist.results summary`", file=sys.stderr)
    sys.exit(main(["summary", *sys.argv[1:]]))
