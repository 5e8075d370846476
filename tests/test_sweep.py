import errno
import json
import os
import re
import shutil
import subprocess
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from fmnist.config import PLACEMENT_KEYS
from fmnist.errors import INCOMPLETE_SWEEP_EXIT_CODE, ConfigError, StorageError
from fmnist.fsio import storage_errors
from fmnist.overrides import setting_of
from fmnist.results.__main__ import main as results_main
from fmnist.results.report import ablation_pairs, write_report
from fmnist.results.sweep import summarize
from fmnist.sweeps.start import check_sweep_dir
from fmnist.runs import record_problem
from tests.conftest import CONF, FAST, FAST_NAMED, compose_cfg, snapshot

EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def test_the_studys_experiments_exist():
    assert {"ablation_dropout", "ablation_batch_size", "ablation_lr", "simple_vs_optimized", "study"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
@pytest.mark.parametrize("preset", [None, "cpu", "smoke"])
def test_every_experiment_composes_with_seeds_and_a_stable_directory(experiment, preset):
    overrides = [f"experiment={experiment}"] + ([f"preset={preset}"] if preset else [])
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert len(str(params.seed).split(",")) >= 3
    assert cfg.name == experiment
    # A preset's sweep lives beside the full-size one: a smoke test never blocks (or joins) the real sweep.
    assert cfg.hydra.sweep.dir == f"outputs/{experiment}" + (f"-{preset}" if preset else "")


def _fake_job(sweep: Path, name: str, status: str, seed: int, acc: float | None, overrides: list[str]) -> None:
    job = sweep / name
    job.mkdir(parents=True)
    record = {"status": status, "seed": seed, "overrides": overrides, "git_commit": "abc"}
    if acc is not None:
        record["metrics"] = {"val/acc_best": acc, "test/acc": acc - 0.01, "test/loss": 0.3, "epochs": 2,
                             "best_epoch": 2, "fit_seconds": 1.0}
    else:
        record["error"] = "DivergedError: loss is nan at epoch 1"
    (job / "metrics.json").write_text(json.dumps(record))
    (job / "epochs.csv").write_text("epoch,step,train/loss,train/acc,val/loss,val/acc,val/acc_best,lr,epoch_seconds,train_seconds\n"
                                    f"1,10,1.0,0.6,0.9,0.7,0.7,0.001,1,1\n2,20,0.5,0.8,0.6,{acc or 0.1},{acc or 0.1},0.001,1,2\n")
    (job / "confusion_matrix.csv").write_text("\n".join(",".join("5" if i == j else "0" for j in range(10)) for i in range(10)))


def test_a_sweep_continues_in_an_earlier_sweeps_directory_but_not_in_a_folder_of_ones_own_or_a_study(tmp_path):
    check_sweep_dir(tmp_path / "new")  # not there yet, or empty: a sweep's to make
    (tmp_path / "copied" / "seed=0").mkdir(parents=True)  # results copied without Hydra's multirun.yaml
    (tmp_path / "copied" / "seed=0" / "metrics.json").write_text("{}")
    (tmp_path / "copied" / "summary.md").write_text("# Sweep copied")
    check_sweep_dir(tmp_path / "copied")
    (tmp_path / "mine" / "notes").mkdir(parents=True)
    (tmp_path / "mine" / "summary.md").write_text("my notes")
    with pytest.raises(ConfigError, match=r"mine holds files that no sweep wrote \(notes, summary.md; no multirun.yaml\)"):
        check_sweep_dir(tmp_path / "mine")
    (tmp_path / "mine" / "multirun.yaml").write_text("hydra: {}\n")  # an earlier sweep's
    check_sweep_dir(tmp_path / "mine")
    (tmp_path / "refused" / "seed=1").mkdir(parents=True)  # a job refused in a joblib worker: its log alone
    (tmp_path / "refused" / "seed=1" / "train.log").write_text("")
    check_sweep_dir(tmp_path / "refused")
    (tmp_path / "study" / "trial-0000").mkdir(parents=True)  # tune.py's: trial directories, its summary and best.yaml
    (tmp_path / "study" / "trial-0000" / "metrics.json").write_text("{}")
    (tmp_path / "study" / "summary.md").write_text("# Sweep study")
    with pytest.raises(ConfigError, match=r"study is a tune.py study's directory \(trial-0000; no multirun.yaml\)"):
        check_sweep_dir(tmp_path / "study")


def test_a_diverged_record_may_hold_nan_where_a_completed_one_may_not(tmp_path):
    nan = {"val/acc_best": float("nan"), "val/loss": float("inf")}
    assert record_problem(tmp_path, {"status": "diverged", "seed": 0, "metrics": nan}) is None
    assert "in a completed run" in record_problem(tmp_path, {"status": "completed", "seed": 0, "metrics": nan})


@pytest.mark.parametrize("edit,words", [
    ({"status": [1]}, "status is [1], not one of running, completed"),
    ({"status": None}, "status is None"),  # a foreign JSON object: no status at all
    ({"seed": "0"}, "seed of the wrong type"),
    ({"overrides": [1, 2]}, "overrides of the wrong type"),
    ({"error": {"a": 1}}, "error of the wrong type"),
    ({"precision": [1]}, "precision of the wrong type"),  # read by the leaderboard only
    ({"hardware": "x"}, "hardware of the wrong type"),
    ({"trackers": [1]}, "trackers of the wrong type"),  # read by a resume
    ({"data_digest": "abc"}, "data_digest of the wrong type"),  # pools runs by their data; on a shipped model's card
    ({"precision": {"resolved": "64-bogus"}}, "precision.resolved is '64-bogus', not one of 32-true, bf16-mixed"),
    ({"seed": 10 ** 26}, f"seed is {10 ** 26}, not a seed from 0 to 4294967295"),  # pandas keeps seeds in int64
    # never averaged, published or chosen as a sweep's best
    ({"metrics": {"val/acc_best": float("inf"), "test/acc": 0.9}}, "metrics.val/acc_best is inf in a completed run"),
    ({"metrics": {"val/acc_best": 0.9, "test/acc": 1.5}}, "metrics.test/acc is 1.5, not an accuracy"),
    ({"metrics": {}}, "a completed run without metrics.val/acc_best"),
    ({"metrics": {"test/acc": 0.9}}, "a completed run without metrics.val/acc_best"),
    ({"seed": None}, "a completed run without its seed"),  # runs are paired by seed
    ({"metrics": {"val/acc_best": 0.9, "test/loss": -0.6}}, "metrics.test/loss is -0.6, not a loss"),
    ({"metrics": {"val/acc_best": 0.9, "best_epoch": -3}}, "metrics.best_epoch is -3, not a number of epochs"),
    ({"metrics": {"val/acc_best": 0.9, "epochs": 2.5}}, "metrics.epochs is 2.5, not a number of epochs"),
    ({"metrics": {"val/acc_best": 0.9, "fit_seconds": -1}}, "metrics.fit_seconds is -1, not a duration"),
    ({"metrics": {"val/acc_best": 10 ** 400}}, "metrics.val/acc_best is an integer of 401 digits, past what a float holds"),
    ({"status": "diverged", "metrics": {"val/acc_best": 0.9, "test/acc": -10 ** 309}},
     "metrics.test/acc is an integer of 310 digits"),
])
def test_a_hand_edited_record_is_listed_as_unreadable_not_a_crash(tmp_path, capsys, edit, words):
    sweep = tmp_path / "sweep"
    for seed in (0, 1):
        _fake_job(sweep, f"seed={seed}", "completed", seed, 0.9, [f"seed={seed}"])
    path = sweep / "seed=0" / "metrics.json"
    path.write_text(json.dumps({k: v for k, v in {**json.loads(path.read_text()), **edit}.items() if v is not None}))
    table = summarize(sweep).set_index("job")
    assert table.status.to_dict() == {"seed=0": "unreadable", "seed=1": "completed"}
    assert words in table.error["seed=0"]
    assert "seed=0" in (sweep / "summary.md").read_text()
    assert results_main(["leaderboard", str(sweep)]) == 0
    assert "1 job(s) left out, not completed or not tested: `seed=0` (unreadable)" in capsys.readouterr().out


@pytest.mark.parametrize("name,content,words", [
    ("confusion_matrix.csv", "a,b,c\n", "cannot read it as a table of numbers"),
    ("confusion_matrix.csv", "1,2\n", "expected the 10 x 10 confusion matrix a run writes; it holds a 1 x 2 table"),
    ("confusion_matrix.csv", "", "expected the 10 x 10 confusion matrix a run writes; it is empty."),  # numpy warned
    ("confusion_matrix.csv", "\n".join([",".join(["-1"] * 10)] * 10), "expected counts"),
    ("confusion_matrix.csv", "\n".join([",".join(["inf"] * 10)] * 10), "expected counts"),  # a sum of -2**63 images
    ("confusion_matrix.csv", "\n".join([",".join(["1e30"] * 10)] * 10), "expected counts"),  # past int64
    ("config.yaml", "- a list\n", "expected a mapping with a `data` section"),
    ("config.yaml", ": [\n", "cannot read it as YAML"),
    ("config.yaml", "data:\n  train_subset: abc\ntrainer:\n  max_epochs: 1\n",
     "data.train_subset is 'abc'; expected null or a whole number"),
    # Emptied, or without a section every run writes: damaged, not a run older than config.yaml (whose split is
    # unknown), which the main table would place beside the published results.
    ("config.yaml", "", "holds no config keys; expected a mapping with a `data` section"),
    ("config.yaml", "{}\n", "holds no config keys; expected a mapping with a `data` section"),
    ("config.yaml", "data:\n  train_subset: 500\n", "expected a mapping with a `trainer` section"),
])
def test_a_damaged_run_file_is_named_by_the_results_verbs_that_read_it(tmp_path, capsys, name, content, words):
    sweep = tmp_path / "sweep"
    _fake_job(sweep, "seed=0", "completed", 0, 0.9, ["seed=0"])
    (sweep / "seed=0" / name).write_text(content)
    verbs = ["leaderboard"] + (["report"] if name == "confusion_matrix.csv" else [])
    for verb in verbs:
        assert results_main([verb, str(sweep)]) == 2
        err = capsys.readouterr().err
        assert f"seed=0/{name}: {words}" in err and "Traceback" not in err and "Warning" not in err


@pytest.mark.parametrize("damage,words,compute_read", [
    (lambda text: bytes(range(128, 256)), ": cannot read it as a CSV table", False),
    (lambda text: b"epoch,foo\n1,2\n", ": not an epochs.csv as a run writes it: it lacks the columns train/loss, "
     "val/loss, val/acc", False),
    (lambda text: text.replace(",0.001,1,2\n", ",0.001,1,abc\n").encode(),
     ", line 3, column train_seconds: expected a number, found 'abc'", False),
    (lambda text: text.replace("\n2,20,", "\n1,20,").encode(), ", line 3: epoch 1 again", True),
    (lambda text: text.replace("\n1,10,1.0,0.6,0.9,0.7,", "\n1,10,1.0,0.6,0.9,-inf,").encode(),
     ", line 2, column val/acc: expected an accuracy (0 to 1) or an empty cell, found -inf", True),
    (lambda text: text.replace("\n1,10,1.0,", "\n1,10,-1.0,").encode(),
     ", line 2, column train/loss: expected a loss (0 to inf) or an empty cell, found -1.0", True),
])
def test_a_damaged_epochs_csv_refuses_the_report_and_leaves_the_summarys_compute_unrecorded(
        tmp_path, capsys, damage, words, compute_read):
    sweep = tmp_path / "sweep"
    for seed in (0, 1):
        _fake_job(sweep, f"seed={seed}", "completed", seed, 0.9, [f"seed={seed}"])
    path = sweep / "seed=0" / "epochs.csv"
    path.write_bytes(damage(path.read_text()))
    assert results_main(["report", str(sweep)]) == 2  # the report draws the curves: it needs them whole
    err = capsys.readouterr().err
    assert f"seed=0/epochs.csv{words}" in err and "Traceback" not in err
    assert sorted(p.name for p in sweep.iterdir()) == ["seed=0", "seed=1"]  # no figures/, no summary rewritten
    # Elsewhere only the last row's compute is read: shown as not recorded, as for a run older than the columns.
    assert results_main(["leaderboard", str(sweep)]) == 0
    assert results_main(["summary", str(sweep)]) == 0
    seconds = pd.read_csv(sweep / "summary.csv").set_index("job").train_seconds
    assert seconds["seed=1"] == 2 and pd.isna(seconds["seed=0"]) != compute_read


@pytest.mark.parametrize("damage,words", [
    (lambda path: path.write_text(""), ": empty, though the job completed 2 epoch(s)"),
    (lambda path: path.write_text(path.read_text().splitlines(keepends=True)[0]),  # its header alone
     ": lacks the row of epoch 1 and 1 more, though the job completed 2 epoch(s)"),
    (lambda path: path.write_text(path.read_text().split("\n2,")[0] + "\n"), ": lacks the row of epoch 2, though"),
    (lambda path: path.unlink(), ": missing, though the job completed 2 epoch(s)"),
    (lambda path: path.unlink() or path.symlink_to(path.parent / "gone.csv"), ": a link to nothing, though"),
    (lambda path: path.write_bytes(path.read_bytes()[:-5]), ", line 3: cut short inside the line (no line end)"),
])
def test_a_completed_jobs_epochs_csv_without_each_epoch_refuses_the_report(tmp_path, capsys, damage, words):
    # Drawn without them, its setting's figures would show one seed fewer, or curves that end early, beside a
    # summary that counts the job.
    sweep = tmp_path / "sweep"
    for seed in (0, 1):
        _fake_job(sweep, f"seed={seed}", "completed", seed, 0.9, [f"seed={seed}"])
    assert results_main(["report", str(sweep)]) == 0
    damage(sweep / "seed=1" / "epochs.csv")
    before = snapshot(sweep)
    assert results_main(["report", str(sweep)]) == 2
    err = capsys.readouterr().err
    assert f"seed=1/epochs.csv{words}" in err and "Traceback" not in err, err
    assert snapshot(sweep) == before  # the earlier figures and summary kept


def test_aggregation_lists_a_failed_job_and_groups_over_seeds(tmp_path):
    sweep = tmp_path / "sweep"
    for seed, acc in enumerate([0.90, 0.92]):
        _fake_job(sweep, f"optim.lr=0.001,seed={seed}", "completed", seed, acc, ["experiment=x", "optim.lr=0.001", f"seed={seed}"])
    _fake_job(sweep, "optim.lr=10,seed=0", "diverged", 0, None, ["optim.lr=10", "seed=0"])
    (sweep / "optim.lr=0.1,seed=0" / ".hydra").mkdir(parents=True)  # started, nothing recorded yet
    _fake_job(sweep, "optim.lr=0.001,seed=2", "completed", 2, 0.5, ["optim.lr=0.001", "seed=2"])
    record = json.loads((sweep / "optim.lr=0.001,seed=2" / "metrics.json").read_text())
    record["metrics"]["val/acc_best"] = "0.95"  # a hand-edited record: listed, never averaged nor a crash
    (sweep / "optim.lr=0.001,seed=2" / "metrics.json").write_text(json.dumps(record))
    table = summarize(sweep)
    assert len(table) == 5 and sorted(table.status) == ["completed", "completed", "diverged", "started", "unreadable"]
    assert "metrics.val/acc_best is '0.95', not a number" in table.set_index("job").error["optim.lr=0.001,seed=2"]
    csv = pd.read_csv(sweep / "summary.csv")
    assert list(csv.columns[:4]) == ["job", "setting", "seed", "status"] and "git_commit" in csv.columns
    md = (sweep / "summary.md").read_text()
    # training time: the last row of each job's epochs.csv (cumulative over resumes), not metrics.json
    assert "| `optim.lr=0.001` | 2 | 91.00 ± 12.71 | 90.00 ± 12.71 | 0.3000 ± 0.0000 | 2 |" in md
    assert "optim.lr=10,seed=0` | diverged | DivergedError: loss is nan" in md and "1 started" in md


def test_report_draws_curves_ablations_and_confusion(tmp_path):
    sweep = tmp_path / "sweep"
    for lr, acc in (("0.001", 0.9), ("0.01", 0.85)):
        for seed in (0, 1):
            _fake_job(sweep, f"optim.lr={lr},seed={seed}", "completed", seed, acc + seed / 100, [f"optim.lr={lr}", f"seed={seed}"])
    names = {p.name for p in write_report(sweep)}
    assert names == {"curves_optim.lr-0.001.png", "curves_optim.lr-0.01.png", "ablation_optim.lr.png", "confusion_matrix.png"}
    assert all((sweep / "figures" / n).stat().st_size > 10_000 for n in names)


def test_report_leaves_out_a_job_without_a_readable_record(tmp_path):
    sweep = tmp_path / "sweep"
    for seed in (0, 1):
        _fake_job(sweep, f"optim.lr=0.01,seed={seed}", "completed", seed, 0.9, ["optim.lr=0.01", f"seed={seed}"])
    _fake_job(sweep, "optim.lr=0.1,seed=0", "completed", 0, 0.5, ["optim.lr=0.1", "seed=0"])
    (sweep / "optim.lr=0.1,seed=0" / "metrics.json").write_text('{"status": "compl')  # cut short by a crash
    names = {p.name for p in write_report(sweep)}
    # Its setting is unknown: drawn, it would be a setting called "(defaults)".
    assert "curves_optim.lr-0.01.png" in names and not any("defaults" in n for n in names), names


def test_a_job_whose_record_is_lost_is_listed_unreadable_not_started(tmp_path):
    # A run writes its record before its first checkpoint: one gone beside its last.ckpt, or a link to nothing, is
    # lost, listed as a record cut short is (and as the sweep's start check refuses it), not as a job starting.
    from fmnist.sweeps.start import check_job_records, sweep_jobs

    sweep = tmp_path / "sweep"
    for seed in (0, 1, 2):
        _fake_job(sweep, f"seed={seed}", "completed", seed, 0.9, [f"seed={seed}"])
        (sweep / f"seed={seed}" / ".hydra").mkdir()
    (sweep / "seed=1" / "metrics.json").unlink()
    (sweep / "seed=1" / "checkpoints").mkdir()
    (sweep / "seed=1" / "checkpoints" / "last.ckpt").write_bytes(b"a checkpoint")
    (sweep / "seed=2" / "metrics.json").unlink()
    (sweep / "seed=2" / "metrics.json").symlink_to(tmp_path / "gone.json")
    shutil.rmtree(sweep / "seed=2" / ".hydra")  # the link alone marks the job
    table = summarize(sweep).set_index("job")
    assert table.status.to_dict() == {"seed=0": "completed", "seed=1": "unreadable", "seed=2": "unreadable"}
    assert table.error["seed=1"] == f"{sweep}/seed=1/metrics.json is gone, beside the job's checkpoints/last.ckpt"
    assert table.error["seed=2"].startswith(f"{sweep}/seed=2/metrics.json is a link to nothing")
    md = (sweep / "summary.md").read_text()
    assert f"| `seed=1` | unreadable | {sweep}/seed=1/metrics.json is gone" in md
    assert "Jobs: 1 completed, 2 unreadable." in md
    with pytest.raises(ConfigError, match=r"seed=1/metrics.json is gone, beside the job's checkpoints/last.ckpt; "
                                          r"the sweep would stop at that job"):
        check_job_records(sweep, sweep_jobs(sweep))
    (sweep / "seed=1" / "checkpoints" / "last.ckpt").unlink()  # no record yet, nor a checkpoint: a job starting
    assert summarize(sweep).set_index("job").status["seed=1"] == "started"


def test_report_on_a_sweep_with_nothing_to_draw_says_so(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    for seed in (0, 1):  # both failed before their first epoch: no epochs.csv
        _fake_job(sweep, f"seed={seed}", "failed", seed, None, [f"seed={seed}"])
        (sweep / f"seed={seed}" / "epochs.csv").unlink()
    assert results_main(["report", str(sweep)]) == 0
    assert f"{sweep}: no figure to draw (no job has an epoch recorded)" in capsys.readouterr().err
    assert (sweep / "summary.md").exists()


def test_a_figure_that_fails_mid_write_keeps_the_one_there_before(tmp_path, monkeypatch):
    import matplotlib.figure

    sweep = tmp_path / "sweep"
    for seed in (0, 1):
        _fake_job(sweep, f"seed={seed}", "completed", seed, 0.9, [f"seed={seed}"])
    savefig = matplotlib.figure.Figure.savefig

    def half_then_full_disk(self, target, **kwargs):
        Path(target).write_bytes(b"\x89PNG half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    for first_time in (True, False):
        if not first_time:
            monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
            write_report(sweep)
        before = {p.name: p.read_bytes() for p in (sweep / "figures").iterdir()} if not first_time else None
        monkeypatch.setattr(matplotlib.figure.Figure, "savefig", half_then_full_disk)
        with pytest.raises(StorageError, match=r"cannot write .*figures/curves__defaults_.png: the disk is full"), \
                storage_errors(key=None):
            write_report(sweep)
        if first_time:  # not even the directory it made for them
            assert not (sweep / "figures").exists()
        else:  # no temporary, no half figure
            assert {p.name: p.read_bytes() for p in (sweep / "figures").iterdir()} == before


def test_report_draws_what_runs_record_at_their_edges(tmp_path):
    # A diverged run whose every loss is infinite, an override that deletes a key (no `=`), an older run's
    # epochs.csv without compute columns beside a newer one's: drawn, not a crash.
    sweep = tmp_path / "sweep"
    for seed in (0, 1):
        _fake_job(sweep, f"seed={seed}", "completed", seed, 0.9, ["~model.dropout", f"seed={seed}"])
    for seed in (0, 1):  # two seeds: their band too has no finite value
        _fake_job(sweep, f"optim.lr=10,seed={seed}", "diverged", seed, None, ["~model.dropout", "optim.lr=10", f"seed={seed}"])
        diverged = sweep / f"optim.lr=10,seed={seed}" / "epochs.csv"
        diverged.write_text(re.sub(r"\n(\d),(\d+),[\d.]+,([\d.]+),[\d.]+,", r"\n\1,\2,inf,\3,inf,", diverged.read_text()))
    flops_only = sweep / "seed=1" / "epochs.csv"  # FLOPs without seconds: no time-to-accuracy point
    pd.read_csv(flops_only).drop(columns="train_seconds").assign(train_flops=[1e12, 2e12]).to_csv(flops_only, index=False)
    names = {p.name for p in write_report(sweep)}
    assert "curves_optim.lr-10__model.dropout.png" in names and "confusion_matrix.png" in names, names
    assert "time_to_accuracy.png" not in names


def test_a_directory_where_a_figure_goes_is_refused_before_any_figure_is_replaced(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    for seed in (0, 1):
        _fake_job(sweep, f"seed={seed}", "completed", seed, 0.9, [f"seed={seed}"])
    write_report(sweep)
    (sweep / "figures" / "confusion_matrix.png").unlink()
    (sweep / "figures" / "confusion_matrix.png").mkdir()  # in the way of the last figure drawn
    (sweep / "figures" / "curves__defaults_.png").write_bytes(b"an earlier figure")  # drawn again, it would differ
    before = snapshot(sweep)
    assert results_main(["report", str(sweep)]) == 2
    assert f"cannot write {sweep}/figures/confusion_matrix.png: it is a directory" in capsys.readouterr().err
    assert snapshot(sweep) == before


def test_a_failed_job_with_an_empty_error_is_listed(tmp_path):
    sweep = tmp_path / "sweep"
    _fake_job(sweep, "seed=0", "completed", 0, 0.9, ["seed=0"])
    _fake_job(sweep, "seed=1", "failed", 1, None, ["seed=1"])
    record = json.loads((sweep / "seed=1" / "metrics.json").read_text())
    (sweep / "seed=1" / "metrics.json").write_text(json.dumps({**record, "error": ""}))  # a hand edit
    summarize(sweep)
    assert "| `seed=1` | failed |  |" in (sweep / "summary.md").read_text()


def test_report_reads_settings_whose_values_hold_commas(tmp_path):
    sweep = tmp_path / "sweep"
    for widths, acc in (("[8,16]", 0.9), ("[16,32]", 0.85)):
        for seed in (0, 1):
            _fake_job(sweep, f"model.widths={widths},seed={seed}", "completed", seed, acc + seed / 100,
                      [f"model.widths={widths}", f"seed={seed}"])
    names = {p.name for p in write_report(sweep)}
    assert "ablation_model.widths.png" in names and "curves_model.widths-_8_16_.png" in names, names


def test_curve_statistics_skip_the_epochs_that_did_not_validate():
    from fmnist.results.report import curve_stats
    nan = float("nan")  # validation every second epoch: trainer.check_val_every_n_epoch=2
    run = pd.DataFrame({"epoch": [1, 2, 3, 4, 5, 6], "train/loss": [1.0, 0.8, 0.6, 0.5, 0.4, 0.3],
                        "val/loss": [nan, 0.7, nan, 0.5, nan, 0.6], "val/acc": [nan, 0.80, nan, 0.85, nan, 0.83]})
    stats = curve_stats([run])
    assert stats["rise_epoch"] == [4] and stats["min_val_loss"] == pytest.approx(0.5)
    assert stats["jaggedness"] == pytest.approx(np.std([5.0, -2.0], ddof=1))  # the changes between validations


def test_ablation_pairs_vary_one_key_from_the_reference():
    settings = ["a=1,b=1", "a=2,b=1", "a=1,b=2", "a=2,b=2"]
    assert ablation_pairs(settings, "a=1,b=1") == {"a": ["a=1,b=1", "a=2,b=1"], "b": ["a=1,b=1", "a=1,b=2"]}


@pytest.mark.parametrize("override,words", [
    ("seed=range(0,0)", "gives no value"), ("x=range(5,0)", "gives no value"),
    ("seed=range(0,1,0)", r"cannot be expanded \(range\(\) arg 3 must not be zero\)"),
])
def test_a_sweep_override_with_no_value_or_none_that_can_be_computed_is_refused(override, words):
    from fmnist.overrides import check_sweep_values

    fine = ["seed=range(0,3)", "optim.lr=1e-2,1e-3", "seed=1", "y=glob(*)", "model.widths=[8,16]", "x=interval(0,1)"]
    check_sweep_values(fine)
    with pytest.raises(ConfigError, match=f"the sweep override {re.escape(override)} {words}"):
        check_sweep_values([*fine, override])


def test_job_names_leave_out_exactly_the_placement_keys():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", return_hydra_config=True)
    assert list(cfg.hydra.job.config.override_dirname.exclude_keys) == list(PLACEMENT_KEYS)


def test_a_sweep_job_is_named_by_its_swept_keys_first_and_keeps_an_earlier_sweeps_directory(tmp_path):
    from omegaconf import OmegaConf

    from fmnist.overrides import sweep_job_dirname

    job = ["model=simple", "data.train_subset=5000", "optim.lr=0.01", "seed=1", "data.dir=/data", "model.widths=[8,16]"]
    assert sweep_job_dirname(str(tmp_path), job) == (  # no multirun.yaml: nothing known to be swept, Hydra's sorted order
        "data.train_subset=5000,model.widths=[8,16],model=simple,optim.lr=0.01,seed=1")
    OmegaConf.save({"hydra": {"overrides": {"task": ["model=simple", "data.train_subset=5000", "optim.lr=1e-2,1e-3"]},
                              "sweeper": {"params": {"seed": "0,1,2"}}}}, tmp_path / "multirun.yaml")
    assert sweep_job_dirname(str(tmp_path), job) == "optim.lr=0.01,seed=1,data.train_subset=5000,model.widths=[8,16],model=simple"
    # The same job under another order (an earlier sweep that varied other keys, or one named before the swept
    # keys led): its directory is kept, so the sweep skips or resumes it instead of training it again.
    (tmp_path / "seed=1,data.train_subset=5000,model.widths=[8,16],model=simple,optim.lr=0.01").mkdir()
    (tmp_path / "seed=1,data.train_subset=500,model.widths=[8,16],model=simple,optim.lr=0.01x").mkdir()  # another job
    assert sweep_job_dirname(str(tmp_path), job) == "seed=1,data.train_subset=5000,model.widths=[8,16],model=simple,optim.lr=0.01"
    assert sweep_job_dirname(str(tmp_path), ["data.dir=/data"]) == "defaults"  # only placement keys: a directory still


def test_a_summary_of_no_jobs_says_none(tmp_path):
    summarize(tmp_path)  # a sweep whose every job was refused before its directory was made
    assert "Jobs: none." in (tmp_path / "summary.md").read_text()


def test_a_sweep_whose_directory_name_is_not_utf8_gets_its_summary_and_report(tmp_path):
    # Python reads such a name with surrogate escapes; the summary names it, written back as its own bytes.
    sweep = tmp_path / os.fsdecode(b"bad\xff\xfe")
    _fake_job(sweep, "seed=0", "completed", 0, 0.9, ["seed=0"])
    (sweep / "seed=0" / "epochs.csv").write_text("epoch,step,train/loss,val/loss,val/acc,train_seconds,train_flops\n"
                                                 "1,10,1.0,0.9,0.7,1,1e12\n2,20,0.5,0.6,0.9,2,2e12\n")  # timed
    summarize(sweep)
    assert b"# Sweep bad\xff\xfe\n" in (sweep / "summary.md").read_bytes() and (sweep / "summary.csv").is_file()
    assert results_main(["report", str(sweep)]) == 0  # its figures' titles show the bytes as U+FFFD
    assert (sweep / "figures" / "time_to_accuracy.png").stat().st_size > 0


def test_a_sweep_that_names_no_computing_key_keeps_its_job_in_a_directory_of_its_own(tmp_path, data_dir,
                                                                                    run_in_process):
    # Its experiment (a placement key, as data.dir is) sizes the run to the test's small CSVs, and to seconds.
    (tmp_path / "conf" / "experiment").mkdir(parents=True)
    (tmp_path / "conf" / "experiment" / "tiny.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /model: simple\n  - override /logger: csv\n"
        "data:\n  val_size: 100\n  batch_size: 32\n  eval_batch_size: 32\n")
    result = run_in_process("train.py", "-m", "--config-dir", str(tmp_path / "conf"), "experiment=tiny", "preset=smoke",
                            f"data.dir={data_dir}", "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    table = summarize(tmp_path / "sweep")
    assert list(table.job) == ["defaults"] and list(table.status) == ["completed"]
    assert "Jobs: 1 completed." in (tmp_path / "sweep" / "summary.md").read_text()


def test_summary_ranks_settings_by_validation_not_test(tmp_path):
    sweep = tmp_path / "sweep"
    _fake_job(sweep, "optim.lr=0.1,seed=0", "completed", 0, 0.95, ["optim.lr=0.1", "seed=0"])
    _fake_job(sweep, "optim.lr=0.2,seed=0", "completed", 0, 0.90, ["optim.lr=0.2", "seed=0"])
    record = json.loads((sweep / "optim.lr=0.2,seed=0" / "metrics.json").read_text())
    record["metrics"]["test/acc"] = 0.99  # best on test, worse on validation
    (sweep / "optim.lr=0.2,seed=0" / "metrics.json").write_text(json.dumps(record))
    summarize(sweep)
    rows = [line for line in (sweep / "summary.md").read_text().splitlines() if line.startswith("| `")]
    assert rows[0].startswith("| `optim.lr=0.1`")


def test_setting_drops_seed_and_placement():
    assert setting_of(["experiment=x", "seed=3", "trainer.accelerator=gpu", "optim.lr=0.1", "model=simple"]) == "model=simple,optim.lr=0.1"


@pytest.mark.slow
def test_sweep_survives_a_diverging_job_skips_finished_jobs_and_reports(tmp_path, data_dir, run_in_process):
    args = ["-m", *FAST, f"data.dir={data_dir}", "model=simple", "optim=sgd", "optim.scheduler=none",
            "optim.warmup_epochs=0", "trainer.precision=32-true", "trainer.limit_train_batches=5", "optim.lr=1e8,0.01", f"hydra.sweep.dir={tmp_path}/s"]
    first = run_in_process("train.py", *args)
    assert first.returncode == INCOMPLETE_SWEEP_EXIT_CODE, first.stderr[-3000:]  # the other job still ran
    table = pd.read_csv(tmp_path / "s" / "summary.csv").set_index("setting")
    assert table.status.to_dict() == {f"{FAST_NAMED},model=simple,optim.lr=100000000.0,"
                                      "optim.scheduler=none,optim.warmup_epochs=0,optim=sgd,trainer.limit_train_batches=5,"
                                      "trainer.precision=32-true": "diverged",
                                      f"{FAST_NAMED},model=simple,optim.lr=0.01,"
                                      "optim.scheduler=none,optim.warmup_epochs=0,optim=sgd,trainer.limit_train_batches=5,"
                                      "trainer.precision=32-true": "completed"}
    records = {p.parent.name: p.read_text() for p in (tmp_path / "s").glob("*/metrics.json")}
    second = run_in_process("train.py", *args)
    assert second.returncode == INCOMPLETE_SWEEP_EXIT_CODE and second.stderr.count("skipped") + second.stdout.count("skipped") >= 2
    assert {p.parent.name: p.read_text() for p in (tmp_path / "s").glob("*/metrics.json")} == records
    assert results_main(["report", str(tmp_path / "s")]) == 0
    assert (tmp_path / "s" / "figures" / "confusion_matrix.png").exists()


def test_a_refused_sweep_leaves_no_directory_and_a_refused_job_no_job_directory(tmp_path, data_dir, run_in_process):
    args = ["-m", *FAST, f"data.dir={data_dir}", f"hydra.sweep.dir={tmp_path}/s"]
    refused = run_in_process("train.py", *args, "optim.lr=-1")
    assert refused.returncode == 2 and "optim.lr must be positive" in refused.stderr
    assert not (tmp_path / "s").exists()  # no multirun.yaml, no job directory, no empty train.log

    (tmp_path / "s" / "earlier").mkdir(parents=True)  # a sweep directory the user already has stays as it was
    (tmp_path / "s" / "multirun.yaml").write_text("earlier sweep\n")
    before = snapshot(tmp_path / "s"), sorted((tmp_path / "s").rglob("*"))
    assert run_in_process("train.py", *args, "optim.lr=-1").returncode == 2
    assert (snapshot(tmp_path / "s"), sorted((tmp_path / "s").rglob("*"))) == before
    # A sweep of no job (an empty range) is refused before anything is written, not a silent exit 0.
    empty = run_in_process("train.py", *args, "seed=range(3,3)")
    assert empty.returncode == 2 and "the sweep override seed=range(3,3) gives no value" in empty.stderr
    assert (snapshot(tmp_path / "s"), sorted((tmp_path / "s").rglob("*"))) == before
    nothing = run_in_process("train.py", *args, "model=glob(zzz*)")  # a glob that matches no model
    assert nothing.returncode == 2 and "the sweep override model=glob(zzz*) gives no value" in nothing.stderr
    assert "range" not in nothing.stderr and "range's end is exclusive" in empty.stderr  # the hint fits the override
    # A value Hydra refuses while composing a job: the sweep's multirun.yaml is put back too.
    wrong = run_in_process("train.py", *args, "seed=abc,def")
    assert wrong.returncode == 2 and "seed" in wrong.stderr
    assert (snapshot(tmp_path / "s"), sorted((tmp_path / "s").rglob("*"))) == before


@pytest.mark.slow
def test_a_finished_job_is_reused_only_for_the_same_experiment(tmp_path, data_dir, run_in_process):
    import shutil

    from fmnist.data.csv_io import write_csv
    from tests.conftest import make_images

    args = ["-m", *FAST, "model=simple", "trainer.precision=32-true", "optim.lr=0.01", f"hydra.sweep.dir={tmp_path}/s"]
    first = run_in_process("train.py", *args, f"data.dir={data_dir}")
    assert first.returncode == 0, first.stderr[-3000:]
    record = next((tmp_path / "s").glob("*/metrics.json")).read_text()

    moved = tmp_path / "moved"  # the same files elsewhere: the same experiment, skipped
    shutil.copytree(data_dir, moved, ignore=shutil.ignore_patterns(".*"))
    again = run_in_process("train.py", *args, f"data.dir={moved}")
    assert again.returncode == 0 and "skipped" in again.stdout + again.stderr

    other = tmp_path / "other"  # other data under the same job name: refused before training, nothing changed
    other.mkdir()
    write_csv(other / "fashion-mnist_train.csv", *make_images(600, 5))
    write_csv(other / "fashion-mnist_test.csv", *make_images(200, 6))
    before = snapshot(tmp_path / "s")
    refused = run_in_process("train.py", *args, f"data.dir={other}")
    assert refused.returncode == 2 and "ran on other data" in refused.stderr and "name=" in refused.stderr
    assert next((tmp_path / "s").glob("*/metrics.json")).read_text() == record
    assert snapshot(tmp_path / "s") == before  # multirun.yaml and the job's train.log included
    # So is one the sweep would resume (stopped, its last.ckpt there): refused at its turn, after others trained.
    stopped = next((tmp_path / "s").glob("*/metrics.json"))
    stopped.write_text(json.dumps({**json.loads(record), "status": "interrupted"}))
    before = snapshot(tmp_path / "s")
    refused = run_in_process("train.py", *args, f"data.dir={other}")
    assert refused.returncode == 2 and "its interrupted job " in refused.stderr and "ran on other data" in refused.stderr
    assert snapshot(tmp_path / "s") == before
    stopped.write_text(record)

    # Another preset's sweep into this directory: its job seed=7 joins the finished job's setting (a job is named
    # without its experiment and preset), and the summary would average the two. Refused before training.
    before = snapshot(tmp_path / "s")
    other_preset = [a.replace("preset=smoke", "preset=cpu") for a in args]
    mixed = run_in_process("train.py", *other_preset, "seed=7", f"data.dir={data_dir}")
    assert mixed.returncode == 2 and "computes something other than this sweep's jobs of the same setting" \
        in mixed.stderr and "No job of the sweep was started" in mixed.stderr, mixed.stderr[-2000:]
    assert snapshot(tmp_path / "s") == before
    again = run_in_process("train.py", *args, "seed=7", f"data.dir={data_dir}")  # the same experiment: one setting
    assert again.returncode == 0, again.stderr[-2000:]
    shutil.rmtree(next((tmp_path / "s").glob("*seed=7*")))

    # The experiment's length changed since (an edited experiment file): a finished shorter job is not its result.
    saved = next((tmp_path / "s").glob("*/config.yaml"))
    saved.write_text(saved.read_text().replace("max_epochs: 1\n", "max_epochs: 2\n"))
    longer = run_in_process("train.py", *args, f"data.dir={data_dir}")
    assert longer.returncode == 2 and "computes something other than this sweep's jobs of the same setting" in \
        longer.stderr and "differ in trainer.max_epochs (trainer.max_epochs: 2 there, 1 here)" in longer.stderr, \
        longer.stderr[-2000:]

    # A hand-edited record: whether the job finished, and with what, is unknown; refused, nothing changed.
    saved.write_text(saved.read_text().replace("max_epochs: 2\n", "max_epochs: 1\n"))
    edited = json.loads(record)
    edited["metrics"]["val/acc_best"] = None
    next((tmp_path / "s").glob("*/metrics.json")).write_text(json.dumps(edited))
    before = snapshot(tmp_path / "s")
    unknown = run_in_process("train.py", *args, f"data.dir={data_dir}")
    assert unknown.returncode == 2 and "a completed run without metrics.val/acc_best" in unknown.stderr \
        and "No job of the sweep was started" in unknown.stderr and "Traceback" not in unknown.stderr, \
        unknown.stderr[-2000:]
    assert snapshot(tmp_path / "s") == before

    # A job directory copied inside the sweep: its summary would count the seed twice; said, not just warned of.
    job = next((tmp_path / "s").glob("*/metrics.json")).parent
    (job / "metrics.json").write_text(record)
    shutil.copytree(job, tmp_path / "s" / "backup")
    copied = run_in_process("train.py", *args, f"data.dir={data_dir}")
    assert copied.returncode == 2 and "jobs backup, " in copied.stderr and "Move the copies out" in copied.stderr


@pytest.mark.slow
def test_a_sweep_of_two_keys_runs_again_and_a_changed_recipe_is_found_in_any_of_its_settings(tmp_path, data_dir,
                                                                                             run_in_process):
    args = ["-m", *FAST, "model=simple", "trainer.precision=32-true", "optim.lr=0.1,0.01", f"data.dir={data_dir}",
            f"hydra.sweep.dir={tmp_path}/s"]
    first = run_in_process("train.py", *args, "seed=0,1")
    assert first.returncode == 0, first.stderr[-3000:]
    again = run_in_process("train.py", *args, "seed=0,1")  # the same sweep: its finished jobs skipped
    assert again.returncode == 0 and (again.stdout + again.stderr).count("skipped") == 4, again.stderr[-3000:]
    # (optim.lr=0.01, seed=0) is a combination that no k-th job composes (those are (0.1, 0) and (0.01, 1))
    saved = next((tmp_path / "s").glob("*optim.lr=0.01*seed=0*/config.yaml"))
    saved.write_text(re.sub(r"(?m)^  hidden: .*$", "  hidden: 7", saved.read_text()))
    before = snapshot(tmp_path / "s")
    more = run_in_process("train.py", *args, "seed=2")
    assert more.returncode == 2 and f"its completed job {saved.parent.name} computes something other than this " \
        "sweep's jobs of the same setting" in more.stderr and "model.hidden: 7 there, " in more.stderr, more.stderr[-2000:]
    assert snapshot(tmp_path / "s") == before


def test_a_fault_in_the_sweeps_start_checks_stops_it_instead_of_running_it_unchecked(tmp_path, data_dir,
                                                                                     run_in_process, monkeypatch):
    # Hydra turns an exception in a callback into a warning, and went on with the sweep.
    from fmnist.sweeps import start

    def broken(sweep_dir):
        raise RuntimeError("a fault in a check")

    monkeypatch.setattr(start, "check_sweep_dir", broken)
    result = run_in_process("train.py", "-m", *FAST, "model=simple", "optim.lr=0.01,0.02", f"data.dir={data_dir}",
                            f"hydra.sweep.dir={tmp_path}/s")
    assert result.returncode == 1 and "RuntimeError: a fault in a check" in result.stderr
    assert not (tmp_path / "s").exists()


@pytest.mark.slow
def test_a_sweep_holding_a_damaged_record_is_refused_before_any_job_trains(tmp_path, data_dir, run_in_process):
    # Found by the damaged job when its turn came, it stopped the sweep after the jobs before it had trained.
    args = ["-m", *FAST, "model=simple", "optim.lr=0.01,0.02", f"data.dir={data_dir}", f"hydra.sweep.dir={tmp_path}/s"]
    assert run_in_process("train.py", *args).returncode == 0
    first, second = sorted(p.parent for p in (tmp_path / "s").glob("*/metrics.json"))
    shutil.rmtree(first)  # to be trained again by the rerun
    record = json.loads((second / "metrics.json").read_text())
    (second / "metrics.json").write_text(json.dumps({**record, "seed": "x"}))
    before = snapshot(tmp_path / "s")
    refused = run_in_process("train.py", *args)
    assert refused.returncode == 2 and "seed of the wrong type" in refused.stderr
    assert "No job of the sweep was started" in refused.stderr and snapshot(tmp_path / "s") == before
    (second / "metrics.json").unlink()  # gone beside its last.ckpt: that job would refuse to resume without it
    before = snapshot(tmp_path / "s")
    refused = run_in_process("train.py", *args)
    assert refused.returncode == 2 and f"{second}/metrics.json is gone, beside the job's checkpoints/last.ckpt" \
        in refused.stderr
    assert "No job of the sweep was started" in refused.stderr and snapshot(tmp_path / "s") == before


@pytest.mark.slow
def test_ad_hoc_sweeps_get_their_own_directories(tmp_path, data_dir, run_in_process):
    started = 0
    for _ in range(2):
        while int(time.time()) == started:  # an ad hoc sweep's directory is named by its start, to the second
            time.sleep(0.05)
        started = int(time.time())
        result = run_in_process("train.py", "-m", *FAST, f"data.dir={data_dir}", "model=simple",
                                "trainer.limit_train_batches=1", "optim.lr=0.01", cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
    sweeps = sorted((tmp_path / "outputs" / "train").iterdir())
    assert len(sweeps) == 2 and all(len(pd.read_csv(s / "summary.csv")) == 1 for s in sweeps)


def test_leaderboard_rows_come_from_the_sweeps_records(tmp_path):
    from fmnist.results.leaderboard import REFERENCES, markdown

    sweep = tmp_path / "myrecipe"
    for seed, acc in enumerate([0.94, 0.96]):
        job = sweep / f"seed={seed}"
        _fake_job(sweep, job.name, "completed", seed, acc, [f"seed={seed}"])
        record = json.loads((job / "metrics.json").read_text())
        record["hardware"] = {"gpu": "Test GPU"}
        record["precision"] = {"requested": "auto", "resolved": "bf16-mixed"}
        (job / "metrics.json").write_text(json.dumps(record))
        (job / "epochs.csv").write_text("epoch,val/acc,train_seconds,train_images,train_flops\n1,0.9,10,55000,5.5e15\n")
        np.savetxt(job / "confusion_matrix.csv", np.eye(10, dtype=int) * 1000, fmt="%d", delimiter=",")  # 10,000 tested
    (sweep / "seed=2").mkdir()
    (sweep / "seed=2" / "metrics.json").write_text("{")  # a corrupt record: listed as left out, never dropped silently
    small = tmp_path / "small"  # a subset and a 200-image test set: not comparable with published results
    _fake_job(small, "seed=0", "completed", 0, 0.99, ["seed=0"])
    (small / "seed=0" / "config.yaml").write_text("data:\n  train_subset: 1000\ntrainer:\n  limit_train_batches: null\n")
    np.savetxt(small / "seed=0" / "confusion_matrix.csv", np.eye(10, dtype=int) * 20, fmt="%d", delimiter=",")
    table = markdown([sweep, small])
    main_table = table.split("\n\n")[0].splitlines()
    assert len(main_table) == 2 + len(REFERENCES) + 1
    assert "| **myrecipe** | 94.00 ± 12.71 | 2 | 55,000 | 5.5 | 10 | Test GPU, bf16-mixed |" in main_table
    assert "Not on the standard 60k/10k split" in table and "| small | 98.00 | 1 | 1,000-image training subset, 200 test images |" in table
    assert "myrecipe: 1 job(s) left out, not completed or not tested: `seed=2` (unreadable)." in table
    # Two sweeps of one name (a recipe's records of two dates) are told apart by the folders above them.
    again = shutil.copytree(sweep, tmp_path / "later" / "myrecipe")
    table = markdown([sweep, again])
    assert table.count(f"| **{tmp_path.name}/myrecipe** |") == 1 and table.count("| **later/myrecipe** |") == 1
    assert "later/myrecipe: 1 job(s) left out" in table
    shutil.rmtree(tmp_path / "later")
    # The project's rows by their training FLOPs, cheapest first, never by test accuracy: a cheaper, less
    # accurate recipe comes before this one, and one whose compute is unknown comes last.
    cheap, unknown = tmp_path / "cheap", tmp_path / "unknown"
    for recipe, acc, flops in ((cheap, 0.90, "1e15"), (unknown, 0.97, None)):
        _fake_job(recipe, "seed=0", "completed", 0, acc, ["seed=0"])
        if flops:
            (recipe / "seed=0" / "epochs.csv").write_text(f"epoch,val/acc,train_seconds,train_images,train_flops\n"
                                                         f"1,{acc},10,55000,{flops}\n")
        np.savetxt(recipe / "seed=0" / "confusion_matrix.csv", np.eye(10, dtype=int) * 1000, fmt="%d", delimiter=",")
    rows = [line.split(" |")[0] for line in markdown([unknown, sweep, cheap]).splitlines()[2 + len(REFERENCES):][:3]]
    assert rows == ["| **cheap**", "| **myrecipe**", "| **unknown**"], rows
    # Seeds that recorded different FLOPs, or not all of them: a range, and the seeds without a number said.
    _fake_job(cheap, "seed=1", "completed", 1, 0.9, ["seed=1"])
    np.savetxt(cheap / "seed=1" / "confusion_matrix.csv", np.eye(10, dtype=int) * 1000, fmt="%d", delimiter=",")
    assert "| **cheap** | 89.00 ± 0.00 | 2 | 55,000 | 1 (some seeds ?) |" in markdown([cheap])
    (cheap / "seed=1" / "epochs.csv").write_text("epoch,val/acc,train_seconds,train_images,train_flops\n1,0.9,10,55000,3e15\n")
    assert "| **cheap** | 89.00 ± 0.00 | 2 | 55,000 | 1-3 |" in markdown([cheap])
    for seed in (0, 1):  # rows from before the epochs were timed: their time unknown, as their FLOPs would be
        (cheap / f"seed={seed}" / "epochs.csv").write_text("epoch,val/acc,train_images\n1,0.9,55000\n")
    assert "| **cheap** | 89.00 ± 0.00 | 2 | 55,000 | ? | ? |" in markdown([cheap])
    untested = tmp_path / "untested"  # test=false: validation only, so no row with a NaN accuracy
    _fake_job(untested, "seed=0", "completed", 0, 0.99, ["seed=0"])
    record = json.loads((untested / "seed=0" / "metrics.json").read_text())
    del record["metrics"]["test/acc"], record["metrics"]["test/loss"]
    (untested / "seed=0" / "metrics.json").write_text(json.dumps(record))
    table = markdown([untested, sweep])
    assert "nan" not in table
    assert "untested: 1 job(s) left out, not completed or not tested: `seed=0` (not tested)." in table
    # Seeds that ran on two machines, or one of them on a subset: each machine named, and the row not counted
    # as on the standard split.
    record = json.loads((sweep / "seed=1" / "metrics.json").read_text())
    record["hardware"] = {"gpu": "Other GPU"}
    (sweep / "seed=1" / "metrics.json").write_text(json.dumps(record))
    OmegaConf.save(compose_cfg("data.train_subset=1000"), sweep / "seed=1" / "config.yaml")  # seed=0 has none
    table = markdown([sweep])
    assert "| Test GPU, bf16-mixed / Other GPU, bf16-mixed |" in table
    assert "| myrecipe | 94.00 ± 12.71 | 2 | standard split; 1,000-image training subset |" in table


def test_report_draws_time_to_accuracy_when_runs_recorded_flops(tmp_path):
    sweep = tmp_path / "sweep"
    for seed in (0, 1):
        _fake_job(sweep, f"seed={seed}", "completed", seed, 0.9, [f"seed={seed}"])
        path = sweep / f"seed={seed}" / "epochs.csv"
        frame = pd.read_csv(path).assign(train_images=[100, 200], train_flops=[1e12, 2e12])
        frame.to_csv(path, index=False)
    assert "time_to_accuracy.png" in {p.name for p in write_report(sweep)}
    assert (sweep / "figures" / "time_to_accuracy.png").stat().st_size > 10_000


@pytest.mark.parametrize("verb", ["summary", "report", "leaderboard", "tricks"])
def test_results_command_refuses_what_is_not_a_sweep_and_writes_nothing(tmp_path, verb, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text('{"status": "completed"}')
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "notes.txt").write_text("mine")
    for directory, words in ((run, "a run directory, not a sweep"), (empty, "no job directories"),
                             (tmp_path / "missing", "no such directory"), (tmp_path / "notes.txt", "a file, not a")):
        if verb == "tricks" and directory == run:  # tricks takes run directories (one setting's jobs of a sweep)
            continue
        before = sorted(p.name for p in tmp_path.rglob("*"))
        assert results_main([verb, str(directory)]) == 2
        assert words in capsys.readouterr().err
        assert sorted(p.name for p in tmp_path.rglob("*")) == before
    # A folder of sweeps (outputs/train, where unnamed sweeps go) is told to pass one of them.
    (empty / "2026-12-05_10-00-00").mkdir()
    (empty / "2026-12-05_10-00-00" / "multirun.yaml").write_text("hydra: {}\n")
    assert results_main([verb, str(empty)]) == 2
    assert f"it holds sweep directories: pass one of them ({empty / '2026-12-05_10-00-00'})" in capsys.readouterr().err
    if verb == "tricks":
        return
    # The hint names the folder above only when it is a sweep: a single run's folder (outputs/runs) is none.
    assert results_main([verb, str(run)]) == 2
    assert "(such as outputs/train/<time>/ from `python train.py -m ...`" in capsys.readouterr().err
    for sign in ("multirun.yaml", "summary.md"):  # a sweep Hydra wrote, or one committed with its summary alone
        (tmp_path / sign).write_text("hydra: {}\n")
        assert results_main([verb, str(run)]) == 2
        assert f"(here {tmp_path})" in capsys.readouterr().err
        (tmp_path / sign).unlink()


def test_the_old_script_names_still_work_and_say_the_new_command(tmp_path, run_in_process):
    result = run_in_process("scripts/aggregate.py", str(tmp_path))
    assert result.returncode == 2 and "python -m fmnist.results summary" in result.stderr


def test_an_unknown_option_is_named_as_such_not_taken_for_a_missing_directory(run_in_process, capfd):
    from fmnist.results.__main__ import parse_args

    result = run_in_process("scripts/aggregate.py", "--bogus")
    assert result.returncode == 2 and "error: unrecognized arguments: --bogus" in result.stderr, result.stderr
    assert "required" not in result.stderr
    for argv in (["--bogus"], ["summary", "--bogus"], ["images", "a", "--bogus"], ["changes", "--bogus", "a"],
                 ["tricks", "--bogus=1"]):
        with pytest.raises(SystemExit) as exited:
            parse_args(argv)
        err = capfd.readouterr().err
        assert exited.value.code == 2 and "unrecognized arguments: --bogus" in err and "required" not in err, argv
    result = run_in_process("scripts/aggregate.py")  # a directory missing, and nothing else: said as before
    assert result.returncode == 2 and "error: the following arguments are required: DIR" in result.stderr


def test_figures_stay_readable_and_their_names_keep_whole_values():
    from fmnist.results.report import PANELS_PER_ROW, _slug, curves_figure, time_to_accuracy_figure, timed_runs

    long = ",".join(f"optim.key{i}=0.000123456" for i in range(12))
    names = [_slug(long), _slug(long.replace("key11", "key12"))]
    assert all(len(n) <= 80 for n in names) and names[0] != names[1]  # cut, and still told apart
    full, kept = _slug(long, limit=10_000), names[0].rsplit("-", 1)[0]
    assert full.startswith(kept) and full[len(kept)] == "_"  # cut between two values, not inside one
    frame = pd.DataFrame({"epoch": [1, 2], "train/loss": [2.0, 1.5], "val/loss": [2.1, 1.6], "val/acc": [0.3, 0.4],
                          "train_seconds": [1.0, 2.0], "train_flops": [1e12, 2e12]})
    fig = curves_figure([(f"s{i}", [frame]) for i in range(5)], "five settings")
    assert fig.get_size_inches()[0] <= 5 * PANELS_PER_ROW  # a second row, not a 25-inch-wide strip
    fig = time_to_accuracy_figure(timed_runs({"(defaults)": [frame.copy(), frame.copy()]}), "below 80%")
    low, high = fig.axes[0].get_ylim()
    assert low < 30 < 40 < high  # every point shown, the axis the right way up
    assert {t.get_text() for t in fig.axes[0].get_legend().get_texts()} == {"seed 0", "seed 1"}


def test_a_sweep_ends_incomplete_for_its_failures_not_for_a_job_another_process_is_running(tmp_path):
    """Parallel commands into one sweep directory (make gpu-check's report): the first to end sees a sibling's
    job `running`; that is not its failure. A failed job is."""
    from omegaconf import OmegaConf

    from fmnist.results.sweep import SummarizeSweep

    sweep = tmp_path / "sweep"
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}})
    _fake_job(sweep, "seed=0", "completed", 0, 0.9, ["seed=0"])
    _fake_job(sweep, "seed=1", "running", 1, None, ["seed=1"])
    SummarizeSweep().on_multirun_end(config)  # no SystemExit
    _fake_job(sweep, "seed=2", "failed", 2, None, ["seed=2"])
    with pytest.raises(SystemExit) as stop:
        SummarizeSweep().on_multirun_end(config)
    assert stop.value.code == INCOMPLETE_SWEEP_EXIT_CODE


def test_a_job_whose_process_is_gone_without_a_record_of_its_end_is_listed_interrupted(tmp_path):
    """SIGKILL, the kernel's out-of-memory kill, or a DDP rank that took rank 0 down leave a record `running`: on this
    machine, with its process gone, the sweep's table says `interrupted`, which is what a rerun makes of it, and the
    sweep ends incomplete. A live process's job, another machine's, or another container's on this machine (same
    name, its own pid numbers) stays `running`; a record from before the pid namespace was kept is judged without it."""
    from omegaconf import OmegaConf

    from fmnist.results.sweep import SummarizeSweep
    from fmnist.provenance import pid_namespace, this_process

    ended = subprocess.Popen(["true"])
    ended.wait()
    here = this_process()
    assert here["pid_namespace"] == pid_namespace() is not None
    sweep = tmp_path / "sweep"
    for seed, process in ((0, {**here, "pid": ended.pid}), (1, here), (2, {**here, "host": "another-machine",
                          "pid": ended.pid}), (3, {**here, "pid": ended.pid, "pid_namespace": here["pid_namespace"] + 1}),
                          (4, {"host": here["host"], "pid": ended.pid})):
        _fake_job(sweep, f"seed={seed}", "running", seed, None, [f"seed={seed}"])
        path = sweep / f"seed={seed}" / "metrics.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "error": None, **process}))
    table = summarize(sweep).set_index("job")
    assert table.status.to_dict() == {"seed=0": "interrupted", "seed=1": "running", "seed=2": "running",
                                      "seed=3": "running", "seed=4": "interrupted"}
    assert f"its process ({ended.pid}) ended without recording how" in table.error["seed=0"]
    assert json.loads((sweep / "seed=0" / "metrics.json").read_text())["status"] == "running"  # read, not rewritten
    with pytest.raises(SystemExit) as stop:
        SummarizeSweep().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}}))
    assert stop.value.code == INCOMPLETE_SWEEP_EXIT_CODE


