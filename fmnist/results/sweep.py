"""Results of a sweep directory: `summary.csv` (one row per job) and `summary.md` (mean ± std over seeds).

Works on any sweep directory at any time, finished, running or interrupted, from the jobs'
`metrics.json` files; `SummarizeSweep` runs it when a Hydra multirun ends.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
from hydra.experimental.callback import Callback

from fmnist.config import PLACEMENT_KEYS
from fmnist.results.runs import read_record

log = logging.getLogger(__name__)

COLUMNS = ["job", "setting", "seed", "status", "val_acc_best", "best_epoch", "test_acc", "test_loss", "epochs",
           "train_seconds", "train_images", "train_flops", "git_commit", "error"]
# The compute behind a job, from the last row of its epochs.csv: cumulative over every process that
# trained it, where metrics.json's fit/wall seconds cover only the process that finished it.
COMPUTE = ("train_seconds", "train_images", "train_flops")


def setting_of(overrides: list[str]) -> str:
    """The overrides that define a job's setting (seed and placement removed), e.g. `optim.lr=0.01`."""
    kept = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in (*PLACEMENT_KEYS, "seed")
            and not o.startswith("hydra.")]
    return ",".join(sorted(kept)) or "(defaults)"


def collect(sweep_dir: Path) -> pd.DataFrame:
    """One row per job directory under `sweep_dir` (a directory holding `.hydra/` or `metrics.json`)."""
    rows = []
    for job in sorted(p for p in Path(sweep_dir).iterdir() if p.is_dir()):
        record = read_record(job)
        if record is None and not (job / ".hydra").is_dir():
            continue
        record = record or {"status": "started"}
        metrics = record.get("metrics", {})
        rows.append({
            "job": job.name, "setting": setting_of(record.get("overrides", [])), "seed": record.get("seed"),
            "status": record.get("status"), "val_acc_best": metrics.get("val/acc_best"),
            "best_epoch": metrics.get("best_epoch"), "test_acc": metrics.get("test/acc"),
            "test_loss": metrics.get("test/loss"), "epochs": metrics.get("epochs"),
            **_compute(job), "git_commit": record.get("git_commit"), "error": record.get("error"),
        })
    return pd.DataFrame(rows, columns=COLUMNS)


def _compute(job: Path) -> dict:
    """The job's cumulative training seconds, images and FLOPs (None where epochs.csv lacks them)."""
    try:
        last = pd.read_csv(job / "epochs.csv").iloc[-1]
    except (OSError, ValueError, IndexError):  # no epoch finished yet
        return dict.fromkeys(COMPUTE)
    return {key: last.get(key) for key in COMPUTE}


def group(table: pd.DataFrame) -> pd.DataFrame:
    """Completed jobs grouped by setting: mean and std of each metric over seeds, and n."""
    done = table[table.status == "completed"]
    metrics = ["val_acc_best", "test_acc", "test_loss", "train_seconds"]
    stats = done.groupby("setting")[metrics].agg(["mean", "std"])
    stats["n"] = done.groupby("setting").size()
    return stats.sort_values(("val_acc_best", "mean"), ascending=False)  # selection is on validation, never test


def _markdown(table: pd.DataFrame, stats: pd.DataFrame, title: str) -> str:
    def pm(mean: float, std: float, scale: float = 100, digits: int = 2) -> str:
        # One seed has no spread: show none rather than a made-up "± 0.00".
        return f"{mean * scale:.{digits}f}" + ("" if pd.isna(std) else f" ± {std * scale:.{digits}f}")

    lines = [f"# {title}", "", "| setting | n | val acc best (%) | test acc (%) | test loss | training time (s) |",
             "|---|---|---|---|---|---|"]
    for setting, s in stats.iterrows():
        lines.append(f"| `{setting}` | {int(s['n'].iloc[0])} | {pm(s[('val_acc_best', 'mean')], s[('val_acc_best', 'std')])} "
                     f"| {pm(s[('test_acc', 'mean')], s[('test_acc', 'std')])} "
                     f"| {pm(s[('test_loss', 'mean')], s[('test_loss', 'std')], 1, 4)} "
                     f"| {s[('train_seconds', 'mean')]:.0f} |")
    counts = table.status.value_counts().to_dict()
    lines += ["", "Jobs: " + ", ".join(f"{n} {status}" for status, n in sorted(counts.items())) + "."]
    commits = sorted(table.git_commit.dropna().unique())
    if len(commits) > 1:  # not a refusal: code changes that do not change results are common
        lines += ["", f"Warning: the jobs ran on different code (git commits {', '.join(commits)})."]
    unfinished = table[table.status != "completed"]
    if len(unfinished):
        lines += ["", "| job | status | error |", "|---|---|---|"]
        lines += [f"| `{r.job}` | {r.status} | {r.error.splitlines()[0] if isinstance(r.error, str) else ''} |"
                  for r in unfinished.itertuples()]
    return "\n".join(lines) + "\n"


def summarize(sweep_dir: Path) -> pd.DataFrame:
    """Write `summary.csv` and `summary.md` into `sweep_dir`; return the per-job table."""
    sweep_dir = Path(sweep_dir)
    table = collect(sweep_dir)
    table.to_csv(sweep_dir / "summary.csv", index=False)
    (sweep_dir / "summary.md").write_text(_markdown(table, group(table), f"Sweep {sweep_dir.name}"))
    return table


class SummarizeSweep(Callback):
    """Hydra callback: summarize the sweep directory when a multirun ends, and list failed jobs."""

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        table = summarize(sweep_dir)
        log.info("sweep summary: %s", sweep_dir / "summary.md")
        print((sweep_dir / "summary.md").read_text())
        failed = table[~table.status.isin(["completed"])]
        for row in failed.itertuples():
            log.warning("job %s: %s %s", row.job, row.status, row.error if isinstance(row.error, str) else "")
