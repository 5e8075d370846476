"""Regenerate the docs' tables from the committed results: `make docs` (`--check`: list stale files, exit 1).

Each table sits between `<!-- generated: python -m fmnist.results ... -->` and `<!-- end generated -->`
(fmnist/results/generated.py).
"""

import argparse
import sys
from pathlib import Path

from fmnist.cli import run_plain
from fmnist.results.generated import update

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a table is out of date")
    args = parser.parse_args(argv)
    stale: list[Path] = []

    def work() -> None:
        # The blocks name results by paths from the repository root: run them there, wherever this is run from.
        stale.extend(update(DOCS, check=args.check, root=ROOT))
        for path in stale:
            print(f"{'out of date' if args.check else 'rewrote'}: {path.relative_to(ROOT)}")

    code = run_plain(work, unwind_on_sigterm=True)  # SIGTERM while a page is written leaves no temporary file
    return code or (1 if args.check and stale else 0)


if __name__ == "__main__":
    sys.exit(main())
