"""The record recipes' ingredients, each a switch: identity (dirac) init, a patch-whitening stem, lookahead, Muon."""

import copy
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from fmnist.errors import CheckpointError, ConfigError
from fmnist.models import patch_whitening_filters
from fmnist.training.averaging import Lookahead
from fmnist.training.module import OPTIMIZER_CLASSES, WHITENING_IMAGES, fused_on, parameter_groups
from fmnist.training import muon
from fmnist.training.muon import Muon, orthogonalize, orthogonalize_together
from fmnist.training.train import train
from tests.conftest import TensorOps, build, snapshot

RESNET = ["model=resnet", "model.widths=[24,32]", "model.blocks=[1,1]", "trainer.deterministic=true",
          "trainer.precision=32-true"]


def _convs(net):
    return [m for m in net.features.modules() if isinstance(m, torch.nn.Conv2d)]


def test_dirac_init_makes_each_convolution_start_as_the_identity_on_its_input_channels():
    torch.manual_seed(0)
    net = build("resnet", widths=[8, 16], blocks=[1, 1], dirac_init=True)
    x = torch.randn(2, 16, 7, 7)
    for conv in _convs(net):
        c_in = conv.in_channels
        out = conv(x[:, :c_in])
        assert torch.allclose(out[:, :c_in], x[:, :c_in], atol=1e-6)  # identity on the first c_in channels...
        if conv.out_channels > c_in:
            assert not torch.allclose(out[:, c_in:], torch.zeros_like(out[:, c_in:]))  # ...random init on the rest
    torch.manual_seed(0)
    plain = build("resnet", widths=[8, 16], blocks=[1, 1])
    assert not any(torch.allclose(c(x[:, :c.in_channels])[:, :c.in_channels], x[:, :c.in_channels], atol=1e-3)
                   for c in _convs(plain))


def test_patch_whitening_filters_decorrelate_the_patches_to_unit_variance():
    torch.manual_seed(0)
    noise = torch.randn(300, 1, 28, 28)
    images = noise + torch.roll(noise, 1, -1) + 0.5 * torch.roll(noise, 1, -2)  # neighbouring pixels correlated
    patches = F.unfold(images, 3).transpose(1, 2).reshape(-1, 9)
    assert (torch.cov(patches.T) - torch.eye(9)).abs().max() > 0.4  # far from white to begin with
    filters = patch_whitening_filters(images, 3)
    assert filters.shape == (18, 1, 3, 3) and torch.equal(filters[9:], -filters[:9])
    responses = F.conv2d(images, filters[:9]).permute(1, 0, 2, 3).reshape(9, -1)
    assert torch.allclose(torch.cov(responses), torch.eye(9), atol=0.02)


class StemAtTrainStart(L.Callback):
    def on_train_start(self, trainer, pl_module):
        self.stem = pl_module.net.stem.weight.detach().clone()
        self.expected = patch_whitening_filters(trainer.datamodule.model_inputs("train", WHITENING_IMAGES), 3)


@pytest.mark.slow
def test_whitening_stem_is_set_from_the_training_images_and_a_resume_keeps_the_trained_one(make_cfg, tmp_path):
    first = StemAtTrainStart()
    train(make_cfg(*RESNET, "model.whiten_stem=true"), tmp_path, callbacks=[first])
    assert torch.allclose(first.stem[:18], first.expected, atol=1e-5)
    trained = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]["net.features.0.0.weight"]
    assert not torch.allclose(trained[:18], first.expected, atol=1e-5)  # one epoch moved it
    resumed = StemAtTrainStart()
    train(make_cfg(*RESNET, "model.whiten_stem=true", "trainer.max_epochs=2", "ckpt_path=last"), tmp_path,
          callbacks=[resumed])
    assert torch.equal(resumed.stem, trained)


def test_lookahead_pulls_the_weights_back_every_k_steps():
    param = torch.nn.Parameter(torch.zeros(3))
    module = torch.nn.Module()
    module.p = param
    look = Lookahead(steps=2, alpha=0.5)
    trainer = SimpleNamespace(global_step=0)
    look.on_train_start(trainer, module)
    for step, value in ((1, 4.0), (2, 8.0)):  # what the optimizer made of the weights by each step
        trainer.global_step = step
        param.data.fill_(value)
        look.on_train_batch_end(trainer, module, None, None, step - 1)
    assert torch.equal(param.data, torch.full((3,), 4.0))  # 0 + 0.5 * (8 - 0): slow and fast weights meet
    look.on_train_batch_end(trainer, module, None, None, 2)  # an accumulated batch at the same step: no second pull
    assert torch.equal(param.data, torch.full((3,), 4.0))
    again = Lookahead(steps=2, alpha=0.5)
    again.load_state_dict(look.state_dict())
    assert again.synced_at == 2 and torch.equal(again.slow[0], look.slow[0])


