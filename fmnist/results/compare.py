"""Is a change worth keeping? Paired comparisons on validation, with their intervals, as markdown tables.

`changes`: each setting of some sweeps against a baseline sweep run with the same seeds (a training-side
change: a switch, a batch size), paired by seed on the best validation accuracy. `image_comparison`: two
runs (or sweeps) paired by seed and by image, from their `predictions.npz`. `tricks_markdown`:
raw vs averaged weights under each TTA mode (an evaluation-side change), from the table that
`fmnist.inference.tricks.compare` makes. Validation decides; the test accuracy is shown, never used.
"""

from __future__ import annotations

import math
import zipfile
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from fmnist import NUM_CLASSES
from fmnist.config import TTA_MODES, is_count
from fmnist.errors import ConfigError
from fmnist.fsio import not_a_directory, some_names
from fmnist.results.leaderboard import sweep_labels
from fmnist.results.stats import (ALPHA, INTERVAL_NOTE, Interval, holm, mcnemar, mean_interval, paired,
                                  seed_and_image_interval, seeds_text, summary_comparison, summary_interval)
from fmnist.runs import (ACCURACY_RANGE, COMPLETED, CONFIG_FILE, METRICS_FILE, PREDICTIONS_FILE, TRICKS_COLUMNS,
                         TRICKS_REFERENCE, TRICKS_WEIGHTS, UNREADABLE, check_poolable, collect, read_config_section,
                         read_record, read_table, record_problem)

WITHIN_NOISE = "within noise"
ONE_SEED = "not judged (one seed)"
NO_SPREAD_GIVEN = "not judged (no spread given)"
# How a table of paired changes judges them; it follows each such table.
VERDICT_NOTE = ("A change is `better` or `worse` only when it holds after Holm's correction over the table's rows: "
                f"p (Holm) below {ALPHA} (the interval shown is the row's own, before the correction); p: paired t-test, "
                "or, when the change is the same on every seed, a sign test, which takes 6 seeds alone (more after "
                "Holm's correction).")


def change_verdict(change: Interval, p: float | None = None) -> str:
    """`better` or `worse` when the change holds, else `within noise`: with `p` (a paired test's, Holm-adjusted
    where a table judges several changes), when p < ALPHA; without one, when the interval, over two seeds or
    more, excludes zero. (The report's claims say the same as `stats.Comparison.verdict`: holds, contradicted,
    no detectable difference.)"""
    if p is None:  # judged by its interval (`images`: over the seeds and the images)
        if change.n < 2 or math.isnan(change.half_width):  # one seed's interval holds its images' error alone
            return ONE_SEED
        holds = not change.low <= 0 <= change.high
    elif math.isnan(p):
        return ONE_SEED if change.n < 2 else NO_SPREAD_GIVEN
    else:
        holds = p < ALPHA
    return ("better" if change.mean > 0 else "worse") if holds else WITHIN_NOISE


def p_text(p: float) -> str:
    """A p-value for a table: three decimals, four (rounded down) where three would round it up to ALPHA (0.0496,
    not 0.050 beside `better`), or `< 0.001`."""
    if math.isnan(p):
        return ""
    if p < 0.001:
        return "< 0.001"
    text = f"{p:.3f}"
    return f"{math.floor(p * 1e4) / 1e4:.4f}" if p < ALPHA <= float(text) else text  # 0.04996: 0.0499


def _by_seed(table: pd.DataFrame, metric: str, sweep_dir: Path) -> pd.Series:
    """A setting's `metric` per seed (`table`: its completed jobs in `sweep_dir`); ConfigError for two jobs of one
    seed (a copied job directory), which a pairing by seed cannot tell apart, or for jobs on different data."""
    check_poolable(table, sweep_dir)
    by_seed = table.set_index("seed")[metric].astype(float)
    by_seed.index = by_seed.index.astype(int)  # whole numbers (a completed run records its seed), even beside a NaN
    return by_seed


