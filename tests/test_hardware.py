"""`trainer.precision=auto`: the hardware decides; a clear probe on a quiet machine is cached, anything else decides
one run only; an explicit value wins."""

import json
import logging
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from fmnist import hardware
from fmnist.errors import ConfigError, OutOfMemory
from fmnist.training import precision as auto
from fmnist.models import training_flops_per_image
from fmnist.training.train import train
from tests.conftest import build, compose_cfg

MODEL = OmegaConf.to_container(compose_cfg("model=simple").model)


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FMNIST_CACHE_DIR", str(tmp_path / "cache"))


def fake_probe(fp32_ms: float | list, bf16_ms: float | list, others_cpu_share: float = 0.0):
    """A `probe` that returns the given per-round timings (one number: the same in every round)."""
    calls = []

    def measure(model: dict, batch_size: int, device: str) -> dict:
        calls.append((model, batch_size, device))
        fp32 = fp32_ms if isinstance(fp32_ms, list) else [fp32_ms] * auto.PROBE_ROUNDS
        bf16 = bf16_ms if isinstance(bf16_ms, list) else [bf16_ms] * auto.PROBE_ROUNDS
        return {"fp32_ms": fp32, "bf16_ms": bf16, "batch_size": batch_size, "device": device,
                "others_cpu_share": others_cpu_share}
    return measure, calls


def steps_taking(fp32_s: float, bf16_s: float, spikes: dict[int, float] | None = None):
    """A step timer for `probe`: each call takes the given seconds, the n-th call (counting from 0, warm-ups
    included) multiplied by `spikes[n]`, as a burst of other work would."""
    calls = []

    def step(bf16: bool) -> float:
        calls.append(bf16)
        return (bf16_s if bf16 else fp32_s) * (spikes or {}).get(len(calls) - 1, 1.0)
    return step, calls


def cpu_with_bf16(monkeypatch, native: bool):
    monkeypatch.setattr(hardware, "device_kind", lambda accelerator: "cpu")
    monkeypatch.setattr(hardware, "native_cpu_bf16", lambda: native)


def test_explicit_precision_always_wins(monkeypatch):
    measure, calls = fake_probe(10, 1)
    assert auto.resolve_precision("32-true", "cpu", MODEL, 64, measure=measure)[0] == "32-true"
    assert auto.resolve_precision("bf16-mixed", "cpu", MODEL, 64, measure=measure)[0] == "bf16-mixed"
    assert calls == []


def test_cpu_without_native_bf16_takes_fp32_without_probing(monkeypatch):
    cpu_with_bf16(monkeypatch, native=False)
    measure, calls = fake_probe(10, 1)
    precision, evidence = auto.resolve_precision("auto", "cpu", MODEL, 64, measure=measure)
    assert precision == "32-true" and calls == [] and "no native bf16" in evidence["reason"]


@pytest.mark.parametrize("fp32_s, bf16_s, expected", [(0.010, 0.005, "bf16-mixed"), (0.010, 0.020, "32-true"),
                                                     (0.010, 0.0095, "32-true")])
def test_the_faster_precision_wins_when_the_difference_is_clear(monkeypatch, fp32_s, bf16_s, expected):
    cpu_with_bf16(monkeypatch, native=True)
    monkeypatch.setattr(auto, "_others_share", lambda before, after: 0.0)  # a quiet machine, whatever runs beside
    step, steps = steps_taking(fp32_s, bf16_s)
    measure = lambda model, batch_size, device: auto.probe(model, batch_size, device, step=step)  # noqa: E731
    precision, evidence = auto.resolve_precision("auto", "cpu", MODEL, 64, measure=measure)
    assert precision == expected and evidence["verdict"]["clear"]
    # Both precisions timed alike: interleaved, the same number of times, each round starting with the other.
    assert steps.count(True) == steps.count(False) and steps[2:4] != steps[6:8]
    assert "probe (cached)" in evidence["reason"] and json.loads(auto.cache_file().read_text())  # kept: clear, quiet


def test_a_burst_of_other_work_in_one_round_does_not_change_the_verdict(monkeypatch):
    cpu_with_bf16(monkeypatch, native=True)
    # bf16 1.5x faster; during the first round (calls 2-5 after the warm-ups, fp32 first) every fp32 step
    # is 3x slower and every bf16 step 5x slower, so that round alone says fp32.
    per_round = 2 * auto.STEPS_PER_ROUND
    spikes = {n: (5.0 if n % 2 else 3.0) for n in range(2, 2 + per_round)}
    step, _ = steps_taking(0.015, 0.010, spikes)
    measure = lambda model, batch_size, device: auto.probe(model, batch_size, device, step=step)  # noqa: E731
    precision, evidence = auto.resolve_precision("auto", "cpu", MODEL, 64, measure=measure)
    assert precision == "bf16-mixed" and evidence["verdict"]["rounds_bf16_faster"] == auto.PROBE_ROUNDS - 1