@pytest.mark.slow
def test_lookahead_survives_a_resume(make_cfg, tmp_path):
    """2 epochs in one go end with the same weights as 1 epoch resumed for a 2nd: the slow weights are checkpointed."""
    look = [*RESNET, "optim.lookahead_steps=2"]
    train(make_cfg(*look, "trainer.max_epochs=2"), tmp_path / "whole")
    train(make_cfg(*look), tmp_path / "resumed")
    train(make_cfg(*look, "trainer.max_epochs=2", "ckpt_path=last"), tmp_path / "resumed")
    whole, resumed = (torch.load(tmp_path / d / "checkpoints" / "last.ckpt", weights_only=True)
                      for d in ("whole", "resumed"))
    for name, value in whole["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][name]), name
    plain = tmp_path / "plain"
    train(make_cfg(*RESNET, "trainer.max_epochs=2"), plain)
    weights = torch.load(plain / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert any(not torch.equal(weights[k], v) for k, v in whole["state_dict"].items() if k.startswith("net."))
    # Slow weights that do not fit the model (damaged) are named before the resume rewrites the record.
    last = tmp_path / "resumed" / "checkpoints" / "last.ckpt"
    for slow, words in ((resumed["callbacks"]["Lookahead"]["slow"][:-1], "slow weights are not the shapes"),
                        ([torch.full_like(s, float("nan")) for s in resumed["callbacks"]["Lookahead"]["slow"]],
                         "slow weights should be finite")):
        torch.save({**resumed, "callbacks": {**resumed["callbacks"], "Lookahead": {"slow": slow, "synced_at": 0}}}, last)
        before = snapshot(tmp_path / "resumed")
        with pytest.raises(CheckpointError, match=f"its callback state `Lookahead` cannot be restored .*{words}"):
            train(make_cfg(*look, "trainer.max_epochs=3", "ckpt_path=last"), tmp_path / "resumed")
        assert snapshot(tmp_path / "resumed") == before


@pytest.mark.parametrize("override, message", [("optim.lookahead_steps=-1", "optim.lookahead_steps must be"),
                                               ("optim.lookahead_alpha=0", "optim.lookahead_alpha must be in")])
def test_bad_lookahead_values_are_refused(make_cfg, tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        train(make_cfg("model=simple", override), tmp_path)


def test_orthogonalize_brings_every_singular_value_near_one_and_keeps_the_singular_vectors():
    torch.manual_seed(0)
    for shape in [(16, 72), (72, 16), (32, 32)]:
        k = min(shape)
        u, _ = torch.linalg.qr(torch.randn(shape[0], k))
        v, _ = torch.linalg.qr(torch.randn(shape[1], k))
        matrix = u @ torch.diag(torch.logspace(1, -0.5, k)) @ v.T  # singular values from 10 down to 0.3
        out = orthogonalize(matrix)
        assert out.shape == matrix.shape
        in_axes = u.T @ out @ v  # `out` in the singular axes of `matrix`: diagonal if it kept them
        assert torch.allclose(in_axes, torch.diag(torch.diag(in_axes)), atol=1e-4)
        singular = torch.diag(in_axes)
        assert singular.min() > 0.5 and singular.max() < 1.3, singular

def test_orthogonalize_together_gives_each_matrix_its_own_orthogonalization():
    # Filter banks of a ResNet's shapes, tall ones included, padded into one batch: the padding must not leak.
    torch.manual_seed(0)
    matrices = [torch.randn(shape) * scale for shape, scale in
                [((32, 9), 1.0), ((32, 288), 0.01), ((64, 576), 3.0), ((64, 32), 1.0), ((128, 1152), 0.1)]]
    together = orthogonalize_together(matrices)
    for matrix, out in zip(matrices, together):
        assert out.shape == matrix.shape
        assert torch.allclose(out, orthogonalize(matrix), atol=1e-4), matrix.shape


def _net():
    # No bias before the batch norm: its gradient would be rounding noise, which Adam scales up to full steps.
    return torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, bias=False), torch.nn.BatchNorm2d(8), torch.nn.Flatten(),
                               torch.nn.Linear(8 * 26 * 26, 10))


def _steps(net, optimizer, n, seed=0):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randn(4, 1, 28, 28, generator=generator)
        y = torch.randint(0, 10, (4,), generator=generator)
        optimizer.zero_grad()
        F.cross_entropy(net(x), y).backward()
        optimizer.step()


def test_muon_moves_filters_by_an_orthogonalised_step_and_the_rest_exactly_as_adamw():
    torch.manual_seed(0)
    net = _net()
    before = net[0].weight.detach().clone()
    _steps(net, Muon(parameter_groups(net, 1e-2, 0.1, 1.0), lr=1e-2, weight_decay=0.1), 1)
    # A fresh Muon's first step: decoupled decay, then lr x 0.2 x sqrt(9) x the orthogonalised gradient of the
    # filters seen as an [8 filters, 1 x 3 x 3 inputs] matrix (9: its larger side).
    moved = (before * (1 - 1e-2 * 0.1) - net[0].weight.detach()).reshape(8, -1) / (1e-2 * 0.2 * 9 ** 0.5)
    singular = torch.linalg.svdvals(moved)
    assert singular.min() > 0.5 and singular.max() < 1.3, singular

    # Everything but the filters follows AdamW exactly, with the bias rate's groups: same data, same start,
    # the filters held still in both so that both see the same gradients.
    a = _net()
    b = copy.deepcopy(a)
    for m in (a, b):
        m[0].weight.requires_grad_(False)
    _steps(a, Muon(parameter_groups(a, 1e-2, 0.1, 4.0), lr=1e-2, weight_decay=0.1), 3)
    _steps(b, torch.optim.AdamW(parameter_groups(b, 1e-2, 0.1, 4.0), lr=1e-2, weight_decay=0.1), 3)
    start = _net()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(pa, pb, atol=1e-6), name
    assert not torch.allclose(a[3].weight, start[3].weight)


def test_muon_resumes_exactly_from_its_state_dict():
    torch.manual_seed(0)
    net = _net()
    optimizer = Muon(parameter_groups(net, 1e-2, 0.1, 4.0), lr=1e-2, weight_decay=0.1)
    _steps(net, optimizer, 2)
    saved_net, saved_optimizer = copy.deepcopy(net.state_dict()), copy.deepcopy(optimizer.state_dict())
    _steps(net, optimizer, 2, seed=1)
    resumed = _net()
    resumed.load_state_dict(saved_net)
    resumed_optimizer = Muon(parameter_groups(resumed, 1e-2, 0.1, 4.0), lr=1e-2, weight_decay=0.1)
    resumed_optimizer.load_state_dict(saved_optimizer)
    _steps(resumed, resumed_optimizer, 2, seed=1)
    for (name, p), q in zip(net.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name


def _muon_step_ops(banks: int, monkeypatch) -> TensorOps:
    """The operations of a fused Muon's second step over `banks` filter banks and as many biases,
    the Newton-Schulz iteration left out (its batched form is counted in docs/performance.md)."""
    monkeypatch.setattr(muon, "orthogonalize", lambda matrix: matrix)
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(8, 4, 3, 3)) for _ in range(banks)]
    params += [torch.nn.Parameter(torch.randn(8)) for _ in range(banks)]
    optimizer = Muon(params, lr=1e-2, weight_decay=0.1, fused=True)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        counted = TensorOps()
        with counted:
            optimizer.step()
    return counted


