"""`trainer.precision=auto`: the precision this machine runs the run's model fastest in, with the evidence.

bf16 autocast is only fast where the hardware has native bf16 arithmetic: on a CPU without it
(AVX2-only x86, most laptops) a bf16 step is an order of magnitude slower than fp32. So `auto`
resolves, before the Trainer is built, to:
- CUDA: `bf16-mixed` where the GPU supports bf16, else `16-mixed`;
- MPS: `32-true` (not measured here; Lightning's mixed precision on MPS is not a known win);
- CPU: `32-true` without native bf16 (no probe at all); with it, a short probe of the run's own
  model in both precisions decides, and the verdict is cached per (CPU model, torch, model).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Callable

import torch

from fmnist import hardware
from fmnist.fsio import atomic_write
from fmnist.models import build_model

log = logging.getLogger(__name__)

# bf16 must beat fp32 by this factor in the probe to be chosen: a tie is not worth bf16's rounding.
BF16_MIN_SPEEDUP = 1.1


def probe_cpu_bf16(model: dict, batch_size: int = 16, steps: int = 3, budget_s: float = 2.0) -> dict:
    """Milliseconds per training step (forward + backward) of `model` in fp32 and in bf16 autocast.

    `model`: the `model` config, plus `channels_last` (how the run lays out its tensors).

    One warm-up step each, then up to `steps` alternating timed steps; stops early when the
    budget is spent, so a slow machine still answers in about `budget_s` seconds.
    """
    net = build_model(**{k: v for k, v in model.items() if k != "channels_last"}).train()
    x = torch.rand(batch_size, 1, 28, 28)
    if model.get("channels_last"):
        net, x = net.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch_size,))

    def step(bf16: bool) -> float:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(net(x).float(), y)
        loss.backward()
        net.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    deadline = time.perf_counter() + budget_s
    step(False), step(True)  # warm-ups: the first calls allocate and choose kernels
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(steps):
        for bf16 in (False, True):
            times[bf16].append(step(bf16))
        if time.perf_counter() > deadline:
            break
    return {"fp32_ms": round(1000 * min(times[False]), 2), "bf16_ms": round(1000 * min(times[True]), 2),
            "batch_size": batch_size}


def _cache_file() -> Path:
    root = os.environ.get("FMNIST_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fmnist"
    return Path(root) / "precision.json"


def _cached_probe(model: dict, probe: Callable[[dict], dict]) -> dict:
    """The probe's result for this (CPU model and ISA, torch version, architecture), measured once per machine.

    The ISA is part of the key because VMs of different CPU generations can report the same model name.
    """
    arch = {k: v for k, v in sorted(model.items()) if k not in ("dropout", "compile")}
    machine = f"{hardware.cpu_model()} ({' '.join(hardware.cpu_isa())})"
    key = f"{machine} | torch {torch.__version__} | {json.dumps(arch, sort_keys=True)}"
    path = _cache_file()
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return {**cache[key], "cached": True}
    result = probe(model)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps({**cache, key: result}, indent=1))
    except OSError as e:  # a read-only home only costs a probe per run
        log.debug("precision cache not written: %s", e)
    return {**result, "cached": False}


def resolve_precision(requested, accelerator: str, model: dict,
                      probe: Callable[[dict], dict] | None = None) -> tuple[str, dict]:
    """The Lightning precision to use, and the evidence for it (recorded in metrics.json).

    An explicit `requested` value always wins; `auto` is decided by the hardware as the module
    docstring says. `probe` times the model in both precisions (default: `probe_cpu_bf16`).
    """
    if str(requested) != "auto":
        return str(requested), {"requested": str(requested), "resolved": str(requested), "reason": "set explicitly"}
    kind = hardware.device_kind(accelerator)
    evidence: dict = {"requested": "auto", "device": kind}
    if kind == "cuda":
        bf16 = torch.cuda.is_bf16_supported()
        precision = "bf16-mixed" if bf16 else "16-mixed"
        reason = f"{hardware.gpu_name()} {'supports' if bf16 else 'lacks'} bf16"
    elif kind == "mps":
        precision, reason = "32-true", "Apple GPU: fp32 (mixed precision there is unmeasured)"
    elif not hardware.native_cpu_bf16():
        precision, reason = "32-true", "no native bf16 on this CPU (emulated bf16 is an order of magnitude slower)"
    else:
        timings = _cached_probe(model, probe or probe_cpu_bf16)
        evidence["probe"] = timings
        speedup = timings["fp32_ms"] / max(timings["bf16_ms"], 1e-9)
        precision = "bf16-mixed" if speedup >= BF16_MIN_SPEEDUP else "32-true"
        reason = (f"bf16 {speedup:.2f}x faster" if speedup >= 1 else f"bf16 {1 / speedup:.1f}x slower") + \
            f" than fp32 on this CPU ({'cached probe' if timings['cached'] else 'probe'}: " \
            f"{timings['bf16_ms']} vs {timings['fp32_ms']} ms per step)"
    evidence.update(resolved=precision, reason=reason)
    where = hardware.gpu_name() if kind == "cuda" else \
        f"{hardware.cpu_model()}, {' '.join(hardware.cpu_isa()) or 'unknown ISA'}"
    log.info("precision auto -> %s: %s (%s)", precision, reason, where)
    return precision, evidence
