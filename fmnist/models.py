"""CNN architectures for 1x28x28 inputs and 10 classes, each a plain `nn.Module` built from config values.

`MODELS` is the one registry: `model=NAME` builds `MODELS[NAME]` from the keys of `conf/model/NAME.yaml`.
A constructor's typed parameters are the model's config keys (`check_model` checks a config against
them before a run starts); the values live in the YAML file, and a checkpoint carries the values it
was trained with.
"""

from __future__ import annotations

import copy
import functools
import inspect
import typing
from typing import Any, Callable

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fmnist import IMAGE_SIDE, NUM_CLASSES
from fmnist.config import ADDED_KEYS
from fmnist.errors import ConfigError, OutOfMemory
from fmnist.hardware import memory_errors

POOLED_SIDE = IMAGE_SIDE // 4  # the side of the feature maps the simple and optimized CNNs' heads take: two 2x2 poolings


def conv_bn_relu(c_in: int, c_out: int, kernel_size: int = 3) -> nn.Sequential:
    """A same-size convolution (no bias: batch norm's shift replaces it), batch norm and ReLU."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class SimpleCNN(nn.Module):
    """The report's baseline (Figure 4.7): two conv layers, no batch norm, a small FC head."""

    def __init__(self, channels: list[int], hidden: int, dropout: float, num_classes: int = NUM_CLASSES):
        super().__init__()
        if len(channels) != 2:
            raise ConfigError("config key model.channels must have 2 entries (the simple CNN has two conv layers); "
                              f"got {list(channels)}.")
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(c2 * POOLED_SIDE ** 2, hidden), nn.ReLU(inplace=True),
            nn.Dropout(dropout), nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class OptimizedCNN(nn.Module):
    """The report's optimized CNN: four conv blocks of varying kernel size with batch norm, dropout, FC head.

    Blocks 1-2 run at 28x28 and blocks 3-4 at 14x14, each pair followed by 2x2 max pooling and
    (spatial) dropout; `dropout=0` gives the report's no-dropout ablation.
    """

    def __init__(self, channels: list[int], kernel_sizes: list[int], hidden: int, dropout: float,
                 num_classes: int = NUM_CLASSES):
        super().__init__()
        if len(channels) != 4 or len(kernel_sizes) != 4:
            raise ConfigError("config keys model.channels and model.kernel_sizes must each have 4 entries (the "
                              f"optimized CNN has four conv blocks); got {list(channels)} and {list(kernel_sizes)}.")
        c, k = channels, kernel_sizes
        self.features = nn.Sequential(
            conv_bn_relu(1, c[0], k[0]), conv_bn_relu(c[0], c[1], k[1]), nn.MaxPool2d(2), nn.Dropout2d(dropout / 2),
            conv_bn_relu(c[1], c[2], k[2]), conv_bn_relu(c[2], c[3], k[3]), nn.MaxPool2d(2), nn.Dropout2d(dropout / 2),
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(c[3] * POOLED_SIDE ** 2, hidden), nn.ReLU(inplace=True),
            nn.Dropout(dropout), nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class ResidualBlock(nn.Module):
    """Two 3x3 conv-batch-norm layers at one width, added to the input before the last ReLU."""

    def __init__(self, width: int, zero_init: bool):
        super().__init__()
        self.body = nn.Sequential(
            conv_bn_relu(width, width),
            nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
        )
        self.relu = nn.ReLU(inplace=True)
        if zero_init:
            # The last batch norm's scale at 0 makes the block start as the identity: the early updates
            # train a shallow net and the residual branches grow in from there (Goyal et al., 2017).
            nn.init.zeros_(self.body[-1].weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(x + self.body(x))


class ResNet(nn.Module):
    """A small residual CNN: a stem, then per stage a (pooled) width change and `blocks[i]` residual blocks.

    Global average pooling keeps the head tiny; stages after the first halve the resolution.
    dirac_init: every 3x3 convolution starts as the identity on its first input-many output channels
    (airbench's identity init). whiten_stem: the stem's first filters are set from the training images
    by `whiten_stem_` before training (airbench's patch-whitening first layer). A checkpoint from before a key
    existed builds with its `ADDED_KEYS` value (`with_defaults`).
    """

    def __init__(self, widths: list[int], blocks: list[int], dropout: float, zero_init_residual: bool,
                 dirac_init: bool, whiten_stem: bool, num_classes: int = NUM_CLASSES):
        super().__init__()
        if not widths or len(widths) != len(blocks):
            raise ConfigError(f"config keys model.widths and model.blocks must be non-empty and of equal length "
                              f"(one residual stage each); got {list(widths)} and {list(blocks)}.")
        self.whiten_stem = whiten_stem
        layers: list[nn.Module] = [conv_bn_relu(1, widths[0])]
        for i, (width, n) in enumerate(zip(widths, blocks)):
            if i > 0:
                layers += [nn.MaxPool2d(2), conv_bn_relu(widths[i - 1], width)]
            layers += [ResidualBlock(width, zero_init_residual) for _ in range(n)]
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout),
                                  nn.Linear(widths[-1], num_classes))
        if dirac_init:
            for conv in self.features.modules():
                if isinstance(conv, nn.Conv2d) and conv.out_channels >= conv.in_channels:
                    with torch.no_grad():
                        nn.init.dirac_(conv.weight[:conv.in_channels])

    @property
    def stem(self) -> nn.Conv2d:
        return self.features[0][0]

    @torch.no_grad()
    def whiten_stem_(self, images: torch.Tensor) -> int:
        """Set the stem's first filters to whiten the 3x3 patches of `images` (float inputs as the network
        sees them, [N, 1, 28, 28]), each filter with its negative (`patch_whitening_filters`); the others
        keep their random init. Returns how many filters were set."""
        filters = patch_whitening_filters(images, self.stem.kernel_size[0])
        n = min(len(filters), self.stem.out_channels)
        self.stem.weight[:n] = filters[:n].to(self.stem.weight)
        return n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def patch_whitening_filters(images: torch.Tensor, kernel_size: int, eps: float = 5e-4) -> torch.Tensor:
    """Convolution filters [2 * C * k * k, C, k, k] that whiten the k x k patches of `images` [N, C, H, W].

    The eigenvectors of the patches' covariance, each divided by the square root of its eigenvalue
    (plus `eps`, so that near-constant directions are not blown up), so that their responses over
    these patches are uncorrelated with unit variance; then the same filters negated, so that the
    ReLU after them keeps both signs (airbench). Largest eigenvalues first.
    """
    c = images.shape[1]
    patches = F.unfold(images.float(), kernel_size).transpose(1, 2).reshape(-1, c * kernel_size ** 2).double()
    covariance = torch.cov(patches.T)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
    eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.flip(1)
    filters = (eigenvectors.T / torch.sqrt(eigenvalues.clamp(min=0) + eps)[:, None]).reshape(-1, c, kernel_size, kernel_size)
    return torch.cat([filters, -filters]).float()


