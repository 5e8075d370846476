"""Results of a sweep directory: `summary.csv` (one row per job) and `summary.md` (the mean over seeds with its
95% confidence interval).

Works on any sweep directory at any time, finished, running or interrupted, from the jobs'
`metrics.json` files; `SummarizeSweep` runs it when a Hydra multirun ends. (The sweep's gate at its start is
`fmnist.sweeps.start.CheckSweep`.)
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
from hydra.experimental.callback import Callback

from fmnist.cli import exit_with
from fmnist.errors import INCOMPLETE_SWEEP_EXIT_CODE, ConfigError, StorageError
from fmnist.fsio import atomic_write, check_not_directories, keep_early_writes, storage_errors
from fmnist.results.stats import INTERVAL_NOTE, mean_interval
from fmnist.runs import COMPLETED, RUNNING, check_poolable, collect

log = logging.getLogger(__name__)


def _ci(values: pd.Series) -> float:
    return mean_interval(values).half_width


def group(table: pd.DataFrame) -> pd.DataFrame:
    """Completed jobs grouped by setting: each metric's mean over seeds, std, count (of the jobs that have it: a
    run with `test=false` has no test accuracy), and the half-width of the mean's 95% confidence interval (`ci`);
    and n, the completed jobs."""
    done = table[table.status == COMPLETED]
    metrics = ["val_acc_best", "test_acc", "test_loss", "train_seconds"]
    stats = done.groupby("setting")[metrics].agg(["mean", "std", "count", ("ci", _ci)])
    stats[("n", "")] = done.groupby("setting").size()  # the whole column key: pandas deprecates a partial one
    return stats.sort_values(("val_acc_best", "mean"), ascending=False)  # selection is on validation, never test


def _markdown(table: pd.DataFrame, stats: pd.DataFrame, title: str) -> str:
    def pm(metric: str, scale: float = 100, digits: int = 2) -> str:
        # One seed has no interval: show none rather than a made-up "± 0.00".
        mean, ci, count = s[(metric, "mean")], s[(metric, "ci")], int(s[(metric, "count")])
        if count == 0:
            return ""
        shown = f"{mean * scale:.{digits}f}" + ("" if pd.isna(ci) else f" ± {ci * scale:.{digits}f}")
        return shown + ("" if count == int(s["n"].iloc[0]) else f" (n={count})")  # e.g. runs with test=false

    lines = [f"# {title}", "", "| setting | n | val acc best (%) | test acc (%) | test loss | training time (s) |",
             "|---|---|---|---|---|---|"]
    for setting, s in stats.iterrows():
        lines.append(f"| `{setting}` | {int(s['n'].iloc[0])} | {pm('val_acc_best')} | {pm('test_acc')} "
                     f"| {pm('test_loss', 1, 4)} | {s[('train_seconds', 'mean')]:.0f} |")
    lines += ["", INTERVAL_NOTE + " Settings are ordered by validation accuracy; the test set never ranks."]
    counts = table.status.value_counts().to_dict()
    lines += ["", "Jobs: " + (", ".join(f"{n} {status}" for status, n in sorted(counts.items())) or "none") + "."]
    commits = sorted(table.git_commit.dropna().unique())
    if len(commits) > 1:  # not a refusal: code changes that do not change results are common
        lines += ["", f"Warning: the jobs ran on different code (git commits {', '.join(commits)})."]
    unfinished = table[table.status != COMPLETED]
    if len(unfinished):
        lines += ["", "| job | status | error |", "|---|---|---|"]
        lines += [f"| `{r.job}` | {r.status} | {(r.error.splitlines() or [''])[0] if isinstance(r.error, str) else ''} |"
                  for r in unfinished.itertuples()]
    return "\n".join(lines) + "\n"


SUMMARY_FILES = ("summary.csv", "summary.md")


def summary_files(sweep_dir: Path) -> tuple[pd.DataFrame, dict[Path, str]]:
    """The per-job table of `sweep_dir` and the text of its `summary.csv` and `summary.md`, by path; or the error
    that refuses the directory. Nothing is written."""
    sweep_dir = Path(sweep_dir)
    check_not_directories(sweep_dir / name for name in SUMMARY_FILES)
    table = collect(sweep_dir)
    check_poolable(table, sweep_dir)
    csv_name, md_name = SUMMARY_FILES
    return table, {sweep_dir / csv_name: table.to_csv(index=False),
                   sweep_dir / md_name: _markdown(table, group(table), f"Sweep {sweep_dir.name}")}


def summarize(sweep_dir: Path) -> pd.DataFrame:
    """Write `summary.csv` and `summary.md` into `sweep_dir` (both made before either is written); return the
    per-job table."""
    table, files = summary_files(sweep_dir)
    for path, text in files.items():
        atomic_write(path, text)
    return table


class SummarizeSweep(Callback):
    """Hydra callback (`conf/train.yaml`): at a multirun's end, summarize the sweep directory and list the jobs that
    did not complete; a sweep with such a job then exits with INCOMPLETE_SWEEP_EXIT_CODE, not 0."""

    def on_multirun_end(self, config, **kwargs) -> None:
        keep_early_writes()  # the jobs ran under this multirun.yaml, whatever their outcome
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        try:
            with storage_errors(key=None):  # Hydra would only warn of an OSError too, and the sweep would exit 0
                table = summarize(sweep_dir)
        except StorageError as e:
            exit_with(StorageError(f"the sweep's summary was not written: {e} Each job's results are in its own "
                                   "directory; the same command, run again, skips the finished jobs and writes it."))
        except ConfigError as e:  # e.g. a job directory copied inside the sweep; Hydra would only warn of it
            exit_with(e)
        summary_md = sweep_dir / SUMMARY_FILES[1]
        log.info("sweep summary: %s", summary_md)
        print(summary_md.read_text())
        # Every job this process ran has ended by now: one still `running` belongs to another process that
        # shares the sweep directory (parallel commands into one sweep), and is its concern, not this one's.
        # A job whose process is gone without recording its end is listed `interrupted` (`collect`).
        failed = table[~table.status.isin((COMPLETED, RUNNING))]
        for row in failed.itertuples():
            log.warning("job %s: %s %s", row.job, row.status, row.error if isinstance(row.error, str) else "")
        if len(failed):
            raise SystemExit(INCOMPLETE_SWEEP_EXIT_CODE)
