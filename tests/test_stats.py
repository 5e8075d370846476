"""Intervals, paired comparisons and verdicts, on synthetic results whose answers are known."""

import io
import json
import math
import re
import shutil
import zipfile

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf
from scipy import stats

from fmnist.errors import ConfigError
from fmnist.results.__main__ import main as results_main
from fmnist.results.compare import (NO_SPREAD_GIVEN, ONE_SEED, WITHIN_NOISE, change_verdict, changes, changes_markdown,
                                    image_comparison, image_comparison_markdown, p_text, tricks_markdown)
from fmnist.results.report import claims_table
from fmnist.results.stats import (ALPHA, holm, mcnemar, mean_interval, paired, seed_and_image_interval,
                                  seeds_for_power, seeds_text, summary_comparison)
from tests.conftest import compose_cfg, snapshot

SEEDS = range(5)


def test_the_mean_interval_is_student_t_and_one_value_has_none():
    interval = mean_interval([0.90, 0.91, 0.92])
    half = stats.t.ppf(0.975, 2) * 0.01 / math.sqrt(3)  # 4.303 x s / sqrt(n)
    assert interval.mean == pytest.approx(0.91) and interval.half_width == pytest.approx(half)
    assert interval.text() == f"91.00 ± {100 * half:.2f}"
    assert mean_interval([0.9]).text() == "90.00" and mean_interval([0.9]).n == 1


def test_a_real_difference_is_found_and_no_difference_is_not_claimed():
    rng = np.random.default_rng(0)
    a = pd.Series(0.93 + rng.normal(0, 0.002, 5), index=SEEDS)
    better = paired(a + 0.01, a + rng.normal(0, 0.002, 5))
    assert better.verdict(+1) == "holds" and better.difference.low > 0
    assert better.verdict(-1) == "contradicted"
    same = paired(a + rng.normal(0, 0.002, 5), a + rng.normal(0, 0.002, 5))
    assert same.verdict(+1) == "no detectable difference" and same.difference.low < 0 < same.difference.high


def test_the_same_difference_on_every_seed_is_judged_by_a_sign_test_not_called_certain():
    # Accuracies count whole images (1/5000 of validation), so two seeds can move by exactly the same amount.
    base = pd.Series([0.9500, 0.9512, 0.9488, 0.9520, 0.9496, 0.9504], index=range(6))
    two = paired(base[:2] + 0.0004, base[:2])
    assert two.difference.half_width < 1e-9 and two.p_value == 0.5  # zero but for float rounding
    assert two.verdict(+1) == "no detectable difference" and change_verdict(two.difference, two.p_value) == WITHIN_NOISE
    six = paired(base + 0.0004, base)
    assert six.p_value == 2 * 0.5 ** 6 < 0.05
    assert six.verdict(+1) == "holds" and change_verdict(six.difference, six.p_value) == "better"
    three = paired(base[:3] - 0.0004, base[:3])
    assert change_verdict(three.difference, three.p_value) == WITHIN_NOISE
    worse = paired(base - 0.0004, base)
    assert change_verdict(worse.difference, worse.p_value) == "worse"
    # One image of spread (1/5000) is a spread: the t-test judges it, the same way in both places.
    spread = paired(base + 0.0004 + np.array([0.0002, 0, 0, 0, 0, 0]), base)
    assert 0 < spread.p_value < 0.05 and spread.verdict(+1) == "holds"
    assert change_verdict(spread.difference, spread.p_value) == "better"


def test_pairing_by_seed_removes_what_a_seed_does_to_both():
    # Seeds move both settings by up to 2 points; the setting itself adds a steady 0.3 points.
    seed_effect = pd.Series([0.0, 0.02, -0.015, 0.01, -0.02], index=SEEDS)
    noise = pd.Series([0.0005, -0.0005, 0.0003, -0.0002, 0.0001], index=SEEDS)
    a, b = 0.930 + seed_effect + 0.003 + noise, 0.930 + seed_effect
    assert paired(a, b).verdict(+1) == "holds"
    # Unpaired, the seeds' spread hides it: Welch's test finds nothing.
    assert stats.ttest_ind(a, b, equal_var=False).pvalue > 0.05
    # Seeds one setting lacks are left out of the pairing.
    assert paired(a, b.drop(4)).difference.n == 4


def test_seeds_needed_grow_as_the_effect_shrinks():
    assert seeds_for_power(3.0) < seeds_for_power(1.0) < seeds_for_power(0.5)
    assert seeds_for_power(1.0) == 10  # a paired t-test at 5% needs 10 pairs for 80% power at d = 1
    assert seeds_for_power(0.0) is None


def test_holm_adjusts_step_down_and_keeps_order():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, math.nan]) [0] == 0.5 and math.isnan(holm([0.5, math.nan])[1])


