"""Hydra entry point: `python export.py ckpt=PATH [out=model.onnx]` (see fmnist/inference/export.py)."""

import sys

import hydra
from omegaconf import DictConfig

from fmnist.errors import FmnistError
from fmnist.inference.config import register

register()


@hydra.main(version_base="1.3", config_path="conf", config_name="export")
def main(cfg: DictConfig) -> None:
    from fmnist.inference.export import export  # after Hydra parsed the command line: `--help` stays fast

    try:
        export(cfg)
    except FmnistError as e:
        print(f"error: {e}", file=sys.stderr)  # (logging goes to stderr too: printed once)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
