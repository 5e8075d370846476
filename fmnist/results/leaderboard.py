"""The leaderboard: published Fashion-MNIST results next to this project's recipes, from their sweep directories.

Each project row is one setting of a sweep: test accuracy, the mean over its seeds with its 95% confidence
interval, and the compute behind it (training images, training FLOPs, training time: the epochs' wall time
with their validation, without start-up or the test) with the hardware it ran on, all read from the jobs'
`metrics.json` and `epochs.csv`, so the table is regenerated rather than typed.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from fmnist.config import is_count
from fmnist.data.sources import SPLITS
from fmnist.errors import ConfigError
from fmnist.results.stats import INTERVAL_NOTE, mean_interval
from fmnist.runs import (COMPLETED, CONFIG_FILE, check_poolable, collect, read_config_section,
                         read_confusion_matrix, read_record)

STANDARD_TEST_IMAGES = SPLITS["test"][1]  # the standard split's test set (Zalando's t10k files)

# Published results on the standard 60k/10k split without extra data (result, test accuracy %, budget,
# where it is published).
REFERENCES = [
    ("2-conv CNN with flips", "93.9", "", "Zalando benchmark table"),
    ("small ResNet, 20 epochs + flip TTA", "94.3-94.5", "~1 GPU-minute", "fast.ai course"),
    ("ResNet-18 with flips/translation/rotation", "94.9", "GPU", "Zalando benchmark table"),
    ("small ResNet, 50 epochs + random erasing", "94.9", "GPU", "fast.ai course"),
    ("ResNet-20 + random erasing", "96.0", "300 epochs, GPU", "Zhong et al., random erasing"),
    ("WRN-28-10 + random erasing (best epoch chosen on test)", "96.35", "300 epochs, GPU", "Zhong et al., random erasing"),
    ("WRN-40-4, crop + flip", "96.7", "GPU", "Zalando benchmark table"),
    ("fine-tuned DARTS (best known)", "96.91", "NAS", "NAS literature"),
]


def hardware_of(record: dict) -> str:
    """The machine a run trained on, and in which precision (e.g. `NVIDIA H100 80GB HBM3, bf16-mixed`).
    `record`: a completed job's, whose fields `collect` checked."""
    hw = record.get("hardware") or {}
    precision = (record.get("precision") or {}).get("resolved")
    if hw.get("gpu"):
        machine = hw["gpu"]
    else:
        machine = f"{hw.get('cpu', '?')} ({hw.get('isa', '?')}), {hw.get('cores', '?')} cores" if hw else "unknown"
    return f"{machine}, {precision}" if precision else machine


def split_of(job: Path) -> str | None:
    """How a job's data differs from the standard 60k/10k split (a training subset, limited batches, another
    test set), or None when it trained and tested on the standard split."""
    data, trainer = (read_config_section(job, name) for name in ("data", "trainer"))
    differences = []
    subset = data.get("train_subset")
    if subset is not None and not is_count(subset, at_least=1):
        raise ConfigError(f"{job / CONFIG_FILE}: data.train_subset is {subset!r}; expected null or a whole number of "
                          "at least 1, as a run writes it.")
    if subset:
        differences.append(f"{subset:,}-image training subset")
    limited = [k for k in ("limit_train_batches", "limit_test_batches") if trainer.get(k) not in (None, 1, 1.0)]
    differences += [f"trainer.{k}={trainer[k]}" for k in limited]
    confusion = read_confusion_matrix(job)
    tested = int(confusion.sum()) if confusion is not None else None
    if tested is not None and tested != STANDARD_TEST_IMAGES:
        differences.append(f"{tested:,} test images")
    return ", ".join(differences) or None


def _pflop(flops: pd.Series) -> str:
    """The seeds' training PFLOP: one number, a range where they differ, `?` where none recorded it."""
    known = flops.dropna().astype(float) / 1e15
    if known.empty:
        return "?"
    low, high = f"{known.min():.2g}", f"{known.max():.2g}"
    return (low if low == high else f"{low}-{high}") + ("" if len(known) == len(flops) else " (some seeds ?)")


def sweep_labels(sweep_dirs: list[Path]) -> dict[Path, str]:
    """How the leaderboard names each sweep: its folder's name, with as many folders above it as tell it apart from
    another given sweep of that name (`2026-12-04/speedrun_gpu` beside `2026-12-06/speedrun_gpu`)."""
    paths = [Path(d).resolve() for d in sweep_dirs]
    labels = {}
    for path, given in zip(paths, map(Path, sweep_dirs)):
        depth = 1
        while depth < len(path.parts) and sum(p.parts[-depth:] == path.parts[-depth:] for p in paths) > 1:
            depth += 1
        labels[given] = "/".join(path.parts[-depth:])
    return labels


