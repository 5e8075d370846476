"""`python predict.py ckpt=PATH inputs=[...] [top_k=3] [out=FILE.csv|FILE.json]`: classify image files and CSVs.

Inputs are image files (PNG/JPEG/BMP, any size, colour or grey: converted by the rule in
`fmnist/inference/images.py`), Kaggle-format CSVs (`label` column optional), and directories of both
(searched recursively, through links to folders, sorted; other files are skipped; a file named twice, or
through a link, is read once; a link to nothing is an input that could not be used). The output has
one row per image:
`input` (the file, or `file.csv:N` for the CSV's row on line N, the header being line 1), the top-k class names and
probabilities, the true label where a CSV gives it, and `error` for an input that could not be
used. An unusable input does not stop the others; the run then ends with exit code 2 (and writes nothing where no
input could be used). A directory's files never include the command's own `out=` file.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from fmnist import CLASS_NAMES, IMAGE_SIDE
from fmnist.data.csv_io import parse_csv
from fmnist.errors import DataError
from fmnist.fsio import atomic_output, check_output_file, dirs_made, storage_errors
from fmnist.hardware import memory_errors
from fmnist.inference.config import check_predict
from fmnist.inference.images import EXTENSIONS, ImageRejected, load_image
from fmnist.inference.loading import load_model

log = logging.getLogger(__name__)

CSV_SUFFIXES = (".csv", ".csv.gz")
# A CSV input's most bytes, decompressed: the 60,000-image training CSV (133 MB) fits; parsing takes a few times this in memory.
MAX_CSV_BYTES = 256 * 2 ** 20
SHOWN_ROWS = 20


class InputsFailed(DataError):
    """Some inputs could not be used; the others were predicted (and written)."""


@dataclass
class Item:
    """One input to classify: its name as printed (`file.csv:N` for a CSV row), the image, or why it has none."""

    name: str
    image: np.ndarray | None = None  # uint8 [28, 28]
    label: int | None = None
    error: str | None = None


def _is_csv(path: Path) -> bool:
    return path.name.lower().endswith(CSV_SUFFIXES)


def _expand(inputs: list[str], out: Path | None = None) -> list[tuple[str, Path | None, str | None]]:
    """(name, file, error) for every file the inputs name, directories expanded, each file once. `out`: the
    command's output, never an input of a directory (a rerun would read its own predictions as a CSV)."""
    found, seen = [], set()
    mine = out.resolve() if out is not None else None
    for raw in inputs:
        path = Path(raw).expanduser()
        if path.is_dir():
            files = [p for p in _files_under(path) if not p.name.startswith(".")
                     and (p.suffix.lower() in EXTENSIONS or _is_csv(p))]
            # Each file with where it leads (None for a link to nothing: resolve() raises on a loop of links).
            files = [(p, real) for p in files if (real := p.resolve() if p.exists() else None) is None or real != mine]
            if not files:
                found.append((raw, None, f"directory without {'/'.join(EXTENSIONS)} or .csv files"))
            for p, real in files:  # a link to a file named too, or found before, is read once
                if real is None:
                    found.append((str(p), None, "a link to nothing (or a loop of links)"))
                elif real not in seen:
                    seen.add(real)
                    found.append((str(p), p, None))
        elif path.is_file() and path.resolve() in seen:
            continue
        elif path.is_file():
            seen.add(path.resolve())
            ok = path.suffix.lower() in EXTENSIONS or _is_csv(path)
            found.append((raw, path, None if ok else f"not an image ({', '.join(EXTENSIONS)}) or a .csv file"))
        elif path.exists():  # a pipe, a device, a socket: nothing to read an image or a table from
            found.append((raw, None, "not a regular file (a pipe, a device or a socket)"))
        else:
            found.append((raw, None, "no such file or directory"))
    return found


def _files_under(directory: Path) -> list[Path]:
    """Every file under `directory`, sorted, and links to nothing, which a run must name rather than pass over;
    through links to folders too, each real folder once (so a link back up ends), under its own path where it is
    inside `directory` (the folders themselves are walked first, then the links)."""
    files, visited, links = [], set(), []

    def walk(top, follow: bool) -> None:
        for root, dirs, names in os.walk(top, followlinks=follow):
            real = os.path.realpath(root)
            if real in visited:
                dirs[:] = []
                continue
            visited.add(real)
            if not follow:
                links.extend(os.path.join(root, d) for d in dirs if os.path.islink(os.path.join(root, d)))
            files.extend(p for p in (Path(root) / name for name in names) if p.is_file() or p.is_symlink())

    walk(directory, follow=False)
    for link in sorted(links):
        walk(link, follow=True)
    return sorted(files)


def read_inputs(inputs: list[str], out: Path | None = None) -> list[Item]:
    """One Item per image (a CSV gives one per row), or per input that failed, in input order; `out`: see `_expand`."""
    items = []
    for name, path, error in _expand(inputs, out):
        if error:
            items.append(Item(name, error=error))
        elif _is_csv(path):
            try:
                images, labels = parse_csv(path, require_label=False, max_bytes=MAX_CSV_BYTES)
            except DataError as e:
                items.append(Item(name, error=str(e).removeprefix(f"{path}").lstrip(", :") or str(e)))
                continue
            # Named by file line (the header is line 1), as the CSV's error messages count them.
            items += [Item(f"{name}:{i + 2}", images[i], None if labels is None else int(labels[i]))
                      for i in range(len(images))]
        else:
            try:
                items.append(Item(name, load_image(path)))
            except ImageRejected as e:
                items.append(Item(name, error=str(e)))
    return items


