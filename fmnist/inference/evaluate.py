"""`python evaluate.py ckpt=PATH [data.dir=DIR] [tta=flip]`: test any checkpoint on any Kaggle-format test CSV.

Writes into a new evaluation directory (never into the run's own files), all at the end, each file
atomically, `metrics.json` last: `confusion_matrix.csv`, `confusion_matrix.png` and `metrics.json`
with accuracy, cross-entropy loss, macro-F1, per-class precision/recall/F1, expected calibration
error, the number of images and the checkpoint's path and SHA-256. Runs in fp32 on the CPU, with
the run's own evaluation batch size, so that a run directory's `test/acc` (from an fp32 run over
its whole test set) is reproduced exactly.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchmetrics.functional.classification as tm
from omegaconf import DictConfig, OmegaConf

from fmnist import CLASS_NAMES, NUM_CLASSES
from fmnist.data.csv_io import load_csv
from fmnist.errors import CheckpointError, ConfigError
from fmnist.fsio import RUN_DIR_KEY, atomic_output
from fmnist.hardware import memory_errors
from fmnist.inference.config import check_evaluate
from fmnist.inference.loading import best_in_run, load_model, run_test_acc, run_test_images, run_tested_on
from fmnist.provenance import now, provenance
from fmnist.runs import COMPLETED, CONFUSION_FILE, METRICS_FILE, read_record, write_record
from fmnist.training.rundir import own_run_dir

log = logging.getLogger(__name__)

ECE_BINS = 15  # equal-width confidence bins of the expected calibration error
CONFUSION_FIGURE = "confusion_matrix.png"  # beside CONFUSION_FILE in an evaluation directory


def classification_metrics(logits: torch.Tensor, labels: np.ndarray) -> tuple[dict, np.ndarray]:
    """(metrics, confusion matrix [true, predicted]) of logits [N, 10] against labels [N], by torchmetrics.

    Precision, recall and F1 of a class with no prediction or no image are 0 (torchmetrics' zero_division).
    """
    y = torch.as_tensor(labels)
    per_class = {"precision": tm.multiclass_precision, "recall": tm.multiclass_recall, "f1": tm.multiclass_f1_score}
    scores = {name: f(logits, y, NUM_CLASSES, average=None).tolist() for name, f in per_class.items()}
    cm = tm.multiclass_confusion_matrix(logits, y, NUM_CLASSES).numpy()
    metrics = {
        "accuracy": float(tm.multiclass_accuracy(logits, y, NUM_CLASSES, average="micro")),
        "loss": float(F.cross_entropy(logits, y)),  # plain cross-entropy, no label smoothing
        "macro_f1": float(np.mean(scores["f1"])),
        "ece": float(tm.multiclass_calibration_error(logits.softmax(dim=1), y, NUM_CLASSES, n_bins=ECE_BINS, norm="l1")),
        "n_images": int(len(labels)),
        "per_class": {name: {**{k: scores[k][i] for k in per_class}, "support": int(cm[i].sum())}
                      for i, name in enumerate(CLASS_NAMES)},
    }
    return metrics, cm


def _check_output_dir(out_dir: Path) -> None:
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise ConfigError(f"{out_dir} is not empty; an evaluation writes into a new directory (never into a run's "
                          f"or another evaluation's files): leave {RUN_DIR_KEY} at its default or name a new one.")


def evaluate(cfg: DictConfig, out_dir: Path) -> dict:
    """Evaluate `cfg.ckpt` on the test CSV and write the evaluation into `out_dir`; return the metrics."""
    check_evaluate(cfg)
    out_dir = Path(out_dir)
    _check_output_dir(out_dir)
    model = load_model(cfg.ckpt)
    csv = model.test_csv(cfg.data.dir)
    images, labels = load_csv(csv)
    batch_size = cfg.data.batch_size or model.eval_batch_size
    tta = cfg.tta if cfg.tta is not None else model.tta  # by default, as the run validated and tested
    whose = "" if cfg.data.batch_size else ", the run's own evaluation batch size"
    with memory_errors(f"lower data.batch_size ({batch_size}{whose})"):
        logits = model.logits_batched(images, batch_size, tta=tta)
    metrics, cm = classification_metrics(logits, labels)
    run_record = read_record(model.run_dir) if model.run_dir else None  # what the run itself recorded of its test
    record = {
        "status": COMPLETED, "finished_at": now(),
        "checkpoint": {"path": str(model.path.resolve()), "sha256": model.sha256, "run_dir": _str(model.run_dir),
                       "chosen": model.note or None, "model": model.model},
        "data": {"test_csv": str(csv.resolve()), "normalize": model.normalize, "mean": model.mean, "std": model.std,
                 "batch_size": batch_size},
        "tta": tta, "precision": "32-true", "metrics": metrics,
        "run_test_acc": run_test_acc(run_record), "run_test_images": run_test_images(model.run_dir),
        "run_tested_on_this_csv": run_tested_on(run_record, csv),
        "run_tested_this_checkpoint": _run_tested(model, run_record), "config": OmegaConf.to_container(cfg, resolve=True),
        **provenance(),
    }
    with own_run_dir(out_dir):  # another evaluation writing there now is refused (RunDirInUse), as is one after it
        if (out_dir / METRICS_FILE).exists():
            raise ConfigError(f"{out_dir}: another evaluation wrote its results there while this one ran; they are "
                              f"kept, and this evaluation wrote nothing. Name a new directory ({RUN_DIR_KEY}=...).")
        written = [out_dir / CONFUSION_FILE, out_dir / CONFUSION_FIGURE]
        try:
            with atomic_output(written[0]) as tmp:
                np.savetxt(tmp, cm, fmt="%d", delimiter=",")
            _write_figure(written[1], cm, csv, tta)
            write_record(out_dir, record)
        except BaseException:  # stopped or failed before its record: no half an evaluation is left to refuse the next
            for path in written:
                path.unlink(missing_ok=True)
            raise
    print(summary_table(record, out_dir))
    return record


def _run_tested(model, run_record: dict | None) -> bool | None:
    """Whether the checkpoint is the one its run tested (its best on validation): its `last.ckpt`, or an earlier best
    file, is another model than the one the run's test/acc describes. None outside a run, for a run that tested
    nothing, or one that tested its final weights (no file is known to hold them)."""
    if model.run_dir is None or run_test_acc(run_record) is None or run_record.get("tested") != "best checkpoint":
        return None
    try:
        return best_in_run(model.run_dir, suggest_last=False, warn=False).resolve() == model.path.resolve()
    except CheckpointError:  # no best file: the run tested none of these
        return False


def _str(path: Path | None) -> str | None:
    return None if path is None else str(path.resolve())


def _write_figure(path: Path, cm: np.ndarray, csv: Path, tta: str) -> None:
    from fmnist.training.figures import confusion_matrix_figure, save_png

    save_png(confusion_matrix_figure(cm, title=f"{csv.name}{'' if tta == 'none' else f' (TTA: {tta})'}"), path, dpi=100)


def summary_table(record: dict, out_dir: Path) -> str:
    """What evaluate.py prints at the end: the checkpoint, the test metrics and where the files are."""
    m = record["metrics"]
    # What ckpt= chose (a sweep's best job, the shipped model: `checkpoint.chosen`) was logged when it was found.
    lines = [f"checkpoint {record['checkpoint']['path']} (sha256 {record['checkpoint']['sha256'][:12]})"]
    tta = "" if record["tta"] == "none" else f", TTA {record['tta']}"
    own, counted, same_csv = record["run_test_acc"], record["run_test_images"], record["run_tested_on_this_csv"]
    # a run that tested another checkpoint, another CSV, or part of this one (trainer.limit_test_batches), is not
    # what this reproduces
    where = (" of its best checkpoint, not this one" if record.get("run_tested_this_checkpoint") is False else
             " on another test CSV" if same_csv is False else
             "" if counted in (None, m["n_images"]) else f" on {counted} of these images")
    own = "" if own is None else f"   (run's own test/acc {own:.4%}{where})"
    lines += [f"test CSV   {record['data']['test_csv']} ({m['n_images']} images{tta})",
              f"accuracy {m['accuracy']:.4%}   loss {m['loss']:.4f}   macro-F1 {m['macro_f1']:.4f}   "
              f"ECE {m['ece']:.4f}{own}",
              "", f"{'class':<12} {'precision':>9} {'recall':>7} {'F1':>7} {'n':>6}"]
    for name, c in m["per_class"].items():
        lines.append(f"{name:<12} {c['precision']:>9.4f} {c['recall']:>7.4f} {c['f1']:>7.4f} {c['support']:>6}")
    lines.append(f"\nwritten to {out_dir}/ ({METRICS_FILE}, {CONFUSION_FILE}, {CONFUSION_FIGURE})")
    return "\n".join(lines)