# model=NAME -> its architecture. Adding a model: its class above, an entry here, conf/model/NAME.yaml
# with `name: NAME` and a value for each constructor parameter (docs/architecture.md).
MODELS: dict[str, type[nn.Module]] = {"simple": SimpleCNN, "optimized": OptimizedCNN, "resnet": ResNet}
FIXED_PARAMETERS = ("num_classes",)  # constructor parameters that the task fixes, not the config
# Model keys that say how the weights start, not what a training step computes (nor how fast).
INIT_ONLY_KEYS = ("zero_init_residual", "dirac_init", "whiten_stem")


def architecture(name: str) -> type[nn.Module]:
    """`MODELS[name]`, or ConfigError naming the choices."""
    if name not in MODELS:
        raise ConfigError(f"config key model.name must be one of {sorted(MODELS)}; got {name!r}.")
    return MODELS[name]


def model_keys(name: str) -> dict[str, Any]:
    """The config keys of model `name` (besides `name`) with their types: its constructor's typed parameters."""
    cls = architecture(name)
    hints = typing.get_type_hints(cls.__init__)
    return {p: hints[p] for p in list(inspect.signature(cls.__init__).parameters)[1:] if p not in FIXED_PARAMETERS}


def with_defaults(model: typing.Mapping) -> dict:
    """A `model` config with, for each of its architecture's keys it lacks that was added later, the value that
    behaves as the code did before (`ADDED_KEYS`): what a checkpoint written before the key existed builds with."""
    keys = model_keys(model["name"])
    added = {key[len("model."):]: value for key, value in ADDED_KEYS.items() if key.startswith("model.")}
    return {**{key: value for key, value in added.items() if key in keys}, **model}


def _has_type(value: Any, kind: Any) -> bool:
    if typing.get_origin(kind) is list:
        (item,) = typing.get_args(kind)
        return isinstance(value, (list, tuple)) and all(_has_type(v, item) for v in value)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _type_name(kind: Any) -> str:
    if typing.get_origin(kind) is list:
        item = typing.get_args(kind)[0]
        return "a list of " + {int: "integers", float: "numbers", bool: "bools", str: "strings"}.get(item, str(item))
    return {int: "an int", float: "a float", bool: "a bool (true or false)", str: "a string"}.get(kind, str(kind))


