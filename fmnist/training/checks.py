"""The checks of a composed training config, without Lightning: a sweep's start checks every job with them, and
`gpu_check.py --dry-run` every command, before any job trains or Lightning's seconds of import are spent."""

from __future__ import annotations

import importlib.util

from omegaconf import DictConfig

from fmnist.config import TRACKERS, check_values
from fmnist.errors import ConfigError
from fmnist.models import check_model

# What W&B accepts as a project's name (wandb.Settings refuses others once the run starts, and the run would go on
# without the tracker).
WANDB_PROJECT_MAX = 128  # characters
WANDB_PROJECT_FORBIDDEN = "/\\#?%:"


def check_config(cfg: DictConfig, trackers: bool = True) -> None:
    """ConfigError naming the key for a composed training config whose values make no sense: the model's keys
    against its architecture, then every other key's range, then (with `trackers`) the trackers."""
    check_model(cfg.model)
    check_values(cfg)
    if trackers:
        check_trackers(cfg)


def check_trackers(cfg: DictConfig) -> None:
    """ConfigError for a tracker this project does not know, named twice, or whose package is not installed."""
    repeated = sorted({name for name in cfg.logger.backends if list(cfg.logger.backends).count(name) > 1})
    if repeated:  # each would log every value twice
        raise ConfigError(f"config key logger.backends must be a list naming each tracker once; got {repeated[0]!r} more than once.")
    for name in cfg.logger.backends:
        if name not in TRACKERS:
            raise ConfigError(f"config key logger.backends must list trackers among {tuple(TRACKERS)}; got {name!r}.")
        _, package = TRACKERS[name]
        if package and importlib.util.find_spec(package) is None:
            raise ConfigError(f"logger.backends includes {name}, whose package `{package}` is not installed here: "
                              f"`pip install -e '.[{package}]'` (make install installs it), or leave {name} out.")
    if cfg.logger.wandb_mode not in ("offline", "online"):
        raise ConfigError(f"config key logger.wandb_mode must be offline or online; got {cfg.logger.wandb_mode!r}.")
    project = cfg.logger.wandb_project
    if not isinstance(project, str) or not project.strip() or len(project) > WANDB_PROJECT_MAX \
            or set(project) & set(WANDB_PROJECT_FORBIDDEN):
        raise ConfigError(f"config key logger.wandb_project must be a W&B project's name: not empty, at most "
                          f"{WANDB_PROJECT_MAX} characters, none of {' '.join(WANDB_PROJECT_FORBIDDEN)}; got {project!r}.")
    uri = cfg.logger.mlflow_tracking_uri
    if uri is not None and not str(uri).strip():  # an unset shell variable: MLflow would read it as ./mlruns
        raise ConfigError("config key logger.mlflow_tracking_uri is empty (an unset shell variable?); give a tracking "
                          "server's or store's URI, or leave it out (null) for the local store outputs/mlflow.db.")
