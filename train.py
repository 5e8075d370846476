"""Hydra entry point: `python train.py [overrides]`, `python train.py -m experiment=ablation_lr`."""

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from fmnist.config import register
from fmnist.errors import FmnistError

register()
log = logging.getLogger("fmnist")


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    from fmnist.training.train import run_job  # after Hydra parsed the command line: `--help` stays fast

    hydra_cfg = HydraConfig.get()
    in_sweep = hydra_cfg.mode == RunMode.MULTIRUN
    if in_sweep:  # parallel launchers: this job's share of the cores, and its GPU
        from fmnist.sweeps.placement import place_job

        cfg = place_job(cfg, hydra_cfg)
    try:
        return run_job(cfg, Path(hydra_cfg.runtime.output_dir), in_sweep=in_sweep,
                       overrides=list(hydra_cfg.overrides.task))
    except FmnistError as e:
        log.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