def project_rows(sweep_dir: Path, table: pd.DataFrame, label: str | None = None) -> list[dict]:
    """One row per completed setting of a sweep directory (`table`: its jobs, `collect`), named after `label` (by
    default the folder's name); `split` says how its data differs from the standard."""
    sweep_dir = Path(sweep_dir)
    label = label or sweep_dir.name
    done = table[(table.status == COMPLETED) & table.test_acc.notna()]
    rows = []
    for setting, jobs in done.groupby("setting"):
        # Each seed's machine and precision, and its data's difference from the standard split: its seeds may
        # have run on different machines, or with a different subset given on the command line.
        hardware = dict.fromkeys(hardware_of(read_record(sweep_dir / job)) for job in jobs.job)
        splits = dict.fromkeys(split_of(sweep_dir / job) for job in jobs.job)
        acc = jobs.test_acc * 100
        first = jobs.iloc[0]  # the seeds of a setting train on the same number of images
        rows.append({
            "recipe": label if setting == "(defaults)" else f"{label}: {setting}",
            "test acc (%)": mean_interval(jobs.test_acc).text(),
            "n": len(acc), "flops": jobs.train_flops.dropna().astype(float).mean(),  # NaN when no seed recorded it
            "training images": "?" if pd.isna(first.train_images) else f"{int(first.train_images):,}",
            "training PFLOP": _pflop(jobs.train_flops),
            "training time (s)": "?" if jobs.train_seconds.isna().all() else f"{jobs.train_seconds.mean():.0f}",
            "hardware": " / ".join(hardware),
            "split": None if splits == {None: None} else "; ".join(split or "standard split" for split in splits),
        })
    return rows


def left_out(sweep_dir: Path, table: pd.DataFrame, label: str | None = None) -> str | None:
    """A line naming the jobs of a sweep (`table`: its jobs; `label`: its name, as `project_rows` takes it) left out
    of the leaderboard (not completed, unreadable, or completed without a test accuracy: `test=false`), if any."""
    missing = table[(table.status != COMPLETED) | table.test_acc.isna()]
    if missing.empty:
        return None
    why = {COMPLETED: "not tested"}
    jobs = ", ".join(f"`{r.job}` ({why.get(r.status, r.status)})" for r in missing.head(5).itertuples())
    return (f"{label or Path(sweep_dir).name}: {len(missing)} job(s) left out, not completed or not tested: {jobs}"
            + (", ..." if len(missing) > 5 else "") + ".")


def markdown(sweep_dirs: list[Path]) -> str:
    """The leaderboard: the published results (REFERENCES) and the sweeps' recipes, fewest training FLOPs first;
    recipes not on the standard split in a table of their own."""
    lines = ["| result | test acc (%) | n | training images | training PFLOP | training time (s) | hardware / budget |",
             "|---|---|---|---|---|---|---|"]
    for name, acc, budget, source in REFERENCES:
        lines.append(f"| {name} [{source}] | {acc} | | | | | {budget} |")
    tables = {Path(d): collect(d) for d in sweep_dirs}  # every job's record and epochs.csv, read once
    for sweep_dir, table in tables.items():
        check_poolable(table, sweep_dir)
    # Cheapest first (unknown compute last), never by test accuracy: the test set shows a result, it ranks none.
    labels = sweep_labels(list(tables))
    rows = sorted((r for d, t in tables.items() for r in project_rows(d, t, labels[d])),
                  key=lambda r: math.inf if pd.isna(r["flops"]) else r["flops"])
    row = ("| **{recipe}** | {test acc (%)} | {n} | {training images} | {training PFLOP} | {training time (s)} "
           "| {hardware} |")
    lines += [row.format(**r) for r in rows if r["split"] is None]
    other = [r for r in rows if r["split"] is not None]
    if other:  # not comparable with the published results: a table of their own, saying why
        lines += ["", "Not on the standard 60k/10k split, so not comparable with the results above:", "",
                  "| recipe | test acc (%) | n | data | training images | training PFLOP | training time (s) | hardware |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['recipe']} | {r['test acc (%)']} | {r['n']} | {r['split']} | {r['training images']} "
                  f"| {r['training PFLOP']} | {r['training time (s)']} | {r['hardware']} |" for r in other]
    notes = [note for d, t in tables.items() if (note := left_out(d, t, labels[d]))]
    notes.append(INTERVAL_NOTE + " Two rows whose intervals overlap are not shown to differ. The published "
                 "results give one number each, without an interval.")
    return "\n".join(lines + [""] + notes) + "\n"
