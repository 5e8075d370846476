"""How sure a result is: intervals for means over seeds, paired comparisons, and verdicts on claims.

Seeds are few (3 to 5), so every mean gets a Student-t interval rather than a standard deviation, and
two settings run with the same seeds are compared pairwise (the difference per seed), which removes
what a seed does to both. A claim "A beats B" holds only when the paired test's p is below ALPHA in the
claimed direction, after Holm's correction when one report or table makes several claims.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

ALPHA = 0.05  # a claim holds when p < ALPHA (exactly 0.05: 1 - 0.95 is a hair above it in floating point)
LEVEL = 1 - ALPHA  # every interval here is a 95% interval
POWER = 0.8  # "seeds needed": for an 80% chance of detecting the observed difference
MOST_SEEDS = 1000  # "seeds needed" is searched up to this many
# A spread of paired accuracy differences (or its interval's half-width) below this is float rounding, not
# seeds: one image of 5,000 is 2e-4.
NO_SPREAD = 1e-5


@dataclass(frozen=True)
class Interval:
    """A mean with its `LEVEL` confidence interval (Student t over `n` values; no interval for n < 2)."""
    mean: float
    low: float
    high: float
    n: int

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def text(self, scale: float = 100, digits: int = 2) -> str:
        """`93.10 ± 0.45` (the interval's half-width), or the mean alone for one value."""
        if self.n < 2 or math.isnan(self.half_width):
            return f"{self.mean * scale:.{digits}f}"
        return f"{self.mean * scale:.{digits}f} ± {self.half_width * scale:.{digits}f}"


def t_critical(df: int) -> float:
    """The two-sided Student-t critical value of the 95% level (`ALPHA`) with `df` degrees of freedom."""
    # SciPy's statistics are imported where a number is computed, here and below: their import takes seconds that a
    # command refused before any result (a bad value, a missing file) would spend for nothing.
    from scipy import stats

    return float(stats.t.ppf(1 - ALPHA / 2, df))


def mean_interval(values) -> Interval:
    """The mean of `values` with its Student-t confidence interval."""
    x = np.asarray(pd.Series(values).dropna(), dtype=float)
    if len(x) == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    return summary_interval(x.mean(), x.std(ddof=1) if len(x) > 1 else math.nan, len(x))


def summary_interval(mean: float, std: float, n: int) -> Interval:
    """The Student-t interval of a mean known only by its summary: `n` values with this mean and std."""
    n = int(n)
    if n < 2 or math.isnan(std):
        return Interval(float(mean), math.nan, math.nan, n)
    half = t_critical(n - 1) * float(std) / math.sqrt(n)
    return Interval(float(mean), mean - half, mean + half, n)


HOLDS, CONTRADICTED, NO_DIFFERENCE = "holds", "contradicted", "no detectable difference"  # `Comparison.verdict`


@dataclass(frozen=True)
class Comparison:
    """A paired comparison of `a` - `b` over the seeds both ran."""
    difference: Interval  # the mean paired difference, with its interval
    p_value: float  # paired t-test, two-sided (a sign test when the difference has no spread: `no_spread`)
    effect_size: float  # Cohen's d_z: mean difference / standard deviation of the differences
    seeds_needed: int | float | None  # seeds for an 80% chance to detect a difference this large (`seeds_for_power`)

    def verdict(self, direction: int = 1, p_adjusted: float | None = None) -> str:
        """HOLDS when the difference is significant in the claimed `direction` (+1: a > b), CONTRADICTED
        when it is significant the other way, else NO_DIFFERENCE. (`fmnist.results.compare.change_verdict` says
        the same of a change, in a change's words: better, worse, within noise.)"""
        p = self.p_value if p_adjusted is None else p_adjusted
        if self.difference.n < 2 or math.isnan(p) or p >= ALPHA:
            return NO_DIFFERENCE
        return HOLDS if np.sign(self.difference.mean) == direction else CONTRADICTED


def paired(a: pd.Series, b: pd.Series) -> Comparison:
    """Compare two settings' metric, each a Series indexed by seed; only seeds both ran are used."""
    both = pd.concat({"a": a, "b": b}, axis=1).dropna()
    diff = (both["a"] - both["b"]).astype(float)
    return summary_comparison(float(diff.mean()), float(diff.std(ddof=1)) if len(diff) > 1 else math.nan, len(diff))


def summary_comparison(mean: float, std: float, n: int) -> Comparison:
    """A paired comparison from the summary of its per-seed differences (their mean, std and count): a paired
    t-test, or a sign test when the difference is the same on every seed (a t-test would call it certain)."""
    interval = summary_interval(mean, std, n)
    if interval.n < 2 or math.isnan(std):
        return Comparison(interval, math.nan, math.nan, None)
    if no_spread(interval):
        return Comparison(interval, same_difference_p(interval), math.inf if interval.mean else 0.0, None)
    from scipy import stats  # as in t_critical

    p = float(2 * stats.t.sf(abs(mean) / (std / math.sqrt(interval.n)), interval.n - 1))
    d = float(mean / std)
    return Comparison(interval, p, d, seeds_for_power(d))


def no_spread(difference: Interval) -> bool:
    """Whether a paired difference is the same on every seed, but for float rounding: its standard deviation,
    recovered from the interval's half-width, below `NO_SPREAD`."""
    if difference.n < 2 or math.isnan(difference.half_width):
        return False
    sd = difference.half_width * math.sqrt(difference.n) / t_critical(difference.n - 1)
    return sd < NO_SPREAD


def same_difference_p(difference: Interval) -> float:
    """Two-sided p of a paired difference that is the same on every seed (no spread): a sign test, the
    chance that `n` differences all fall on one side when neither setting is better. Accuracies count
    whole images, so two seeds can give the same difference by chance; it takes 6 seeds to reach 5%."""
    return 1.0 if abs(difference.mean) < NO_SPREAD else min(1.0, 2 * 0.5 ** difference.n)


def seeds_for_power(effect_size: float) -> int | float | None:
    """The fewest seeds with which a paired t-test at `ALPHA` detects `effect_size` (d_z) with `POWER`: None for no
    effect (or none measured), `math.inf` when more than `MOST_SEEDS` would be needed."""
    d = abs(effect_size)
    if d == 0 or math.isnan(d):
        return None
    from scipy import stats  # as in t_critical

    for n in range(2, MOST_SEEDS + 1):
        df, shift = n - 1, d * math.sqrt(n)
        critical = t_critical(df)
        power = stats.nct.sf(critical, df, shift) + stats.nct.cdf(-critical, df, shift)
        if power >= POWER:
            return n
    return math.inf


def seeds_text(needed: int | float | None) -> str:
    """`seeds_for_power`'s answer for a table: blank for none, `> 1000` past its search."""
    if needed is None or (isinstance(needed, float) and math.isnan(needed)):
        return ""
    return f"> {MOST_SEEDS}" if math.isinf(needed) else str(int(needed))


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment of `p_values` (several claims tested in one report)."""
    order = sorted(range(len(p_values)), key=lambda i: (math.isnan(p_values[i]), p_values[i]))
    valid = [i for i in order if not math.isnan(p_values[i])]
    adjusted = [math.nan] * len(p_values)
    running = 0.0
    for rank, i in enumerate(valid):
        running = max(running, min(1.0, (len(valid) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def mcnemar(pred_a: np.ndarray, pred_b: np.ndarray, labels: np.ndarray) -> dict:
    """McNemar's exact test of two models on the same images: do they err on different numbers of them?

    Only the images exactly one model gets right count (`a_only`, `b_only`); p is two-sided.
    """
    a, b = np.asarray(pred_a) == np.asarray(labels), np.asarray(pred_b) == np.asarray(labels)
    a_only, b_only = int((a & ~b).sum()), int((~a & b).sum())
    from scipy import stats  # as in t_critical

    p = float(stats.binomtest(a_only, a_only + b_only, 0.5).pvalue) if a_only + b_only else 1.0
    return {"a_only": a_only, "b_only": b_only, "difference": (a_only - b_only) / len(a), "p_value": p}


def seed_and_image_interval(correct_a: list[np.ndarray], correct_b: list[np.ndarray], same_images: bool) -> Interval:
    """The difference in accuracy of A over B, paired by seed and by image, with a `LEVEL` interval that carries
    both sources of chance: the seeds and the images evaluated.

    `correct_a[i]` and `correct_b[i]` say which images (the same ones, in the same order) each model got right
    in seed i. One seed: the images' sampling error alone (normal, from the per-image differences). Several
    seeds, each on its own images (`same_images` False: a validation split drawn with the run's seed): Student t
    over the seeds' differences, which already vary with their images; their spread is taken as at least the
    images' own, so that a few seeds that happen to agree are not called certain. Several seeds on the same
    images (the test set): Student t over the seeds, and the sampling error of those images (of the per-image
    difference averaged over the seeds), their half-widths added in quadrature.
    """
    if not correct_a or len(correct_a) != len(correct_b):
        raise ValueError("seed_and_image_interval needs the same number (at least one) of runs of A and B")
    differences = [np.asarray(a, dtype=float) - np.asarray(b, dtype=float) for a, b in zip(correct_a, correct_b)]
    per_seed = np.array([d.mean() for d in differences])
    from scipy import stats  # as in t_critical

    k, mean, z = len(per_seed), float(per_seed.mean()), stats.norm.ppf(1 - ALPHA / 2)

    def image_variance(d: np.ndarray) -> float:  # of the mean of `d` over its images
        return float(d.var(ddof=1) / len(d)) if len(d) > 1 else 0.0

    if k == 1:
        half = z * math.sqrt(image_variance(differences[0]))
    elif not same_images or len({len(d) for d in differences}) > 1:
        spread = max(per_seed.var(ddof=1), float(np.mean([image_variance(d) for d in differences])))
        half = t_critical(k - 1) * math.sqrt(spread / k)
    else:
        seeds_half = t_critical(k - 1) * math.sqrt(per_seed.var(ddof=1) / k)
        half = math.hypot(seeds_half, z * math.sqrt(image_variance(np.mean(differences, axis=0))))
    return Interval(mean, mean - float(half), mean + float(half), k)


INTERVAL_NOTE = ("`±`: the half-width of the 95% confidence interval of the mean over seeds (Student t); "
                 "one seed shows no interval.")