def _curves(loss_rises_at: int | None, jagged: float) -> pd.DataFrame:
    epochs = np.arange(1, 11)
    loss = (epochs - (loss_rises_at or 10)) ** 2 / 100 + 0.3
    acc = 0.9 + 0.001 * epochs + jagged * (-1) ** epochs
    return pd.DataFrame({"epoch": epochs, "val/loss": loss, "val/acc": acc})


def test_the_reports_verdicts_come_from_paired_tests_with_their_numbers():
    rng = np.random.default_rng(1)
    seed_effect = rng.normal(0, 0.005, 5)
    accuracy = {"best": 0.930 + seed_effect, "no_dropout": 0.920 + seed_effect + rng.normal(0, 0.0005, 5),
                "batch_32": 0.930 + seed_effect + rng.normal(0, 0.002, 5),
                "simple": 0.940 + seed_effect + rng.normal(0, 0.0005, 5)}
    rows = [{"setting": f"variant={v}", "seed": s, "status": "completed", "test_acc": acc[s]}
            for v, acc in accuracy.items() for s in SEEDS]
    curves = {"best": [_curves(None, 0.001)] * 5, "no_dropout": [_curves(5, 0.001)] * 5,
              "batch_32": [_curves(None, 0.01)] * 5, "simple": [_curves(None, 0.001)] * 5}
    text = claims_table(pd.DataFrame(rows), curves)
    line = {row.split("|")[1].strip(): row for row in text.splitlines() if row.startswith("| ")}
    assert "more accurate: holds" in line["dropout"] and "p=" in line["dropout"] and "n=5" in line["dropout"]
    assert "more accurate: no detectable difference (about" in line["batch size"]
    assert "more accurate: contradicted" in line["architecture"]  # the simple CNN made better here
    assert "not measured" in line["learning rate"]
    assert "Holm" in text and "95% confidence interval" in text


def test_mcnemar_counts_only_the_images_one_model_gets_right():
    labels = np.zeros(1000, dtype=np.uint8)
    a, b = labels.copy(), labels.copy()
    a[:40] = 1  # a errs on 40 images
    b[20:100] = 1  # b errs on 80, sharing 20 of a's errors
    result = mcnemar(a, b, labels)
    assert (result["a_only"], result["b_only"]) == (60, 20) and result["difference"] == pytest.approx(0.04)
    assert result["p_value"] == pytest.approx(stats.binomtest(60, 80, 0.5).pvalue) and result["p_value"] < 0.001
    assert mcnemar(a, a, labels)["p_value"] == 1.0


def _sweep(root, name: str, settings: dict[str, list[float]], data: str = "d"):
    """A finished sweep on disk: each setting's best validation accuracy per seed (test = validation - 0.005),
    trained on the data whose digests are `data` repeated."""
    for setting, accuracies in settings.items():
        for seed, acc in enumerate(accuracies):
            job = root / name / ",".join([*([setting] if setting else []), f"seed={seed}"])
            job.mkdir(parents=True)
            overrides = [*([setting] if setting else []), f"seed={seed}"]
            (job / "metrics.json").write_text(json.dumps({
                "status": "completed", "seed": seed, "overrides": overrides,
                "data_digest": {"train": data * 40, "test": data * 40},
                "metrics": {"val/acc_best": acc, "test/acc": acc - 0.005}}))
            (job / "epochs.csv").write_text("epoch,train_seconds\n0,10\n")
    return root / name


def _config(job, val_size) -> None:
    """A job's config.yaml as a run writes it (conf/'s defaults), its `data.val_size` written as `repr(val_size)`."""
    text, n = re.subn(r"(?m)^(  val_size: ).*$", rf"\g<1>{val_size!r}", OmegaConf.to_yaml(compose_cfg()))
    assert n == 1
    (job / "config.yaml").write_text(text)


def test_changes_pair_by_seed_and_keep_only_what_validation_shows(tmp_path):
    base = 0.94 + np.array([0.0, 0.006, 0.004, -0.003, 0.002])  # what each seed does to every setting
    baseline = _sweep(tmp_path, "base", {"": list(base)})
    tried = _sweep(tmp_path, "tried", {
        "optim.lr=0.01": list(base + 0.002 + np.array([0.0003, -0.0002, 0.0001, 0.0, -0.0002])),  # small, steady
        "optim.lr=0.1": list(base - 0.010 + np.array([0.002, -0.002, 0.001, -0.001, 0.0])),
        "model.dropout=0.2": list(base + np.array([0.004, -0.004, 0.003, -0.002, -0.001]))})  # noise only
    table = changes(baseline, [tried]).set_index("setting")
    # Unpaired, +0.2 points is a fraction of the seed-to-seed spread; paired by seed, it is clear.
    assert mean_interval(table.loc["optim.lr=0.01", "val"]).low < mean_interval(base).high
    assert table.loc["optim.lr=0.01", "verdict"] == "better"
    assert table.loc["optim.lr=0.01", "val_change"].mean == pytest.approx(0.002)
    assert table.loc["optim.lr=0.1", "verdict"] == "worse"
    assert table.loc["model.dropout=0.2", "verdict"] == WITHIN_NOISE
    assert table.loc["optim.lr=0.01", "p_holm"] >= table.loc["optim.lr=0.01", "p"]
    text = changes_markdown(table.reset_index())
    assert "| `optim.lr=0.01` | " in text and "[+0." in text and "never used to choose" in text


