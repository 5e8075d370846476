"""Print the leaderboard (markdown): the older name of `python -m fmnist.results leaderboard`, kept working."""

import sys

from fmnist.results.__main__ import main

if __name__ == "__main__":
    print("note: scripts/leaderboard.py is now `python -m fmnist.results leaderboard`", file=sys.stderr)
    sys.exit(main(["leaderboard", *sys.argv[1:]]))
