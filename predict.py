"""Hydra entry point: `python predict.py ckpt=PATH inputs=[...] [top_k=3] [out=FILE]` (see fmnist/inference/predict.py)."""


import hydra
from omegaconf import DictConfig

from fmnist import console
from fmnist.cli import check_given_config, exit_with, run_cli
from fmnist.errors import FmnistError
from fmnist.inference.config import register, training_key_message

register()


@hydra.main(version_base="1.3", config_path="conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    from fmnist.inference.predict import predict  # after Hydra parsed the command line: `--help` stays fast

    console.setup()  # one line per message, no third-party notices, as train.py prints

    try:
        check_given_config(cfg)  # `+foo=1`, `${oc.env:CK}` with CK unset: named, before anything is read
        predict(cfg)
    except FmnistError as e:
        exit_with(e)


if __name__ == "__main__":
    # A bad command line exits 2 with one paragraph, as train.py's does; a training key (model=simple) is named as one.
    run_cli(main, unwind_on_sigterm=True, sweeps=False, explain=training_key_message)
