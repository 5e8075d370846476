"""What this machine is: CPU model and speed-relevant flags, cores, GPU; which accelerators it has.

Every record of a run names its hardware from here (`describe`); the precision `auto` chooses
from it is decided in fmnist/training/precision.py. The checks of a run's devices and nodes against the machine
(`check_accelerator`, `check_nodes`) are here too, and `memory_errors`, which turns running out of CPU or GPU
memory into one paragraph (`OutOfMemory`) with what to lower.
"""

from __future__ import annotations

import os
import platform
import re
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from fmnist.errors import ConfigError, OutOfMemory

# CPU flags that decide speed here: vector width and native bf16 (x86); `bf16` is Arm's.
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "bf16")
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    fields: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return fields
    for line in text.split("\n\n")[0].splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


def cpu_model() -> str:
    """The CPU's model name, e.g. 'Intel(R) Xeon(R) Processor'."""
    info = _cpuinfo()
    return info.get("model name") or info.get("Model") or platform.processor() or platform.machine()


def cpu_isa() -> list[str]:
    """The speed-relevant instruction-set flags this CPU reports, e.g. ['avx2', 'avx512f', 'avx512_bf16']."""
    info = _cpuinfo()
    flags = set((info.get("flags") or info.get("Features") or "").split())
    return [f for f in ISA_FLAGS if f in flags]


