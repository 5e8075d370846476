"""The leaderboard: published Fashion-MNIST results next to this project's recipes, from their sweep directories.

Each project row is one setting of a sweep: test accuracy mean ± std over its seeds, and the compute
behind it (training images, training FLOPs, wall time) with the hardware it ran on, all read from
the jobs' `metrics.json` and `epochs.csv`, so the table is regenerated rather than typed.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from fmnist.runs import COMPLETED, collect, read_record

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
    """The machine a run trained on, and in which precision (e.g. `NVIDIA H100 80GB HBM3, bf16-mixed`)."""
    hw = record.get("hardware") or {}
    precision = (record.get("precision") or {}).get("resolved")
    if hw.get("gpu"):
        machine = hw["gpu"]
    else:
        machine = f"{hw.get('cpu', '?')} ({hw.get('isa', '?')}), {hw.get('cores', '?')} cores" if hw else "unknown"
    return f"{machine}, {precision}" if precision else machine


def project_rows(sweep_dir: Path) -> list[dict]:
    """One row per completed setting of a sweep directory."""
    sweep_dir = Path(sweep_dir)
    table = collect(sweep_dir)
    done = table[table.status == COMPLETED]
    rows = []
    for setting, jobs in done.groupby("setting"):
        record = read_record(sweep_dir / jobs.job.iloc[0])
        acc = jobs.test_acc * 100
        first = jobs.iloc[0]  # the seeds of a setting train on the same number of images
        rows.append({
            "recipe": sweep_dir.name if setting == "(defaults)" else f"{sweep_dir.name}: {setting}",
            "test acc (%)": f"{acc.mean():.2f}" + (f" ± {acc.std():.2f}" if len(acc) > 1 else ""),
            "n": len(acc), "mean": acc.mean(),
            "training images": "?" if pd.isna(first.train_images) else f"{int(first.train_images):,}",
            "training PFLOP": "?" if pd.isna(first.train_flops) else f"{first.train_flops / 1e15:.2g}",
            "wall time (s)": f"{jobs.train_seconds.mean():.0f}",
            "hardware": hardware_of(record),
        })
    return rows


def markdown(sweep_dirs: list[Path]) -> str:
    lines = ["| result | test acc (%) | n | training images | training PFLOP | wall time (s) | hardware / budget |",
             "|---|---|---|---|---|---|---|"]
    for name, acc, budget, source in REFERENCES:
        lines.append(f"| {name} [{source}] | {acc} | | | | | {budget} |")
    for r in sorted((r for d in sweep_dirs for r in project_rows(d)), key=lambda r: -r["mean"]):
        lines.append(f"| **{r['recipe']}** | {r['test acc (%)']} | {r['n']} | {r['training images']} "
                     f"| {r['training PFLOP']} | {r['wall time (s)']} | {r['hardware']} |")
    return "\n".join(lines) + "\n"
