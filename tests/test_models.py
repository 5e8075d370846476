import pytest
import torch

from fmnist import IMAGE_SIDE, NUM_CLASSES
from fmnist.config import OPTIMIZERS
from fmnist.errors import ConfigError
from fmnist.models import MODELS, ResidualBlock, build_model, check_model, model_keys
from fmnist.training.module import OPTIMIZER_CLASSES, LitClassifier
from tests.conftest import CONF, build, compose_cfg


@pytest.mark.parametrize("name", sorted(MODELS))
def test_forward_shape(name):
    model = build(name)
    out = model(torch.rand(4, 1, 28, 28))
    assert out.shape == (4, 10) and torch.isfinite(out).all()


def test_optimized_has_batchnorm_and_dropout_simple_has_neither():
    optimized, simple = build("optimized", dropout=0.4), build("simple")
    kinds = lambda m: {type(x).__name__ for x in m.modules()}  # noqa: E731
    assert {"BatchNorm2d", "Dropout", "Dropout2d"} <= kinds(optimized)
    assert "BatchNorm2d" not in kinds(simple)
    assert sum(isinstance(x, torch.nn.Conv2d) for x in simple.modules()) == 2
    assert sum(isinstance(x, torch.nn.Conv2d) for x in optimized.modules()) == 4


def test_the_registries_name_the_same_choices():
    assert set(MODELS) == {p.stem for p in (CONF / "model").glob("*.yaml")}
    assert set(OPTIMIZER_CLASSES) == set(OPTIMIZERS)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_models_yaml_gives_exactly_its_constructors_keys(name):
    cfg = compose_cfg(f"model={name}").model
    assert set(cfg) - {"name"} == set(model_keys(name)) and cfg.name == name
    check_model(cfg)