def test_an_unclear_verdict_decides_one_run_as_fp32_and_is_measured_again(monkeypatch):
    cpu_with_bf16(monkeypatch, native=True)
    measure, calls = fake_probe(10, [10, 8, 10, 8, 9.5])  # bf16 1.25x faster in 2 rounds of 5: noise
    precision, evidence = auto.resolve_precision("auto", "cpu", MODEL, 64, measure=measure)
    assert precision == "32-true" and not evidence["verdict"]["clear"] and "unclear" in evidence["reason"]
    auto.resolve_precision("auto", "cpu", MODEL, 64, measure=measure)
    assert len(calls) == 2 and not auto.cache_file().exists()


def test_a_verdict_measured_on_a_busy_machine_is_used_once_not_kept(monkeypatch):
    cpu_with_bf16(monkeypatch, native=True)
    measure, calls = fake_probe(10, 5, others_cpu_share=0.6)
    precision, evidence = auto.resolve_precision("auto", "cpu", MODEL, 64, measure=measure)
    assert precision == "bf16-mixed" and "busy" in evidence["reason"]
    auto.resolve_precision("auto", "cpu", MODEL, 64, measure=measure)
    assert len(calls) == 2 and not auto.cache_file().exists()


def test_the_verdict_is_cached_per_architecture_and_batch_size_not_evaluation_keys(monkeypatch):
    cpu_with_bf16(monkeypatch, native=True)
    measure, calls = fake_probe(10, 5)
    auto.resolve_precision("auto", "cpu", MODEL, 64, measure=measure)
    precision, evidence = auto.resolve_precision("auto", "cpu", {**MODEL, "dropout": 0.3, "compile": True}, 64, measure=measure)
    assert precision == "bf16-mixed" and len(calls) == 1 and "cached verdict" in evidence["reason"]
    auto.resolve_precision("auto", "cpu", {**MODEL, "hidden": 64}, 64, measure=measure)  # another architecture
    auto.resolve_precision("auto", "cpu", MODEL, 256, measure=measure)  # another batch size
    assert len(calls) == 3


def test_two_processes_probing_at_once_keep_both_verdicts_and_the_first_for_one_key(monkeypatch):
    # Another process caches its verdicts while this one probes: for another key (both are kept, not the last
    # writer's alone), and for this very key (its verdict is used and kept, so every run of the key gets the same).
    cpu_with_bf16(monkeypatch, native=True)
    theirs = {**auto.verdict({"fp32_ms": [10] * auto.PROBE_ROUNDS, "bf16_ms": [5] * auto.PROBE_ROUNDS,
                              "others_cpu_share": 0.0}), "measured": "another process's probe"}
    other_key = auto.cache_key({**MODEL, "hidden": 64}, 64, "cpu")
    measure, _ = fake_probe(5, 10)  # this probe: fp32 faster

    def probe_while_another_process_writes(model, batch_size, device):
        auto.cache_file().parent.mkdir(parents=True, exist_ok=True)
        auto.cache_file().write_text(json.dumps({other_key: theirs}))
        return measure(model, batch_size, device)

    precision, _ = auto.resolve_precision("auto", "cpu", MODEL, 64, measure=probe_while_another_process_writes)
    cached = json.loads(auto.cache_file().read_text())
    assert precision == "32-true" and other_key in cached and auto.cache_key(MODEL, 64, "cpu") in cached

    this_key = auto.cache_key(MODEL, 256, "cpu")

    def probe_while_another_process_caches_this_key(model, batch_size, device):
        auto.cache_file().write_text(json.dumps({**json.loads(auto.cache_file().read_text()), this_key: theirs}))
        return measure(model, batch_size, device)

    precision, evidence = auto.resolve_precision("auto", "cpu", MODEL, 256,
                                                 measure=probe_while_another_process_caches_this_key)
    assert precision == "bf16-mixed" and "cached by another process during this one's probe" in evidence["reason"]
    assert json.loads(auto.cache_file().read_text())[this_key]["precision"] == "bf16-mixed"


def test_a_cache_in_the_run_directory_a_run_holds_is_written_not_waited_on(monkeypatch, tmp_path):
    # FMNIST_CACHE_DIR naming the run's own directory, whose lock the run holds: the cache's lock is another file.
    import threading

    from fmnist.training.rundir import own_run_dir

    cpu_with_bf16(monkeypatch, native=True)
    run = tmp_path / "run"
    monkeypatch.setenv("FMNIST_CACHE_DIR", str(run))
    measure, _ = fake_probe(10, 5)
    decided = []
    with own_run_dir(run):
        worker = threading.Thread(target=lambda: decided.append(auto.decide(MODEL, 64, "cpu", measure=measure)),
                                  daemon=True)
        worker.start()
        worker.join(timeout=120)  # milliseconds of work; waiting on its own lock, it would never end
    assert decided and decided[0]["precision"] == "bf16-mixed" and (run / "precision.json").is_file()


