"""`python export.py ckpt=PATH [out=model.onnx]`: one self-contained ONNX file, checked with onnxruntime.

The graph takes `images`, uint8 [N, 1, 28, 28] raw pixels (0-255, light garment on black, as in the
CSVs), with a dynamic batch dimension N, and returns `logits`, float32 [N, 10]. The preprocessing
(scaling to [0, 1], and the training mean/std where the model was trained with `data.normalize`)
is part of the graph. The model's metadata holds the class names (JSON), the checkpoint's path and
SHA-256, and the input's description.

The file is written beside `out` under a temporary name, checked, and only then renamed into
place: onnxruntime must give the same top-1 class as the PyTorch model on >= 99.9% of the test
images and logits within 1e-3 of it, or the export fails and nothing is left behind.
"""

from __future__ import annotations

import json
import logging
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn

from fmnist import CLASS_NAMES, IMAGE_SIDE
from fmnist.stops import stop_behind
from fmnist.config import EVAL_BATCH_SIZE
from fmnist.data.batches import network_input
from fmnist.data.csv_io import load_csv
from fmnist.errors import ConfigError, FmnistError
from fmnist.fsio import HEAD_BYTES, atomic_output, check_output_file, dirs_made, storage_errors
from fmnist.hardware import memory_errors
from fmnist.inference.config import check_export
from fmnist.inference.loading import LoadedModel, load_model

log = logging.getLogger(__name__)

MIN_TOP1_AGREEMENT = 0.999
MAX_LOGIT_DIFF = 1e-3
INPUT_NAME, OUTPUT_NAME = "images", "logits"
SIGNATURE = "exported by fmnist"  # in the model's doc string: how export.py recognises a file it wrote
INPUT_DOC = (f"uint8 [N, 1, {IMAGE_SIDE}, {IMAGE_SIDE}]: raw pixels 0-255, a light garment on a black background as in the "
             "Fashion-MNIST CSVs; scaling (and standardisation) happen inside the graph")


class ExportFailed(FmnistError):
    """The exported model does not agree with the PyTorch model, or could not be written."""


class RawPixelsModel(nn.Module):
    """uint8 images in, logits out: the training preprocessing followed by the network."""

    def __init__(self, loaded: LoadedModel):
        super().__init__()
        # ONNX has no memory formats: export the NCHW (contiguous) layout of a copy of the weights.
        self.net = _contiguous_copy(loaded.net).eval()
        self.normalize, self.mean, self.std = loaded.normalize, loaded.mean, loaded.std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(network_input(images, self.normalize, self.mean, self.std))


