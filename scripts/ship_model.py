"""Ship a finished run's best checkpoint as `pretrained/NAME.ckpt` and `pretrained/NAME.onnx`, with a card.

`python scripts/ship_model.py RUN_DIR [--name speedrun_cpu]` keeps only what inference needs from
the checkpoint (the weights, EMA-averaged where the run had EMA, and the model's and data's
hyperparameters; no optimizer state), checks that the shipped file reproduces the run's own test
accuracy, exports it to ONNX (checked against PyTorch), and writes `pretrained/NAME.md` with both
files' SHA-256, the accuracy and how the run was made. `ckpt=pretrained` then loads it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from fmnist.config import EVAL_BATCH_SIZE
from fmnist.errors import FmnistError
from fmnist.fsio import atomic_output, atomic_write, file_digest
from fmnist.inference.loading import PRETRAINED_DIR, best_in_run, load_model
from fmnist.runs import read_record
from fmnist.training.checkpoint import load_checkpoint

# What evaluate, predict and export read from a checkpoint; the rest (optimizer state, loops, callbacks) stays behind.
KEPT = ("state_dict", "hyper_parameters", "datamodule_hyper_parameters", "FashionMNISTDataModule", "epoch",
        "global_step", "pytorch-lightning_version")


def ship(run_dir: Path, name: str, out_dir: Path = PRETRAINED_DIR) -> Path:
    """Write out_dir/NAME.ckpt, NAME.onnx and NAME.md from the run's best checkpoint; return the card's path."""
    from omegaconf import OmegaConf

    from fmnist.inference.evaluate import classification_metrics
    from fmnist.inference.export import export

    record = read_record(run_dir) or {}
    source = best_in_run(run_dir)
    payload = load_checkpoint(source)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt = out_dir / f"{name}.ckpt"
    with atomic_output(ckpt) as tmp:
        torch.save({k: payload[k] for k in KEPT if k in payload}, tmp)
    loaded = load_model(ckpt)
    images, labels = loaded_test_set(loaded)
    logits = loaded.logits_batched(images, EVAL_BATCH_SIZE, tta=loaded.module.tta)
    accuracy = classification_metrics(logits, labels)[0]["accuracy"]
    recorded = record.get("metrics", {}).get("test/acc")
    onnx = out_dir / f"{name}.onnx"
    export(OmegaConf.create({"ckpt": str(ckpt), "out": str(onnx), "overwrite": True,
                             "data": {"dir": None, "batch_size": None}}))
    card = out_dir / f"{name}.md"
    atomic_write(card, card_text(name, record, loaded.model, accuracy, recorded, ckpt, onnx, run_dir))
    return card


def loaded_test_set(loaded):
    from fmnist.data.csv_io import load_csv

    return load_csv(loaded.test_csv(None))


def card_text(name, record, model, accuracy, recorded, ckpt, onnx, run_dir) -> str:
    hw = record.get("hardware") or {}
    lines = [
        f"# Shipped model: `{name}`", "",
        f"Use it as `ckpt=pretrained` (`python evaluate.py ckpt=pretrained`, `python predict.py ckpt=pretrained "
        f"inputs=[...]`, `python export.py ckpt=pretrained`), or run `{onnx.name}` with onnxruntime "
        "(input `images`, uint8 [N, 1, 28, 28]; output `logits` [N, 10]).", "",
        "| file | bytes | SHA-256 |", "|---|---|---|",
        *(f"| `{p.name}` | {p.stat().st_size:,} | `{file_digest(p, 'sha256')}` |" for p in (ckpt, onnx)), "",
        f"Test accuracy of the shipped checkpoint on the 10,000 Fashion-MNIST test images, with the run's own "
        f"test-time augmentation (`model.tta={model.get('tta', 'none')}`): **{accuracy:.2%}**"
        + (f" (the run recorded {recorded:.2%})." if recorded is not None else "."),
        "The ONNX file holds the plain network (one view per image, no TTA).", "",
        f"How it was made: `python train.py {' '.join(record.get('overrides', []))}` "
        f"(seed {record.get('seed')}, git commit {record.get('git_commit')}), on {hw.get('cpu')} ({hw.get('isa')}), "
        f"precision {((record.get('precision') or {}).get('resolved'))}, finished {record.get('finished_at')}; "
        f"{record.get('metrics', {}).get('epochs')} epochs, best validation accuracy "
        f"{record.get('metrics', {}).get('val/acc_best', float('nan')):.2%} at epoch "
        f"{record.get('metrics', {}).get('best_epoch')} (the epoch kept).",
        "", f"Model: `{json.dumps(model)}`", "",
        f"Made by `python scripts/ship_model.py {run_dir} --name {name}`.", "",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a finished run directory")
    parser.add_argument("--name", default="speedrun_cpu", help="the shipped files' name (default: speedrun_cpu)")
    args = parser.parse_args()
    try:
        print(ship(args.run_dir, args.name).read_text())
    except FmnistError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