def test_tta_and_ema_do_not_reach_the_verdicts_key(make_cfg, tmp_path, monkeypatch):
    from fmnist.training import train as training

    class Resolved(Exception):
        pass

    keys = []

    def spy(requested, accelerator, model, batch_size, planned_steps=None, measure=None):
        keys.append(auto.cache_key(model, batch_size, "cpu"))
        raise Resolved  # what the run would be resolved from is all this test needs
    monkeypatch.setattr(training, "resolve_precision", spy)
    for i, overrides in enumerate(([], ["tta=flip", "optim.ema_decay=0.99"])):
        with pytest.raises(Resolved):
            train(make_cfg("model=simple", *overrides), tmp_path / str(i))
    assert len(keys) == 2 and keys[0] == keys[1]


def test_cuda_measures_fp32_with_tf32_against_bf16(monkeypatch):
    monkeypatch.setattr(hardware, "device_kind", lambda accelerator: "cuda")
    monkeypatch.setattr(hardware, "gpu_name", lambda: "Test GPU")
    measure, calls = fake_probe(10, 12)  # launch-bound: bf16 slower
    precision, evidence = auto.resolve_precision("auto", "gpu", MODEL, 512, measure=measure)
    assert precision == "32-true" and calls[0][1:] == (512, "cuda") and evidence["fp32_matmul"] == "tf32"
    assert torch.get_float32_matmul_precision() == "high"
    torch.set_float32_matmul_precision("highest")


def test_the_real_probe_times_both_precisions_in_rounds():
    result = auto.probe(MODEL, batch_size=4, rounds=3)
    assert len(result["fp32_ms"]) == len(result["bf16_ms"]) == 3 and min(result["fp32_ms"] + result["bf16_ms"]) > 0
    assert 0.0 <= result["others_cpu_share"] <= 1.0


@pytest.mark.slow
def test_a_probe_beside_cpu_bound_processes_sees_the_machine_busy_and_keeps_nothing():
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 1)]
    try:
        time.sleep(0.5)
        found = auto.decide(MODEL, 16, "cpu")
    finally:
        for p in busy:
            p.kill()
            p.wait()
    assert found["busy"] and found["probe"]["others_cpu_share"] > auto.BUSY_SHARE
    assert not auto.cache_file().exists()


@pytest.mark.slow
def test_a_run_records_the_resolved_precision_and_how_it_was_decided(make_cfg, tmp_path, monkeypatch):
    cpu_with_bf16(monkeypatch, native=True)
    measure, calls = fake_probe(10, 30)  # bf16 3x slower: auto must pick fp32
    monkeypatch.setattr(auto, "probe", measure)
    # Not bounded by the config (a fraction of the batches), so worth a probe; the tiny data keeps it short.
    train(make_cfg("model=simple", "trainer.limit_train_batches=1.0"), tmp_path)
    record = json.loads((tmp_path / "metrics.json").read_text())
    assert record["precision"]["requested"] == "auto" and record["precision"]["resolved"] == "32-true"
    verdict = record["precision"]["verdict"]
    assert verdict["probe"]["bf16_ms"] == [30] * auto.PROBE_ROUNDS and verdict["clear"] and "rounds" in verdict["how"]
    assert len(calls) == 1 and record["hardware"]["cores"] >= 1 and record["hardware"]["torch"] == torch.__version__


def test_a_ddp_rank_started_by_rank_0_trains_in_the_precision_rank_0_recorded(make_cfg, monkeypatch):
    # Rank 0 records its choice before it starts the other ranks (its pid in the record): a rank that probed again
    # could choose another precision, as an unclear or busy verdict is not cached, and the record would name rank 0's.
    from lightning.pytorch.utilities import rank_zero_only

    from fmnist.training import train as train_module

    cpu_with_bf16(monkeypatch, native=True)
    measure, calls = fake_probe(10, 30)  # this rank's own probe would choose fp32
    monkeypatch.setattr(auto, "probe", measure)
    cfg = make_cfg("trainer.limit_train_batches=1.0")
    model = {**OmegaConf.to_container(cfg.model), "channels_last": cfg.channels_last}
    chosen = {"requested": "auto", "device": "cpu", "resolved": "bf16-mixed", "reason": "rank 0's probe"}
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    record = {"status": "running", "pid": os.getppid(), "precision": chosen}
    assert train_module._precision(cfg, model, record, resume=False) == ("bf16-mixed", chosen) and calls == []
    # Started otherwise (torchrun, SLURM: every rank at once), the record may be an earlier start's: the rank decides.
    assert train_module._precision(cfg, model, {**record, "pid": -1}, resume=False)[0] == "32-true"
    assert len(calls) == 1


def test_a_short_run_takes_a_cached_verdict_or_fp32_without_a_probe(make_cfg, monkeypatch):
    from fmnist.training.train import planned_steps

    cpu_with_bf16(monkeypatch, native=True)
    measure, calls = fake_probe(10, 5)
    assert planned_steps(make_cfg()) == 2 and planned_steps(make_cfg("trainer.limit_train_batches=1.0")) is None
    assert planned_steps(make_cfg("trainer.limit_train_batches=1.0", "data.train_subset=640", "trainer.max_epochs=3")) == 60
    precision, evidence = auto.resolve_precision("auto", "cpu", MODEL, 64, 2, measure=measure)
    assert precision == "32-true" and calls == [] and "too short" in evidence["reason"]
    auto.resolve_precision("auto", "cpu", MODEL, 64, 10_000, measure=measure)  # a long run measures, and keeps it
    precision, evidence = auto.resolve_precision("auto", "cpu", MODEL, 64, 2, measure=measure)
    assert precision == "bf16-mixed" and len(calls) == 1 and "cached verdict" in evidence["reason"]