def predict(cfg: DictConfig) -> list[dict]:
    """Predict every input; write `cfg.out` (unless no input could be used); raise InputsFailed (after writing) if
    any input failed."""
    inputs = check_predict(cfg)
    if cfg.out:
        cfg.out = str(Path(cfg.out).expanduser())  # `~/preds.csv`, as ckpt= and inputs= take it
        check_output_file(Path(cfg.out), "out", cfg.overwrite, written_by_predict, "predict.py")
    model = load_model(cfg.ckpt)
    items = read_inputs(inputs, Path(cfg.out) if cfg.out else None)
    good = [it for it in items if it.error is None]
    images = np.stack([it.image for it in good]) if good else np.zeros((0, IMAGE_SIDE, IMAGE_SIDE), np.uint8)
    with memory_errors(f"lower batch_size ({cfg.batch_size})"):
        probs = model.logits_batched(images, cfg.batch_size, tta=model.tta).softmax(dim=1).numpy()  # as it was tested
    rows, k = [], cfg.top_k
    by_item = dict(zip(map(id, good), probs))
    for it in items:
        row = {"input": it.name}
        p = by_item.get(id(it))
        order = np.argsort(-p, kind="stable")[:k] if p is not None else []
        for rank in range(k):
            row[f"class_{rank + 1}"] = CLASS_NAMES[order[rank]] if p is not None else None
            row[f"prob_{rank + 1}"] = round(float(p[order[rank]]), 6) if p is not None else None
        row["class_id"] = int(order[0]) if p is not None else None  # top-1 as a number, as a submission gives it
        row["label"] = CLASS_NAMES[it.label] if it.label is not None else None
        row["error"] = it.error
        rows.append(row)
    failed = [r for r in rows if r["error"]]
    predicted = len(items) - len(failed)
    if cfg.out and predicted:  # errors alone would replace earlier predictions (overwrite=true), or need it next time
        with storage_errors(key="out"):
            write_rows(Path(cfg.out), rows, k, replace=cfg.overwrite)
    print(table(rows, k, model.path, cfg.out if predicted else None))
    if failed:
        written = f" and written to {cfg.out}" if cfg.out else ""
        raise InputsFailed(f"{len(failed)} of {len(items)} inputs could not be used ("
                           + "; ".join(f"{r['input']}: {r['error']}" for r in failed[:3])
                           + ("; ..." if len(failed) > 3 else "") + "). "
                           + (f"The other {predicted} were predicted{written}." if predicted else
                              f"None was predicted{f'; nothing was written to {cfg.out}' if cfg.out else ''}.")
                           # out= is never replaced without overwrite=true: the corrected command needs it
                           + (" With the inputs fixed, add overwrite=true to write over it."
                              if cfg.out and predicted and not cfg.overwrite else ""))
    return rows


def written_by_predict(head: bytes) -> bool:
    """Whether a file begins as `write_rows` begins its CSV or JSON."""
    return head.startswith((b"input,class_1,prob_1,", b'[\n {\n  "input": '))


def write_rows(path: Path, rows: list[dict], k: int, replace: bool = True) -> None:
    """Write the rows as CSV or JSON (by the suffix), atomically; `replace=False` keeps a file that appeared
    at `path` meanwhile (fmnist.fsio.atomic_output)."""
    with dirs_made(path.parent), atomic_output(path, replace=replace) as tmp:
        if path.suffix.lower() == ".json":
            records = [{"input": r["input"], "class_id": r["class_id"], "label": r["label"], "error": r["error"],
                        "top_k": [] if r["error"] else [{"class": r[f"class_{i}"], "prob": r[f"prob_{i}"]}
                                                        for i in range(1, k + 1)]} for r in rows]
            tmp.write_text(json.dumps(records, indent=1) + "\n")
        else:
            # A file name that is not UTF-8 (bytes the file system allows) is written with its odd bytes as \udcNN,
            # as the JSON escapes them, rather than failing after every image was predicted.
            with open(tmp, "w", newline="", encoding="utf-8", errors="backslashreplace") as f:
                writer = csv.DictWriter(f, list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)


def table(rows: list[dict], k: int, ckpt: Path, out: str | None) -> str:
    """A short text table: the first rows with their top-k classes in percent, and the accuracy where labels are known.

    Percent is for people; the files (`out`) hold probabilities as fractions, as metrics.json holds accuracies.
    """
    lines = [f"checkpoint {ckpt}", f"{'input':<40} {f'top-{k} (probability)':<44} {'label':<12} error"]
    for r in rows[:SHOWN_ROWS]:
        name = r["input"] if len(r["input"]) <= 40 else "..." + r["input"][-37:]
        top = ", ".join(f"{r[f'class_{i}']} {r[f'prob_{i}']:.1%}" for i in range(1, k + 1) if r[f"class_{i}"])
        lines.append(f"{name:<40} {top:<44} {r['label'] or '':<12} {r['error'] or ''}")
    if len(rows) > SHOWN_ROWS:
        lines.append(f"... {len(rows) - SHOWN_ROWS} more rows" + (f" in {out}" if out else " (out=FILE.csv writes all)"))
    labelled = [r for r in rows if r["label"] is not None and not r["error"]]
    if labelled:
        correct = sum(r["class_1"] == r["label"] for r in labelled)
        lines.append(f"top-1 accuracy on the {len(labelled)} labelled rows: {correct / len(labelled):.2%}")
    return "\n".join(lines)