def test_jobs_on_different_data_are_neither_pooled_nor_paired(tmp_path, capsys):
    mixed = _sweep(tmp_path, "mixed", {"": [0.9, 0.91, 0.92]})
    other_data = mixed / "seed=2" / "metrics.json"  # a job added to the sweep with another data.dir
    other_data.write_text(other_data.read_text().replace("d" * 40, "e" * 40))
    before = snapshot(mixed)
    for verb in ("summary", "report", "leaderboard"):
        assert results_main([verb, str(mixed)]) == 2, verb
        err = capsys.readouterr().err
        assert "jobs seed=0 and seed=2 are the same setting run on different data (the training/test CSVs' SHA-1 " \
               f"in their metrics.json: {'d' * 12}/{'d' * 12} and {'e' * 12}/{'e' * 12}" in err, (verb, err)
    assert snapshot(mixed) == before
    base = _sweep(tmp_path, "base", {"": [0.9, 0.91]})
    elsewhere = _sweep(tmp_path, "elsewhere", {"optim.lr=0.1": [0.9, 0.92]}, data="e")
    assert results_main(["changes", str(base), str(elsewhere)]) == 2
    assert "trained on different training CSVs (SHA-1 dddddddddddd and eeeeeeeeeeee" in capsys.readouterr().err
    # The seed draws the validation split, of data.val_size images: another size validates on other images.
    resized = _sweep(tmp_path, "resized", {"data.val_size=10000": [0.9, 0.92]})
    for sweep, size in ((base, 5000), (resized, 10000)):
        for job in sweep.iterdir():
            _config(job, size)
    assert results_main(["changes", str(base), str(resized)]) == 2
    assert ("setting `data.val_size=10000` and the baseline " in (err := capsys.readouterr().err)
            and "data.val_size 5000 and 10000 in their jobs' config.yaml" in err), err
    # Emptied, or a link to nothing, in every job: damaged files, not runs older than config.yaml (not judged).
    for damage in (lambda config: config.write_text(""), lambda config: config.symlink_to(tmp_path / "gone.yaml")):
        damaged = shutil.copytree(resized, tmp_path / "damaged")
        for job in damaged.iterdir():
            (job / "config.yaml").unlink()
            damage(job / "config.yaml")
        assert results_main(["changes", str(base), str(damaged)]) == 2
        err = capsys.readouterr().err
        assert f"{damaged / 'data.val_size=10000,seed=0' / 'config.yaml'}: " in err and "Traceback" not in err, err
        shutil.rmtree(damaged)
    for job in resized.iterdir():  # the same size, given on the command line: one split
        _config(job, 5000)
    assert results_main(["changes", str(base), str(resized)]) == 0
    for job in resized.iterdir():
        _config(job, "5000")
    assert results_main(["changes", str(base), str(resized)]) == 2  # not a number: named, not a TypeError
    assert re.search(r"seed=\d/config.yaml: data.val_size is '5000', not a whole number", capsys.readouterr().err)
    _config(base / "seed=1", 10000)
    assert results_main(["changes", str(base), str(resized)]) == 2  # the baseline's own seeds disagree
    assert (f"{base}: jobs seed=0 and seed=1 are the same setting, (defaults), but their config.yaml differ in "
            "data.val_size (data.val_size: 5000 and 10000)") in capsys.readouterr().err


def test_jobs_of_one_setting_that_compute_different_things_are_neither_pooled_nor_paired(tmp_path, capsys):
    # A job is named without its experiment and preset: another preset's job joins the setting by name alone.
    mixed = _sweep(tmp_path, "mixed", {"": [0.9, 0.91, 0.92]})
    for job in mixed.iterdir():
        _config(job, 10000 if job.name == "seed=2" else 5000)
    before = snapshot(mixed)
    for verb in ("summary", "report", "leaderboard"):
        assert results_main([verb, str(mixed)]) == 2, verb
        assert ("jobs seed=0 and seed=2 are the same setting, (defaults), but their config.yaml differ in "
                "data.val_size (data.val_size: 5000 and 10000)") in capsys.readouterr().err
    assert snapshot(mixed) == before
    (mixed / "seed=2" / "config.yaml").unlink()
    (mixed / "seed=2" / "config.yaml").symlink_to(tmp_path / "gone.yaml")  # lost, not a run older than the file
    assert results_main(["summary", str(mixed)]) == 2
    assert f"seed=2/config.yaml: a link to {tmp_path / 'gone.yaml'}, which does not exist" in capsys.readouterr().err
    (mixed / "seed=2" / "config.yaml").unlink()
    _config(mixed / "seed=2", 5000)
    assert results_main(["summary", str(mixed)]) == 0