def _val_sizes(sweep_dir: Path, jobs: pd.DataFrame) -> set[int]:
    """The validation splits' sizes (`data.val_size` in the config.yaml) of `jobs` in `sweep_dir`, where recorded."""
    sizes = set()
    for job in jobs.job:
        size = read_config_section(Path(sweep_dir) / job, "data").get("val_size")
        if size is not None and not is_count(size, at_least=1):
            raise ConfigError(f"{Path(sweep_dir) / job / CONFIG_FILE}: data.val_size is {size!r}, not a whole number "
                              "of images; expected the resolved config a run writes.")
        if size is not None:
            sizes.add(size)
    return sizes


def changes(baseline_dir: Path, sweep_dirs: list[Path]) -> pd.DataFrame:
    """One row per setting of `sweep_dirs` (completed jobs), paired by seed with `baseline_dir`'s one setting.

    Columns: setting (with its sweep's name where another of `sweep_dirs` holds it too), seeds, val (per-seed best
    validation accuracy), paired_seeds (those the baseline ran too), val_change (Interval of the paired
    difference), p and p_holm (paired t-test; Holm over the rows), seeds_needed (for an 80% chance to detect a
    change this large), verdict (on p_holm), test (Interval of the setting's test accuracy, shown only),
    train_seconds (mean). `attrs["left_out"]`: the jobs that did not complete (a
    setting that failed on some seeds is judged on the others, and one that failed on all is listed only).
    """
    left_out: dict[Path, list[str]] = {}

    def completed(sweep: Path) -> pd.DataFrame:
        table = collect(sweep)
        left_out[sweep] = [f"{sweep}/{r.job} ({r.status})" for r in table[table.status != COMPLETED].itertuples()]
        return table[table.status == COMPLETED]

    base = completed(baseline_dir)
    tried = {sweep: completed(sweep) for sweep in sweep_dirs}
    for dirs, nothing in (([baseline_dir], base.empty), (sweep_dirs, all(t.empty for t in tried.values()))):
        if nothing:
            jobs = [job for d in dirs for job in left_out[d]]
            raise ConfigError(f"{', '.join(map(str, dirs))}: no completed job to compare (not completed: "
                              f"{', '.join(jobs)}); nothing was compared.")
    if base.setting.nunique() != 1:
        raise ConfigError(f"{baseline_dir}: a baseline is one setting run with several seeds; this sweep has "
                          f"{base.setting.nunique()} completed settings ({', '.join(sorted(base.setting.unique()))}).")
    base_val = _by_seed(base, "val_acc_best", baseline_dir)
    base_val_sizes = _val_sizes(baseline_dir, base)  # one at most: `_by_seed` found its seeds computing one thing
    # A setting that two sweeps hold (one recipe run on two dates) is two rows, each named with its sweep as the
    # leaderboard names sweeps: a setting's name alone would show two identical rows.
    labels = sweep_labels(sweep_dirs)
    held = Counter(setting for table in tried.values() for setting in table.setting.unique())
    rows = [{"setting": f"baseline ({Path(baseline_dir).name})", "seeds": sorted(base_val.index),
             "val": base_val, "paired_seeds": sorted(base_val.index), "val_change": None, "p": math.nan,
             "seeds_needed": None,
             "test": mean_interval(base.test_acc), "train_seconds": base.train_seconds.mean()}]
    for sweep, table in tried.items():
        for setting, runs in table.groupby("setting"):
            val = _by_seed(runs, "val_acc_best", sweep)
            trained_on = sorted(set(runs.train_sha1.dropna()) | set(base.train_sha1.dropna()))
            if len(trained_on) > 1:  # the validation split is drawn from the training CSV
                raise ConfigError(f"{sweep}: setting `{setting}` and the baseline {baseline_dir} trained on different "
                                  f"training CSVs (SHA-1 {' and '.join(trained_on)} in their jobs' {METRICS_FILE}), so "
                                  "they validated on other images; a change paired by seed compares validation "
                                  "accuracies on the same images. Compare runs of one data set.")
            val_sizes = sorted(_val_sizes(sweep, runs) | base_val_sizes)
            if len(val_sizes) > 1:  # the seed draws the split, of this size: another size, other images
                raise ConfigError(f"{sweep}: setting `{setting}` and the baseline {baseline_dir} hold validation "
                                  f"splits of different sizes (data.val_size {' and '.join(map(str, val_sizes))} in "
                                  f"their jobs' {CONFIG_FILE}), so they validated on other images; a change paired by "
                                  "seed compares validation accuracies on the same images. Compare runs with one "
                                  "data.val_size.")
            if not set(val.index) & set(base_val.index):
                raise ConfigError(f"{sweep}: setting `{setting}` ran seeds {sorted(val.index)} and the baseline "
                                  f"{baseline_dir} seeds {sorted(base_val.index)}; a change is paired by seed, and "
                                  "these share none. Run the setting with the baseline's seeds (seed=...).")
            comparison = paired(val, base_val)
            rows.append({"setting": setting if held[setting] == 1 else f"{setting} ({labels[Path(sweep)]})",
                         "seeds": sorted(val.index), "val": val,
                         "paired_seeds": sorted(pd.concat([val, base_val], axis=1).dropna().index),
                         "val_change": comparison.difference, "p": comparison.p_value,
                         "seeds_needed": comparison.seeds_needed, "test": mean_interval(runs.test_acc),
                         "train_seconds": runs.train_seconds.mean()})
    result = pd.DataFrame(rows)
    result["p_holm"] = [math.nan] + holm(list(result.p[1:]))
    result["verdict"] = [""] + [change_verdict(r.val_change, r.p_holm) for r in result.iloc[1:].itertuples()]
    result.attrs["left_out"] = [job for jobs in left_out.values() for job in jobs]
    return result