def native_cpu_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX-512 BF16, AMX or Arm's BF16): without
    it bf16 is emulated, and slow."""
    return any(f in cpu_isa() for f in NATIVE_BF16_FLAGS)


def gpu_name() -> str | None:
    """The first CUDA GPU's name; None without one."""
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def describe() -> dict:
    """The hardware a number was measured on: CPU model and ISA, cores, torch threads, GPU."""
    return {"cpu": cpu_model(), "isa": " ".join(cpu_isa()) or "unknown", "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "gpu": gpu_name(), "torch": torch.__version__}


def describe_line(hw: dict | None = None) -> str:
    """`describe()` (or `hw`) as one line, as every measured number is labelled with it."""
    hw = hw or describe()
    line = f"{hw['cpu']} ({hw['isa']}), {hw['cores']} cores, {hw['torch_threads']} torch threads"
    return line + (f", GPU {hw['gpu']}" if hw["gpu"] else ", no GPU") + f", torch {hw['torch']}"


def usable_cores() -> int:
    """The CPU cores this process may use: its affinity and its cgroup's quota (a container's `--cpus`), as joblib
    counts them."""
    import joblib

    return joblib.cpu_count()


def check_accelerator(accelerator: str, devices: Any = "auto", precision: Any = "auto") -> None:
    """ConfigError if this machine lacks `accelerator`, or `devices` of it (Lightning would fail later with a
    traceback), or if it would run another `precision` than the one asked for. `devices` is already well-formed
    (`fmnist.config.check_values`)."""
    has = {"gpu": torch.cuda.is_available, "cuda": torch.cuda.is_available, "mps": torch.backends.mps.is_available}
    if not has.get(accelerator, lambda: True)():
        raise ConfigError(f"config key trainer.accelerator must be one this machine has; got {accelerator!r}, but "
                          "torch finds no such device here. Use trainer.accelerator=auto (or cpu).")
    count = int(devices) if isinstance(devices, str) and devices.strip().isdigit() else devices  # "2", as Lightning reads it
    if device_kind(accelerator) == "cpu" and devices != "auto" and not (isinstance(count, int) and count >= 1):
        raise ConfigError(f"config key trainer.devices must be `auto` or a number of processes (at least 1) on a CPU; "
                          f"got {devices!r}, device indices or -1, which only GPUs take.")
    # Not where a launcher started the processes itself (srun's tasks, torchrun): each may be pinned to its own cores.
    launched = "LOCAL_RANK" in os.environ or (os.environ.get("SLURM_NTASKS") or "1") not in ("", "1")
    if device_kind(accelerator) == "cpu" and isinstance(count, int) and not launched \
            and count > (cores := usable_cores()):  # they started, then stalled
        raise ConfigError(f"config key trainer.devices={count} starts {count} training processes on the CPU, more than "
                          f"the {cores} core(s) this process may use: each waits for the others at every step, and "
                          f"they start slowly, each with its own copy of torch and the data. Use trainer.devices={cores} "
                          "or fewer (auto: one process).")
    if device_kind(accelerator) == "cpu" and str(precision) == "16-mixed":  # the run would record one and run the other
        raise ConfigError("config key trainer.precision must be one a CPU runs as asked; got '16-mixed', which Lightning "
                          "replaces with bf16-mixed on a CPU (fp16 autocast is for GPUs). Use bf16-mixed, 32-true or auto.")


def devices_used(accelerator: str, devices: Any) -> int | None:
    """How many devices Lightning gives a run here, as it reads `devices` (already well-formed:
    `fmnist.config.check_values`); None where this machine cannot tell (-1 without a GPU)."""
    if isinstance(devices, Sequence) and not isinstance(devices, str):  # device indices: [0, 1] (a list, a ListConfig)
        return len(devices)
    text = str(devices).strip()
    if "," in text:  # device indices as a string: "0,1", "0,"
        return len([index for index in text.split(",") if index.strip()])
    if text in ("auto", "-1"):
        if device_kind(accelerator) == "cpu":
            return 1 if text == "auto" else None
        return torch.cuda.device_count() or None
    return int(text) if text.isdigit() else None


# What a multi-node launcher sets in each process (SLURM, torchrun, Lightning's own NODE_RANK, LSF, MPI).
NODE_RANK_VARIABLES = ("SLURM_NODEID", "TORCHELASTIC_RUN_ID", "NODE_RANK", "LSB_JOBID", "OMPI_COMM_WORLD_RANK", "PMI_RANK")


def check_nodes(num_nodes: int) -> None:
    """ConfigError for several nodes without a multi-node launcher: the run would wait forever for the others."""
    if num_nodes > 1 and not any(name in os.environ for name in NODE_RANK_VARIABLES):
        raise ConfigError(f"config key trainer.num_nodes must be 1 outside a multi-node launch; got {num_nodes}, but "
                          f"no launcher set a node rank here ({', '.join(NODE_RANK_VARIABLES)}), so the run would wait "
                          "for nodes that never join. Launch it through SLURM (hydra/launcher=slurm, "
                          "docs/scaling.md) or torchrun.")


def device_kind(accelerator: str) -> str:
    """`cuda`, `mps` or `cpu`: what Lightning's `accelerator` setting will run on here."""
    accelerator = str(accelerator).lower()
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    if accelerator == "mps" or (accelerator == "auto" and mps is not None and mps.is_available()):
        return "mps"
    return "cpu"


# Out-of-memory errors that torch raises as a plain RuntimeError, not as OutOfMemoryError: Apple's GPU allocator
# ("MPS backend out of memory (...). Tried to allocate 9.19 MiB on private pool."), and a CUDA call that allocates
# outside torch's caching allocator (a cuBLAS handle, the context: "CUDA error: out of memory").
GPU_OUT_OF_MEMORY = ("MPS backend out of memory", "CUDA error: out of memory")
# onnxruntime's refusal (its own exception class, `Fail`, not a RuntimeError), in bytes: "... BFCArena::
# AllocateRawInternal(...) Failed to allocate memory for requested buffer of size 6021120000"
ONNXRUNTIME_OUT_OF_MEMORY = "Failed to allocate memory for requested buffer of size"


def _memory_refused(error: BaseException) -> tuple[str, str] | None:
    """Which memory ran out ("the GPU", "this machine") and the size of the allocation that failed ("5.14 GiB"; ""
    where `error` does not say), if `error` is running out of memory: CUDA's OutOfMemoryError, the MPS or CUDA
    refusals above, the CPU allocator's refusal, numpy's MemoryError, onnxruntime's; None for any other error."""
    text = str(error)
    gpu = isinstance(error, torch.OutOfMemoryError) or (isinstance(error, RuntimeError)
                                                        and any(words in text for words in GPU_OUT_OF_MEMORY))
    if gpu or isinstance(error, MemoryError):
        # numpy writes a size of three digits with a point and no decimals: "Unable to allocate 931. GiB"
        found = re.search(r"(?:Tried|Unable) to allocate (\d+(?:\.\d+)?)\.? ([KMGTPE]?i?B)\b", text)
        return "the GPU" if gpu else "this machine", f"{found.group(1)} {found.group(2)}" if found else ""
    if isinstance(error, RuntimeError) and "can't allocate memory" in text:  # torch's CPU allocator, in bytes
        found = re.search(r"allocate (\d+) bytes", text)
    elif type(error).__module__.startswith("onnxruntime") and ONNXRUNTIME_OUT_OF_MEMORY in text:
        found = re.search(rf"{ONNXRUNTIME_OUT_OF_MEMORY} (\d+)", text)
    else:
        return None
    if not found:
        return "this machine", ""
    size, unit = float(found.group(1)), "bytes"
    for larger in ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        if size < 1024:
            break
        size, unit = size / 1024, larger
    return "this machine", f"{size:.2f} {unit}"


@contextmanager
def memory_errors(advice: str):
    """Turn running out of memory into an OutOfMemory: one paragraph with the allocation that failed and `advice`,
    the setting to lower ("lower data.batch_size (256)"), instead of torch's traceback. (Where the kernel kills the
    process for memory instead, exit 137, nothing in the process can say so: docs/troubleshooting.md does.)"""
    try:
        yield
    except Exception as e:  # onnxruntime's refusal is not a RuntimeError
        refused = _memory_refused(e)
        if refused is None:
            raise
        where, size = refused
        raise OutOfMemory(f"{where} ran out of memory{f' (an allocation of {size} failed)' if size else ''}: "
                          f"{advice}.") from e
