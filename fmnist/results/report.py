"""The report's figures from a sweep directory: curves per setting, ablation pairs, confusion matrix.

Reads only files every run writes (`metrics.json`, `epochs.csv`, `confusion_matrix.csv`), so it
works on a finished, running or interrupted sweep, with no TensorBoard parsing.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import math
import os
import textwrap
from collections.abc import Callable
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.ticker import FormatStrFormatter, FuncFormatter, MaxNLocator

from fmnist.errors import ConfigError
from fmnist.fsio import atomic_write, check_not_directories, dirs_made, shown
from fmnist.overrides import name_items
from fmnist.results.stats import ALPHA, INTERVAL_NOTE, MOST_SEEDS, NO_DIFFERENCE, holm, mean_interval, paired
from fmnist.runs import (COMPLETED, EPOCHS_FILE, METRICS_FILE, RECORDED, check_poolable, collect, lacking_epochs,
                         read_confusion_matrix, read_epochs)
from fmnist.training.figures import confusion_matrix_figure, save_png

# The seed report's Figures 4.1-4.8: (number, its title, the `experiment=report` variant behind it).
REPORT_FIGURES = [
    ("4.1", "Loss & Accuracy vs Epochs w/Dropout", "best"),
    ("4.2", "Loss & Accuracy vs Epochs without/Dropout", "no_dropout"),
    ("4.3", "Loss & Accuracy vs Epochs high batch size", "best"),
    ("4.4", "Loss & Accuracy vs Epochs low batch size", "batch_32"),
    ("4.5", "Loss & Accuracy vs Epochs high learning rate", "lr_high"),
    ("4.6", "Loss & Accuracy vs Epochs low learning rate", "best"),
    ("4.7", "Loss & Accuracy vs Epochs (Simple CNN)", "simple"),
    ("4.8", "Loss & Accuracy vs Epochs (Optimized CNN)", "best"),
]
# The report's claims, each a comparison of its best setting with one one-factor change.
# (factor, figures, the changed variant, the claim, whether smoother curves are part of it)
REPORT_CLAIMS = [
    ("dropout", "4.1 vs 4.2", "no_dropout",
     "without dropout the validation loss turns up early (about epoch 5): overfitting; with it, 92-93%", False),
    ("batch size", "4.3 vs 4.4", "batch_32", "the high batch size is smoother and ends more accurate", True),
    ("learning rate", "4.6 vs 4.5", "lr_high", "the high learning rate spikes up and down; the low one is smooth and better",
     True),
    ("architecture", "4.8 vs 4.7", "simple", "the optimized CNN is clearly more accurate than the simple CNN", False),
]


def parse_setting(setting: str) -> dict[str, str]:
    """`a=1,b=x` -> {"a": "1", "b": "x"} (values are kept as the override text; `~a`, which deletes a key, is
    {"~a": ""}, which `setting_item` writes back as `~a`)."""
    if setting == "(defaults)":
        return {}
    return {key: value for key, _, value in (item.partition("=") for item in name_items(setting))}


def setting_item(key: str, value: str) -> str:
    """One override of a setting as a title shows it: `a=1`, or `~a` for a deleted key."""
    return key if key.startswith("~") and not value else f"{key}={value}"


def load_curves(sweep_dir: Path, table: pd.DataFrame) -> dict[str, list[pd.DataFrame]]:
    """Per setting, the `epochs.csv` of each of its jobs (any recorded status: a diverged run's curve matters too),
    or ConfigError naming a damaged one: the report draws every column it reads. A completed job's must hold a row
    of each epoch its record counts: without them its setting's curves would leave the job out, or end early, beside
    a summary that counts it. A job without a readable record is left out: its setting is not known, and
    `summary.md` lists it."""
    curves: dict[str, list[pd.DataFrame]] = {}
    for row in table[table.status.isin(RECORDED)].itertuples():
        path = Path(sweep_dir) / row.job / EPOCHS_FILE
        epochs = int(row.epochs) if row.status == COMPLETED and pd.notna(row.epochs) else 0
        lacking = None
        if path.exists() and path.stat().st_size > 0:
            frame = read_epochs(path)
            lacking = lacking_epochs(frame, epochs)
            if len(frame) and not lacking:
                frame.attrs["seed"] = row.seed  # for labels: the seeds of one setting are its lines
                curves.setdefault(row.setting, []).append(frame)
        elif epochs:
            lacking = "empty" if path.exists() else "a link to nothing" if path.is_symlink() else "missing"
        if lacking:
            raise ConfigError(f"{path}: {lacking}, though the job completed {epochs} epoch(s) (metrics.epochs in its "
                              f"{METRICS_FILE}); the report draws each epoch of a completed job, and nothing was "
                              "written. Put the file back, or move the job's directory out of the sweep.")
    return curves


def draw_curves(ax_loss: plt.Axes, ax_acc: plt.Axes, runs: list[pd.DataFrame], title: str) -> None:
    """Train/val loss and val accuracy (%) per epoch: mean over seeds, with a min-max band."""
    for ax, column, label, scale in ((ax_loss, "train/loss", "train loss", 1), (ax_loss, "val/loss", "validation loss", 1),
                                     (ax_acc, "val/acc", "validation accuracy", 100)):
        # dropped: epochs without validation (trainer.check_val_every_n_epoch), so the line joins the others
        # and an infinite loss (a run that diverged), which no axis can show
        stacked = pd.concat([r.set_index("epoch")[column] * scale for r in runs], axis=1)
        stacked = stacked.replace([np.inf, -np.inf], np.nan).dropna(how="all")
        mean = stacked.mean(axis=1)
        line, = ax.plot(mean.index, mean.values, label=label, marker="o", markersize=3)
        if stacked.shape[1] > 1:
            ax.fill_between(mean.index, stacked.min(axis=1), stacked.max(axis=1), alpha=0.2, color=line.get_color())
    seeds = f"n={len(runs)} seeds; band: min-max" if len(runs) > 1 else "1 seed"
    ax_loss.set_title("\n".join(textwrap.wrap(title, 48)) + f"\n({seeds})", fontsize=9)
    ax_loss.set_ylabel("cross-entropy loss (log scale)")
    ax_loss.set_yscale("log")
    # A log axis spanning a decade or two gets one or two labels by default: label the 2s, 3s and 5s too.
    ax_loss.yaxis.set_major_formatter(FormatStrFormatter("%.2g"))
    ax_loss.yaxis.set_minor_formatter(FuncFormatter(
        lambda v, _: f"{v:.2g}" if v > 0 and f"{v:.0e}"[0] in "235" else ""))
    ax_acc.set_ylabel("validation accuracy (%)")
    ax_acc.set_xlabel("epoch")
    ax_acc.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_loss.legend(fontsize=8)
    ax_acc.legend(fontsize=8)
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)


PANELS_PER_ROW = 3  # wider figures shrink to unreadable fonts on a page or a screen


def curves_figure(panels: list[tuple[str, list[pd.DataFrame]]], suptitle: str) -> plt.Figure:
    """One column per setting (at most PANELS_PER_ROW, then a new row), loss on top and accuracy below,
    shared axes for comparison."""
    cols = min(len(panels), PANELS_PER_ROW)
    blocks = -(-len(panels) // cols)
    fig, axes = plt.subplots(2 * blocks, cols, figsize=(5 * cols, 7 * blocks), sharex=True, squeeze=False)
    for row in (0, 1):  # every loss panel on one scale, every accuracy panel on another, across rows too
        for ax in axes[row::2].flat[1:]:
            ax.sharey(axes[row, 0])
    for i, (title, runs) in enumerate(panels):
        block, col = divmod(i, cols)
        draw_curves(axes[2 * block, col], axes[2 * block + 1, col], runs, title)
    if not any(len(line.get_ydata()) for ax in axes[0::2].flat for line in ax.get_lines()):
        axes[0, 0].set_ylim(0.1, 10)  # no finite loss anywhere (diverged runs): a log axis needs limits to draw
    for i in range(len(panels), blocks * cols):  # the last row's empty places
        block, col = divmod(i, cols)
        axes[2 * block, col].set_visible(False)
        axes[2 * block + 1, col].set_visible(False)
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


def short_names(settings: list[str]) -> dict[str, str]:
    """Each setting named by the keys that differ between the settings, i.e. what the sweep varied."""
    parsed = {s: parse_setting(s) for s in settings}
    keys = sorted({k for p in parsed.values() for k in p})
    varying = [k for k in keys if len({p.get(k) for p in parsed.values()}) > 1]
    return {s: ",".join(f"{k}={p[k]}" for k in varying if k in p) or s for s, p in parsed.items()}


def _slug(text: str, limit: int = 80) -> str:
    """`text` as a file name: other characters as `_`, `=` as `-`; a long one cut at a separator (never inside
    a value) and told apart from others by a short hash of the whole text."""
    slug = "".join(c if c.isalnum() or c in "._=-" else "_" for c in text).replace("=", "-")
    if len(slug) <= limit:
        return slug
    cut = slug[:limit - 9]
    cut = cut[:cut.rfind("_")] if "_" in cut else cut
    return f"{cut}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"


def curve_stats(runs: list[pd.DataFrame]) -> dict:
    """Per-run shape of the validation curves, averaged over seeds.

    `rise_epoch`: the epoch of the lowest validation loss, after which it rises (None if it is the
    last epoch); `jaggedness`: the std of the epoch-to-epoch changes of validation accuracy, in points.
    """
    runs = [r.dropna(subset=["val/loss", "val/acc"]) for r in runs]  # the epochs that validated
    rises = [int(r.loc[r["val/loss"].idxmin(), "epoch"]) if len(r) else None for r in runs]
    last = [int(r["epoch"].max()) if len(r) else None for r in runs]
    jagged = [float(r["val/acc"].mul(100).diff().std()) for r in runs if len(r) > 2]
    return {"rise_epoch": [None if e == n else e for e, n in zip(rises, last)],
            "min_val_loss": float(np.mean([r["val/loss"].min() for r in runs])),
            "jaggedness": float(np.mean(jagged)) if jagged else float("nan")}


def variant_of(setting: str) -> str | None:
    """The `experiment=report` variant a setting belongs to (`variant=best,...` -> `best`), else None."""
    return parse_setting(setting).get("variant")


def claims_table(table: pd.DataFrame, curves: dict[str, list[pd.DataFrame]]) -> str:
    """Markdown: the report's claim per factor next to what was measured, and a verdict with its numbers.

    `curves` maps each variant (`best`, `no_dropout`, ...) to its runs' epochs.csv frames. "More
    accurate" is judged by the paired difference in test accuracy over the seeds both settings ran,
    with Holm's correction over the report's accuracy claims: `holds` only when it is significant in
    the claimed direction.
    """
    done = table[table.status == COMPLETED].assign(variant=lambda t: t.setting.map(variant_of))
    by_seed = {v: jobs.set_index("seed").test_acc for v, jobs in done.groupby("variant")}

    def accuracy(variant: str) -> str:
        if variant not in by_seed:
            return "not run"
        interval = mean_interval(by_seed[variant])
        return f"{interval.text()}% (n={interval.n})"

    has_best = "best" in by_seed and "best" in curves  # every claim compares a change with the best setting
    measured = [c for c in REPORT_CLAIMS if has_best and c[2] in by_seed and c[2] in curves]
    comparisons = {c[2]: paired(by_seed["best"], by_seed[c[2]]) for c in measured}
    adjusted = dict(zip(comparisons, holm([c.p_value for c in comparisons.values()])))

    lines = ["| factor | figures | report's claim | test accuracy: best setting vs changed | paired difference "
             "(pp, 95% CI), p (Holm) | val loss lowest at epoch (then rises), per seed | jaggedness of val "
             "accuracy (pp) | verdict |", "|---|---|---|---|---|---|---|---|"]
    best = curve_stats(curves["best"]) if has_best else None
    for factor, figures, variant, claim, smoother in REPORT_CLAIMS:
        if variant not in comparisons:
            lines.append(f"| {factor} | {figures} | {claim} | {accuracy('best')} vs {accuracy(variant)} | | | | not measured |")
            continue
        other, c, p = curve_stats(curves[variant]), comparisons[variant], adjusted[variant]
        verdict, note = c.verdict(+1, p), ""
        if verdict == NO_DIFFERENCE and c.verdict(+1) != verdict:
            note = f" (p < {ALPHA} before Holm's correction over {len(comparisons)} claims)"
        elif verdict == NO_DIFFERENCE and c.seeds_needed and c.seeds_needed > c.difference.n:
            about = f"more than {MOST_SEEDS}" if math.isinf(c.seeds_needed) else f"about {c.seeds_needed}"
            note = f" ({about} seeds would detect a difference this large)"
        verdicts = [f"more accurate: {verdict}{note}"]
        if smoother:
            verdicts.append("smoother: " + ("yes" if best["jaggedness"] < other["jaggedness"] else "no"))
        if factor == "dropout":
            early = [e for e in other["rise_epoch"] if e is not None]
            verdicts.append("no-dropout val loss rises by epoch 8: " + ("yes" if early and max(early) <= 8 else "no"))
        lines.append(f"| {factor} | {figures} | {claim} | {accuracy('best')} vs {accuracy(variant)} "
                     f"| {_difference(c, p)} | {best['rise_epoch']} vs {other['rise_epoch']} "
                     f"| {best['jaggedness']:.2f} vs {other['jaggedness']:.2f} | {'; '.join(verdicts)} |")
    best_acc = mean_interval(by_seed["best"]) if "best" in by_seed else None
    in_range = best_acc is not None and best_acc.n > 1 and best_acc.low >= 0.92
    lines.append(f"| best setting | 4.1/4.3/4.6/4.8 | dropout + low learning rate + high batch size: 92-93% "
                 f"| {accuracy('best')} | | | | {'at least 92% (the whole interval): yes' if in_range else 'at least 92%: not shown'} |")
    lines += ["", f"{INTERVAL_NOTE} The paired difference is best minus changed, per seed both ran; p is a paired "
              "t-test's (a sign test's when every seed gives the same difference), Holm-adjusted over the accuracy "
              "claims above; d is the effect size (mean difference / its "
              "standard deviation). Smoothness and the epoch of the loss's rise are read from the curves, without a test."]
    return "\n".join(lines) + "\n"


def _difference(c, p_adjusted: float) -> str:
    d = c.difference
    if d.n < 2:
        return f"{100 * d.mean:+.2f} (n={d.n})"
    return (f"{100 * d.mean:+.2f} [{100 * d.low:+.2f}, {100 * d.high:+.2f}], p={c.p_value:.3f} ({p_adjusted:.3f}), "
            f"d={c.effect_size:.1f}, n={d.n}")


def timed_runs(curves: dict[str, list[pd.DataFrame]]) -> list[tuple[str, pd.DataFrame]]:
    """(setting, its epochs with a validation accuracy) of each run that recorded its training seconds and FLOPs."""
    runs = [(setting, frame.dropna(subset=["val/acc", "train_seconds", "train_flops"]))
            for setting, frames in sorted(curves.items()) for frame in frames
            if {"train_seconds", "train_flops"} <= set(frame.columns)]
    return [(setting, frame) for setting, frame in runs if len(frame)]


def time_to_accuracy_figure(runs: list[tuple[str, pd.DataFrame]], title: str) -> plt.Figure:
    """Validation accuracy against training seconds and against training FLOPs, a line per run of `timed_runs`
    (at least one). Seconds depend on the machine (each run records its hardware); FLOPs do not.
    """
    fig, (ax_s, ax_f) = plt.subplots(1, 2, figsize=(11, 4))
    names = short_names(sorted({s for s, _ in runs}))
    one_setting = len(names) == 1  # then a colour per seed, not one colour for all
    colours = {s: f"C{i}" for i, s in enumerate(names)}
    labelled = set()
    for i, (setting, frame) in enumerate(runs):
        if one_setting:
            colour, label = f"C{i}", f"seed {frame.attrs.get('seed', i)}"
        else:
            colour, label = colours[setting], None if setting in labelled else names[setting]
        labelled.add(setting)
        ax_s.plot(frame.train_seconds, 100 * frame["val/acc"], marker=".", color=colour, label=label)
        ax_f.plot(frame.train_flops / 1e12, 100 * frame["val/acc"], marker=".", color=colour)
    lowest = min(100 * f["val/acc"].min() for _, f in runs)
    highest = max(100 * f["val/acc"].max() for _, f in runs)
    # Zoomed on the last points from 80% up when the runs get there; else the whole range, never an empty plot.
    low = max(80.0, lowest - 0.5) if highest > 81.0 else lowest - 0.5
    for ax, xlabel in ((ax_s, "training seconds (this run's hardware)"), (ax_f, "training TFLOP (forward + backward)")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation accuracy (%)")
        ax.set_ylim(bottom=low)
        ax.grid(alpha=0.3)
    ax_s.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


REPORT_FILE = "report.md"  # beside the figures of a sweep of experiment=report: the claim-vs-measured table


def write_report(sweep_dir: Path) -> list[Path]:
    """Write the figures into `sweep_dir/figures/`; return their paths.

    A sweep of `experiment=report` also gets the report's Figures 4.1-4.8 under its own titles and
    `report.md`, the claim-vs-measured table.
    """
    return planned_report(sweep_dir)()


def _curves_by_variant(sweep_dir: Path, curves: dict[str, list[pd.DataFrame]]) -> dict[str, list[pd.DataFrame]]:
    """The runs' curves of each `experiment=report` variant ({} for another sweep), or ConfigError for a variant
    run as more than one setting."""
    by_variant: dict[str, list[pd.DataFrame]] = {}
    settings_of: dict[str, list[str]] = {}
    for setting, runs in curves.items():
        variant = variant_of(setting)
        if variant:
            by_variant.setdefault(variant, []).extend(runs)
            settings_of.setdefault(variant, []).append(setting)
    for variant, settings in settings_of.items():
        if len(settings) > 1:  # pooled, each seed would count once per setting in a claim's paired test
            raise ConfigError(f"{sweep_dir}: variant={variant} was run as {len(settings)} settings "
                              f"({', '.join(f'`{s}`' for s in sorted(settings))}); the report pairs one setting of "
                              "each variant with the best one by seed, and draws one curve per variant. Run each "
                              "setting in a sweep directory of its own.")
    return by_variant


def planned_report(sweep_dir: Path) -> Callable[[], list[Path]]:
    """`write_report`'s reading and checks, done now (a refusal raises here, and nothing is written); return the
    function that draws and writes the report, returning the figures' paths."""
    sweep_dir = Path(sweep_dir)
    out = sweep_dir / "figures"
    if out.exists() and not out.is_dir():  # refused before anything is read or written, with or without figures
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(out))
    check_not_directories([sweep_dir / REPORT_FILE])
    # Every file read before the first figure is drawn: a damaged one is named, and nothing is written.
    table = collect(sweep_dir)
    check_poolable(table, sweep_dir)
    curves = load_curves(sweep_dir, table)
    done = table[table.status == COMPLETED]
    ranked = done[done.val_acc_best.notna()]  # a record without validation accuracy has nothing to rank it by
    best = ranked.loc[ranked.val_acc_best.idxmax()] if len(ranked) else None
    cm = read_confusion_matrix(sweep_dir / best.job) if best is not None else None
    # Each figure's file and how to draw it, named before any is drawn: a directory in the way of one is refused
    # before the others replace theirs.
    figures: list[tuple[str, Callable[[], plt.Figure]]] = []
    by_variant = _curves_by_variant(sweep_dir, curves)
    if by_variant:  # a sweep of experiment=report: the report's own figures
        figures += [(f"figure_{number}.png", functools.partial(
                        curves_figure, [(f"variant={variant}", by_variant[variant])], f"Figure {number}: {title}"))
                    for number, title, variant in REPORT_FIGURES if variant in by_variant]
    else:
        names = short_names(sorted(curves))
        figures += [(f"curves_{_slug(names[setting])}.png",
                     functools.partial(curves_figure, [(names[setting], runs)], "Loss & Accuracy vs Epochs"))
                    for setting, runs in sorted(curves.items())]
    timed = timed_runs(curves)
    if timed:  # none in runs older than the seconds and FLOPs columns
        figures.append(("time_to_accuracy.png",
                        functools.partial(time_to_accuracy_figure, timed, f"Time to accuracy: {shown(sweep_dir.name)}")))
    if len(ranked):
        means = ranked.groupby("setting").val_acc_best.mean()
        reference = str(means.idxmax())
        for key, members in ablation_pairs(sorted(curves), reference).items():
            panels = sorted((setting_item(key, parse_setting(s).get(key, "(default)")), curves[s])
                            for s in members if s in curves)
            others = ", ".join(setting_item(k, v) for k, v in parse_setting(reference).items() if k != key) or "defaults"
            title = "\n".join(textwrap.wrap(f"Ablation of {key}; other settings as in the best run: {others}", 110))
            figures.append((f"ablation_{_slug(key)}.png", functools.partial(curves_figure, panels, title)))
        if cm is not None:
            figures.append(("confusion_matrix.png", functools.partial(
                confusion_matrix_figure, cm, f"Best run {best.job}\ntest-set confusion matrix")))
    claims = claims_table(table, by_variant) if by_variant else None  # made before any file is written
    check_not_directories(out / name for name, _ in figures)

    def write() -> list[Path]:
        written = []
        for name, draw in figures:
            with dirs_made(out):  # made with the first figure, and removed again if that one fails
                save_png(draw(), out / name, dpi=110)
            written.append(out / name)
        if claims is not None:
            atomic_write(sweep_dir / REPORT_FILE, claims)
        return written
    return write