def test_a_model_config_that_does_not_fit_its_constructor_is_refused_naming_the_key():
    good = dict(compose_cfg("model=simple").model)
    for change, message in [({"hidden": "abc"}, "model.hidden must be an int"),
                            ({"hidden": True}, "model.hidden must be an int"),
                            ({"channels": [8, 0]}, "model.channels must be a list of one or more positive"),
                            ({"channels": [8, 8, 8]}, "model.channels must have 2 entries"),
                            ({"extra": 1}, "model.extra is not a key of model simple"),
                            ({"hidden": None}, "model.hidden has no value"),
                            ({"name": "vgg"}, "model.name must be one of")]:
        with pytest.raises(ConfigError, match=message):
            check_model({**good, **change})
    check_model({**good, "dropout": 0})  # an int is a float
    # Sizes the meta device builds but memory cannot hold: a config's refusal, not torch's traceback (exit 1).
    with pytest.raises(ConfigError, match=r"ran out of memory \(an allocation of .* failed\): model simple built from .*"
                                          r"'hidden': 100000000000.* is too large for it; lower its sizes"):
        check_model({**good, "hidden": 100_000_000_000})


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("optim", sorted(OPTIMIZERS))
def test_every_choice_composes_and_builds(model, optim):
    cfg = compose_cfg(f"model={model}", f"optim={optim}")
    assert cfg.model.name == model and cfg.optim.name == optim
    assert build_model(**cfg.model)(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def test_a_models_values_come_from_its_yaml_and_a_missing_one_is_named():
    dropouts = [m.p for m in build("optimized").modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts == [compose_cfg("model=optimized").model.dropout] == [0.3]  # conf/model/optimized.yaml
    with pytest.raises(ConfigError, match="model.hidden has no value"):  # nothing else to fall back on
        check_model(compose_cfg("model=optimized", "~model.hidden").model)


@pytest.mark.parametrize("name, kwargs, key", [("optimized", {"channels": [8]}, "model.channels"),
                                               ("resnet", {"widths": [8, 16], "blocks": [1]}, "model.widths")])
def test_bad_architectures_are_config_errors_naming_the_key(name, kwargs, key):
    with pytest.raises(ConfigError, match=f"config key.* {key}"):
        build(name, **kwargs)
    with pytest.raises(ConfigError, match="config key model.name"):
        build_model("vgg")


@pytest.mark.parametrize("overrides", [("model=optimized", "model.kernel_sizes=[4,4,4,4]"),  # the head's size
                                       ("model=resnet", "model.widths=[8,8,8,8,8,8]", "model.blocks=[1,1,1,1,1,1]")])
def test_a_network_that_cannot_take_a_28x28_image_is_refused_before_the_run(overrides):
    cfg = compose_cfg(*overrides)
    with pytest.raises(ConfigError, match=f"model {cfg.model.name} built from .* cannot take a 28 x 28 image"):
        check_model(cfg.model)
    state = torch.get_rng_state()
    check_model(compose_cfg("model=optimized", "model.hidden=97").model)  # a config the check has not seen
    assert torch.equal(torch.get_rng_state(), state)  # building it drew no random numbers of the run's


def test_zero_init_residual_starts_every_block_as_the_identity():
    x = torch.rand(2, 8, 6, 6)  # non-negative, as after a ReLU; 8 channels, the first stage's width
    for zero_init in [True, False]:
        net = build("resnet", widths=[8, 16], blocks=[2, 1], zero_init_residual=zero_init)
        first_stage = [m for m in net.modules() if isinstance(m, ResidualBlock)][:2]
        assert [torch.equal(block(x), x) for block in first_stage] == [zero_init] * 2
    # The scales still train: the first backward pass gives them a gradient.
    net = build("resnet", widths=[8, 16], blocks=[1, 1], zero_init_residual=True)
    net(torch.rand(4, 1, 28, 28)).sum().backward()
    assert all(b.body[-1].weight.grad.abs().sum() > 0 for b in net.modules() if isinstance(b, ResidualBlock))


def test_bias_lr_scale_trains_the_biases_apart_with_the_same_decay_per_step():
    cfg = compose_cfg("model=resnet", "model.widths=[8,16]", "model.blocks=[1,1]", "optim=adamw",
                      "optim.scheduler=none", "optim.warmup_epochs=0", "optim.lr=1e-3", "optim.weight_decay=0.05")
    lit = LitClassifier(model=dict(cfg.model), optim={**cfg.optim, "bias_lr_scale": 8.0})
    others, biases = lit.configure_optimizers().param_groups
    names = {id(p): name for name, p in lit.net.named_parameters()}
    assert {names[id(p)].rsplit(".", 1)[-1] for p in biases["params"]} == {"bias"}
    assert not any(names[id(p)].endswith("bias") for p in others["params"])
    assert len(others["params"]) + len(biases["params"]) == len(names)
    assert (others["lr"], biases["lr"]) == (1e-3, 8e-3)
    assert biases["lr"] * biases["weight_decay"] == pytest.approx(others["lr"] * others["weight_decay"])
    # The default keeps one group, as before the option existed.
    assert len(LitClassifier(model=dict(cfg.model), optim=dict(cfg.optim)).configure_optimizers().param_groups) == 1


class TinyMLP(torch.nn.Module):
    """A model a researcher adds: typed constructor parameters are its config keys."""

    def __init__(self, hidden: int, dropout: float, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(IMAGE_SIDE * IMAGE_SIDE, hidden), torch.nn.ReLU(),
                                       torch.nn.Dropout(dropout), torch.nn.Linear(hidden, num_classes))

    def forward(self, x):
        return self.net(x)


@pytest.mark.slow
def test_adding_a_model_is_a_class_a_registry_entry_and_its_yaml(monkeypatch, make_cfg, tmp_path):
    from fmnist.training.train import train

    monkeypatch.setitem(MODELS, "tiny_mlp", TinyMLP)
    conf = tmp_path / "conf"
    (conf / "model").mkdir(parents=True)
    (conf / "model" / "tiny_mlp.yaml").write_text("name: tiny_mlp\nhidden: 16\ndropout: 0.1\n")
    cfg = make_cfg("model=tiny_mlp", f"hydra.searchpath=[file://{conf}]")
    assert dict(cfg.model) == {"name": "tiny_mlp", "hidden": 16, "dropout": 0.1}
    metrics = train(cfg, tmp_path / "run")
    assert 0.0 <= metrics["test/acc"] <= 1.0
    with pytest.raises(ConfigError, match="model.hidden must be an int"):
        train(make_cfg("model=tiny_mlp", "model.hidden=wide", f"hydra.searchpath=[file://{conf}]"), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
