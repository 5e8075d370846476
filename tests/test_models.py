import pytest
import torch

from fmnist.models import MODELS, build_model
from tests.conftest import compose_cfg


@pytest.mark.parametrize("name", sorted(MODELS))
def test_forward_shape(name):
    model = build_model(name)
    out = model(torch.rand(4, 1, 28, 28))
    assert out.shape == (4, 10) and torch.isfinite(out).all()


def test_optimized_has_batchnorm_and_dropout_simple_has_neither():
    optimized, simple = build_model("optimized", dropout=0.4), build_model("simple")
    kinds = lambda m: {type(x).__name__ for x in m.modules()}  # noqa: E731
    assert {"BatchNorm2d", "Dropout", "Dropout2d"} <= kinds(optimized)
    assert "BatchNorm2d" not in kinds(simple)
    assert sum(isinstance(x, torch.nn.Conv2d) for x in simple.modules()) == 2
    assert sum(isinstance(x, torch.nn.Conv2d) for x in optimized.modules()) == 4


@pytest.mark.parametrize("model", ["simple", "optimized", "resnet"])
@pytest.mark.parametrize("optim", ["adam", "adamw", "sgd"])
def test_every_choice_composes_and_builds(model, optim):
    cfg = compose_cfg(f"model={model}", f"optim={optim}")
    assert cfg.model.name == model and cfg.optim.name == optim
    arch = {k: v for k, v in cfg.model.items() if k not in ("channels_last", "compile")}
    assert build_model(**arch)(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def test_unknown_model():
    with pytest.raises(ValueError, match="unknown model 'vgg'"):
        build_model("vgg")