def test_a_fused_muon_step_costs_the_same_few_operations_however_many_tensors_it_steps(monkeypatch):
    # Each operation is a kernel launch on a GPU, where a small model's step is bound by launches: one
    # multi-tensor operation per stage for all the banks, one fused AdamW kernel, and no value read back.
    few, many = _muon_step_ops(2, monkeypatch), _muon_step_ops(9, monkeypatch)
    assert few.ops == many.ops <= 10, (few.ops, many.ops)  # was 7 per bank plus 2 per bias, and 2 reads per bias
    assert few.reads == many.reads == 0


def test_a_fused_muon_steps_as_the_unfused_one():
    nets = [_net() for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    for net, fused in zip(nets, (False, True)):
        _steps(net, Muon(parameter_groups(net, 1e-2, 0.1, 4.0), lr=1e-2, weight_decay=0.1, fused=fused), 3)
    for (name, p), q in zip(nets[0].named_parameters(), nets[1].parameters()):
        assert torch.allclose(p, q, atol=1e-6), name


def test_every_optimizer_steps_fused_on_cuda_and_as_torch_defaults_elsewhere():
    assert fused_on(torch.device("cuda", 0)) == {"fused": True} and fused_on(torch.device("cpu")) == {}
    for name, (cls, keys) in OPTIMIZER_CLASSES.items():  # each accepts it (fused kernels run on a CPU too)
        net = _net()
        options = {"weight_decay": 0.1, "momentum": 0.9, "nesterov": True}
        _steps(net, cls(parameter_groups(net, 1e-2, 0.1, 4.0), lr=1e-2, **{k: options[k] for k in keys}, fused=True), 1)


def test_optim_muon_trains_the_filters_by_muon_and_the_rest_by_adamw(make_cfg, tmp_path):
    train(make_cfg(*RESNET, "optim=muon"), tmp_path)
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    (state,) = checkpoint["optimizer_states"]
    kinds = {frozenset(s) for s in state["state"].values()}
    assert kinds == {frozenset({"momentum_buffer"}), frozenset({"step", "exp_avg", "exp_avg_sq"})}
