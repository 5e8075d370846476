"""Put fashion-mnist_train.csv and fashion-mnist_test.csv into a data directory (`make data`)."""

import argparse
import logging
import sys
from pathlib import Path

from fmnist.cli import run_plain
from fmnist.config import DataConfig
from fmnist.fsio import path_argument
from fmnist.data.sources import obtain


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", type=path_argument, default=Path(DataConfig.dir),
                        help="where the CSVs go (default: %(default)s)")
    parser.add_argument("--idx-dir", type=path_argument, help="a directory holding Zalando's IDX files to convert")
    parser.add_argument("--no-install", action="store_true", help="never run apt-get")
    parser.add_argument("--no-download", action="store_true", help="never download")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return run_plain(lambda: print(obtain(args.data_dir, args.idx_dir, not args.no_install, not args.no_download)),
                      unwind_on_sigterm=True)


if __name__ == "__main__":
    sys.exit(main())
