"""One owner per run directory: an exclusive lock held for as long as a run may write there.

The lock is `flock` on the directory itself: no lock file is written (a refused command leaves the
directory byte-identical), and the OS releases it when the owner exits, even by SIGKILL, so a
killed run never leaves its directory locked.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

from fmnist.cli import OTHER_RUN_DIR
from fmnist.errors import ConfigError
from fmnist.fsio import exclusive_lock, storage_errors


class RunDirInUse(ConfigError):
    """The run directory belongs to another run: nothing may be written there."""


def holder_pid(path: Path) -> int | None:
    """The process holding a flock on `path`, from /proc/locks (Linux); None where unknown."""
    st = os.stat(path)
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if "FLOCK" in fields and "->" not in fields and len(fields) >= 6 and fields[5] == inode:
            return int(fields[4])
    return None


@contextmanager
def own_run_dir(run_dir: Path, elsewhere: str = OTHER_RUN_DIR):
    """Create `run_dir` if needed and hold its lock for the block; RunDirInUse if another process holds it.
    `elsewhere`: the keys that choose another directory, for the message."""
    run_dir = Path(run_dir)
    with storage_errors():
        run_dir.mkdir(parents=True, exist_ok=True)

    def refuse() -> None:
        pid = holder_pid(run_dir)
        holder = f"process {pid}" if pid else "another process"
        raise RunDirInUse(f"{run_dir} is in use by {holder}, which is running in it now; nothing was written. "
                          f"Wait for that run to end (or stop it), or choose another directory ({elsewhere}).")

    with exclusive_lock(run_dir, when_busy=refuse):
        yield run_dir