def test_changes_say_which_jobs_they_left_out_and_refuse_when_nothing_completed(tmp_path, capsys):
    base = _sweep(tmp_path, "base", {"": [0.9, 0.91, 0.92]})
    tried = _sweep(tmp_path, "tried", {"optim.lr=0.1": [0.9, 0.92, 0.93]})
    failed = tried / "optim.lr=0.1,seed=2" / "metrics.json"
    failed.write_text(failed.read_text().replace('"completed"', '"failed"'))
    assert results_main(["changes", str(base), str(tried)]) == 0
    assert f"Left out, not completed: {tried}/optim.lr=0.1,seed=2 (failed)." in capsys.readouterr().out
    for job in tried.iterdir():
        (job / "metrics.json").write_text((job / "metrics.json").read_text().replace('"completed"', '"failed"'))
    # a setting that failed on every seed is a result: listed beside the others, not a refusal of them all
    also = _sweep(tmp_path, "also", {"optim.lr=0.01": [0.9, 0.92, 0.93]})
    assert results_main(["changes", str(base), str(tried), str(also)]) == 0
    out = capsys.readouterr().out
    assert "| `optim.lr=0.01` |" in out and f"{tried}/optim.lr=0.1,seed=0 (failed)" in out
    assert results_main(["changes", str(base), str(tried)]) == 2
    err = capsys.readouterr().err
    assert f"{tried}: no completed job to compare (not completed: {tried}/" in err and f"{base}/" not in err


def test_changes_name_a_setting_that_two_sweeps_hold_with_its_sweep(tmp_path, capsys):
    # Two rows of one name would look like one setting listed twice, and each is a change of its own under Holm.
    base = _sweep(tmp_path, "base", {"": [0.90, 0.91, 0.92]})
    first = _sweep(tmp_path, "first", {"optim.lr=0.01": [0.91, 0.92, 0.93]})
    second = _sweep(tmp_path / "later", "first", {"optim.lr=0.01": [0.89, 0.90, 0.91],
                                                  "optim.lr=0.1": [0.90, 0.90, 0.90]})
    table = changes(base, [first, second])
    assert list(table.setting) == ["baseline (base)", f"optim.lr=0.01 ({tmp_path.name}/first)",
                                   "optim.lr=0.01 (later/first)", "optim.lr=0.1"]
    assert results_main(["changes", str(base), str(first), str(second)]) == 0
    assert "| `optim.lr=0.01 (later/first)` | 89.00 / 90.00 / 91.00 (seeds 0,1,2) |" in capsys.readouterr().out


def test_tricks_refuses_what_it_could_not_finish_before_evaluating(tmp_path, capsys, tmpfs):
    # Its checkpoints are missing: an evaluation would fail on them, so each refusal below comes first.
    sweep = _sweep(tmp_path, "s", {"": [0.9, 0.91]})
    read_only = tmpfs("ro,size=1m")
    assert results_main(["tricks", str(sweep), "--csv", str(read_only / "t.csv")]) == 2
    err = capsys.readouterr().err
    assert f"cannot write {read_only}: the file system is read-only" in err and "--csv" in err, err
    for job in sweep.iterdir():
        (job / "metrics.json").write_text((job / "metrics.json").read_text().replace('"completed"', '"failed"'))
    assert results_main(["tricks", str(sweep)]) == 2
    assert f"{sweep}: no completed run to evaluate" in capsys.readouterr().err


