"""Ship a finished run's best checkpoint as `pretrained/NAME.ckpt` and `pretrained/NAME.onnx`, with a card.

`python scripts/ship_model.py RUN_DIR [--name NAME]` keeps only what inference needs from
the checkpoint (the weights, EMA-averaged where the run had EMA, and the model's and data's
hyperparameters; no optimizer state), checks that the shipped file reproduces the run's own test
accuracy, exports it to ONNX (checked against PyTorch), and writes `pretrained/NAME.md` with both
files' SHA-256, the accuracy and how the run was made. `ckpt=pretrained` loads the one under the default name;
`ckpt=pretrained/NAME.ckpt` another.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

from fmnist.cli import UnknownOptionFirstParser, exit_if_no_working_directory, run_plain

exit_if_no_working_directory()  # here: torch's import fails in a deleted directory, with oneMKL's error instead

import torch

from fmnist import IMAGE_SIDE, NUM_CLASSES
from fmnist.config import EVAL_BATCH_SIZE
from fmnist.data.csv_io import csv_digest, load_csv
from fmnist.overrides import check_name
from fmnist.errors import ConfigError, StorageError
from fmnist.fsio import (atomic_write, check_writable, dirs_made, file_digest, load_checkpoint, path_argument,
                         storage_error, storage_errors)
from fmnist.inference.loading import DATAMODULE_STATE_KEY, PRETRAINED, PRETRAINED_DIR, best_in_run, load_model
from fmnist.runs import (COMPLETED, METRICS_FILE, read_config_section, read_record, record_problem, short_digest,
                         status_note)

# Test images whose prediction may change when a model tested in bf16 or fp16 is scored in fp32, as it is shipped.
MIXED_PRECISION_IMAGES = 10
# What evaluate, predict and export read from a checkpoint; the rest (optimizer state, loops, callbacks) stays behind.
KEPT = ("state_dict", "hyper_parameters", "datamodule_hyper_parameters", DATAMODULE_STATE_KEY, "epoch",
        "global_step", "pytorch-lightning_version")


def ship(run_dir: Path, name: str, out_dir: Path = PRETRAINED_DIR, replace: bool = False,
         data_dir: Path | None = None) -> Path:
    """Write out_dir/NAME.ckpt, NAME.onnx and NAME.md from the run's best checkpoint; return the card's path.

    Refused (ConfigError, nothing written) unless the run completed and the stripped checkpoint gives
    the run's recorded test accuracy back; the three files are made in a staging directory and moved
    into place only when all of them are ready.
    """
    from omegaconf import OmegaConf

    from fmnist.inference.evaluate import classification_metrics
    from fmnist.inference.export import export

    check_name("--name", name, names=f"the shipped files in {out_dir}")
    if name.startswith("."):
        raise ConfigError(f"--name {name}: a name starting with '.' would ship hidden files; give a plain name.")
    targets = [out_dir / f"{name}{suffix}" for suffix in (".ckpt", ".onnx", ".md")]
    for target in targets:  # refused before the test set is scored: only a shipped file is ever replaced
        if (target.exists() or target.is_symlink()) and not (target.is_file() and not target.is_symlink()):
            raise ConfigError(f"--name {name}: {target} is {'a directory' if target.is_dir() else 'not a plain file'}, "
                              "not a shipped file; nothing was written. Move it away or give another --name.")
    shipped = [target for target in targets if target.exists()]
    if shipped and not replace:
        raise ConfigError(f"--name {name}: {shipped[0]} is already shipped; nothing was written. Give another --name, "
                          "or --replace to ship this run in its place.")
    if not (run_dir / METRICS_FILE).is_file():
        what = ("holds no metrics.json (a sweep's directory holds its jobs: pass one of them)" if run_dir.is_dir()
                else "not a directory" if run_dir.exists() else "no such directory")
        raise ConfigError(f"{run_dir}: {what}; expected a run directory; not shipped.")
    record = read_record(run_dir)
    problem = record_problem(run_dir, record)
    if problem:  # the card states the record's fields
        raise ConfigError(f"{problem}; not shipped.")
    record = record or {}
    if record.get("status") != COMPLETED:
        raise ConfigError(f"{run_dir}: a run ships only once it has completed; its status is {status_note(record)}.")
    recorded = record.get("metrics", {}).get("test/acc")
    if recorded is None:
        raise ConfigError(f"{run_dir}: its metrics.json holds no test accuracy, which the shipped model must "
                          "reproduce; not shipped.")
    limit = read_config_section(run_dir, "trainer").get("limit_test_batches")  # a damaged config.yaml is named
    if limit is not None and not (isinstance(limit, float) and limit == 1.0):  # an int counts batches: 1 is one
        raise ConfigError(f"{run_dir}: its test accuracy covers part of the test set (trainer.limit_test_batches="
                          f"{limit}), which the shipped model cannot be checked against; not shipped.")
    precision = (record.get("precision") or {}).get("resolved", "32-true")
    source = best_in_run(run_dir, suggest_last=False)  # the best on validation, or nothing
    test_dir = None if data_dir is None else str(data_dir)
    # A checkpoint that cannot serve (weights that are not finite) is named as the run's.
    test_csv = load_model(source).test_csv(test_dir, key="--data-dir")
    tested = (record.get("data_digest") or {}).get("test")
    if tested and (digest := csv_digest(test_csv)) != tested:  # the card states a score on the run's test set
        raise ConfigError(f"{test_csv}: not the test CSV the run was tested on (SHA-1 {short_digest(digest)}, the "
                          f"run's {short_digest(tested)}), so the shipped model could not be checked against the "
                          "run's test accuracy; not shipped. Give --data-dir the directory of the run's CSVs.")
    payload = load_checkpoint(source)
    # A read-only out_dir: one paragraph, before the test set is scored; a refusal leaves no folder it made.
    with storage_errors(key=None), dirs_made(out_dir):
        check_writable(out_dir, key=None)
        staging = Path(tempfile.mkdtemp(prefix=".ship-", dir=out_dir))
        try:
            with shipping_errors(staging, out_dir):  # a full disk: one paragraph naming the shipped file
                ckpt, onnx, card = (staging / f"{name}{suffix}" for suffix in (".ckpt", ".onnx", ".md"))
                # Serialised in memory first: torch.save reports a full disk as an opaque RuntimeError.
                buffer = io.BytesIO()
                torch.save({k: payload[k] for k in KEPT if k in payload}, buffer)
                atomic_write(ckpt, buffer.getvalue())  # as every file is written: an error names it, and it is on disk
                loaded = load_model(ckpt)
                images, labels = load_csv(test_csv)
                logits = loaded.logits_batched(images, EVAL_BATCH_SIZE, tta=loaded.tta)
                accuracy = classification_metrics(logits, labels)[0]["accuracy"]
                differing = round(abs(accuracy - recorded) * len(labels))
                allowed = MIXED_PRECISION_IMAGES if precision.endswith("-mixed") else 1  # one image: rounding
                if differing > allowed:
                    raise ConfigError(f"{source}: stripped of its training state it scores {accuracy:.2%} on the "
                                      f"test set in fp32, not the {recorded:.2%} the run recorded in {precision}: "
                                      f"{differing} of {len(labels):,} images, where at most {allowed} may differ; "
                                      "not shipped.")
                export(OmegaConf.create({"ckpt": str(ckpt), "out": str(onnx), "overwrite": False,
                                         "data": {"dir": test_dir, "batch_size": None}}),
                       shipped_name(out_dir / ckpt.name))
                final = {p: out_dir / p.name for p in (ckpt, onnx, card)}
                atomic_write(card, card_text(name, record, loaded.model, loaded.tta, accuracy, recorded, ckpt, onnx,
                                             run_dir, len(labels), ckpt_value(final[ckpt])))
                move_into_place(final, staging)
                return final[card]
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def move_into_place(final: dict[Path, Path], staging: Path) -> None:
    """Move each staged file onto its target, all or none: the files a model replaces are moved into `staging`
    first, and put back if any move fails (a card that cannot be replaced would otherwise describe the files of
    another run)."""
    kept: dict[Path, Path] = {}
    placed: list[Path] = []
    try:
        for target in final.values():
            if target.exists():
                kept[target] = staging / f".replaced-{target.name}"
                os.replace(target, kept[target])
        for staged, target in final.items():
            os.replace(staged, target)
            placed.append(target)
    except BaseException:
        for target in placed:
            target.unlink(missing_ok=True)
        for target, old in kept.items():
            if old.exists():
                os.replace(old, target)
        raise


@contextmanager
def shipping_errors(staging: Path, out_dir: Path):
    """A full or read-only disk while the files are made in `staging`: StorageError naming the file as it would be
    shipped in `out_dir`, with no config key to change (ship_model.py has none for the place; export.py's own
    paragraph would name its `out=`)."""
    try:
        yield
    except (OSError, StorageError) as e:
        error = e.__cause__ if isinstance(e, StorageError) else e  # export's StorageError: the OSError it was made from
        mapped = None
        if isinstance(error, OSError):
            if error.filename and Path(error.filename).parent == staging:
                error.filename = str(out_dir / Path(error.filename).name)
            mapped = storage_error(error, key=None)
        if mapped is None:
            raise
        raise mapped from error


def shipped_name(path: Path) -> str:
    """How a shipped file is named in its ONNX metadata: relative to the repository when inside it
    (`pretrained/speedrun_cpu.ckpt`), else its full path."""
    root = PRETRAINED_DIR.parent
    path = path.resolve()
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def ckpt_value(shipped: Path) -> str:
    """The `ckpt=` that loads a checkpoint shipped at `shipped`: `pretrained` for the default one."""
    if shipped.resolve() == PRETRAINED.resolve():
        return "pretrained"
    if shipped.resolve().parent == PRETRAINED_DIR.resolve():
        return f"{PRETRAINED_DIR.name}/{shipped.name}"
    return str(shipped)


def card_text(name, record, model, tta, accuracy, recorded, ckpt, onnx, run_dir, n_test: int, given: str) -> str:
    """The model card: how to use the files (`given`: the `ckpt=` that loads it), their digests, the test accuracy on
    the `n_test` images of the run's own test CSV (the standard set holds 10,000), and how the run was made."""
    hw = record.get("hardware") or {}
    root = " from the repository's root" if given.startswith(f"{PRETRAINED_DIR.name}/") else ""  # `pretrained` works anywhere
    test_sha1 = short_digest((record.get("data_digest") or {}).get("test"))
    test_csv = f" (SHA-1 {test_sha1})" if test_sha1 else ""
    lines = [
        f"# Shipped model: `{name}`", "",
        f"Use it as `ckpt={given}`{root} (`python evaluate.py ckpt={given}`, `python predict.py ckpt={given} "
        f"inputs=[...]`, `python export.py ckpt={given}`), or run `{onnx.name}` with onnxruntime "
        f"(input `images`, uint8 [N, 1, {IMAGE_SIDE}, {IMAGE_SIDE}]; output `logits` [N, {NUM_CLASSES}]).", "",
        "| file | bytes | SHA-256 |", "|---|---|---|",
        *(f"| `{p.name}` | {p.stat().st_size:,} | `{file_digest(p, 'sha256')}` |" for p in (ckpt, onnx)), "",
        f"Test accuracy of the shipped checkpoint on the {n_test:,} images of the run's test CSV{test_csv}, with the run's own "
        f"test-time augmentation (`tta={tta}`): **{accuracy:.2%}**"
        + (f" (the run recorded {recorded:.2%})." if recorded is not None else "."),
        "The ONNX file holds the plain network (one view per image, no TTA).", "",
        f"How it was made: `python train.py {' '.join(record.get('overrides', []))}` "
        f"(seed {record.get('seed')}, git commit {record.get('git_commit')}), on {hw.get('cpu')} ({hw.get('isa')}), "
        f"precision {((record.get('precision') or {}).get('resolved'))}, finished {record.get('finished_at')}; "
        f"{record.get('metrics', {}).get('epochs')} epochs, best validation accuracy "
        f"{record.get('metrics', {}).get('val/acc_best', float('nan')):.2%} at epoch "
        f"{record.get('metrics', {}).get('best_epoch')} (the epoch kept).",
        "", f"Model: `{json.dumps(model)}`", "",
        f"Made by `python scripts/ship_model.py RUN_DIR --name {name}`, RUN_DIR being that run's directory.", "",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = UnknownOptionFirstParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=path_argument, help="a finished run directory")
    parser.add_argument("--name", default=PRETRAINED.stem,
                        help=f"the shipped files' name (default: {PRETRAINED.stem}, the one ckpt=pretrained loads)")
    parser.add_argument("--replace", action="store_true", help="replace a model already shipped under --name")
    parser.add_argument("--data-dir", type=path_argument, default=None,
                        help="the directory holding the test CSV (default: the one the run was trained on)")
    args = parser.parse_args()
    return run_plain(lambda: print(ship(args.run_dir, args.name, replace=args.replace,
                                        data_dir=args.data_dir).read_text()), unwind_on_sigterm=True)


if __name__ == "__main__":
    sys.exit(main())