def changes_markdown(table: pd.DataFrame) -> str:
    """The `changes` table in percentage points."""
    lines = ["| setting | val acc best, per seed (%) | val change (points, paired, 95% CI) | p (Holm) | verdict "
             "| seeds to detect | test acc (%) | training time (s) |", "|---|---|---|---|---|---|---|---|"]
    for r in table.itertuples():
        per_seed = " / ".join(f"{100 * v:.2f}" for v in r.val.sort_index())
        seeds = ",".join(str(s) for s in r.seeds)
        if r.val_change is None:
            change, p = "", ""
        else:
            paired_on = r.paired_seeds
            if paired_on != r.seeds or paired_on != table.paired_seeds.iloc[0]:  # some seeds ran on one side only
                change = f"{_signed(r.val_change)} (paired on seed{'s' * (len(paired_on) > 1)} " \
                         f"{','.join(map(str, paired_on))})"
            else:
                change = _signed(r.val_change) + ("" if r.val_change.n >= 2 else f" ({r.val_change.n} seed)")
            p = "" if math.isnan(r.p) else f"{p_text(r.p)} ({p_text(r.p_holm)})"
        lines.append(f"| `{r.setting}` | {per_seed} (seeds {seeds}) | {change} | {p} | {r.verdict} "
                     f"| {seeds_text(r.seeds_needed)} | {r.test.text()} | {r.train_seconds:.0f} |")
    lines += ["", f"{INTERVAL_NOTE} {VERDICT_NOTE} Each change is paired on the seeds both its setting and the "
              "baseline ran; seeds to detect: the seeds a paired t-test would need for an 80% chance of detecting a "
              "change this large. The test accuracy is shown, never used to choose."]
    if table.attrs.get("left_out"):
        lines += ["", f"Left out, not completed: {', '.join(table.attrs['left_out'])}."]
    return "\n".join(lines) + "\n"


def _signed(interval: Interval) -> str:
    if math.isnan(interval.half_width):
        return f"{100 * interval.mean:+.2f}"
    return f"{100 * interval.mean:+.2f} [{100 * interval.low:+.2f}, {100 * interval.high:+.2f}]"


