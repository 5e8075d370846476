"""Who ran a run, and whether its process still runs: the provenance a run record keeps (commit, package
versions, machine, scheduler job) and the identity of its process (machine, boot, pid namespace, pid), by which a
`running` record whose process ended is told apart from one still running (`process_gone`)."""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

PACKAGES = ("torch", "lightning", "torchmetrics", "hydra-core", "omegaconf", "numpy")  # their versions, in a record


def git_commit() -> str | None:
    """The checkout's commit, with `-dirty` when it has uncommitted changes; None outside git."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=here, capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def provenance() -> dict:
    """What produced a run: commit, package versions, machine."""
    # Here, not at the top: fmnist.hardware imports torch, and the entry points import fmnist.runs (and so this
    # module) for its file names before their Ctrl-C handling starts.
    from fmnist.hardware import describe

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {"git_commit": git_commit(), "versions": versions, "python": platform.python_version(),
            "hardware": describe(), **this_process(), "scheduler": scheduler_job()}


# The environment variables a batch scheduler sets for a job, by the name the record gives them.
SCHEDULER_VARIABLES = {"slurm_job_id": "SLURM_JOB_ID", "slurm_array_job_id": "SLURM_ARRAY_JOB_ID",
                       "slurm_array_task_id": "SLURM_ARRAY_TASK_ID", "slurm_partition": "SLURM_JOB_PARTITION",
                       "slurm_restart_count": "SLURM_RESTART_COUNT"}


def scheduler_job() -> dict | None:
    """The batch scheduler's job this process runs in (SLURM's ids, partition, requeues); None outside one."""
    job = {name: os.environ[var] for name, var in SCHEDULER_VARIABLES.items() if var in os.environ}
    return job or None


def process_alive(pid) -> bool:
    """Whether process `pid` (of this machine) is running; False for no pid."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def pid_namespace() -> int | None:
    """The inode of this process's pid namespace: containers that share a machine's name (`--network host`) each
    number their processes apart, so a pid means a process only within one namespace. None where /proc has none."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def _read_first_line(path: str) -> str | None:
    """The first line of a small system file, or None where the system has none."""
    try:
        with open(path, "rb") as f:
            return f.readline().decode(errors="replace").strip() or None
    except OSError:
        return None


def boot_id() -> str | None:
    """The running kernel's boot id: another on every start of the machine (and on every other machine)."""
    return _read_first_line("/proc/sys/kernel/random/boot_id")


def boot_time() -> float | None:
    """When the running kernel started, in seconds since the epoch (`btime` in /proc/stat), or None."""
    try:
        with open("/proc/stat", "rb") as f:
            return next(float(line.split()[1]) for line in f if line.startswith(b"btime "))
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def machine_id() -> str | None:
    """This machine as its id (systemd's /etc/machine-id, or D-Bus's copy) names it across restarts, hashed with this
    project's name, as machine-id(5) asks of an id written where others may read it (a run record shipped with its
    results); None where the machine has no id. Copies of one image may share it: see `process_gone`."""
    raw = _read_first_line("/etc/machine-id") or _read_first_line("/var/lib/dbus/machine-id")
    if raw is None or raw == "uninitialized":  # an image's placeholder, until systemd writes the id at first boot
        return None
    return hashlib.sha256(f"fmnist:{raw}".encode()).hexdigest()[:32]


def this_process() -> dict:
    """This process as `process_gone` later recognises it: its machine's name and id, the boot it runs in, its pid
    and pid namespace, and when it was seen running (now)."""
    return {"host": platform.node(), "pid": os.getpid(), "pid_namespace": pid_namespace(), "boot_id": boot_id(),
            "machine_id": machine_id(), "seen_at": now()}


def _before_this_boot(seen_at) -> bool:
    """Whether the time `seen_at` (ISO 8601, as `now` writes it) is before this machine's running kernel started."""
    started = boot_time()
    try:
        return started is not None and datetime.fromisoformat(seen_at).timestamp() < started
    except (TypeError, ValueError):
        return False


def process_gone(record: dict) -> bool:
    """Whether the process that wrote `record` (its fields from `this_process`) ran on this machine and has ended.

    A record of another boot (its boot id) is of this machine before a restart, or of another machine of the same
    name: copies of one image may share their machine id too. It is judged gone only if its machine id is this
    machine's and its process was seen running before this boot began; whatever runs under its pid now is another
    process. A record of this boot is judged by its pid, if it ran in this pid namespace. A record of another machine
    or container, or without its process, is never judged gone: it may still run (so on a machine without a machine id
    a process ended by a restart is never judged gone). A record without a boot id or pid namespace (written before
    they were kept) is judged without them."""
    if record.get("host") != platform.node() or not isinstance(record.get("pid"), int):
        return False
    recorded_boot, this_boot = record.get("boot_id"), boot_id()
    if isinstance(recorded_boot, str) and this_boot and recorded_boot.strip().lower() != this_boot.lower():
        recorded_machine = record.get("machine_id")
        return isinstance(recorded_machine, str) and recorded_machine == machine_id() \
            and _before_this_boot(record.get("seen_at"))
    here = pid_namespace()
    return record.get("pid_namespace", here) == here and not process_alive(record["pid"])


def now() -> str:
    """The time a record states: UTC, ISO 8601, to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
