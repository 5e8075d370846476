"""The report's figures from a sweep directory: curves per setting, ablation pairs, confusion matrix.

Reads only files every run writes (`metrics.json`, `epochs.csv`, `confusion_matrix.csv`), so it
works on a finished, running or interrupted sweep, with no TensorBoard parsing.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from fmnist.plots import confusion_matrix_figure
from fmnist.sweep import collect


def parse_setting(setting: str) -> dict[str, str]:
    """`a=1,b=x` -> {"a": "1", "b": "x"} (values are kept as the override text)."""
    if setting == "(defaults)":
        return {}
    return dict(item.split("=", 1) for item in setting.split(","))


def load_curves(sweep_dir: Path, table: pd.DataFrame) -> dict[str, list[pd.DataFrame]]:
    """Per setting, the `epochs.csv` of each of its jobs (any status: a diverged run's curve matters too)."""
    curves: dict[str, list[pd.DataFrame]] = {}
    for row in table.itertuples():
        path = Path(sweep_dir) / row.job / "epochs.csv"
        if path.exists() and path.stat().st_size > 0:
            frame = pd.read_csv(path)
            if len(frame):
                curves.setdefault(row.setting, []).append(frame)
    return curves


def draw_curves(ax_loss: plt.Axes, ax_acc: plt.Axes, runs: list[pd.DataFrame], title: str) -> None:
    """Train/val loss and val accuracy per epoch: mean over seeds, with a min-max band."""
    for ax, column, label in ((ax_loss, "train/loss", "train loss"), (ax_loss, "val/loss", "validation loss"),
                              (ax_acc, "val/acc", "validation accuracy")):
        stacked = pd.concat([r.set_index("epoch")[column] for r in runs], axis=1)
        mean = stacked.mean(axis=1)
        line, = ax.plot(mean.index, mean.values, label=label, marker="o", markersize=3)
        if stacked.shape[1] > 1:
            ax.fill_between(mean.index, stacked.min(axis=1), stacked.max(axis=1), alpha=0.2, color=line.get_color())
    ax_loss.set_title(f"{title}\n(n={len(runs)} seeds; band: min-max)", fontsize=9)
    ax_loss.set_ylabel("cross-entropy loss (log scale)")
    ax_loss.set_yscale("log")
    ax_acc.set_ylabel("validation accuracy")
    ax_acc.set_xlabel("epoch")
    ax_loss.legend(fontsize=8)
    ax_acc.legend(fontsize=8)
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)


def curves_figure(panels: list[tuple[str, list[pd.DataFrame]]], suptitle: str) -> plt.Figure:
    """One column per setting, loss on top and accuracy below, shared axes for comparison."""
    fig, axes = plt.subplots(2, len(panels), figsize=(5 * len(panels), 7), sharex=True, sharey="row", squeeze=False)
    for col, (title, runs) in enumerate(panels):
        draw_curves(axes[0, col], axes[1, col], runs, title)
    fig.suptitle(suptitle)
    fig.tight_layout()
    return fig


def ablation_pairs(settings: list[str], reference: str) -> dict[str, list[str]]:
    """For each swept key, the settings that differ from `reference` in that key alone (reference first)."""
    ref = parse_setting(reference)
    pairs: dict[str, list[str]] = {}
    for setting in settings:
        s = parse_setting(setting)
        diff = [k for k in set(ref) | set(s) if ref.get(k) != s.get(k)]
        if len(diff) == 1:
            pairs.setdefault(diff[0], [reference]).append(setting)
    return pairs


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._=-" else "_" for c in text).replace("=", "-")[:150]


def write_report(sweep_dir: Path) -> list[Path]:
    """Write the figures into `sweep_dir/figures/`; return their paths."""
    sweep_dir = Path(sweep_dir)
    out = sweep_dir / "figures"
    out.mkdir(exist_ok=True)
    table = collect(sweep_dir)
    curves = load_curves(sweep_dir, table)
    written = []

    def save(fig: plt.Figure, name: str) -> None:
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(out / name)

    for setting, runs in sorted(curves.items()):
        save(curves_figure([(setting, runs)], "Loss & Accuracy vs Epochs"), f"curves_{_slug(setting)}.png")
    done = table[table.status == "completed"]
    if len(done):
        means = done.groupby("setting").val_acc_best.mean()
        reference = str(means.idxmax())
        for key, members in ablation_pairs(sorted(curves), reference).items():
            panels = sorted((f"{key}={parse_setting(s).get(key, '(default)')}", curves[s]) for s in members if s in curves)
            others = ", ".join(f"{k}={v}" for k, v in parse_setting(reference).items() if k != key) or "defaults"
            title = "\n".join(textwrap.wrap(f"Ablation of {key}; other settings as in the best run: {others}", 110))
            save(curves_figure(panels, title), f"ablation_{_slug(key)}.png")
        best = done.loc[done.val_acc_best.idxmax()]
        cm_path = sweep_dir / best.job / "confusion_matrix.csv"
        if cm_path.exists():
            cm = np.loadtxt(cm_path, delimiter=",", dtype=np.int64)
            save(confusion_matrix_figure(cm, f"Best run {best.job}\ntest-set confusion matrix"), "confusion_matrix.png")
    return written