def read_tricks_table(path: Path):
    """A table `tricks --csv` wrote, or ConfigError naming the file, and the line and column of a damaged cell."""
    low, high = ACCURACY_RANGE
    spread = (0, high - low, "a standard deviation")  # of accuracies, or of their changes
    what = "a table `tricks --csv` wrote"
    table = read_table(path, what, tuple(TRICKS_COLUMNS),
                       numbers=("val_acc_mean", "val_acc_std", "change_mean", "change_std"), counts=("n",),
                       # n: runs, at least one; a billion is no study's (a typo, and beyond what the t-quantile takes)
                       ranges={"val_acc_mean": (low, high, "an accuracy"), "val_acc_std": spread,
                               "change_mean": (low - high, high - low, "a change of accuracy"), "change_std": spread,
                               "n": (1, 1e9, "a number of runs")})
    # The spreads are empty where one run was scored; every row has its weights, TTA, mean, count and change.
    rows, seen = list(table.itertuples()), set()
    for line, row in enumerate(rows, start=2):
        empty = [c for c in ("weights", "tta", "val_acc_mean", "n", "change_mean") if pd.isna(getattr(row, c))]
        if empty:
            raise ConfigError(f"{path}, line {line}: an empty {empty[0]} cell; expected {what}.")
        if row.weights not in TRICKS_WEIGHTS or row.tta not in TTA_MODES:
            raise ConfigError(f"{path}, line {line}: weights {row.weights!r}, tta {row.tta!r}; expected {what}, whose "
                              f"weights are one of {', '.join(TRICKS_WEIGHTS)} and tta one of {', '.join(TTA_MODES)}.")
        if (row.weights, row.tta) in seen:
            raise ConfigError(f"{path}, line {line}: a second row of weights {row.weights}, tta {row.tta}; expected "
                              f"{what}, one row each.")
        seen.add((row.weights, row.tta))
    if TRICKS_REFERENCE not in seen:
        weights, tta = TRICKS_REFERENCE
        lacks = f"lacks the row of weights {weights}, tta {tta}" if rows else "holds no rows"
        raise ConfigError(f"{path}: {lacks}, the reference of every change; expected {what}.")
    # Every weights it scored under every TTA mode, on the same runs: a table cut short, or rows of two tables, would
    # be rendered with a weaker Holm correction, or changes paired over other runs, without a word.
    weights_scored = [w for w in TRICKS_WEIGHTS if any(row.weights == w for row in rows)]
    missing = [(w, tta) for w in weights_scored for tta in TTA_MODES if (w, tta) not in seen]
    if missing:
        raise ConfigError(f"{path}: lacks the row of weights {missing[0][0]}, tta {missing[0][1]}"
                          f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}; expected {what}, which scores "
                          f"each weights under every TTA mode ({', '.join(TTA_MODES)}). Was it cut short?")
    if table.n.nunique() > 1:
        raise ConfigError(f"{path}: its rows count different numbers of runs (n: {', '.join(map(str, sorted(table.n.unique())))}); "
                          f"expected {what}, whose every row scores the same runs.")
    reference = next(row for row in rows if (row.weights, row.tta) == TRICKS_REFERENCE)
    if reference.change_mean != 0 or (pd.notna(reference.change_std) and reference.change_std != 0):
        raise ConfigError(f"{path}: the reference row (weights {TRICKS_REFERENCE[0]}, tta {TRICKS_REFERENCE[1]}) has a "
                          f"change of {reference.change_mean} ± {reference.change_std}; expected {what}, in which every "
                          "change is against that row, so its own is 0.")
    return table


def tricks_markdown(table: pd.DataFrame) -> str:
    """`fmnist.inference.tricks.compare`'s table in percentage points, each mean and paired change with its
    95% interval (from the per-run mean, std and n it holds)."""
    lines = ["| weights | TTA | val acc % (mean ± 95% CI) | n | change vs raw, no TTA (points, paired, 95% CI) "
             "| p (Holm) | verdict |", "|---|---|---|---|---|---|---|"]
    reference = [(r.weights, r.tta) == TRICKS_REFERENCE for r in table.itertuples()]
    comparisons = [None if ref else summary_comparison(r.change_mean, r.change_std, r.n)
                   for ref, r in zip(reference, table.itertuples())]
    adjusted = iter(holm([c.p_value for c in comparisons if c is not None]))
    for r, c in zip(table.itertuples(), comparisons):
        val = summary_interval(r.val_acc_mean, r.val_acc_std, r.n)
        if c is None:
            change, p, verdict = "+0.00", "", "(the reference)"
        else:
            p_holm = next(adjusted)
            change, verdict = _signed(c.difference), change_verdict(c.difference, p_holm)
            p = "" if math.isnan(c.p_value) else f"{p_text(c.p_value)} ({p_text(p_holm)})"
        lines.append(f"| {r.weights} | {r.tta} | {val.text()} | {r.n} | {change} | {p} | {verdict} |")
    lines += ["", f"{INTERVAL_NOTE} {VERDICT_NOTE}"]
    return "\n".join(lines) + "\n"