def test_a_process_of_an_earlier_boot_of_this_machine_is_gone_whatever_now_holds_its_pid(monkeypatch):
    """After a restart the pids start again: the one a running record names may now be another, live process. The
    boot id, the machine id and when the process was seen tell an earlier boot of this machine (gone) from another
    machine of the same name, even a copy of the same image sharing its machine id (it may still run)."""
    import fmnist.provenance as provenance

    monkeypatch.setattr(provenance, "boot_id", lambda: "boot-now")
    monkeypatch.setattr(provenance, "machine_id", lambda: "this-machine")
    monkeypatch.setattr(provenance, "boot_time", lambda: datetime.fromisoformat("2026-12-04T12:00:00+00:00").timestamp())
    ended = subprocess.Popen(["true"])
    ended.wait()
    here = provenance.this_process()  # its pid is alive
    assert (here["boot_id"], here["machine_id"]) == ("boot-now", "this-machine")
    assert not provenance.process_gone(here)
    assert provenance.process_gone({**here, "pid": ended.pid})
    before = {**here, "boot_id": "boot-before", "seen_at": "2026-12-04T11:00:00+00:00"}
    assert provenance.process_gone(before)  # this machine restarted since; the pid now another process's
    assert provenance.process_gone({**before, "pid_namespace": -1})  # a container of it too
    for other in ({**before, "machine_id": "another-machine"},  # another machine of the same name
                  {**before, "seen_at": "2026-12-04T12:30:00+00:00"},  # a copy of this image, running since this boot
                  {**before, "seen_at": None}, {**before, "seen_at": "yesterday"},
                  {**before, "machine_id": None, "pid": ended.pid},  # a machine without an id: cannot tell
                  {**before, "host": "another-machine", "pid": ended.pid}):
        assert not provenance.process_gone(other), other
    # A record of this boot (its id however written), or one without a boot id (written before it was kept) or with
    # a value that is not one, is judged by its pid.
    for boot in ("BOOT-NOW", "boot-now\n", None, 1, True, ["x"]):
        assert not provenance.process_gone({**before, "boot_id": boot}), boot
        assert provenance.process_gone({**before, "boot_id": boot, "pid": ended.pid}), boot
    assert provenance.process_gone({"host": here["host"], "pid": ended.pid})