@pytest.mark.parametrize("xdg", ["", "relative/cache", "/abs/cache"])
def test_the_verdicts_live_in_the_users_cache_whatever_xdg_cache_home_holds(monkeypatch, tmp_path, xdg):
    # An empty or relative $XDG_CACHE_HOME is ignored (the XDG spec): else the cache, and `clear`, would act on a
    # folder of the current directory, such as the package's own `fmnist/`.
    monkeypatch.delenv("FMNIST_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", xdg)
    monkeypatch.setenv("HOME", str(tmp_path))
    expected = Path(xdg) if xdg.startswith("/") else tmp_path / ".cache"
    assert auto.cache_file() == expected / "fmnist" / "precision.json"


@pytest.mark.parametrize("blank", ["", " "])
def test_clear_refuses_a_blank_cache_dir_rather_than_clearing_the_default_verdicts(monkeypatch, capsys, tmp_path, blank):
    # `FMNIST_CACHE_DIR=$SCRATCH ... clear` with SCRATCH unset removed the user's own ~/.cache verdicts.
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("FMNIST_CACHE_DIR", blank)
    default = tmp_path / ".cache" / "fmnist" / "precision.json"
    assert auto.cache_file() == default  # blank is unset: not a folder named ' ' in the current directory
    measure, _ = fake_probe(10, 5)
    monkeypatch.setattr(auto, "probe", measure)
    assert auto.main(["measure", "model=simple", "--device", "cpu"]) == 0 and default.is_file()
    capsys.readouterr()
    assert auto.main(["clear"]) == 2
    said = capsys.readouterr().err
    assert f"FMNIST_CACHE_DIR is set but empty (an unset shell variable?), which means the default verdicts file, " \
           f"{default}; nothing was removed" in said and default.is_file()


