"""Hydra entry point: `python predict.py ckpt=PATH inputs=[...] [top_k=3] [out=FILE]` (see fmnist/inference/predict.py)."""

import sys

import hydra
from omegaconf import DictConfig

from fmnist.errors import FmnistError
from fmnist.inference.config import register

register()


@hydra.main(version_base="1.3", config_path="conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    from fmnist.inference.predict import predict  # after Hydra parsed the command line: `--help` stays fast

    try:
        predict(cfg)
    except FmnistError as e:
        print(f"error: {e}", file=sys.stderr)  # (logging goes to stderr too: printed once)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
