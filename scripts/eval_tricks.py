"""Score finished runs' best checkpoints with raw and EMA weights under each TTA mode: the older name of `python -m fmnist.results tricks`, kept working."""

import sys

from fmnist.results.__main__ import main

if __name__ == "__main__":
    print("note: scripts/eval_tricks.py is now `python -m fmnist.results tricks`", file=sys.stderr)
    sys.exit(main(["tricks", *sys.argv[1:]]))
