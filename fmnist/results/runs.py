"""A run directory's record: `metrics.json` (status and final metrics) and provenance.

Statuses: `running`, `completed`, `failed`, `diverged`, `interrupted`. Sweeps skip `completed`,
`failed` and `diverged` jobs when started again, and resume the others from `checkpoints/last.ckpt`.
"""

from __future__ import annotations

import json
import platform
import subprocess
from importlib import metadata
from pathlib import Path

from fmnist.fsio import atomic_write
from fmnist.hardware import describe

METRICS_FILE = "metrics.json"
FINISHED = ("completed", "failed", "diverged")
PACKAGES = ("torch", "lightning", "torchmetrics", "hydra-core", "omegaconf", "numpy")


def read_record(run_dir: Path) -> dict | None:
    """The run's metrics.json, or None if it has none (or it is unreadable)."""
    try:
        return json.loads((Path(run_dir) / METRICS_FILE).read_text())
    except (OSError, ValueError):
        return None


def write_record(run_dir: Path, record: dict) -> None:
    """Write metrics.json atomically: a reader never sees half a file."""
    atomic_write(Path(run_dir) / METRICS_FILE, json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")


def update_record(run_dir: Path, drop: tuple[str, ...] = (), **fields) -> dict:
    """Merge `fields` into metrics.json, removing the keys in `drop` (e.g. a resumed run's old `error`)."""
    record = {k: v for k, v in (read_record(run_dir) or {}).items() if k not in drop}
    record.update(fields)
    write_record(run_dir, record)
    return record


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
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {"git_commit": git_commit(), "versions": versions, "python": platform.python_version(),
            "hardware": describe()}
