"""Draw the report's figures for a sweep into SWEEP_DIR/figures/ (and refresh its summary): the older name of `python -m fmnist.results report`, kept working."""

import sys

from fmnist.results.__main__ import main

if __name__ == "__main__":
    print("note: scripts/report.py is now `python -m fmnist.results report`", file=sys.stderr)
    sys.exit(main(["report", *sys.argv[1:]]))
