"""`trainer.precision=auto`: the precision this machine trains the run's model fastest in, with the evidence.

bf16 is only fast where the hardware has native bf16 arithmetic: on a CPU without it (AVX2-only x86,
most laptops) a bf16 step is an order of magnitude slower than fp32, and on a GPU a model this small
can be launch-bound, so that bf16-mixed's casts cost more than they save. So `auto` resolves, before
the Trainer is built, to:
- CPU without native bf16: `32-true`, with no measurement;
- MPS: `32-true` (not measured here; Lightning's mixed precision on MPS is not a known win);
- CPU with native bf16, and CUDA: a probe of the run's own model at its batch size decides between
  fp32 (TF32 matmuls on CUDA) and bf16-mixed.

The probe times both precisions in interleaved rounds, so that a burst of other work slows both
alike, and keeps the per-round speedups. Its verdict is *clear* when at least all but one round
fall on the same side of `BF16_MIN_SPEEDUP`; only a clear verdict measured on a quiet machine (other
processes took at most `BUSY_SHARE` of the CPU time while it ran) is cached, per (device,
torch, architecture, batch size). Anything else decides this run only, conservatively (fp32 unless
bf16 is clearly faster), and the next run measures again. A run too short to repay a probe (fewer
than `PROBE_MIN_STEPS` training steps) takes a cached verdict, or fp32. `python -m fmnist.training.precision
show|measure|clear` shows, re-measures or clears the cached verdicts. A file there that is not a verdicts
file, or a link to nothing (an unmounted share), is never rewritten or removed: runs decide without it. A link to a
verdicts file elsewhere (a cache shared by several users or machines) is written through, and stays a link.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple

if __name__ == "__main__":  # the command: here, as torch's import fails in a deleted directory with oneMKL's error
    from fmnist.cli import exit_if_no_working_directory

    exit_if_no_working_directory()

import torch
from omegaconf import OmegaConf

from fmnist import IMAGE_SIDE, NUM_CLASSES, hardware
from fmnist.errors import ConfigError
from fmnist.fsio import atomic_write, check_folder_can_hold, exclusive_lock, not_a_file, storage_errors
from fmnist.models import INIT_ONLY_KEYS, build_model

log = logging.getLogger(__name__)

BF16 = "bf16-mixed"
FP32 = "32-true"
# bf16 must beat fp32 by this factor to be chosen: a tie is not worth bf16's rounding.
BF16_MIN_SPEEDUP = 1.1
PROBE_ROUNDS = 5  # interleaved rounds; a verdict is clear when all of them but at most one agree
STEPS_PER_ROUND = 2  # timed steps of each precision per round (their median is the round's time)
PROBE_BUDGET_S = 4.0  # a slow machine stops after this many seconds with the rounds it has (at least 3)
# The share of the machine's CPU time that other processes took during the probe above which the
# machine counts as busy, and a verdict measured there is not cached: contention can reverse a small speedup.
BUSY_SHARE = 0.25
# A run of fewer training steps than this is not worth a probe's seconds (a smoke run, a test): it takes a
# cached verdict where there is one, else fp32.
PROBE_MIN_STEPS = 200
CACHE_VERSION = 2  # entries of another version (single timings that could be noise) are measured again


def _step_timer(model: dict, batch_size: int, device: str) -> Callable[[bool], float]:
    """A function that times one training step (forward, backward) of `model` in bf16 autocast or fp32."""
    net = build_model(**{k: v for k, v in model.items() if k != "channels_last"}).train().to(device)
    x = torch.rand(batch_size, 1, IMAGE_SIDE, IMAGE_SIDE, device=device)
    if model.get("channels_last"):
        net, x = net.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, NUM_CLASSES, (batch_size,), device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step(bf16: bool) -> float:
        sync()
        start = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(net(x).float(), y)
        loss.backward()
        net.zero_grad(set_to_none=True)
        sync()
        return time.perf_counter() - start
    return step


def probe(model: dict, batch_size: int, device: str = "cpu", step: Callable[[bool], float] | None = None,
          rounds: int = PROBE_ROUNDS, budget_s: float = PROBE_BUDGET_S) -> dict:
    """Milliseconds per training step of `model` in fp32 and in bf16 autocast, per interleaved round.

    `model`: the `model` config plus `channels_last` (how the run lays out its tensors). `step` times
    one step (default: the real model on `device`); tests pass timings. One warm-up step of each first.
    """
    step = step or _step_timer(model, batch_size, device)
    load_before = _cpu_counters()
    step(False), step(True)  # warm-ups: the first calls allocate and choose kernels
    deadline = time.perf_counter() + budget_s
    fp32_ms, bf16_ms = [], []
    for r in range(rounds):
        # Alternate which precision goes first, so that neither always meets the machine warmer.
        order = (False, True) if r % 2 == 0 else (True, False)
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(STEPS_PER_ROUND):
            for bf16 in order:
                times[bf16].append(step(bf16))
        fp32_ms.append(round(1000 * statistics.median(times[False]), 3))
        bf16_ms.append(round(1000 * statistics.median(times[True]), 3))
        if r >= 2 and time.perf_counter() > deadline:
            break
    return {"fp32_ms": fp32_ms, "bf16_ms": bf16_ms, "batch_size": batch_size, "device": device,
            "others_cpu_share": _others_share(load_before, _cpu_counters())}


def _cpu_counters() -> tuple[float, float, float] | None:
    """(all CPUs' busy seconds, all CPUs' total seconds, this process's CPU seconds) now, from /proc/stat;
    None where there is no /proc/stat (then the 1-minute load average stands in)."""
    try:
        ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    per_s = os.sysconf("SC_CLK_TCK")
    idle = ticks[3] + ticks[4]  # idle and iowait
    own = os.times()
    return (sum(ticks) - idle) / per_s, sum(ticks) / per_s, own.user + own.system


def _others_share(before, after) -> float:
    """The share of all CPU time that processes other than this one used between two `_cpu_counters`."""
    if before is None or after is None or after[1] <= before[1]:
        try:
            return round(min(1.0, max(0.0, os.getloadavg()[0] - 1) / (os.cpu_count() or 1)), 3)
        except (OSError, AttributeError):
            return 0.0
    others = (after[0] - before[0]) - (after[2] - before[2])
    return round(min(1.0, max(0.0, others / (after[1] - before[1]))), 3)


def verdict(timings: dict) -> dict:
    """The precision `timings` (from `probe`) favour, how clearly, and whether it may be cached."""
    speedups = [f / max(b, 1e-9) for f, b in zip(timings["fp32_ms"], timings["bf16_ms"])]
    faster = sum(s >= BF16_MIN_SPEEDUP for s in speedups)
    clear_bf16, clear_fp32 = faster >= len(speedups) - 1, faster <= 1
    busy = timings.get("others_cpu_share", 0.0) > BUSY_SHARE
    median = statistics.median(speedups)
    if clear_bf16 or clear_fp32:
        how = f"{faster} of {len(speedups)} rounds"
    else:
        how = f"unclear: {faster} of {len(speedups)} rounds, so fp32 for this run only"
    return {"precision": BF16 if clear_bf16 else FP32, "clear": clear_bf16 or clear_fp32, "busy": busy,
            "bf16_speedup": round(median, 3), "speedup_range": [round(min(speedups), 3), round(max(speedups), 3)],
            "rounds_bf16_faster": faster, "how": how}


def cache_file() -> Path:
    """Where the cached verdicts live: $FMNIST_CACHE_DIR, or the user's cache directory ($XDG_CACHE_HOME, ignored
    when empty or relative as the XDG spec says, else ~/.cache)."""
    return _cache_place()[0]


def _cache_place() -> tuple[Path, str]:
    """`cache_file()`, and what chose its directory as a message says it."""
    if os.environ.get("FMNIST_CACHE_DIR", "").strip():  # blank: unset (not a folder named ' ' here)
        return Path(os.environ["FMNIST_CACHE_DIR"]) / "precision.json", "FMNIST_CACHE_DIR names its directory"
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    # Not a folder of the current directory.
    user_cache, chooser = (Path(xdg), "XDG_CACHE_HOME") if os.path.isabs(xdg) else (Path.home() / ".cache", "HOME")
    return user_cache / "fmnist" / "precision.json", f"its directory is under {chooser}; FMNIST_CACHE_DIR names another"


def _written_file() -> Path:
    """The file that holds the verdicts `cache_file()` names: itself, or the file a link there leads to, which is
    rewritten in its place so that the link stays (an atomic write replaces what it writes to: the link itself)."""
    path = cache_file()
    return path.resolve() if path.is_symlink() else path


# In every key this code has written (v1's too): how a verdicts file is told from another file of that name.
_KEY_MARK = " | torch "


class _Cache(NamedTuple):
    """What `cache_file()` holds: its JSON object's entries ({} where there is none), or, where it is something a
    run may not rewrite, what it is (`problem`) and how to mend it (`fix`)."""
    entries: dict
    problem: str | None = None
    fix: str = ""
    at_path: bool = True  # the problem is the path's own (False: a file stands where its directory should)
    removable: bool = True  # `clear` may remove it: the cache, an empty file, or a damaged cache

    @property
    def in_the_way(self) -> bool:
        """Something other than the cache stands at its path: runs decide without it and write nothing there."""
        return self.problem is not None and self.at_path

    @property
    def verdicts(self) -> dict:
        """The cached verdicts, leaving out any entry that is not a verdict `decide` wrote (a damaged or
        hand-edited one): such a key is probed again."""
        return {key: found for key, found in self.entries.items() if _is_verdict(found)}


def _cache() -> _Cache:
    """The verdicts file as `_Cache` says. Anything that is not a JSON object of this code's keys (a pipe, a
    directory, someone's notes, another tool's JSON) is not the cache, so that no run or command overwrites it."""
    path = cache_file()
    move = "move it away, or set FMNIST_CACHE_DIR to another directory"
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                return _Cache({}, f"{parent} is a file, not a directory", "move it away, or set FMNIST_CACHE_DIR "
                              "(which names the verdicts' directory) to a directory", at_path=False, removable=False)
            break
    if path.is_symlink() and not path.exists():  # an unmounted share: reading finds nothing, writing would replace it
        return _Cache({}, f"it is {not_a_file(path)}", f"{move}, or create the file it links to: `touch` makes an "
                      "empty cache", removable=False)
    if path.exists() and not path.is_file():  # reading a pipe would wait for a writer
        return _Cache({}, "it is a directory" if path.is_dir() else f"it is {not_a_file(path)}", move, removable=False)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return _Cache({})
    except OSError as e:
        return _Cache({}, f"it cannot be read ({e.strerror or e})", "make it readable, or " + move, removable=False)
    text = data.decode(errors="replace")
    if not text.strip():  # an empty file (`touch`) holds nothing to lose: an empty cache
        return _Cache({})
    try:
        entries = json.loads(data)
    except ValueError as e:
        # An object holding this code's keys is a damaged cache (hand-edited, truncated), which `clear` is for.
        if text.lstrip().startswith("{") and _KEY_MARK in text:
            return _Cache({}, f"it cannot be read as JSON ({type(e).__name__}), a damaged verdicts file",
                          "`python -m fmnist.training.precision clear` removes it")
        return _Cache({}, f"it cannot be read as JSON ({type(e).__name__}) and is not a verdicts file", move,
                      removable=False)
    if not isinstance(entries, dict) or (entries and not any(_KEY_MARK in key for key in entries)):
        return _Cache({}, "it is JSON but not a verdicts file (an object keyed by device, torch version and model)",
                      move, removable=False)
    return _Cache(entries)


def _is_verdict(found) -> bool:
    number = (int, float)
    return (isinstance(found, dict) and found.get("precision") in (BF16, FP32)
            and isinstance(found.get("bf16_speedup"), number) and isinstance(found.get("how"), str)
            and isinstance(found.get("speedup_range"), list) and len(found["speedup_range"]) == 2
            and all(isinstance(v, number) for v in found["speedup_range"]))


def cache_key(model: dict, batch_size: int, device: str) -> str:
    """What a verdict depends on: the device (CPU model and ISA, or GPU), torch, the architecture and its
    memory layout, the batch size. Keys that change only evaluation (TTA, EMA) or nothing a step times
    (dropout's rate, compile, how the weights start) are not in `model` or are left out here."""
    arch = {k: v for k, v in sorted(model.items()) if k not in ("dropout", "compile", *INIT_ONLY_KEYS)}
    machine = hardware.gpu_name() if device == "cuda" else f"{hardware.cpu_model()} ({' '.join(hardware.cpu_isa())})"
    return (f"v{CACHE_VERSION} | {device}: {machine} | torch {torch.__version__} | batch {batch_size} | "
            f"{json.dumps(arch, sort_keys=True)}")


def _cached(found: dict, how: str = "") -> dict:
    return {**found, "source": f"cached verdict of {found.get('measured', 'an earlier probe')}{how}"}


def decide(model: dict, batch_size: int, device: str, measure: Callable[..., dict] | None = None,
           remeasure: bool = False, short_run: bool = False) -> dict | None:
    """The verdict for this (device, model, batch size): the cached one, or a new probe's (cached when it
    is clear and the machine was quiet); None for a `short_run` with nothing cached. `measure` stands in
    for `probe` in tests."""
    key = cache_key(model, batch_size, device)
    cache = _cache()
    if cache.in_the_way:  # the cache is an optimisation: the run goes on without it
        _warn_not_the_cache(cache)
    found = cache.verdicts.get(key)
    if found is not None and not remeasure:
        return _cached(found)
    if short_run:
        return None
    timings = (measure or probe)(model, batch_size, device)
    result = {**verdict(timings), "probe": timings,
              "measured": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    keep = result["clear"] and not result["busy"]
    why = "cached" if keep else ("not cached: the machine was busy" if result["busy"] else "not cached: unclear")
    not_a_verdicts_file = f"not cached: {cache_file()} is not a verdicts file"
    if keep and cache.in_the_way:
        why = not_a_verdicts_file
    elif keep:
        written = _written_file()
        try:
            written.parent.mkdir(parents=True, exist_ok=True)
            # One writer at a time, each adding to what the others wrote; a verdict another process cached while
            # this one probed is kept and used, so that every run of this key gets the first clear verdict.
            with exclusive_lock(written.with_name(written.name + ".lock")):  # beside what all links to it share
                cache = _cache()
                if cache.in_the_way:  # put there during the probe
                    _warn_not_the_cache(cache)
                    return {**result, "source": f"probe ({not_a_verdicts_file})"}
                found = cache.verdicts.get(key)
                if found is not None and not remeasure:
                    return _cached(found, " (cached by another process during this one's probe)")
                # Entries that are not verdicts (hand-edited ones) are kept as they are: runs ignore them.
                atomic_write(written, json.dumps({**cache.entries, key: result}, indent=1))
        except OSError as e:  # a read-only home only costs a probe per run
            log.debug("precision cache not written: %s", e)
            why = f"not cached: {cache_file()} could not be written"
    return {**result, "source": f"probe ({why})"}


def _warn_not_the_cache(cache: _Cache) -> None:
    log.warning("precision auto: %s is not used as the verdicts cache: %s; this run decides without it and writes "
                "nothing there (%s)", cache_file(), cache.problem, cache.fix)


def resolve_precision(requested, accelerator: str, model: dict, batch_size: int, planned_steps: int | None = None,
                      measure: Callable[..., dict] | None = None) -> tuple[str, dict]:
    """The Lightning precision to use, and the evidence for it (recorded in metrics.json).

    An explicit `requested` value always wins; `auto` is decided as the module docstring says.
    `planned_steps`: the run's training steps where its config bounds them (None: a full run).
    """
    if str(requested) != "auto":
        return str(requested), {"requested": str(requested), "resolved": str(requested), "reason": "set explicitly"}
    kind = hardware.device_kind(accelerator)
    evidence: dict = {"requested": "auto", "device": kind}
    if kind == "mps":
        precision, reason = FP32, "Apple GPU: fp32 (mixed precision there is unmeasured)"
    elif kind == "cpu" and not hardware.native_cpu_bf16():
        precision, reason = FP32, "no native bf16 on this CPU (emulated bf16 is an order of magnitude slower)"
    else:
        if kind == "cuda":  # fp32 as the GPU runs it fastest: TF32 matmuls (convolutions use TF32 by default)
            torch.set_float32_matmul_precision("high")
            evidence["fp32_matmul"] = "tf32"
        short = planned_steps is not None and planned_steps < PROBE_MIN_STEPS
        found = decide(model, batch_size, kind, measure, short_run=short)
        if found is None:
            precision, reason = FP32, f"{planned_steps} training steps: too short to be worth a probe, and none cached"
        else:
            evidence["verdict"] = found
            precision = found["precision"]
            speedup = found["bf16_speedup"]
            low, high = found["speedup_range"]
            reason = (f"bf16 {speedup:.2f}x as fast as fp32{' (TF32)' if kind == 'cuda' else ''} "
                      f"(rounds {low:.2f}-{high:.2f}x; {found['how']}; {found['source']})")
    evidence.update(resolved=precision, reason=reason)
    where = hardware.gpu_name() if kind == "cuda" else \
        f"{hardware.cpu_model()}, {' '.join(hardware.cpu_isa()) or 'unknown ISA'}"
    log.info("precision auto -> %s: %s (%s)", precision, reason, where)
    return precision, evidence


def _show(path: Path, cache: _Cache) -> None:
    """`show`: the cached verdicts, and what else the file holds."""
    verdicts = cache.verdicts
    odd = len(cache.entries) - len(verdicts)
    note = (f"{cache.problem}: runs decide without it and write nothing there; {cache.fix}" if cache.problem
            else f"and {odd} entr{'y' if odd == 1 else 'ies'} that are not verdicts, which runs ignore" if odd
            else None)
    print(f"{path}: {len(verdicts)} verdict(s)" + (f" ({note})" if note else ""))
    for key, found in verdicts.items():
        print(f"  {key}\n    -> {found.get('precision')}: bf16 {found.get('bf16_speedup')}x "
              f"(rounds {found.get('speedup_range')}), measured {found.get('measured')}")


def _clear(path: Path, cache: _Cache) -> None:
    """`clear`: remove the verdicts file (empty the one a link there leads to), unless something else stands at its
    path."""
    if "FMNIST_CACHE_DIR" in os.environ and not os.environ["FMNIST_CACHE_DIR"].strip():
        # `FMNIST_CACHE_DIR=$SCRATCH` with SCRATCH unset: the user's own cache is not what was meant
        raise ConfigError(f"FMNIST_CACHE_DIR is set but empty (an unset shell variable?), which means the default "
                          f"verdicts file, {path}; nothing was removed. Name the directory, or unset FMNIST_CACHE_DIR "
                          "to clear the default one.")
    if not cache.removable:
        raise ConfigError(f"{path}: {cache.problem}; expected the verdicts file ({_cache_place()[1]}). Nothing was "
                          f"removed; {cache.fix}.")
    damaged = " (a damaged verdicts file)" if cache.problem else ""
    if path.is_symlink() and path.is_file():
        # Emptied, not removed: without the link, the next verdict would be cached here, no longer shared.
        with storage_errors(key=None):
            atomic_write(_written_file(), "")
        print(f"emptied {_written_file()}, which {path} links to (the link is kept){damaged}")
    elif path.is_file():
        with storage_errors(key=None):  # a read-only cache directory
            path.unlink()
        print(f"removed {path}{damaged}")
    else:
        print(f"{path}: no verdicts cached; nothing to remove")


def _measure(path: Path, cache: _Cache, overrides: list[str], device: str | None) -> None:
    """`measure`: probe the model that `overrides` compose again, on `device` or where they would train, and cache
    its verdict if clear."""
    from fmnist.overrides import SWEEP_FORMS, compose_train, first_sweep
    from fmnist.training.checks import check_config

    if cache.problem:  # measuring is for caching: no probe's minute is spent on a verdict that cannot be kept
        raise ConfigError(f"{path}: {cache.problem}; expected the verdicts file, which `measure` rewrites "
                          f"({_cache_place()[1]}). Nothing was measured or written; {cache.fix}.")
    # Nor on one whose directory takes no file (read-only, no permission): it would be probed, then not kept.
    check_folder_can_hold(_written_file().parent, "FMNIST_CACHE_DIR", path,
                          "name a directory (FMNIST_CACHE_DIR) for it.")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: this machine's torch sees no CUDA GPU; measure with --device cpu.")
    swept = first_sweep(overrides)
    if swept:  # Hydra's own words would advise --multirun, which `measure` does not take
        raise ConfigError(f"{swept} is {SWEEP_FORMS}; `measure` probes one model: give one value (a list is "
                          "key=[a,b], text with a comma key='a,b'), and measure each value in turn.")
    cfg = compose_train(*overrides)
    check_config(cfg, trackers=False)  # e.g. data.batch_size=0 would be measured, and cached; a probe logs nowhere
    device = _probe_device(cfg.trainer.accelerator, device)
    model = {**OmegaConf.to_container(cfg.model, resolve=True), "channels_last": cfg.channels_last}
    if device == "cuda":
        torch.set_float32_matmul_precision("high")
    with hardware.memory_errors(f"lower data.batch_size ({cfg.data.batch_size}), the batch the probe times"):
        verdict = decide(model, cfg.data.batch_size, device, remeasure=True)
    print(json.dumps(verdict, indent=1))


def _probe_device(accelerator: str, asked: str | None) -> str:
    """The device `measure` probes: `--device` (`asked`), else the one a run of `trainer.accelerator` trains on here.
    ConfigError where the two name different devices, where this machine lacks the accelerator (as a run is refused),
    or for Apple's GPU, whose runs take fp32 without a probe."""
    kind = hardware.device_kind(accelerator)
    if asked and str(accelerator) != "auto" and asked != kind:
        raise ConfigError(f"--device {asked} and config key trainer.accelerator={accelerator} name different devices "
                          f"({asked} and {kind}); give one of them, or the same device to both. Nothing was measured.")
    hardware.check_accelerator(accelerator)
    if (asked or kind) == "mps":
        raise ConfigError(f"config key trainer.accelerator={accelerator} trains on Apple's GPU (mps) here, where "
                          "precision auto takes fp32 without a probe, so there is nothing to measure. Nothing was "
                          "measured; measure the CPU's verdict with --device cpu.")
    return asked or kind


def main(argv: list[str] | None = None) -> int:
    """`python -m fmnist.training.precision show|measure|clear`: the cached verdicts of `precision=auto`."""
    from fmnist.cli import run_plain

    parser = argparse.ArgumentParser(prog="python -m fmnist.training.precision", description=main.__doc__)
    parser.add_argument("verb", choices=["show", "measure", "clear"],
                        help="show the cached verdicts; measure one model again (and cache it if clear); clear them all")
    parser.add_argument("overrides", nargs="*", help="train overrides for `measure`, e.g. model=resnet data.batch_size=512")
    parser.add_argument("--device", choices=["cpu", "cuda"],
                        help="for `measure`: the device to probe (default: the one trainer.accelerator trains on)")
    args = parser.parse_intermixed_args(argv)  # `--device` between the overrides too

    def work() -> None:
        if args.verb != "measure" and (args.overrides or args.device):
            # Only `measure` composes a model: `show` and `clear` take every key's verdicts, so would ignore these.
            given = " ".join([*args.overrides, *(["--device", args.device] if args.device else [])])
            raise ConfigError(f"`{args.verb}` takes no overrides or --device ({given}): it {args.verb}s the verdicts "
                              "of every model and device; only `measure` takes them, e.g. `measure model=resnet "
                              "data.batch_size=512`.")
        path, cache = cache_file(), _cache()
        if args.verb == "show":
            _show(path, cache)
        elif args.verb == "clear":
            _clear(path, cache)
        else:
            _measure(path, cache, args.overrides, args.device)
    return run_plain(work)


if __name__ == "__main__":
    sys.exit(main())
