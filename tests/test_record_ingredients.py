"""The record recipes' ingredients, each a switch: identity (dirac) init, a patch-whitening stem, lookahead."""

from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from fmnist.errors import ConfigError
from fmnist.models import patch_whitening_filters
from fmnist.training.callbacks import Lookahead
from fmnist.training.module import WHITENING_IMAGES
from fmnist.training.train import train
from tests.conftest import build

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


@pytest.mark.parametrize("override, message", [("optim.lookahead_steps=-1", "optim.lookahead_steps must be"),
                                               ("optim.lookahead_alpha=0", "optim.lookahead_alpha must be in")])
def test_bad_lookahead_values_are_refused(make_cfg, tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        train(make_cfg("model=simple", override), tmp_path)