def test_a_machine_id_file_that_is_a_placeholder_or_not_text_names_no_machine_and_raises_nothing(tmp_path, monkeypatch):
    import fmnist.provenance as provenance

    odd = tmp_path / "machine-id"
    odd.write_bytes(b"\xff\xfe\x00garbage\n")
    assert provenance._read_first_line(str(odd))  # read, not a UnicodeDecodeError at the start of every run
    assert provenance._read_first_line(str(tmp_path / "missing")) is None
    monkeypatch.setattr(provenance, "_read_first_line", lambda path: "uninitialized")  # systemd's placeholder in an image
    assert provenance.machine_id() is None
    monkeypatch.setattr(provenance, "_read_first_line", lambda path: "0123456789abcdef0123456789abcdef")
    assert provenance.machine_id() not in (None, "0123456789abcdef0123456789abcdef")  # hashed, never the id itself


def test_a_trial_whose_process_is_gone_is_listed_as_one_the_study_replaces(tmp_path):
    """tune.py never resumes a trial: run again, it records the trial interrupted and trains another."""
    import platform

    ended = subprocess.Popen(["true"])
    ended.wait()
    _fake_job(tmp_path, "trial-0000", "running", 0, None, ["optim.lr=0.01"])
    path = tmp_path / "trial-0000" / "metrics.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "error": None, "host": platform.node(),
                                "pid": ended.pid}))
    error = summarize(tmp_path).set_index("job").error["trial-0000"]
    assert error.endswith("tune.py, run again, replaces the trial") and "resumes" not in error


def test_a_sweep_whose_summary_cannot_be_written_says_so_and_exits_2(tmpfs, capsys):
    """Hydra turns an error in a callback into a warning: a full or read-only disk would let the sweep exit 0."""
    from omegaconf import OmegaConf

    from fmnist.results.sweep import SummarizeSweep

    sweep = tmpfs("size=1m") / "sweep"
    _fake_job(sweep, "seed=0", "completed", 0, 0.9, ["seed=0"])
    before = snapshot(sweep)
    subprocess.run(["mount", "-o", "remount,ro", str(sweep.parent)], check=True)
    with pytest.raises(SystemExit) as stop:
        SummarizeSweep().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}}))
    assert stop.value.code == 2
    error = capsys.readouterr().err
    assert f"the sweep's summary was not written: cannot write {sweep / 'summary'}" in error
    assert "read-only" in error and snapshot(sweep) == before