def test_changes_refuse_a_baseline_with_several_settings_or_a_seed_twice(tmp_path, capsys):
    baseline = _sweep(tmp_path, "base", {"optim.lr=0.1": [0.9, 0.91], "optim.lr=0.2": [0.9, 0.91]})
    with pytest.raises(ConfigError, match="base: a baseline is one setting"):
        changes(baseline, [baseline])
    # A job directory copied inside its sweep: two jobs of one seed, which a pairing by seed cannot tell apart,
    # and which every mean over seeds would count twice.
    single, one_setting = _sweep(tmp_path, "single", {"": [0.9, 0.91]}), _sweep(tmp_path, "one", {"": [0.9, 0.91]})
    shutil.copytree(single / "seed=0", single / "seed=0.bak")
    before = snapshot(single)
    for verb in ("changes", "summary", "report", "leaderboard"):
        assert results_main([verb, *([str(one_setting)] if verb == "changes" else []), str(single)]) == 2, verb
        err = capsys.readouterr().err
        assert "jobs seed=0, seed=0.bak are the same setting with seed 0" in err and "Traceback" not in err, verb
    assert snapshot(single) == before  # no summary, figures or report written
    # Seeds the baseline never ran: nothing to pair, not a change of +nan "not judged (one seed)".
    other = _sweep(tmp_path, "other", {"optim.lr=0.1": [0.9, 0.91]})
    for record in other.glob("*/metrics.json"):
        record.write_text(record.read_text().replace('"seed": ', '"seed": 5'))
    shutil.rmtree(single / "seed=0.bak")
    assert results_main(["changes", str(single), str(other)]) == 2
    err = capsys.readouterr().err
    assert "setting `optim.lr=0.1` ran seeds [50, 51] and the baseline" in err and "seeds [0, 1]" in err
    assert "share none" in err and "Traceback" not in err


def test_the_tricks_table_turns_std_and_n_into_intervals():
    table = pd.DataFrame([
        {"weights": "raw", "tta": "none", "val_acc_mean": 0.94, "val_acc_std": 0.004, "n": 3, "change_mean": 0.0,
         "change_std": 0.0},
        {"weights": "raw", "tta": "flip", "val_acc_mean": 0.946, "val_acc_std": 0.004, "n": 3, "change_mean": 0.006,
         "change_std": 0.001},
        {"weights": "ema", "tta": "none", "val_acc_mean": 0.941, "val_acc_std": 0.004, "n": 3, "change_mean": 0.001,
         "change_std": 0.003}])
    lines = tricks_markdown(table).splitlines()
    half = stats.t.ppf(0.975, 2) * 0.4 / math.sqrt(3)  # points
    assert f"| raw | none | 94.00 ± {half:.2f} | 3 | +0.00 |  | (the reference) |" in lines
    assert any(line.startswith("| raw | flip |") and line.endswith("| better |") for line in lines)
    assert any(line.startswith("| ema | none |") and line.endswith(f"| {WITHIN_NOISE} |") for line in lines)


def _runs_with_predictions(root, name: str, correct_per_seed: list[np.ndarray], labels: np.ndarray):
    for seed, correct in enumerate(correct_per_seed):
        job = root / name / f"seed={seed}"
        job.mkdir(parents=True)
        (job / "metrics.json").write_text(json.dumps({"status": "completed", "seed": seed,
                                                      "overrides": [f"seed={seed}"],
                                                      "metrics": {"val/acc_best": float(correct.mean())}}))
        pred = np.where(correct, labels, (labels + 1) % 10)
        np.savez(job / "predictions.npz", val_pred=pred, val_label=labels, val_epoch=3, test_pred=pred,
                 test_label=labels)
    return root / name


def test_two_models_compared_image_by_image_pair_by_seed_and_image(tmp_path, capsys):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 5000)
    b = [rng.random(5000) < 0.92 for _ in SEEDS]
    a = []
    for wrong in b:  # A fixes 100 of B's errors and makes 20 of its own
        fixed = wrong.copy()
        fixed[np.flatnonzero(~wrong)[:100]] = True
        fixed[np.flatnonzero(wrong)[:20]] = False
        a.append(fixed)
    rows, difference = image_comparison(_runs_with_predictions(tmp_path, "a", a, labels),
                                        _runs_with_predictions(tmp_path, "b", b, labels))
    assert list(rows.a_only) == [100] * 5 and list(rows.b_only) == [20] * 5 and (rows.p < 1e-10).all()
    assert difference.mean == pytest.approx(80 / 5000) and 0 < difference.low < difference.mean < difference.high
    assert "better" in image_comparison_markdown(rows, difference, ("a", "b"), "val")
    assert results_main(["images", str(tmp_path / "a"), str(tmp_path / "b"), "--split", "test"]) == 0
    assert "| 0 | " in capsys.readouterr().out
    same, none = image_comparison(tmp_path / "b", tmp_path / "b")
    assert none.mean == 0 and (same.p == 1.0).all()
    shorter = _runs_with_predictions(tmp_path, "shorter", b[:3], labels)  # seeds 3 and 4: run by A only
    rows, difference = image_comparison(tmp_path / "a", shorter)
    assert list(rows.seed) == [0, 1, 2] and "Left out, completed by one side only: A seeds 3, 4." in \
        image_comparison_markdown(rows, difference, ("a", "shorter"), "val")
    # One seed: the interval is the images' sampling error alone (normal, from the per-image differences); five
    # seeds, each validated on its own images, narrow it, though they agree exactly (their spread is taken as at
    # least the images' own, not as zero).
    one = seed_and_image_interval(a[:1], b[:1], same_images=False)
    d = a[0].astype(float) - b[0].astype(float)
    assert one.n == 1 and one.half_width == pytest.approx(stats.norm.ppf(0.975) * d.std(ddof=1) / math.sqrt(len(d)))
    # ... and is not a verdict on the settings, though it excludes zero: one seed shows nothing of their spread.
    assert one.low > 0 and change_verdict(one) == ONE_SEED
    assert "not judged (one seed)" in image_comparison_markdown(rows.head(1), one, ("a", "b"), "val")
    five = seed_and_image_interval(a, b, same_images=False)
    assert five.mean == pytest.approx(80 / 5000) and 0 < five.half_width < one.half_width


