"""Hydra entry point: `python evaluate.py ckpt=PATH [data.dir=DIR] [tta=flip]` (see fmnist/inference/evaluate.py)."""

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from fmnist import console
from fmnist.cli import check_given_config, exit_with, run_cli
from fmnist.errors import FmnistError
from fmnist.fsio import remove_if_empty, storage_errors
from fmnist.inference.config import register, training_key_message

register()


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    from fmnist.inference.evaluate import evaluate  # after Hydra parsed the command line: `--help` stays fast

    console.setup()  # one line per message, no third-party notices, as train.py prints

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        check_given_config(cfg)  # `+foo=1`, `${oc.env:CK}` with CK unset: named, before anything is read
        # A full or read-only disk under the evaluation's files: one paragraph, here (an OSError passing out of the task
        # would be told by Hydra's "Error executing job" line first).
        with storage_errors():
            evaluate(cfg, out_dir)
    except BaseException as e:  # refused, SIGTERM or Ctrl-C: the evaluation writes its files only at the end
        remove_if_empty(out_dir)  # Hydra made it for this evaluation: leave nothing behind
        if isinstance(e, FmnistError):
            exit_with(e)
        raise


if __name__ == "__main__":
    # A bad command line exits 2 with one paragraph, as train.py's does; a training key (model=simple) is named as one.
    run_cli(main, unwind_on_sigterm=True, sweeps=False, explain=training_key_message)
