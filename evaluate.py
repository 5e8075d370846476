"""Hydra entry point: `python evaluate.py ckpt=PATH [data.dir=DIR] [tta=true]` (see fmnist/inference/evaluate.py)."""

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from fmnist.errors import FmnistError
from fmnist.inference.config import register

register()


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    from fmnist.inference.evaluate import evaluate  # after Hydra parsed the command line: `--help` stays fast

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        evaluate(cfg, out_dir)
    except FmnistError as e:
        print(f"error: {e}", file=sys.stderr)  # (logging goes to stderr too: printed once)
        if out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()  # Hydra made it for this evaluation: leave nothing behind
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
