"""Hydra entry point: `python evaluate.py ckpt=PATH [data.dir=DIR] [tta=true]` (see fmnist/inference/evaluate.py)."""

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from fmnist.errors import FmnistError
from fmnist.inference.config import register

register()
log = logging.getLogger("fmnist")


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    from fmnist.inference.evaluate import evaluate  # after Hydra parsed the command line: `--help` stays fast

    try:
        evaluate(cfg, Path(HydraConfig.get().runtime.output_dir))
    except FmnistError as e:
        log.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