def test_an_image_comparison_refuses_other_images_and_runs_without_predictions(tmp_path):
    labels = np.arange(100) % 10
    _runs_with_predictions(tmp_path, "a", [np.ones(100, bool)], labels)
    _runs_with_predictions(tmp_path, "other", [np.ones(100, bool)], (labels + 3) % 10)
    with pytest.raises(ConfigError, match="seed 0: the two runs' val images differ"):
        image_comparison(tmp_path / "a", tmp_path / "other")
    (tmp_path / "other" / "seed=0" / "predictions.npz").unlink()
    with pytest.raises(ConfigError, match="predictions.npz: no such file"):
        image_comparison(tmp_path / "a", tmp_path / "other")
    # A damaged file, a pickle, and arrays of another shape: one paragraph each, never numpy's advice to unpickle.
    damaged = tmp_path / "other" / "seed=0" / "predictions.npz"
    for write in (lambda f: f.write(b"x"), lambda f: np.save(f, np.array([{}]), allow_pickle=True),
                  lambda f: np.save(f, np.zeros(3, int)),  # one bare array, not an archive
                  lambda f: np.savez(f, val_pred=np.zeros((2, 2), int), val_label=np.zeros(2, int)),
                  lambda f: np.savez(f, val_pred=np.zeros(0, int), val_label=np.zeros(0, int)),  # no image
                  lambda f: np.savez(f, val_pred=np.full(100, 12), val_label=labels),  # no class 12: 0.00%, exit 0
                  lambda f: f.write(_damaged_member(val_pred=np.arange(500) % 10, val_label=np.arange(500) % 10))):
        with open(damaged, "wb") as f:
            write(f)
        with pytest.raises(ConfigError, match="predictions.npz: (cannot read it|`val_pred` and `val_label` should)") as e:
            image_comparison(tmp_path / "a", tmp_path / "other")
        assert "allow_pickle" not in str(e.value)
    assert results_main(["images", str(tmp_path / "a"), str(tmp_path / "other")]) == 2


