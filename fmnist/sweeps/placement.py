"""Where a job of a parallel local sweep runs: its share of the CPU cores, and its GPU.

Hydra's joblib launcher runs `n_jobs` jobs at once in worker processes, each of which would
otherwise start one torch thread per core: N jobs x all cores thrash. Each job therefore gets
`cores // n_jobs` threads, and on a machine with G GPUs job i trains on GPU i mod G (instead of
every job taking all GPUs with DDP). Other launchers are left alone: the basic launcher runs one
job at a time, and submitit's jobs get their CPUs and GPUs from the scheduler (SLURM sets
CUDA_VISIBLE_DEVICES and the CPU affinity per job; `cpus_per_task` sets the thread count here).

This runs in the job's own process, before training, from the entry point: it must change the
job's config (`trainer.devices`), which a Hydra callback cannot (it sees a copy).
"""

from __future__ import annotations

import copy
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any, Optional

from omegaconf import DictConfig, open_dict

from fmnist.errors import ConfigError

log = logging.getLogger(__name__)

GPU_ACCELERATORS = ("auto", "gpu", "cuda")


@dataclass(frozen=True)
class Placement:
    threads: Optional[int]  # torch intra-op threads; None: torch's default (all cores)
    device: Optional[int]  # the one GPU index this job uses; None: the config's trainer.devices
    reason: str


def launcher_kind(launcher: DictConfig | dict) -> str:
    """`joblib`, `submitit` or `basic`: which of Hydra's launchers `launcher` (hydra.launcher) configures."""
    target = str(launcher.get("_target_", ""))
    return "joblib" if target.endswith("JoblibLauncher") else "submitit" if "submitit" in target else "basic"


def concurrent_jobs(launcher: DictConfig | dict, cores: int) -> int:
    """How many jobs the launcher runs at once on this machine (1 for sequential launchers)."""
    if launcher_kind(launcher) == "joblib":
        n = int(launcher.get("n_jobs") or 1)
        # joblib's convention: -1 is all cores, -2 all but one, ...
        return max(1, cores + 1 + n if n < 0 else n)
    return 1


def check_launcher(launcher: DictConfig | dict) -> None:
    """ConfigError for a joblib launcher told to run no job at once (`n_jobs=0`, which joblib refuses only after
    the sweep's directory is made)."""
    if launcher_kind(launcher) == "joblib" and launcher.get("n_jobs") == 0:
        raise ConfigError("hydra.launcher.n_jobs=0 runs no job; expected how many jobs run at once: 1 or more, or -1 "
                          "for as many as the cores (joblib's convention: -2 all but one, ...). No job of the sweep "
                          "was started.")


def runs_apart(launcher: DictConfig | dict) -> bool:
    """Whether the launcher runs each job as a job of its own (submitit: a SLURM job, or a local process
    it watches), whose result the sweep's process collects: then a signal that stops a job (`scancel`, its
    time limit) is that job's outcome alone. A joblib worker is not: a signal to it stops the sweep, or
    finds it gone (`stop_when_orphaned`), and the worker must end with its job."""
    return launcher_kind(launcher) == "submitit"


def plan(launcher: DictConfig | dict, job_num: int, cores: int, gpus: int, accelerator: str,
         devices: Any) -> Placement:
    """The placement of job `job_num` of a sweep run by `launcher`, on `cores` CPU cores and `gpus` GPUs."""
    if launcher_kind(launcher) == "submitit":
        cpus = launcher.get("cpus_per_task")
        return Placement(int(cpus) if cpus else None, None, f"submitit: {cpus or 'default'} cpus per task")
    n = concurrent_jobs(launcher, cores)
    if n == 1:
        return Placement(None, None, "one job at a time")
    threads = max(1, cores // n)
    # Only an unpinned job moves: `trainer.devices=[2]` or `trainer=ddp` stay what the user asked for.
    device = job_num % gpus if gpus and str(accelerator) in GPU_ACCELERATORS and devices == "auto" else None
    where = f", GPU {device} of {gpus}" if device is not None else ""
    # On GPUs more jobs than cores can pay (the GPU does the work); on a CPU they only take turns on the cores.
    crowded = (f" (hydra.launcher.n_jobs allows more jobs at once than cores: on a CPU, jobs past {cores} take turns "
               "on them and add no compute)"
               if n > cores and not (gpus and str(accelerator) in GPU_ACCELERATORS) else "")
    return Placement(threads, device, f"up to {n} jobs at once on {cores} cores: {threads} torch thread"
                                      f"{'s' if threads > 1 else ''} each{where}{crowded}")


def place_job(cfg: DictConfig, hydra_cfg: DictConfig) -> DictConfig:
    """Apply this job's placement: set torch's thread count, and pin the job to its GPU in `cfg`."""
    import torch

    from fmnist.hardware import usable_cores  # here: hardware imports torch, which `python -m fmnist.results` needs not

    cores = usable_cores()
    gpus = torch.cuda.device_count()  # counts without initialising CUDA
    placement = plan(hydra_cfg.launcher, int(hydra_cfg.job.get("num") or 0), cores, gpus,
                     cfg.trainer.accelerator, cfg.trainer.devices)
    if placement.threads is not None:
        torch.set_num_threads(placement.threads)
    if placement.device is not None:
        cfg = copy.deepcopy(cfg)
        with open_dict(cfg):
            cfg.trainer.devices = [placement.device]
    log.info("placement: %s (torch threads: %d)", placement.reason, torch.get_num_threads())
    if launcher_kind(hydra_cfg.launcher) == "joblib":
        stop_when_orphaned()
    return cfg


ORPHAN_CHECK_S = 1.0  # how often a joblib worker checks that the sweep process that started it still runs


_orphaned = threading.Event()


def exit_if_orphaned() -> None:
    """End this worker process once its job has stopped because the sweep's process is gone: an idle
    orphan would otherwise stay, holding its memory, with no sweep to give it work."""
    if _orphaned.is_set():
        logging.shutdown()
        os._exit(128 + signal.SIGTERM)


def stop_when_orphaned() -> None:
    """In a joblib worker: if the sweep's process dies (SIGKILL, a lost terminal), stop this job as SIGTERM does
    (recorded `interrupted`, resumable by the same sweep command) instead of training on as an orphan."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(ORPHAN_CHECK_S)
        log.warning("the sweep process %d is gone: stopping this job as SIGTERM would", parent)
        _orphaned.set()
        os.kill(os.getpid(), signal.SIGTERM)

    if not any(t.name == "fmnist-orphan-watch" for t in threading.enumerate()):  # one per worker process
        threading.Thread(target=watch, name="fmnist-orphan-watch", daemon=True).start()