def _read_predictions(file: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(predicted classes, labels) of one split from a run's predictions.npz, or ConfigError saying what is wrong."""
    try:
        saved = np.load(file, allow_pickle=False)
        if not isinstance(saved, np.lib.npyio.NpzFile):  # a bare .npy array, not the archive a run writes
            raise ValueError("one array, not an archive of named arrays")
        with saved:
            if f"{split}_pred" not in saved.files:
                raise ConfigError(f"{file}: holds no `{split}_pred` (the run was not tested, or saved no {split} split).")
            pred, labels = saved[f"{split}_pred"], saved.get(f"{split}_label")
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:  # zlib: a damaged member
        raise ConfigError(f"{file}: cannot read it as the per-image predictions a run writes (a damaged file, or "
                          "another kind of file).") from e
    if (labels is None or pred.ndim != 1 or pred.shape != labels.shape or not len(pred)
            or not (np.issubdtype(pred.dtype, np.integer) and np.issubdtype(labels.dtype, np.integer))):
        raise ConfigError(f"{file}: `{split}_pred` and `{split}_label` should be integer class arrays of one length, "
                          "not empty, as a run writes them; this file holds something else.")
    if not (((0 <= pred) & (pred < NUM_CLASSES)).all() and ((0 <= labels) & (labels < NUM_CLASSES)).all()):
        raise ConfigError(f"{file}: `{split}_pred` and `{split}_label` should hold classes 0 to {NUM_CLASSES - 1}, as "
                          f"a run writes them; this file holds others ({int(min(pred.min(), labels.min()))} to "
                          f"{int(max(pred.max(), labels.max()))}).")
    return pred, labels


def _predictions_by_seed(path: Path, split: str) -> tuple[dict[int, tuple[np.ndarray, np.ndarray]], list[str]]:
    """{seed: (predictions, labels)} of a run directory, or of each completed job of a sweep directory; and the jobs
    of the sweep left out, not completed (`job (status)`). ConfigError for a record no run would write (a sweep's
    job too: its seed is not known, so neither is the seed of the other side it leaves unpaired)."""
    if not path.is_dir():
        raise ConfigError(f"{path}: {not_a_directory(path)}; expected a run "
                          "directory or a sweep directory of one setting.")
    left_out = []
    if (path / METRICS_FILE).is_file():
        record = read_record(path)
        problem = record_problem(path, record)
        if problem:
            raise ConfigError(f"{problem}; expected the record a run writes.")
        if record["status"] != COMPLETED:  # as in a sweep, where only completed jobs are compared
            raise ConfigError(f"{path}: its status is {record['status']!r}; only a completed run is compared.")
        runs = [path]
    else:
        jobs = collect(path)  # a damaged record named in its error, as `record_problem` names the run directory's
        damaged = jobs[jobs.status == UNREADABLE]
        if len(damaged):
            raise ConfigError(f"{damaged.error.iloc[0]}; expected the record a run writes.")
        settings = sorted(jobs[jobs.status == COMPLETED].setting.unique())
        if len(settings) > 1:
            raise ConfigError(f"{path}: holds {len(settings)} completed settings ({some_names(settings)}); expected a "
                              "run directory or a sweep directory of one setting.")
        check_poolable(jobs, path)  # one job per seed, one data set, one recipe
        runs = [path / job for job in jobs[jobs.status == COMPLETED].job]
        left_out = [f"{path / r.job} ({r.status})" for r in jobs[jobs.status != COMPLETED].itertuples()]
    found = {}
    for run in runs:
        record = read_record(run) or {}
        file = run / PREDICTIONS_FILE
        if not file.is_file():
            raise ConfigError(f"{file}: no such file; per-image predictions are written by runs of this version "
                              "(a run that finished before it, or under DDP, has none).")
        pred, labels = _read_predictions(file, split)
        seed = record.get("seed")
        if seed in found:
            raise ConfigError(f"{path}: two runs with seed {seed}; pass a run directory or a sweep of one setting.")
        found[seed] = (pred, labels)
    if not found:
        raise ConfigError(f"{path}: no completed run; expected a run directory or a sweep directory of one setting.")
    return found, left_out


def _seed_order(seed) -> tuple:
    """Seeds in numeric order (2 before 10), any that is not a whole number (a record without one) after them."""
    return (not isinstance(seed, int), seed if isinstance(seed, int) else 0, str(seed))


def image_comparison(dir_a: Path, dir_b: Path, split: str = "val") -> tuple[pd.DataFrame, Interval]:
    """A against B on the same images: per shared seed, each accuracy and McNemar's test; over all of them,
    the accuracy difference with an interval over the seeds and the images (`stats.seed_and_image_interval`)."""
    (a, left_out_a), (b, left_out_b) = _predictions_by_seed(Path(dir_a), split), _predictions_by_seed(Path(dir_b), split)
    seeds = sorted(set(a) & set(b), key=_seed_order)
    if not seeds:
        raise ConfigError(f"{dir_a} and {dir_b} share no seed (seeds {sorted(a, key=_seed_order)} and {sorted(b, key=_seed_order)}); "
                          "a comparison by image pairs runs of the same seed.")
    rows, correct_a, correct_b = [], [], []
    for seed in seeds:
        (pred_a, labels), (pred_b, labels_b) = a[seed], b[seed]
        if not np.array_equal(labels, labels_b):
            raise ConfigError(f"seed {seed}: the two runs' {split} images differ (another split or data); "
                              "a comparison by image needs the same images in the same order.")
        test = mcnemar(pred_a, pred_b, labels)
        correct_a.append(pred_a == labels)
        correct_b.append(pred_b == labels)
        rows.append({"seed": seed, "acc_a": correct_a[-1].mean(), "acc_b": correct_b[-1].mean(),
                     "a_only": test["a_only"], "b_only": test["b_only"], "p": test["p_value"]})
    table = pd.DataFrame(rows)
    table.attrs["unpaired"] = {"A": sorted(set(a) - set(b), key=_seed_order), "B": sorted(set(b) - set(a), key=_seed_order)}
    table.attrs["left_out"] = [*left_out_a, *left_out_b]
    # A validation split is drawn with the run's seed, so each seed is judged on its own images; the test set is one.
    return table, seed_and_image_interval(correct_a, correct_b, same_images=split == "test")


def image_comparison_markdown(rows: pd.DataFrame, difference: Interval, names: tuple[str, str], split: str) -> str:
    """The image-paired comparison as markdown, in percentage points."""
    a, b = names
    lines = ["| seed | A acc (%) | B acc (%) | only A right | only B right | McNemar p |", "|---|---|---|---|---|---|"]
    lines += [f"| {r.seed} | {100 * r.acc_a:.2f} | {100 * r.acc_b:.2f} | {r.a_only} | {r.b_only} | {r.p:.3g} |"
              for r in rows.itertuples()]
    over = (f"over {difference.n} seeds and the images, paired by both" if difference.n > 1 else
            "over the images of one seed, paired by image: the images' error, without the spread between seeds; "
            "McNemar's p above compares these two trained models, not their settings")
    lines += ["", f"A = `{a}`, B = `{b}`, on the {split} split. A - B: {_signed(difference)} points (95% interval "
              f"{over}; {change_verdict(difference)})."]
    unpaired = {side: seeds for side, seeds in rows.attrs.get("unpaired", {}).items() if seeds}
    if unpaired:  # said, not dropped without a word; the other side may have run the seed, and not completed it
        lines.append("Left out, completed by one side only: " + "; ".join(
            f"{side} seeds {', '.join(map(str, seeds))}" for side, seeds in unpaired.items()) + ".")
    if rows.attrs.get("left_out"):  # as `changes` says it
        lines.append(f"Left out, not completed: {', '.join(rows.attrs['left_out'])}.")
    return "\n".join(lines) + "\n"