def _damaged_member(**arrays) -> bytes:
    """A compressed .npz of `arrays` whose first member's deflate stream is damaged: the archive's directory reads,
    the member does not (zlib's error, not zipfile's)."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    data = bytearray(buffer.getvalue())
    offset = zipfile.ZipFile(io.BytesIO(bytes(data))).infolist()[0].header_offset
    names, extra = int.from_bytes(data[offset + 26:offset + 28], "little"), int.from_bytes(data[offset + 28:offset + 30], "little")
    start = offset + 30 + names + extra  # past the member's local header: its compressed bytes
    for i in range(start + 5, start + 60):
        data[i] ^= 0x5A
    return bytes(data)


def test_an_image_comparison_checks_a_run_directorys_record_as_a_sweeps_jobs_are(tmp_path, capsys):
    run = _runs_with_predictions(tmp_path, "a", [np.ones(100, bool)], np.arange(100) % 10) / "seed=0"
    other = shutil.copytree(run, tmp_path / "b" / "seed=0")  # the same predictions: a directory given twice is refused
    record = json.loads((run / "metrics.json").read_text())
    (run / "metrics.json").write_text(json.dumps({**record, "seed": [0]}))
    assert results_main(["images", str(run), str(other)]) == 2
    err = capsys.readouterr().err
    assert "seed=0/metrics.json is not a run record: seed of the wrong type" in err and "Traceback" not in err
    # A run that did not complete is not compared, as in a sweep, where only completed jobs are.
    (run / "metrics.json").write_text(json.dumps({**record, "status": "diverged"}))
    assert results_main(["images", str(run), str(other)]) == 2
    assert "its status is 'diverged'; only a completed run is compared" in capsys.readouterr().err


def test_an_image_comparison_of_sweeps_refuses_a_damaged_record_and_lists_the_jobs_that_did_not_complete(tmp_path,
                                                                                                         capsys):
    labels = np.arange(100) % 10
    a = _runs_with_predictions(tmp_path, "a", [np.ones(100, bool)] * 2, labels)
    b = _runs_with_predictions(tmp_path, "b", [np.ones(100, bool)] * 2, labels)
    record = a / "seed=1" / "metrics.json"
    saved = record.read_text()
    record.write_text(saved[:40])  # cut short: its seed, and so which of B's seeds it leaves unpaired, unknown
    assert results_main(["images", str(a), str(b)]) == 2
    err = capsys.readouterr().err
    assert f"{record} is not a run record (unreadable, or not a JSON object); expected the record a run writes" in err
    assert "Traceback" not in err
    # A job that did not complete is a result of its setting: compared without it, and listed as `changes` lists it.
    record.write_text(saved.replace('"completed"', '"failed"'))
    assert results_main(["images", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "Left out, completed by one side only: B seeds 1." in out
    assert f"Left out, not completed: {a / 'seed=1'} (failed)." in out
    # Jobs of one setting name that computed different things (another preset's), as every results verb refuses them.
    record.write_text(saved)
    for job in a.iterdir():
        _config(job, 10000 if job.name == "seed=1" else 5000)
    assert results_main(["images", str(a), str(b)]) == 2
    assert "are the same setting, (defaults), but their config.yaml differ in data.val_size" in capsys.readouterr().err


def test_results_verbs_name_a_file_in_the_way_instead_of_crashing(tmp_path, capsys):
    labels = np.arange(100) % 10
    sweep = _runs_with_predictions(tmp_path, "a", [np.ones(100, bool)], labels)
    (sweep / "figures").write_text("my notes")
    first = _runs_with_predictions(tmp_path, "first", [np.ones(100, bool)], labels)
    before = snapshot(first)
    assert results_main(["report", str(first), str(sweep)]) == 2
    assert "figures: a file is in the way" in capsys.readouterr().err
    assert (sweep / "figures").read_text() == "my notes"
    assert snapshot(first) == before  # every sweep is checked before any is written


@pytest.mark.parametrize("in_the_way", ["summary.md", "summary.csv", "report.md"])
def test_a_refused_report_writes_nothing(tmp_path, capsys, in_the_way):
    # A directory where an output goes is found before the figures or the other outputs are written.
    labels = np.arange(100) % 10
    sweep = _runs_with_predictions(tmp_path, "a", [np.ones(100, bool)], labels)
    (sweep / in_the_way).mkdir()
    before = snapshot(sweep)
    assert results_main(["report", str(sweep)]) == 2
    assert f"cannot write {sweep / in_the_way}: it is a directory" in capsys.readouterr().err
    assert snapshot(sweep) == before and not (sweep / "figures").exists()
    if in_the_way != "report.md":  # `summary` alone is refused the same way, and writes no sweep's before it
        first = _runs_with_predictions(tmp_path, "first", [np.ones(100, bool)], labels)
        assert results_main(["summary", str(first), str(sweep)]) == 2 and snapshot(sweep) == before
        assert not (first / "summary.md").exists()


def test_an_image_comparisons_interval_carries_the_seeds_spread_and_claims_little_by_chance():
    # Two seeds at +0.4 and +2.0 points: a spread that two seeds cannot pin down (Student t with one degree of
    # freedom), not "better" because both are positive.
    def arms(shift: int) -> tuple[np.ndarray, np.ndarray]:  # A gets `shift` more images right than B (fewer if < 0)
        b = np.ones(5000, bool)
        b[:400] = False
        a = b.copy()
        if shift > 0:
            a[:shift] = True
        else:
            a[400:400 - shift] = False
        return a, b

    a, b = zip(*[arms(20), arms(100)])
    two = seed_and_image_interval(list(a), list(b), same_images=False)
    assert two.low < 0 < two.high and change_verdict(two) == WITHIN_NOISE

    # Two equally good models that disagree on a random 5% of the images in each seed, on each seed's own
    # validation images or on one shared test set: a 95% interval claims a change in about 5% of such
    # comparisons (a bootstrap over 2 seeds claimed one in 44%), and more seeds narrow it.
    rng = np.random.default_rng(0)
    for same_images in (False, True):
        widths = {}
        for k in (2, 3, 20):
            claimed, halves = 0, []
            for _ in range(100):
                a, b = [], []
                for _ in range(k):
                    right = rng.random(5000) < 0.93
                    disagree = rng.random(5000) < 0.05
                    flip = rng.random(5000) < 0.5  # which of the two gets a disagreed image right
                    a.append(np.where(disagree, flip, right))
                    b.append(np.where(disagree, ~flip, right))
                interval = seed_and_image_interval(a, b, same_images=same_images)
                claimed += not interval.low <= 0 <= interval.high
                halves.append(interval.half_width)
            assert claimed <= 10, (same_images, k, claimed)
            widths[k] = np.mean(halves)
        assert widths[20] < widths[3] / 2, (same_images, widths)


def test_a_table_of_changes_judges_each_after_holms_correction_and_names_the_seeds_it_paired(tmp_path):
    base = 0.94 + np.array([0.0, 0.006, 0.004, -0.003, 0.002])
    baseline = _sweep(tmp_path, "base", {"": list(base)})
    step = np.array([0.0010, 0.0030, 0.0002, 0.0025, 0.0008])  # a change of about +0.15 points, p about 0.03
    alone = _sweep(tmp_path, "alone", {"optim.lr=0.01": list(base + step)})
    row = changes(baseline, [alone]).set_index("setting").loc["optim.lr=0.01"]
    assert row.p < 0.05 and row.p_holm == row.p and row.verdict == "better"
    # The same change judged beside two others as uncertain: Holm's correction over the three makes none of
    # them a claim, though each row's own interval excludes zero.
    three = _sweep(tmp_path, "three", {"optim.lr=0.01": list(base + step), "optim.lr=0.02": list(base + step * 1.05),
                                       "optim.lr=0.03": list(base + step * 0.95)})
    table = changes(baseline, [three]).set_index("setting")
    assert (table.p[1:] < 0.05).all() and (table.p_holm[1:] >= 0.05).all()
    assert (table.verdict[1:] == WITHIN_NOISE).all() and all(c.low > 0 for c in table.val_change[1:])
    # A setting run with more seeds than the baseline: the change is paired on the shared ones, and says so.
    longer = _sweep(tmp_path, "longer", {"optim.lr=0.01": [*(base + step), 0.95, 0.95]})
    text = changes_markdown(changes(baseline, [longer]))
    assert "(seeds 0,1,2,3,4,5,6) | +0.15 [" in text and "(paired on seeds 0,1,2,3,4) |" in text


def test_p_values_and_seeds_needed_are_printed_as_they_are_judged():
    assert ALPHA == 0.05 and paired(pd.Series([0.0, 0.0]), pd.Series([0.0, 0.0])).verdict() == "no detectable difference"
    at_the_threshold = paired(pd.Series([0.0, 0.0]), pd.Series([0.0, 0.0]))
    assert at_the_threshold.verdict(+1, p_adjusted=0.05) == "no detectable difference"  # p < 0.05 holds, 0.05 not
    assert p_text(0.0496) == "0.0496" and p_text(0.04996) == "0.0499" and p_text(0.05) == "0.050"
    assert p_text(0.0004) == "< 0.001" and p_text(0.5) == "0.500"
    assert seeds_for_power(0.04) == math.inf and seeds_text(math.inf) == "> 1000"
    assert seeds_text(None) == "" and seeds_text(seeds_for_power(1.0)) == "10"
    # A summary without a spread (a tricks CSV with an empty std) is not judged, and not called one seed.
    c = summary_comparison(0.004, math.nan, 3)
    assert change_verdict(c.difference, c.p_value) == NO_SPREAD_GIVEN


def test_a_report_refuses_a_variant_run_as_two_settings_rather_than_count_its_seeds_twice(tmp_path, capsys):
    sweep = tmp_path / "report"
    for setting in ("variant=best", "variant=best,trainer.max_epochs=3", "variant=no_dropout"):
        for seed in range(3):
            job = sweep / f"{setting},seed={seed}"
            job.mkdir(parents=True)
            overrides = [*setting.split(","), f"seed={seed}"]
            (job / "metrics.json").write_text(json.dumps({"status": "completed", "seed": seed, "overrides": overrides,
                                                          "metrics": {"val/acc_best": 0.93, "test/acc": 0.93}}))
            (job / "epochs.csv").write_text("epoch,train/loss,val/loss,val/acc\n1,0.5,0.4,0.9\n2,0.4,0.35,0.93\n")
    before = snapshot(sweep)
    assert results_main(["report", str(sweep)]) == 2
    err = capsys.readouterr().err
    assert "variant=best was run as 2 settings (`trainer.max_epochs=3,variant=best`, `variant=best`)" in err
    assert snapshot(sweep) == before


def test_a_summary_counts_the_test_accuracies_it_averages(tmp_path):
    from fmnist.results.sweep import SUMMARY_FILES, summary_files

    sweep = _sweep(tmp_path, "s", {"optim.lr=0.01": [0.93, 0.94, 0.95]})
    job = sweep / "optim.lr=0.01,seed=2"
    record = json.loads((job / "metrics.json").read_text())
    del record["metrics"]["test/acc"]  # a run with test=false
    (job / "metrics.json").write_text(json.dumps(record))
    text = summary_files(sweep)[1][sweep / SUMMARY_FILES[1]]
    row = next(line for line in text.splitlines() if line.startswith("| `optim.lr=0.01`"))
    assert row.startswith("| `optim.lr=0.01` | 3 | 94.00 ± ") and "(n=2) |" in row
    assert " ± " in row.split("|")[4] and "nan" not in row