def _contiguous_copy(net: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(net).to(memory_format=torch.contiguous_format)


@contextmanager
def _quiet():
    """Hide the exporter's progress chatter (its optimizer passes log at INFO, torchvision ops are absent)."""
    loggers = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir", "torch.onnx")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def require_packages() -> None:
    """ConfigError naming the optional packages export needs (`pip install -e ".[export]"`) that are missing."""
    missing = []
    for name in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ConfigError(f"export needs the optional packages {', '.join(missing)}: install them with "
                          "pip install -e \".[export]\" (make install does).")


def to_onnx(loaded: LoadedModel, path: Path, checkpoint_name: str | None = None) -> None:
    """Export the model (eval mode, dynamic batch, no external data) to `path`, with metadata; `checkpoint_name`:
    how the metadata names the checkpoint (default: the path it was loaded from)."""
    wrapper = RawPixelsModel(loaded).eval()
    example = torch.zeros(2, 1, IMAGE_SIDE, IMAGE_SIDE, dtype=torch.uint8)
    with _quiet():
        try:
            program = torch.onnx.export(wrapper, (example,), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                        dynamic_shapes=({0: torch.export.Dim("batch")},), external_data=False,
                                        dynamo=True, verbose=False)
        except Exception as e:
            # Ctrl-C or SIGTERM during the exporter's first seconds (it imports torch._dynamo then) comes out of it
            # as a TorchExportError: the command is stopped, as it would be anywhere else.
            stop = stop_behind(e)
            if stop is None:
                raise
            raise type(stop)() from None
    program.model.doc_string = f"Fashion-MNIST classifier ({loaded.model['name']}), {SIGNATURE}"
    # The graph is one view per image: the run's test-time augmentation (`tta`) is not in it.
    metadata = {"class_names": json.dumps(list(CLASS_NAMES)), "checkpoint_sha256": loaded.sha256,
                "checkpoint_path": checkpoint_name or str(loaded.path), "input": INPUT_DOC, "model": json.dumps(loaded.model),
                "tta": f"none in this graph (the run was validated and tested with {loaded.tta})",
                "normalize": json.dumps({"enabled": loaded.normalize, "mean": loaded.mean, "std": loaded.std})}
    program.model.metadata_props.update(metadata)
    program.save(path, external_data=False)


def written_by_export(head: bytes) -> bool:
    """Whether an ONNX file's first bytes hold the doc string `to_onnx` writes (ModelProto field 6, before the graph)."""
    return SIGNATURE.encode() in head[:HEAD_BYTES]


@dataclass
class Agreement:
    """How closely the exported model's logits match PyTorch's on the same images (`ok`: within the limits)."""

    n_images: int
    top1: float  # share of images with the same top-1 class
    max_abs_diff: float  # over all logits

    @property
    def ok(self) -> bool:
        return self.top1 >= MIN_TOP1_AGREEMENT and self.max_abs_diff <= MAX_LOGIT_DIFF

    def line(self) -> str:
        return (f"onnxruntime vs PyTorch on {self.n_images} test images: same top-1 on {self.top1:.4%} "
                f"(need >= {MIN_TOP1_AGREEMENT:.1%}), max |logit difference| {self.max_abs_diff:.2e} "
                f"(need <= {MAX_LOGIT_DIFF:g})")


def compare(loaded: LoadedModel, onnx_path: Path, images: np.ndarray, batch_size: int = EVAL_BATCH_SIZE) -> Agreement:
    """onnxruntime on the file against the PyTorch model (as evaluate runs it) on uint8 images [N, 28, 28]."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4  # fatal only: an error comes out as the exception, said once (memory_errors)
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    x = np.ascontiguousarray(images.reshape(-1, 1, IMAGE_SIDE, IMAGE_SIDE), dtype=np.uint8)
    ours = np.concatenate([session.run([OUTPUT_NAME], {INPUT_NAME: x[i:i + batch_size]})[0]
                           for i in range(0, len(x), batch_size)])
    theirs = loaded.logits_batched(x, batch_size).numpy()
    return Agreement(len(x), float((ours.argmax(1) == theirs.argmax(1)).mean()), float(np.abs(ours - theirs).max()))


def export(cfg: DictConfig, checkpoint_name: str | None = None) -> Agreement:
    """Export `cfg.ckpt` to `cfg.out` and check it on the test CSV; return the agreement. `checkpoint_name`:
    see `to_onnx` (a shipped model names where its checkpoint is shipped, not where it was staged)."""
    check_export(cfg)
    cfg.out = str(Path(cfg.out).expanduser())  # `~/model.onnx`, as ckpt= takes it
    check_output_file(Path(cfg.out), "out", cfg.overwrite, written_by_export, "export.py")
    require_packages()
    loaded = load_model(cfg.ckpt)
    csv = loaded.test_csv(cfg.data.dir)
    images, _ = load_csv(csv)
    out = Path(cfg.out)
    with storage_errors(key="out"), dirs_made(out.parent), \
            atomic_output(out, suffix=".onnx", replace=cfg.overwrite) as tmp:
        to_onnx(loaded, tmp, checkpoint_name)
        batch_size = cfg.data.batch_size or EVAL_BATCH_SIZE
        with memory_errors(f"lower data.batch_size ({batch_size}), the batches that check the exported model"):
            agreement = compare(loaded, tmp, images, batch_size)
        print(agreement.line())
        if not agreement.ok:
            raise ExportFailed(f"{out}: not written: the exported model disagrees with the PyTorch model. "
                               + agreement.line() + ".")
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB): input `{INPUT_NAME}` {INPUT_DOC}; output "
          f"`{OUTPUT_NAME}` float32 [N, 10]; checkpoint {loaded.path} (sha256 {loaded.sha256[:12]})")
    return agreement
