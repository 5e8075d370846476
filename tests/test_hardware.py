"""`trainer.precision=auto`: the hardware decides, the probe's verdict is honoured and cached, an explicit value wins."""

import json

import pytest
import torch
from omegaconf import OmegaConf

from fmnist import hardware
from fmnist.training import precision as auto
from fmnist.models import training_flops_per_image
from fmnist.training.train import train
from tests.conftest import build, compose_cfg

MODEL = OmegaConf.to_container(compose_cfg("model=simple").model)


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FMNIST_CACHE_DIR", str(tmp_path / "cache"))


def fake_probe(fp32_ms: float, bf16_ms: float):
    calls = []

    def probe(model: dict) -> dict:
        calls.append(model)
        return {"fp32_ms": fp32_ms, "bf16_ms": bf16_ms, "batch_size": 16}
    return probe, calls


def cpu_with_bf16(monkeypatch, native: bool):
    monkeypatch.setattr(hardware, "device_kind", lambda accelerator: "cpu")
    monkeypatch.setattr(hardware, "native_cpu_bf16", lambda: native)


def test_explicit_precision_always_wins(monkeypatch):
    probe, calls = fake_probe(10, 1)
    assert auto.resolve_precision("32-true", "cpu", MODEL, probe)[0] == "32-true"
    assert auto.resolve_precision("bf16-mixed", "cpu", MODEL, probe)[0] == "bf16-mixed"
    assert calls == []


def test_cpu_without_native_bf16_takes_fp32_without_probing(monkeypatch):
    cpu_with_bf16(monkeypatch, native=False)
    probe, calls = fake_probe(10, 1)
    precision, evidence = auto.resolve_precision("auto", "cpu", MODEL, probe)
    assert precision == "32-true" and calls == [] and "no native bf16" in evidence["reason"]


@pytest.mark.parametrize("fp32_ms, bf16_ms, expected", [(10.0, 5.0, "bf16-mixed"), (10.0, 9.5, "32-true"),
                                                         (10.0, 20.0, "32-true")])
def test_cpu_with_native_bf16_follows_the_probe(monkeypatch, fp32_ms, bf16_ms, expected):
    cpu_with_bf16(monkeypatch, native=True)
    probe, calls = fake_probe(fp32_ms, bf16_ms)
    precision, evidence = auto.resolve_precision("auto", "cpu", MODEL, probe)
    assert precision == expected and len(calls) == 1
    assert evidence["probe"]["fp32_ms"] == fp32_ms and evidence["resolved"] == expected


def test_the_probe_verdict_is_cached_per_architecture(monkeypatch):
    cpu_with_bf16(monkeypatch, native=True)
    probe, calls = fake_probe(10, 5)
    auto.resolve_precision("auto", "cpu", MODEL, probe)
    precision, evidence = auto.resolve_precision("auto", "cpu", {**MODEL, "dropout": 0.3}, probe)
    assert precision == "bf16-mixed" and len(calls) == 1 and evidence["probe"]["cached"]
    auto.resolve_precision("auto", "cpu", {**MODEL, "hidden": 64}, probe)  # another architecture: probed
    assert len(calls) == 2


@pytest.mark.parametrize("bf16, expected", [(True, "bf16-mixed"), (False, "16-mixed")])
def test_cuda_takes_bf16_where_supported(monkeypatch, bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Test GPU")
    assert auto.resolve_precision("auto", "gpu", MODEL)[0] == expected


def test_the_real_probe_times_both_precisions():
    result = auto.probe_cpu_bf16(MODEL, batch_size=4, steps=1)
    assert result["fp32_ms"] > 0 and result["bf16_ms"] > 0


@pytest.mark.slow
def test_a_run_records_the_resolved_precision_and_hardware(make_cfg, tmp_path, monkeypatch):
    cpu_with_bf16(monkeypatch, native=True)
    probe, calls = fake_probe(10, 30)  # bf16 3x slower: auto must pick fp32
    monkeypatch.setattr(auto, "probe_cpu_bf16", probe)
    train(make_cfg("model=simple"), tmp_path)
    record = json.loads((tmp_path / "metrics.json").read_text())
    assert record["precision"]["requested"] == "auto" and record["precision"]["resolved"] == "32-true"
    assert record["precision"]["probe"]["bf16_ms"] == 30 and len(calls) == 1
    assert record["hardware"]["cores"] >= 1 and record["hardware"]["torch"] == torch.__version__


def test_flop_count_matches_the_simple_cnns_arithmetic():
    net = build("simple")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    conv1, conv2 = 28 * 28 * 32 * 9 * 2, 14 * 14 * 64 * 32 * 9 * 2
    fc = 64 * 7 * 7 * 128 * 2 + 128 * 10 * 2
    # backward = twice forward (input and weight gradients), except the input gradient of the first conv
    assert training_flops_per_image(net) == 3 * (conv1 + conv2 + fc) - conv1
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # the model is untouched
