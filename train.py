"""Hydra entry point: `python train.py [overrides]`, `python train.py -m experiment=report`."""

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from fmnist import console
from fmnist.cli import check_given_config, exit_with, run_cli
from fmnist.stops import hangup_as_sigterm
from fmnist.config import superseded_note
from fmnist.data.sources import split_csvs
from fmnist.errors import FmnistError
from fmnist.fsio import drop_held_logs, hold_log_until_kept, write_held_logs
from fmnist.overrides import register

register()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    hydra_cfg = HydraConfig.get()
    hangup_as_sigterm()  # in a launcher's worker process too, which the command's own start (run_cli) is not
    # Hydra appends this job's log lines to its log file from the start: they wait until the checks pass, so that a
    # refused job adds nothing to it (another process may be writing the same log).
    hold_log_until_kept(hydra_cfg.job_logging.handlers.file.filename)
    overrides = OmegaConf.to_container(hydra_cfg.overrides.task)  # as typed: `optim.lr=${oc.env:LR}` unresolved
    in_sweep = hydra_cfg.mode == RunMode.MULTIRUN
    try:  # before importing Lightning takes its seconds: a key that does not exist, no `make data` yet, a bad value
        check_given_config(cfg, required=True)  # `+optim.lrr=1`, `${oc.env:LR}` with LR unset, `~model`
        split_csvs(cfg.data.dir)
        note = superseded_note(hydra_cfg.runtime.choices.get("experiment"))
        if note and not in_sweep:  # a sweep prints it once, before its first job (fmnist.sweeps.start)
            print(note, file=sys.stderr)
        swept = hydra_cfg.sweeper.get("params") or {}
        if swept and not in_sweep:  # an experiment's sweep (its seeds) runs only with -m: said, not dropped silently
            # On stderr, not through the run's log: the run directory is not this command's until its checks pass.
            print(f"warning: this config defines a sweep ({', '.join(f'{k}: {v}' for k, v in swept.items())}) that "
                  f"runs only with -m; without it, one job runs with the values shown by --cfg job (seed={cfg.seed}). "
                  "Add -m to run them all.", file=sys.stderr)
        from fmnist.training.checks import check_config  # torch's import: after the checks that need none

        check_config(cfg)  # as the run's own checks do again (fmnist.training.claim), for callers of train(cfg)
    except FmnistError as e:
        drop_held_logs()  # a launcher's worker process goes on to its next job: nothing of this one's is kept
        exit_with(e)
    from fmnist.training.train import run_job  # after Hydra parsed the command line: `--help` stays fast

    console.setup()  # after Lightning's import, which adds warning filters of its own in front of ours

    # Hydra's own copy of the config (`hydra.output_subdir` is null) is written only once the run's checks pass.
    hydra_files = {"config.yaml": cfg, "hydra.yaml": {"hydra": hydra_cfg}, "overrides.yaml": overrides}
    apart = False
    if in_sweep:  # parallel launchers: this job's share of the cores, and its GPU
        from fmnist.sweeps.placement import place_job, runs_apart

        cfg = place_job(cfg, hydra_cfg)
        apart = runs_apart(hydra_cfg.launcher)
    try:
        result = run_job(cfg, Path(hydra_cfg.runtime.output_dir), in_sweep=in_sweep, overrides=overrides,
                         hydra_files=hydra_files, apart=apart)
        # A sweep's job skipped as finished returns before the checks that keep its log lines (`claimed`): it was
        # not refused, so they are written all the same.
        write_held_logs()
        return result
    except FmnistError as e:
        exit_with(e)
    finally:
        drop_held_logs()  # a job stopped before its checks passed, in a launcher's worker too: its lines go nowhere
        if in_sweep:  # a joblib worker whose sweep process died ends with the job it stopped
            from fmnist.sweeps.placement import exit_if_orphaned

            exit_if_orphaned()


if __name__ == "__main__":
    # SIGTERM before a run's checks pass (a time limit, scancel) puts back what Hydra wrote early, as Ctrl-C does;
    # from then on the run handles it (fmnist.training.signals).
    run_cli(main, unwind_on_sigterm=True)