@pytest.mark.parametrize("chooser", ["FMNIST_CACHE_DIR", "XDG_CACHE_HOME", "HOME"])
def test_a_refusal_names_what_chose_the_verdicts_place(monkeypatch, capsys, tmp_path, chooser):
    # It said "FMNIST_CACHE_DIR names its directory" also where that was unset and XDG_CACHE_HOME or HOME chose it.
    monkeypatch.delenv("FMNIST_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    if chooser != "HOME":
        monkeypatch.setenv(chooser, str(tmp_path / "chosen"))
    auto.cache_file().mkdir(parents=True)  # a directory where the verdicts file goes
    assert str(auto.cache_file()).startswith(str(tmp_path / ("home" if chooser == "HOME" else "chosen")))
    assert auto.main(["clear"]) == 2
    said = capsys.readouterr().err
    assert "Nothing was removed" in said
    if chooser == "FMNIST_CACHE_DIR":
        assert "(FMNIST_CACHE_DIR names its directory)" in said
    else:
        assert f"(its directory is under {chooser}; FMNIST_CACHE_DIR names another)" in said


def test_the_command_shows_measures_and_clears_the_cached_verdicts(monkeypatch, capsys, tmp_path):
    measure, _ = fake_probe(10, 5)
    monkeypatch.setattr(auto, "probe", measure)
    # --device among the overrides, not only after them
    assert auto.main(["measure", "model=simple", "--device", "cpu", "data.batch_size=32"]) == 0
    assert auto.main(["show"]) == 0
    shown = capsys.readouterr().out
    assert "1 verdict(s)" in shown and "batch 32" in shown and "-> bf16-mixed" in shown
    assert auto.main(["clear"]) == 0 and not auto.cache_file().exists()
    assert "removed" in capsys.readouterr().out
    assert auto.main(["clear"]) == 0 and "no verdicts cached; nothing to remove" in capsys.readouterr().out
    # Bad overrides are one paragraph with exit 2, before anything is measured or cached.
    for overrides, words in [(["model=nosuch"], "Could not find 'model/nosuch'"),
                             (["optim.lr=1e-2,1e-3"], "optim.lr=1e-2,1e-3 is a sweep (`,`, range, choice or glob); "
                                                      "`measure` probes one model"),  # not Hydra's "add --multirun"
                             (["data.batch_size=0"], "config key data.batch_size must be at least 1")]:
        assert auto.main(["measure", *overrides, "--device", "cpu"]) == 2
        assert words in capsys.readouterr().err and not auto.cache_file().exists()
    # So are a GPU this machine lacks and a cache path that is not a file's.
    monkeypatch.setattr(auto.torch.cuda, "is_available", lambda: False)
    assert auto.main(["measure", "model=simple", "--device", "cuda"]) == 2
    assert "--device cuda: this machine's torch sees no CUDA GPU" in capsys.readouterr().err
    monkeypatch.setenv("FMNIST_CACHE_DIR", str(tmp_path))  # not the suite's own cache
    auto.cache_file().mkdir()
    assert auto.main(["clear"]) == 2 and auto.cache_file().is_dir()
    assert "precision.json: it is a directory; expected the verdicts file" in capsys.readouterr().err


def test_measure_probes_the_device_trainer_accelerator_trains_on(monkeypatch, capsys):
    # `measure trainer.accelerator=gpu` on a machine without CUDA probed the CPU, and said nothing of the key.
    measure, calls = fake_probe(10, 5)
    monkeypatch.setattr(auto, "probe", measure)
    monkeypatch.setattr(hardware, "gpu_name", lambda: "a GPU")
    monkeypatch.setattr(auto.torch.cuda, "is_available", lambda: True)  # where a run of `cpu` trains on the CPU
    assert auto.main(["measure", "model=simple", "trainer.accelerator=cpu"]) == 0 and calls[-1][2] == "cpu"
    monkeypatch.setattr(auto.torch.cuda, "is_available", lambda: False)
    for args, words in [(["trainer.accelerator=gpu"], "config key trainer.accelerator must be one this machine has; "
                                                      "got 'gpu'"),
                        (["trainer.accelerator=gpu", "--device", "cpu"], "--device cpu and config key "
                         "trainer.accelerator=gpu name different devices (cpu and cuda)")]:
        assert auto.main(["measure", "model=simple", *args]) == 2
        said = capsys.readouterr().err
        assert words in said and "\n" not in said[:-1]
    monkeypatch.setattr(auto.torch.backends.mps, "is_available", lambda: True)  # a Mac: `auto` trains on its GPU
    assert auto.main(["measure", "model=simple"]) == 2 and "Apple's GPU (mps)" in capsys.readouterr().err
    assert len(calls) == 1
    assert auto.main(["measure", "model=simple", "--device", "cpu"]) == 0 and calls[-1][2] == "cpu"


def test_measure_into_a_cache_directory_that_takes_no_file_is_refused_before_probing(monkeypatch, capsys, tmpfs):
    measure, calls = fake_probe(10, 5)
    monkeypatch.setattr(auto, "probe", measure)
    read_only = tmpfs("ro,size=8k")  # the verdict would be measured, then not kept, and the command end with 0
    for cache_dir in (read_only, read_only / "fmnist"):  # the directory, or the nearest one above it that exists
        monkeypatch.setenv("FMNIST_CACHE_DIR", str(cache_dir))
        assert auto.main(["measure", "model=simple", "data.batch_size=32", "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert f"cannot write {read_only}: the file system is read-only" in err and "(FMNIST_CACHE_DIR=...)" in err
    assert calls == [] and list(read_only.iterdir()) == []


def test_a_damaged_cached_verdict_is_measured_again_not_a_crash(monkeypatch, capsys):
    cpu_with_bf16(monkeypatch, True)
    measure, calls = fake_probe(10, 5)
    key = auto.cache_key(MODEL, 64, "cpu")
    auto.cache_file().parent.mkdir(parents=True, exist_ok=True)
    auto.cache_file().write_text(json.dumps({"other": 5, key: {"precision": "bf16-mixed"}}))  # hand-edited
    assert auto.main(["show"]) == 0
    assert "0 verdict(s) (and 2 entries that are not verdicts, which runs ignore)" in capsys.readouterr().out
    precision, evidence = auto.resolve_precision("auto", "cpu", MODEL, 64, 10_000, measure=measure)
    assert precision == "bf16-mixed" and len(calls) == 1 and "probe" in evidence["verdict"]["source"]
    auto.cache_file().write_text("{broken")  # `show` names what runs ignore, not only "0 verdicts"
    assert auto.main(["show"]) == 0 and "it cannot be read as JSON (JSONDecodeError)" in capsys.readouterr().out


def not_the_cache(kind: str) -> None:
    """Put at the cache's path something that is not this code's verdicts file."""
    path = auto.cache_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    elif kind == "link to nothing":  # a share not mounted now: a verdict written there would replace the link
        path.symlink_to(path.parent / "not-mounted" / "precision.json")
    else:
        path.write_bytes({"notes": b"my notes\n", "binary": b"\xff\xfe\x00", "list": b'["a", "b"]',
                          "other JSON": b'{"0": 0.91, "1": 0.88}'}[kind])


def what_is_there() -> tuple:
    path = auto.cache_file()
    return path.lstat().st_mode, path.read_bytes() if path.is_file() else None, \
        os.readlink(path) if path.is_symlink() else None


@pytest.mark.parametrize("kind", ["notes", "binary", "list", "other JSON", "fifo", "directory", "link to nothing"])
def test_what_is_not_the_cache_is_never_rewritten_nor_removed(monkeypatch, capsys, caplog, kind):
    # A run still trains on its own probe's verdict, and says once why it kept nothing; the commands refuse.
    cpu_with_bf16(monkeypatch, True)
    measure, calls = fake_probe(10, 5)
    not_the_cache(kind)
    before = what_is_there()
    with caplog.at_level(logging.WARNING, logger=auto.__name__):
        precision, evidence = auto.resolve_precision("auto", "cpu", MODEL, 64, 10_000, measure=measure)
    assert precision == "bf16-mixed" and len(calls) == 1
    assert evidence["verdict"]["source"] == f"probe (not cached: {auto.cache_file()} is not a verdicts file)"
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warned) == 1 and f"{auto.cache_file()} is not used as the verdicts cache: it " in warned[0]
    assert "move it away" in warned[0]
    assert auto.main(["show"]) == 0
    assert "0 verdict(s) (it " in capsys.readouterr().out
    monkeypatch.setattr(auto, "probe", lambda *a: pytest.fail("measured a verdict it cannot keep"))
    assert auto.main(["measure", "model=simple", "--device", "cpu"]) == 2
    said = capsys.readouterr().err
    assert f"{auto.cache_file()}: it " in said and "Nothing was measured or written" in said and "\n" not in said[:-1]
    assert auto.main(["clear"]) == 2
    said = capsys.readouterr().err
    assert f"{auto.cache_file()}: it " in said and "Nothing was removed; move it away" in said
    assert what_is_there() == before and not auto.cache_file().with_name("precision.json.lock").exists()


def test_a_link_to_a_verdicts_file_elsewhere_is_written_through_and_kept(monkeypatch, capsys, tmp_path):
    # A cache shared by linking to it: an atomic write replaced the link with a copy, which no one else sees.
    cpu_with_bf16(monkeypatch, True)
    measure, calls = fake_probe(10, 5)
    monkeypatch.setenv("FMNIST_CACHE_DIR", str(tmp_path / "shared"))
    auto.resolve_precision("auto", "cpu", MODEL, 64, 10_000, measure=measure)  # another user's verdict
    shared = auto.cache_file()
    monkeypatch.setenv("FMNIST_CACHE_DIR", str(tmp_path / "mine"))
    auto.cache_file().parent.mkdir()
    auto.cache_file().symlink_to(shared)
    _, evidence = auto.resolve_precision("auto", "cpu", MODEL, 64, 10_000, measure=measure)
    assert len(calls) == 1 and "cached verdict" in evidence["reason"]
    auto.resolve_precision("auto", "cpu", MODEL, 256, 10_000, measure=measure)
    assert len(calls) == 2 and auto.cache_file().is_symlink() and auto.cache_file().resolve() == shared
    assert len(json.loads(shared.read_text())) == 2
    assert os.listdir(auto.cache_file().parent) == ["precision.json"]  # no copy, nor a lock beside the link
    assert auto.main(["show"]) == 0 and "2 verdict(s)" in capsys.readouterr().out
    assert auto.main(["clear"]) == 0 and auto.cache_file().is_symlink() and shared.read_text() == ""
    assert f"emptied {shared}, which {auto.cache_file()} links to (the link is kept)" in capsys.readouterr().out
    auto.resolve_precision("auto", "cpu", MODEL, 64, 10_000, measure=measure)
    assert len(calls) == 3 and auto.cache_file().is_symlink() and len(json.loads(shared.read_text())) == 1


def test_a_damaged_cache_is_left_by_runs_and_removed_by_clear(monkeypatch, capsys, caplog):
    cpu_with_bf16(monkeypatch, True)
    measure, calls = fake_probe(10, 5)
    auto.resolve_precision("auto", "cpu", MODEL, 64, 10_000, measure=measure)
    whole = auto.cache_file().read_text()
    auto.cache_file().write_text(whole[:len(whole) // 2])  # cut short: a disk that filled, an editor that crashed
    with caplog.at_level(logging.WARNING, logger=auto.__name__):
        _, evidence = auto.resolve_precision("auto", "cpu", MODEL, 256, 10_000, measure=measure)
    assert len(calls) == 2 and "not cached" in evidence["verdict"]["source"]
    assert auto.cache_file().read_text() == whole[:len(whole) // 2]
    assert "a damaged verdicts file" in caplog.text
    assert "`python -m fmnist.training.precision clear` removes it" in caplog.text
    assert auto.main(["show"]) == 0 and "clear` removes it)" in capsys.readouterr().out
    assert auto.main(["clear"]) == 0 and not auto.cache_file().exists()
    assert "(a damaged verdicts file)" in capsys.readouterr().out


def test_an_empty_file_is_an_empty_cache_and_hand_added_entries_are_kept(monkeypatch, capsys):
    cpu_with_bf16(monkeypatch, True)
    measure, calls = fake_probe(10, 5)
    auto.cache_file().parent.mkdir(parents=True)
    auto.cache_file().touch()
    assert auto.main(["show"]) == 0 and capsys.readouterr().out.rstrip().endswith(": 0 verdict(s)")
    auto.resolve_precision("auto", "cpu", MODEL, 64, 10_000, measure=measure)
    cached = json.loads(auto.cache_file().read_text())
    assert cached[auto.cache_key(MODEL, 64, "cpu")]["precision"] == "bf16-mixed"
    cached["my note"] = "measured on the quiet node"  # runs ignore it, and do not drop it
    auto.cache_file().write_text(json.dumps(cached))
    auto.resolve_precision("auto", "cpu", MODEL, 256, 10_000, measure=measure)
    assert json.loads(auto.cache_file().read_text())["my note"] == "measured on the quiet node" and len(calls) == 2
    auto.cache_file().write_text("")
    assert auto.main(["clear"]) == 0 and not auto.cache_file().exists()


@pytest.mark.parametrize("where", ["the directory is a file", "the file is a directory"])
def test_show_advises_what_clear_does(monkeypatch, capsys, tmp_path, where):
    (tmp_path / "a-file").write_text("mine")
    if where == "the directory is a file":
        monkeypatch.setenv("FMNIST_CACHE_DIR", str(tmp_path / "a-file"))
    else:
        auto.cache_file().mkdir(parents=True)
    assert auto.main(["show"]) == 0
    shown = capsys.readouterr().out
    assert "`clear` removes it" not in shown and "move it away" in shown
    if where == "the directory is a file":
        assert f"{tmp_path}/a-file is a file, not a directory" in shown and "set FMNIST_CACHE_DIR" in shown
    assert auto.main(["clear"]) == 2 and "Nothing was removed" in capsys.readouterr().err
    assert (tmp_path / "a-file").read_text() == "mine"


def test_show_and_clear_refuse_what_only_measure_takes(monkeypatch, capsys):
    measure, _ = fake_probe(10, 5)
    monkeypatch.setattr(auto, "probe", measure)
    assert auto.main(["measure", "model=simple", "--device", "cpu"]) == 0
    for verb, extra in [("show", ["extra=1"]), ("clear", ["model=resnet"]), ("clear", ["--device", "cpu"])]:
        capsys.readouterr()
        assert auto.main([verb, *extra]) == 2 and auto.cache_file().is_file()
        said = capsys.readouterr()
        assert f"`{verb}` takes no overrides or --device ({' '.join(extra)})" in said.err and not said.out


def test_a_verdict_the_cache_could_not_keep_is_not_called_cached(monkeypatch, tmp_path):
    cpu_with_bf16(monkeypatch, True)
    measure, _ = fake_probe(10, 5)
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("FMNIST_CACHE_DIR", str(tmp_path / "a-file"))  # its directory cannot be made
    _, evidence = auto.resolve_precision("auto", "cpu", MODEL, 64, 10_000, measure=measure)
    assert evidence["verdict"]["source"] == f"probe (not cached: {tmp_path}/a-file/precision.json could not be written)"


def test_flop_count_matches_the_simple_cnns_arithmetic():
    net = build("simple")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    conv1, conv2 = 28 * 28 * 32 * 9 * 2, 14 * 14 * 64 * 32 * 9 * 2
    fc = 64 * 7 * 7 * 128 * 2 + 128 * 10 * 2
    # backward = twice forward (input and weight gradients), except the input gradient of the first conv
    assert training_flops_per_image(net) == 3 * (conv1 + conv2 + fc) - conv1
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # the model is untouched


def test_how_the_weights_start_does_not_reach_the_verdicts_key():
    """Initialisation keys change no step's work, so they share one precision verdict; the widths do not."""
    base = {"name": "resnet", "widths": [32, 64], "blocks": [1, 1], "dropout": 0.0, "zero_init_residual": False,
            "dirac_init": False, "whiten_stem": False, "channels_last": True}
    started_otherwise = {**base, "zero_init_residual": True, "dirac_init": True, "whiten_stem": True}
    assert auto.cache_key(started_otherwise, 256, "cpu") == auto.cache_key(base, 256, "cpu")
    assert auto.cache_key({**base, "widths": [16, 32]}, 256, "cpu") != auto.cache_key(base, 256, "cpu")


def test_fp16_autocast_on_a_cpu_is_refused_rather_than_recorded_as_what_did_not_run():
    from fmnist.hardware import check_accelerator

    with pytest.raises(ConfigError, match="got '16-mixed', which Lightning replaces with bf16-mixed on a CPU"):
        check_accelerator("cpu", "auto", "16-mixed")
    check_accelerator("cpu", "auto", "bf16-mixed")


def test_several_nodes_need_a_launcher_that_set_a_node_rank(monkeypatch):
    from fmnist.hardware import NODE_RANK_VARIABLES, check_nodes

    for name in NODE_RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError, match="trainer.num_nodes must be 1 outside a multi-node launch; got 2"):
        check_nodes(2)
    check_nodes(1)
    monkeypatch.setenv("SLURM_NODEID", "0")  # a node of a SLURM job
    check_nodes(2)


def test_a_cache_path_that_is_a_pipe_is_ignored_not_waited_on_and_a_read_only_one_is_one_paragraph(
        monkeypatch, capsys, tmp_path, tmpfs):
    cpu_with_bf16(monkeypatch, True)
    measure, calls = fake_probe(10, 5)
    monkeypatch.setenv("FMNIST_CACHE_DIR", str(tmp_path))
    os.mkfifo(auto.cache_file())  # reading it would wait for a writer that never comes
    signal.signal(signal.SIGALRM, lambda *args: pytest.fail("the cache was opened and waited on"))
    signal.alarm(20)
    try:
        assert auto.main(["show"]) == 0 and "it is not a regular file (a pipe or a device)" in capsys.readouterr().out
        precision, evidence = auto.resolve_precision("auto", "cpu", MODEL, 64, 10_000, measure=measure)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
    assert precision == "bf16-mixed" and len(calls) == 1 and "probe" in evidence["verdict"]["source"]
    assert stat.S_ISFIFO(auto.cache_file().stat().st_mode)  # not replaced by the verdicts file
    cache = tmpfs("size=1m")
    monkeypatch.setenv("FMNIST_CACHE_DIR", str(cache))
    auto.cache_file().write_text("{}")
    subprocess.run(["mount", "-o", "remount,ro", str(cache)], check=True)
    assert auto.main(["clear"]) == 2 and auto.cache_file().is_file()
    assert f"cannot write {auto.cache_file()}: the file system is read-only" in capsys.readouterr().err


# Running out of memory: one paragraph with the allocation that failed and the setting to lower.
CUDA_OOM = ("CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has a total capacity of 79.19 GiB of which "
            "3.06 MiB is free. Of the allocated memory 78.2 GiB is allocated by PyTorch")
MPS_OOM = ("MPS backend out of memory (MPS allocated: 17.90 GiB, other allocations: 256.00 KiB, max allowed: "
           "18.13 GiB). Tried to allocate 9.19 MiB on private pool. Use PYTORCH_MPS_HIGH_WATERMARK_RATIO=0.0 to "
           "disable upper limit for memory allocations (may cause system failure).")
NUMPY_OOM = "Unable to allocate 931. GiB for an array with shape (1000000000000,) and data type uint8"  # 3 digits
# onnxruntime's, as its CPU arena raises it for a batch of 60,000 images under a 3 GB address-space limit
ONNXRUNTIME_OOM = ("[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running Conv node. Name:"
                   "'relu_nchwc' Status Message: /onnxruntime_src/onnxruntime/core/framework/bfc_arena.cc:360 void* "
                   "onnxruntime::BFCArena::AllocateRawInternal(size_t, bool, onnxruntime::Stream*) Failed to allocate "
                   "memory for requested buffer of size 6021120000")


def onnxruntime_fail(message: str) -> Exception:
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail

    return Fail(message)


CUDA_CALL_OOM = ("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported at some other API "
                 "call, so the stacktrace below might be incorrect.")


@pytest.mark.parametrize("allocate, expected", [
    (lambda: torch.empty(1 << 62, dtype=torch.uint8), "this machine ran out of memory (an allocation of 4.00 EiB failed)"),
    (lambda: np.empty(1 << 62, dtype=np.uint8), "this machine ran out of memory (an allocation of 4.00 EiB failed)"),
    (lambda: (_ for _ in ()).throw(torch.OutOfMemoryError(CUDA_OOM)),  # as CUDA's allocator raises it
     "the GPU ran out of memory (an allocation of 20.00 MiB failed)"),
    (lambda: (_ for _ in ()).throw(RuntimeError(MPS_OOM)),  # Apple's allocator: a plain RuntimeError
     "the GPU ran out of memory (an allocation of 9.19 MiB failed)"),
    (lambda: (_ for _ in ()).throw(RuntimeError(CUDA_CALL_OOM)), "the GPU ran out of memory"),
    (lambda: (_ for _ in ()).throw(MemoryError(NUMPY_OOM)),
     "this machine ran out of memory (an allocation of 931 GiB failed)"),
    (lambda: (_ for _ in ()).throw(onnxruntime_fail(ONNXRUNTIME_OOM)),
     "this machine ran out of memory (an allocation of 5.61 GiB failed)"),
])
def test_running_out_of_memory_is_one_paragraph_naming_what_to_lower(allocate, expected):
    with pytest.raises(OutOfMemory) as refused:
        with hardware.memory_errors("lower data.batch_size (256)"):
            allocate()
    assert str(refused.value) == f"{expected}: lower data.batch_size (256)."


def test_other_runtime_errors_pass_through_memory_errors_as_they_were():
    with pytest.raises(RuntimeError, match="mat1 and mat2 shapes cannot be multiplied"):
        with hardware.memory_errors("lower data.batch_size (256)"):
            torch.ones(2, 3) @ torch.ones(2, 3)
    with pytest.raises(ValueError, match=ONNXRUNTIME_OOM.split(" : ")[-1][:40]):  # the words, in another library's error
        with hardware.memory_errors("lower data.batch_size (256)"):
            raise ValueError(ONNXRUNTIME_OOM)


def test_measure_out_of_memory_at_its_batch_size_is_one_paragraph_and_caches_nothing(monkeypatch, capsys):
    def allocate_too_much(model, batch_size, device):
        return torch.empty(1 << 62, dtype=torch.uint8)  # the CPU allocator's own refusal

    monkeypatch.setattr(auto, "probe", allocate_too_much)
    assert auto.main(["measure", "model=simple", "data.batch_size=4096", "--device", "cpu"]) == 2
    assert capsys.readouterr().err == ("error: this machine ran out of memory (an allocation of 4.00 EiB failed): "
                                       "lower data.batch_size (4096), the batch the probe times.\n")
    assert not auto.cache_file().exists()
