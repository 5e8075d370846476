"""A Hydra callback that proves two sweep jobs ran at the same time, whatever the machine's load.

Each job, as it starts, registers its process id in `directory` and waits until `parties` distinct
processes have registered (or `patience_s` passes), then writes `outcome-<pid>-<job>` saying `met` or
`alone`. A job can only see `met` if another process registered while it was still inside its own
job: the overlap is shown by the wait itself, not by comparing clocks. A sequential launcher runs
every job in one process, so it can never meet anyone.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from hydra.experimental.callback import Callback


class Rendezvous(Callback):
    def __init__(self, directory: str, parties: int = 2, patience_s: float = 240.0) -> None:
        self.directory = Path(directory)
        self.parties = parties
        self.patience_s = patience_s

    def on_job_start(self, config, **kwargs) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / f"arrived-{os.getpid()}").touch()
        deadline = time.monotonic() + self.patience_s
        while len(list(self.directory.glob("arrived-*"))) < self.parties and time.monotonic() < deadline:
            time.sleep(0.05)
        met = len(list(self.directory.glob("arrived-*"))) >= self.parties
        (self.directory / f"outcome-{os.getpid()}-{config.hydra.job.num}").write_text("met" if met else "alone")
