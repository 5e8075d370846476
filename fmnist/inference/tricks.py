"""Evaluation-side tricks measured on finished runs: raw vs EMA weights, under each TTA mode, on validation.

A run trained with `optim.ema_decay > 0` keeps both sets of weights in its checkpoints (`state_dict`:
the average, `current_model_state`: the raw weights), and test-time augmentation needs no training,
so each comparison is paired: the same training trajectory, scored six ways on the run's own
validation split. The test set is not touched (it ranks nothing).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from fmnist.config import TTA_MODES
from fmnist.data.csv_io import csv_digest
from fmnist.data.sources import find_csv
from fmnist.errors import CheckpointError, ConfigError
from fmnist.fsio import some_names
from fmnist.hardware import memory_errors
from fmnist.inference.loading import best_in_run, check_finite, load_model, net_state, training_datamodule
from fmnist.models import weights_error
from fmnist.runs import (COLUMNS, COMPLETED, METRICS_FILE, TRICKS_COLUMNS, TRICKS_REFERENCE, TRICKS_WEIGHTS,
                         check_one_job_per_seed, collect, computed_setting, differing_keys, job_row, read_config_section,
                         short_digest)


def validation_accuracies(run_dir: Path, data_dir: str | Path | None = None,
                          batch_size: int | None = None) -> dict[tuple[str, str], float]:
    """{(weights, tta): validation accuracy} of the run's best checkpoint; weights: `raw`, and `ema` when averaged.
    `batch_size`: images per evaluation batch (by default the run's own evaluation batch size)."""
    path = best_in_run(run_dir, suggest_last=False)  # tricks scores best checkpoints only: no ckpt= to pass
    loaded = load_model(path)
    images, labels = training_datamodule(loaded.data, data_dir).splits["val"]
    batch = batch_size or loaded.eval_batch_size
    whose = "" if batch_size else ", the run's own evaluation batch size"
    raw = loaded.raw_weights
    # load_model gave the checkpoint's `state_dict`: the average when the run had EMA, else the raw weights.
    raw_name, averaged_name = TRICKS_WEIGHTS
    weight_sets = [(averaged_name, None), (raw_name, raw)] if raw is not None else [(raw_name, None)]
    results = {}
    for name, state in weight_sets:
        if state is not None:
            try:
                loaded.net.load_state_dict(net_state(state))
            except RuntimeError as e:
                raise CheckpointError(f"{path}: its raw weights do not fit its model: {weights_error(e)}") from e
            check_finite(loaded.net, path, "raw weights (current_model_state)")  # scored, they would rank as chance
        for tta in TTA_MODES:
            with memory_errors(f"lower --batch-size ({batch}{whose})"):
                logits = loaded.logits_batched(images, batch, tta=tta)
            results[(name, tta)] = float((logits.argmax(1) == labels).float().mean())
    return results


def check_same_training_data(jobs: pd.DataFrame, data_dir: Path | None) -> None:
    """ConfigError if a run's training CSV, in `data_dir` or else where the run read it (its config's `data.dir`),
    is not the one it recorded training on (`train_sha1`): its validation split would hold other images, some of
    which the run may have trained on."""
    digests = {}  # each file read once
    for run, recorded in zip(jobs.job, jobs.train_sha1):
        if recorded is None:
            continue  # nothing recorded to compare with
        directory = data_dir if data_dir is not None else read_config_section(Path(run), "data").get("dir")
        if directory is None:
            continue  # no config.yaml naming it: the checkpoint's own data directory is read, and checked there
        csv = find_csv(Path(str(directory)), "train")
        if not csv.is_file():
            continue  # the datamodule says it is missing, naming the file
        digest = digests.setdefault(csv, short_digest(csv_digest(csv)))
        if digest != recorded:
            where = f"--data-dir {data_dir}: its" if data_dir is not None else "the run's"
            raise ConfigError(f"{where} training CSV {csv} (SHA-1 {digest}) is not the one {run} recorded in its "
                              f"{METRICS_FILE} ({recorded}), so its validation split would hold other images; nothing "
                              "was evaluated. Give the directory holding the runs' own data (--data-dir).")


def check_one_setting(runs: list[Path], given: list[Path]) -> None:
    """ConfigError for runs (the directories `given` hold) that compute different things, named by the keys they
    differ in (a learning-rate sweep, two recipes): the table's mean and interval are over the seeds of one."""
    settings = {run: computed_setting(run) for run in runs}
    settings = {run: setting for run, setting in settings.items() if setting is not None}  # older runs: not judged
    differ = differing_keys(list(settings.values()))
    if not differ:
        return
    first = next(iter(settings.values()))
    same = [str(run) for run, setting in settings.items() if setting == first]
    values = ", ".join(dict.fromkeys(repr(s.get(differ[0])) for s in settings.values()))
    raise ConfigError(f"{', '.join(map(str, given))}: the completed runs differ in {some_names(differ)} ({differ[0]}: "
                      f"{values}), and the table's mean and interval are over the seeds of one setting; nothing was "
                      f"evaluated. Give one setting's runs: a sweep of its seeds, or its run directories "
                      f"({some_names(same, 2)}).")


def compare(sweep_dirs: list[Path], data_dir: str | Path | None = None, batch_size: int | None = None) -> pd.DataFrame:
    """One row per (weights, tta): validation accuracy mean, std and n over the completed runs, and the paired
    change against raw weights without TTA (mean and std of the per-run differences). `batch_size`: images per
    evaluation batch (by default each run's own)."""
    pooled = []
    for given in map(Path, sweep_dirs):
        if (given / METRICS_FILE).is_file():  # a run directory: that run alone (one setting's jobs of a sweep)
            jobs, sweep = pd.DataFrame([job_row(given)], columns=COLUMNS), given.parent
            if jobs.status[0] != COMPLETED:  # named, not left out as a sweep's unfinished job is
                why = f" ({jobs.error[0]})" if isinstance(jobs.error[0], str) else ""
                raise ConfigError(f"{given}: its status is {jobs.status[0]}{why}; tricks scores completed runs; "
                                  "nothing was evaluated.")
        else:
            jobs, sweep = collect(given), given
        check_one_job_per_seed(jobs, sweep)  # each run is paired with itself: data may differ between runs
        done = jobs[jobs.status == COMPLETED]
        pooled.append(done.assign(job=[sweep / job for job in done.job]))
    pooled = pd.concat(pooled, ignore_index=True)
    if pooled.empty:
        raise ConfigError(f"{', '.join(map(str, sweep_dirs))}: no completed run to evaluate; nothing was evaluated.")
    # before the evaluation, which takes minutes; the table pools the runs of every directory given
    check_one_job_per_seed(pooled, "the directories given", advice="Give the sweeps without their copies.")
    check_one_setting(list(pooled.job), sweep_dirs)
    check_same_training_data(pooled, None if data_dir is None else Path(data_dir))
    rows = []
    for run in pooled.job:
        for (weights, tta), acc in validation_accuracies(run, data_dir, batch_size).items():
            rows.append({"run": str(run.resolve()), "weights": weights, "tta": tta, "val_acc": acc})
    runs = pd.DataFrame(rows)
    weights, tta = TRICKS_REFERENCE
    base = runs[(runs.weights == weights) & (runs.tta == tta)].set_index("run").val_acc
    runs["change"] = runs.val_acc - runs.run.map(base)
    order = {w: i for i, w in enumerate(TRICKS_WEIGHTS)} | {t: i for i, t in enumerate(TTA_MODES)}
    table = (runs.groupby(["weights", "tta"], sort=False)
             .agg(val_acc_mean=("val_acc", "mean"), val_acc_std=("val_acc", "std"), n=("val_acc", "size"),
                  change_mean=("change", "mean"), change_std=("change", "std"))
             .reset_index())
    table = table.sort_values(["weights", "tta"], key=lambda c: c.map(order)).reset_index(drop=True)
    return table[TRICKS_COLUMNS]