def check_model(model: typing.Mapping) -> None:
    """ConfigError naming the key when a `model` config does not fit its architecture: an unknown name,
    an unknown or missing key, a value of the wrong type, a size that is not positive, a dropout that
    is not a probability, or values the constructor itself refuses (it is built on the meta device,
    which allocates nothing), or a network that cannot take a 28 x 28 image (a forward pass checks every
    layer's shape)."""
    model = OmegaConf.to_container(model if isinstance(model, DictConfig) else OmegaConf.create(dict(model)), resolve=True)
    name = model.get("name")
    keys = model_keys(name)
    values = {k: v for k, v in model.items() if k != "name"}
    for key in values.keys() - keys.keys():
        raise ConfigError(f"config key model.{key} is not a key of model {name} (conf/model/{name}.yaml); its keys: "
                          f"{', '.join(keys)}.")
    for key, kind in keys.items():
        if key not in values or values[key] is None:
            raise ConfigError(f"config key model.{key} has no value; model {name} needs it (conf/model/{name}.yaml).")
        value = values[key]
        if not _has_type(value, kind):
            raise ConfigError(f"config key model.{key} must be {_type_name(kind)}; got {value!r}.")
        if kind is int and value < 1:
            raise ConfigError(f"config key model.{key} must be a positive integer; got {value!r}.")
        if kind == list[int] and not (len(value) >= 1 and all(v >= 1 for v in value)):
            raise ConfigError(f"config key model.{key} must be a list of one or more positive integers; got {value!r}.")
        if key == "dropout" and not 0.0 <= value < 1.0:
            raise ConfigError(f"config key model.dropout must be in [0, 1); got {value!r}.")
    try:
        with torch.device("meta"):
            architecture(name)(**values)
    except ConfigError:
        raise
    except (ValueError, TypeError, RuntimeError) as e:
        raise ConfigError(f"model {name} cannot be built from {values}: {e}") from e
    try:  # built for real: sizes the meta device takes may not fit in memory (model.hidden=100000000000)
        with memory_errors(f"model {name} built from {values} is too large for it; lower its sizes"):
            problem = _image_problem(name, tuple((k, tuple(v) if isinstance(v, list) else v)
                                                 for k, v in sorted(values.items())))
    except OutOfMemory as e:  # a config's refusal (exit 2), also where a sweep checks its jobs before the first
        raise ConfigError(str(e)) from None
    if problem:
        raise ConfigError(f"model {name} built from {values} cannot take a {IMAGE_SIDE} x {IMAGE_SIDE} image: {problem}")


@functools.lru_cache(maxsize=64)  # a sweep's start checks one model config in many combinations of other keys
def _image_problem(name: str, values: tuple) -> str | None:
    """Why the network of `name` built from `values` (key, value) pairs cannot take one 28 x 28 image, or None.
    A real forward pass on the CPU: on the meta device the first one in a process takes seconds."""
    with torch.random.fork_rng(devices=[]):  # building draws initial weights: a check leaves the random state alone
        net = architecture(name)(**{k: list(v) if isinstance(v, tuple) else v for k, v in values})
    try:
        with torch.no_grad():
            net.eval()(torch.zeros(1, 1, IMAGE_SIDE, IMAGE_SIDE))
    except (ValueError, TypeError, RuntimeError) as e:
        return str(e)
    return None


def build_model(name: str, **kwargs) -> nn.Module:
    """Build the architecture `name` from a `model` config's keys."""
    return architecture(name)(**kwargs)


def memory_format_input(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """A batch in the memory order the network computes in: channels-last (NHWC) for a run with `channels_last`."""
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def tta_logits(net: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, mode: str) -> torch.Tensor:
    """Logits of `x` [B, 1, 28, 28] under test-time augmentation `mode` (fmnist.config.TTA_MODES), in fp32.

    none: one view. flip: the mean of the image and its mirror image (a flip never changes a
    Fashion-MNIST label). flip_shift: half that, half the same for the image shifted one pixel
    up-left and one down-right (airbench's scheme; edges replicated, i.e. background).
    """
    if mode == "none":
        return net(x).float()

    def mirrored(v: torch.Tensor) -> torch.Tensor:
        # A copy of the first view's logits: a network in CUDA graphs (fast_path) overwrites its output at its next call.
        return (net(v).float().clone() + net(v.flip(-1)).float()) / 2

    logits = mirrored(x)
    if mode == "flip":
        return logits
    h, w = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
    shifted = (mirrored(padded[..., :h, :w]) + mirrored(padded[..., 2:, 2:])) / 2
    return (logits + shifted) / 2


def training_flops_per_image(net: nn.Module) -> int:
    """Floating-point operations of one training step (forward + backward) per 1x28x28 image.

    Counted by torch's FLOP counter (convolutions and matrix products, which dominate) on a copy
    of `net`, so the model's batch-norm statistics are not touched: a machine-independent measure
    of training compute, unlike seconds.
    """
    probe = copy.deepcopy(net).train()
    weight = next(probe.parameters())
    x = torch.rand(2, 1, IMAGE_SIDE, IMAGE_SIDE, device=weight.device, dtype=weight.dtype)  # bf16 weights under bf16-true
    counter = FlopCounterMode(display=False)
    with counter:
        probe(x).float().sum().backward()
    return counter.get_total_flops() // 2


NON_FINITE_WHY = "the run diverged before this checkpoint, or the file was damaged since"  # of weights non_finite names


def non_finite(net: nn.Module) -> list[str]:
    """The names of `net`'s floating-point parameters and buffers that hold NaN or infinite values."""
    return [k for k, v in net.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]


def weights_error(error: Exception, limit: int = 400) -> str:
    """Why weights did not load, on one line: torch's `load_state_dict` error names the missing, unexpected and
    misshapen keys only after its first line, which names none; cut after `limit` characters (a whole other model's
    keys run to thousands)."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    text = " ".join(lines[1:] if len(lines) > 1 else lines)
    return text if len(text) <= limit else text[:limit] + " ..."
