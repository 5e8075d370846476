import json
import logging
import math
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from fmnist.config import ADDED_KEYS, RESUMABLE_KEYS, flat_config
from fmnist.errors import CheckpointError, ConfigError, DataError, DivergedError
from fmnist.fsio import load_checkpoint
from fmnist.models import training_flops_per_image
from fmnist.runs import read_record, saved_config
from fmnist.training.module import LitClassifier
from fmnist.training.train import run_job, train
from tests.conftest import ROOT, TensorOps, compose_cfg, make_images, snapshot


@pytest.mark.slow
def test_a_run_without_its_test_says_nothing_was_tested(make_cfg, tmp_path):
    # Its record said "tested": "best checkpoint", and evaluate.py took the run's test/acc as that checkpoint's.
    metrics = train(make_cfg("model=simple", "test=false"), tmp_path)
    record = json.loads((tmp_path / "metrics.json").read_text())
    assert "test/acc" not in metrics and record["status"] == "completed" and "tested" not in record


@pytest.mark.slow
@pytest.mark.parametrize("model", ["simple", "optimized", "resnet"])
def test_one_batch_training_writes_everything(make_cfg, tmp_path, model):
    # The default logger; the whole test split in one evaluation batch, so that every test image is counted.
    metrics = train(make_cfg(f"model={model}", "logger=tensorboard", "data.eval_batch_size=1000"), tmp_path)
    assert 0.0 <= metrics["test/acc"] <= 1.0 and metrics["test/loss"] > 0 and metrics["epochs"] == 1
    record = json.loads((tmp_path / "metrics.json").read_text())
    assert record["status"] == "completed" and record["metrics"]["val/acc_best"] == metrics["val/acc_best"]
    assert record["tested"] == "best checkpoint"
    assert record["versions"]["torch"].startswith("2.") and record["seed"] == 0
    assert list(tmp_path.glob("events.out.tfevents.*")), "TensorBoard events"
    assert (tmp_path / "config.yaml").exists() and (tmp_path / "confusion_matrix.csv").exists()
    # The test set's confusion matrix counts every test image once (the fixture has 200).
    assert pd.read_csv(tmp_path / "confusion_matrix.csv", header=None).to_numpy().sum() == 200
    assert not (tmp_path / "hparams.yaml").exists()  # Lightning's would be empty: config.yaml holds the config
    epochs = pd.read_csv(tmp_path / "epochs.csv")
    assert list(epochs.columns[:3]) == ["epoch", "step", "train/loss"]
    # Checkpoints hold plain values only: they reload under weights_only loading.
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["hyper_parameters"]["model"]["name"] == model
    assert {k.split(".")[0] for k in ckpt["state_dict"]} <= {"net", "val_acc_best"}  # no duplicate copies
    restored = LitClassifier.load_from_checkpoint(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert restored(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    # Time-to-accuracy axes that do not depend on the machine: images (2 batches of 32) and their FLOPs.
    flops = training_flops_per_image(restored.net)
    assert epochs["train_images"].tolist() == [64] and epochs["train_flops"].tolist() == [64 * flops]
    # Every image's prediction, for comparisons image by image: they give the run's own accuracies.
    with np.load(tmp_path / "predictions.npz") as saved:
        assert len(saved["test_pred"]) == len(saved["test_label"]) == 200 and int(saved["val_epoch"]) == 1  # the fixture's test set
        assert (saved["test_pred"] == saved["test_label"]).mean() == pytest.approx(metrics["test/acc"])
        assert (saved["val_pred"] == saved["val_label"]).mean() == pytest.approx(metrics["val/acc_best"])


def test_a_batch_fraction_that_keeps_no_batch_is_refused_before_training(make_cfg, tmp_path):
    # The fixture's test split is 200 images: one batch of data.eval_batch_size, of which half keeps none.
    with pytest.raises(ConfigError, match=r"trainer.limit_test_batches must keep at least one of the test split's 1 "
                                          r"batch \(200 images of 1000\); got 0.5"):
        run_job(make_cfg("model=simple", "data.eval_batch_size=1000", "trainer.limit_test_batches=0.5"), tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_existing_run_directory_is_never_overwritten(make_cfg, tmp_path):
    train(make_cfg("model=simple"), tmp_path)
    before = (tmp_path / "metrics.json").read_text()
    with pytest.raises(ConfigError, match="already holds a run.*ckpt_path=last"):
        run_job(make_cfg("model=simple"), tmp_path)
    assert (tmp_path / "metrics.json").read_text() == before
    # Its checkpoint alone still marks a run, which cannot be resumed without the record (the data it trained on).
    (tmp_path / "metrics.json").unlink()
    before = snapshot(tmp_path)
    with pytest.raises(ConfigError, match=r"already holds a run \(its checkpoints/last.ckpt, its metrics.json gone\); "
                                          r"choose another directory"):
        run_job(make_cfg("model=simple"), tmp_path)
    with pytest.raises(ConfigError, match=r"cannot resume .*: its metrics.json is gone.*Put the file back"):
        run_job(make_cfg("model=simple", "trainer.max_epochs=2", "ckpt_path=last"), tmp_path)
    assert snapshot(tmp_path) == before


@pytest.mark.slow
def test_a_directory_of_ones_own_files_is_refused_and_a_run_stopped_before_its_record_starts_afresh(make_cfg, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    (mine / "config.yaml").write_text("my config")  # a run's file name, not a run's content
    before = snapshot(mine)
    for ckpt_path in ("null", "last"):
        with pytest.raises(ConfigError, match=r"mine holds files that no run wrote \(config.yaml, notes.txt\)"):
            run_job(make_cfg("model=simple", f"ckpt_path={ckpt_path}"), mine)
        assert snapshot(mine) == before
    # A run's config.yaml, copied into a folder of one's own beside other files: still refused.
    train(make_cfg("model=simple"), tmp_path / "finished")
    shutil.copy(tmp_path / "finished" / "config.yaml", mine / "config.yaml")
    before = snapshot(mine)
    with pytest.raises(ConfigError, match=r"mine holds files that no run wrote \(notes.txt\)"):
        run_job(make_cfg("model=simple"), mine)
    assert snapshot(mine) == before
    (mine / "notes.txt").unlink()
    (mine / "config.yaml").unlink()
    (mine / "metrics.json").write_text('{"accuracy": 0.9}')  # another tool's metrics file
    for ckpt_path in ("null", "last"):  # resuming would merge a record into it
        with pytest.raises(ConfigError, match=r"mine holds a metrics.json that is not a run's record \(no run status"):
            run_job(make_cfg("model=simple", f"ckpt_path={ckpt_path}"), mine)
        assert (mine / "metrics.json").read_text() == '{"accuracy": 0.9}'
    (mine / "metrics.json").write_text('{"status": "completed", "bro')  # cut short: not said to lack a status
    with pytest.raises(ConfigError, match=r"not a run's record \(it cannot be read as a JSON object: cut short"):
        run_job(make_cfg("model=simple"), mine)
    # A run stopped after writing its config and before its record: the same command starts it again.
    shutil.copytree(tmp_path / "finished", tmp_path / "stopped")
    shutil.rmtree(tmp_path / "stopped" / "checkpoints")
    for name in ("metrics.json", "epochs.csv", "confusion_matrix.csv", "predictions.npz"):
        (tmp_path / "stopped" / name).unlink()
    assert run_job(make_cfg("model=simple"), tmp_path / "stopped") > 0


@pytest.mark.slow
def test_resume_extends_a_finished_run_also_after_its_directory_moved(make_cfg, tmp_path):
    first = train(make_cfg("model=simple"), tmp_path / "run")
    (tmp_path / "run").rename(tmp_path / "moved")  # or the same directory reached by another path
    metrics = train(make_cfg("model=simple", "trainer.max_epochs=2", "ckpt_path=last"), tmp_path / "moved")
    assert metrics["epochs"] == 2
    epochs = pd.read_csv(tmp_path / "moved" / "epochs.csv")
    assert list(epochs.epoch) == [1, 2]
    # The next resume reads last.ckpt: it is the latest epoch, with no `last-v1.ckpt` beside it, and one best file.
    checkpoints = sorted(p.name for p in (tmp_path / "moved" / "checkpoints").iterdir())
    assert checkpoints[-1] == "last.ckpt" and len(checkpoints) == 2 and checkpoints[0].startswith("best-epoch")
    assert load_checkpoint(tmp_path / "moved" / "checkpoints" / "last.ckpt")["epoch"] == 1  # Lightning counts from 0
    # The run's training time counts both processes' epochs, not just the one that finished it.
    assert metrics["train_seconds"] == pytest.approx(epochs.epoch_seconds.sum(), abs=0.002)
    assert 0 < first["train_seconds"] < metrics["train_seconds"]
    # Run again as a sweep's finished job, with data that is not there: the data cannot be compared, and is named.
    with pytest.raises(DataError, match=r"gone/fashion-mnist_train.csv: file not found"):
        run_job(make_cfg("model=simple", "trainer.max_epochs=2", f"data.dir={tmp_path / 'gone'}"), tmp_path / "moved",
                in_sweep=True)
    # Nothing more to train: refused, not re-tested over the record. Without last.ckpt: refused, not retrained.
    before = snapshot(tmp_path / "moved")
    with pytest.raises(ConfigError, match="already completed its 2 epoch"):
        train(make_cfg("model=simple", "trainer.max_epochs=2", "ckpt_path=last"), tmp_path / "moved")
    # Cut short by trainer.max_time: its last epoch is partial, and a longer max_time cannot finish it; said so.
    saved = (tmp_path / "moved" / "metrics.json").read_text()
    cut = {**json.loads(saved), "stopped_by": "stopped by trainer.max_time (00:00:00:05) at step 3 of 4"}
    (tmp_path / "moved" / "metrics.json").write_text(json.dumps(cut))
    with pytest.raises(ConfigError, match=r"was stopped by trainer.max_time \(00:00:00:05\) at step 3 of 4, in its epoch "
                                          r"2, which Lightning counts as finished .* whatever trainer.max_time is"):
        train(make_cfg("model=simple", "trainer.max_epochs=2", "trainer.max_time=00:01:00:00", "ckpt_path=last"),
              tmp_path / "moved")
    (tmp_path / "moved" / "metrics.json").write_text(saved)
    (tmp_path / "moved" / "checkpoints" / "last.ckpt").unlink()
    before.pop("checkpoints/last.ckpt")
    with pytest.raises(ConfigError, match="last.ckpt is gone, though the run trained 2 epoch"):
        train(make_cfg("model=simple", "trainer.max_epochs=3", "ckpt_path=last"), tmp_path / "moved")
    assert snapshot(tmp_path / "moved") == before
    # So too when it was stopped: an interrupted record counts no epochs, its epochs.csv does (it was retrained).
    record = json.loads((tmp_path / "moved" / "metrics.json").read_text())
    del record["metrics"]
    (tmp_path / "moved" / "metrics.json").write_text(json.dumps({**record, "status": "interrupted"}))
    before = snapshot(tmp_path / "moved")
    with pytest.raises(ConfigError, match="last.ckpt is gone, though the run trained 2 epoch"):
        train(make_cfg("model=simple", "trainer.max_epochs=3", "ckpt_path=last"), tmp_path / "moved")
    assert snapshot(tmp_path / "moved") == before


@pytest.mark.slow
def test_a_resumed_run_continues_bit_for_bit_dropout_included(make_cfg, tmp_path):
    # Dropout draws from torch's generator: a resume must continue its stream, not the seed's start.
    settings = ["model=simple", "model.dropout=0.5", "trainer.deterministic=true", "trainer.precision=32-true"]
    train(make_cfg(*settings, "trainer.max_epochs=2"), tmp_path / "straight")
    train(make_cfg(*settings, "trainer.max_epochs=1"), tmp_path / "resumed")
    train(make_cfg(*settings, "trainer.max_epochs=2", "ckpt_path=last"), tmp_path / "resumed")
    curves = [pd.read_csv(tmp_path / d / "epochs.csv").filter(regex="loss|acc") for d in ("straight", "resumed")]
    pd.testing.assert_frame_equal(*curves)


@pytest.mark.slow
def test_resume_refuses_a_different_config(make_cfg, tmp_path, data_dir):
    from fmnist.data.csv_io import write_csv

    train(make_cfg("model=simple"), tmp_path)
    with pytest.raises(ConfigError, match=r"config differs in \['optim.lr'\]"):
        train(make_cfg("model=simple", "optim.lr=0.5", "ckpt_path=last"), tmp_path)
    # Nor other data (data.dir may move, its CSVs may not change): it trained the next epochs on them, and its
    # record then held the new data's digest alone.
    other = shutil.copytree(data_dir, tmp_path.parent / f"{tmp_path.name}-other-data")
    write_csv(other / "fashion-mnist_train.csv", *make_images(600, 9))
    before = snapshot(tmp_path)
    with pytest.raises(ConfigError, match=r"the train CSV\(s\) in .*-other-data are not the ones the run recorded "
                                          r"\(SHA-1 [0-9a-f]{12}, now [0-9a-f]{12}\); its next epochs would train on "
                                          r"other data.* nothing was written"):
        train(make_cfg("model=simple", f"data.dir={other}", "trainer.max_epochs=2", "ckpt_path=last"), tmp_path)
    assert snapshot(tmp_path) == before
    other_test = shutil.copytree(data_dir, tmp_path.parent / f"{tmp_path.name}-other-test")  # its training CSV the same
    write_csv(other_test / "fashion-mnist_test.csv", *make_images(200, 9))
    with pytest.raises(ConfigError, match=r"the test CSV\(s\) in .*-other-test are not the ones the run recorded "
                                          r".*; it would be tested on other images than the run recorded"):
        train(make_cfg("model=simple", f"data.dir={other_test}", "trainer.max_epochs=2", "ckpt_path=last"), tmp_path)
    assert snapshot(tmp_path) == before
    moved = shutil.copytree(data_dir, tmp_path.parent / f"{tmp_path.name}-moved-data")  # the same CSVs elsewhere
    assert train(make_cfg("model=simple", f"data.dir={moved}", "trainer.max_epochs=2", "ckpt_path=last"),
                 tmp_path)["epochs"] == 2
    for emptied, holds in (("", "no config keys"), ("x\n", "no `data` section"), ("- a\n", "a list")):
        (tmp_path / "config.yaml").write_text(emptied)  # it differed "in every key (was None)"
        with pytest.raises(ConfigError, match=f"config.yaml: holds {holds}, not the mapping of config keys a run"):
            train(make_cfg("model=simple", "trainer.max_epochs=2", "ckpt_path=last"), tmp_path)
    (tmp_path / "config.yaml").unlink()  # lost in a copy: nothing left to tell the change by
    before = snapshot(tmp_path)
    with pytest.raises(ConfigError, match=r"config.yaml is gone, .*nothing was written"):
        train(make_cfg("model=simple", "optim.lr=0.5", "ckpt_path=last"), tmp_path)
    assert snapshot(tmp_path) == before


@pytest.mark.slow
def test_a_run_saved_before_a_key_existed_resumes_with_that_key_at_its_former_value(make_cfg, tmp_path):
    net = ["model=resnet", "model.widths=[8,16]", "model.blocks=[1,1]"]
    train(make_cfg(*net), tmp_path)
    saved = OmegaConf.load(tmp_path / "config.yaml")
    del saved.data.augment["cutmix"], saved.model["whiten_stem"]  # as a config written before the keys were added
    OmegaConf.save(saved, tmp_path / "config.yaml")
    with pytest.raises(ConfigError, match=r"config differs in \['data.augment.cutmix'\]"):
        train(make_cfg(*net, "data.augment.cutmix=0.5", "ckpt_path=last"), tmp_path)
    assert train(make_cfg(*net, "trainer.max_epochs=2", "ckpt_path=last"), tmp_path)["epochs"] == 2


def test_every_key_that_older_runs_lack_says_how_they_behaved_without_it():
    # A key added without an ADDED_KEYS entry would make every run recorded before it "another experiment".
    current, lacking = {}, set()
    for saved in (ROOT / "docs" / "results").rglob("config.yaml"):
        old = saved_config(saved)
        model = old["model.name"]
        if model not in current:
            current[model] = flat_config(compose_cfg(f"model={model}"))
        lacking |= {k for k in current[model] if k not in old and k not in RESUMABLE_KEYS}
    assert "data.augment.cutmix" in lacking  # the stored runs predate it: the check has something to check
    assert lacking <= set(ADDED_KEYS), f"keys older runs lack, without an ADDED_KEYS entry: {sorted(lacking - set(ADDED_KEYS))}"


@pytest.mark.slow
def test_divergence_stops_the_run_and_is_recorded(make_cfg, tmp_path):
    cfg = make_cfg("model=simple", "optim=sgd", "optim.lr=1e8", "optim.scheduler=none", "optim.warmup_epochs=0",
                   "trainer.limit_train_batches=5", "trainer.precision=32-true")
    assert math.isnan(run_job(cfg, tmp_path, in_sweep=True))  # returns instead of raising inside a sweep
    record = read_record(tmp_path)
    assert record["status"] == "diverged" and "loss is" in record["error"] and "optim.lr" in record["error"]


@pytest.mark.slow
def test_refused_run_raises_and_writes_nothing(make_cfg, tmp_path):
    with pytest.raises(ConfigError, match="data.val_size"):
        run_job(make_cfg("data.val_size=100000"), tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_failure_outside_a_sweep_raises_and_is_recorded(make_cfg, tmp_path, monkeypatch):
    def broken(*args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(LitClassifier, "training_step", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        run_job(make_cfg("model=simple"), tmp_path)
    record = read_record(tmp_path)
    assert record["status"] == "failed" and record["error"] == "RuntimeError: a bug"
    assert "a bug" in (tmp_path / "error.txt").read_text()


class Evil:
    def __reduce__(self):
        return (print, ("this would have run code",))


@pytest.mark.slow
def test_pickled_payload_is_refused(tmp_path, make_cfg):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": Evil()}, path)
    with pytest.raises(CheckpointError, match="refused to load: it holds pickled Python objects"):
        load_checkpoint(path)
    train(make_cfg("model=simple"), tmp_path / "run")
    (tmp_path / "run" / "checkpoints" / "last.ckpt").write_bytes(path.read_bytes())
    with pytest.raises(CheckpointError, match="refused"):
        train(make_cfg("model=simple", "trainer.max_epochs=2", "ckpt_path=last"), tmp_path / "run")


def test_truncated_checkpoint_is_reported(tmp_path):
    path = tmp_path / "cut.ckpt"
    torch.save({"x": torch.zeros(1000)}, path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(path)


@pytest.mark.slow
def test_resumed_run_keeps_its_best_validation_accuracy(make_cfg, tmp_path):
    train(make_cfg("model=simple"), tmp_path)
    resumed = train(make_cfg("model=simple", "trainer.max_epochs=3", "ckpt_path=last"), tmp_path)
    # The best is over all three epochs, including the one trained before the resume.
    val_acc = [float(line.split(",")[5]) for line in (tmp_path / "epochs.csv").read_text().splitlines()[1:]]
    assert len(val_acc) == 3 and resumed["val/acc_best"] == pytest.approx(max(val_acc), abs=1e-6)
    module = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert "val_acc_best.max_value" in module


@pytest.mark.slow
def test_last_checkpoint_is_the_latest_epoch_even_when_not_the_best(make_cfg, tmp_path):
    # A learning rate too small to change the validation accuracy: epoch 2 is no better than epoch 1.
    train(make_cfg("model=simple", "optim.lr=1e-12", "trainer.max_epochs=2"), tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["best-epoch001.ckpt", "last.ckpt"]
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert (last["epoch"], last["global_step"]) == (1, 4)  # Lightning counts epochs from 0: the second one


@pytest.mark.slow
def test_an_epoch_without_validation_records_none_rather_than_the_last_validations(make_cfg, tmp_path, caplog):
    with caplog.at_level("INFO"):
        metrics = train(make_cfg("model=simple", "trainer.max_epochs=3", "trainer.check_val_every_n_epoch=2"), tmp_path)
    epochs = pd.read_csv(tmp_path / "epochs.csv")
    assert epochs["val/acc"].notna().tolist() == [False, True, False]  # Lightning's metrics still hold epoch 2's at 3
    assert epochs["val/loss"].notna().tolist() == [False, True, False] and epochs["train/loss"].notna().all()
    assert metrics["best_epoch"] == 2 and metrics["val/acc_best"] == pytest.approx(epochs["val/acc"][1], abs=1e-6)
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.startswith("epoch 1/3: train loss ") and "| no validation this epoch |" in line for line in lines), lines
    assert not any("nan" in line for line in lines if line.startswith("epoch ")), lines


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16-true", "64-true"])  # 16-true (optim=sgd) on a GPU: fp16 crawls on a CPU
def test_a_true_precision_casts_the_images_as_the_weights(make_cfg, tmp_path, precision):
    metrics = train(make_cfg("model=simple", f"trainer.precision={precision}"), tmp_path)
    assert read_record(tmp_path)["status"] == "completed" and math.isfinite(metrics["test/loss"])
    assert read_record(tmp_path)["precision"]["resolved"] == precision


def test_a_fit_cut_short_by_max_time_says_where(monkeypatch):
    from types import SimpleNamespace

    from lightning.pytorch.callbacks import Timer

    from fmnist.training.train import _stopped_by_time

    timer = Timer(duration="00:00:00:03")
    trainer = SimpleNamespace(callbacks=[timer], estimated_stepping_batches=80, global_step=7)  # 2 epochs of 40
    cfg = compose_cfg("trainer.max_time=00:00:00:03", "trainer.max_epochs=2")
    monkeypatch.setattr(timer, "time_remaining", lambda *args: -0.5)  # the time is up
    assert _stopped_by_time(cfg, trainer) == "stopped by trainer.max_time (00:00:00:03) at step 7 of 80"
    trainer.global_step = 80  # every planned step ran: the time limit stopped nothing
    assert _stopped_by_time(cfg, trainer) is None
    trainer.global_step = 7
    monkeypatch.setattr(timer, "time_remaining", lambda *args: 1.0)  # stopped by something else
    assert _stopped_by_time(cfg, trainer) is None


@pytest.mark.slow
def test_a_run_stopped_before_its_first_validation_fails_rather_than_testing_an_unchosen_model(make_cfg, tmp_path,
                                                                                              monkeypatch):
    import lightning as L

    from fmnist.training import train as train_module

    limit = "stopped by trainer.max_time (00:00:00:01) at step 1 of 6"
    monkeypatch.setattr(train_module, "_stopped_by_time", lambda cfg, trainer: limit if trainer.should_stop else None)

    class StopAtFirstStep(L.Callback):  # as a time limit that runs out in the first epoch
        def on_train_batch_end(self, trainer, *args):
            trainer.should_stop = True

    with pytest.raises(ConfigError, match="before its first validation, so no model was chosen and none was tested"):
        train(make_cfg("model=simple", "trainer.max_epochs=2", "trainer.check_val_every_n_epoch=2"), tmp_path,
              callbacks=[StopAtFirstStep()])
    record = read_record(tmp_path)
    assert record["status"] == "failed" and "metrics" not in record
    assert record["stopped_by"] == limit  # the record says what stopped it


def _fake_trainer(steps: int, batch: int, val_images: int, epochs: int):
    from types import SimpleNamespace
    return SimpleNamespace(current_epoch=0, max_epochs=epochs, num_training_batches=steps, num_val_batches=[1],
                           train_dataloader=SimpleNamespace(batch_size=batch),
                           val_dataloaders=SimpleNamespace(batch_size=val_images),
                           strategy=SimpleNamespace(root_device=torch.device("cpu")))


def test_forecast_extrapolates_the_timed_steps_to_all_epochs_with_validation(monkeypatch, caplog):
    """0.1 s per step of 10 images, 100 steps and 300 validation images (a third of the cost each):
    10 s + 1 s per epoch; the first step's one-off cost (5 s here) stays out of the rate."""
    from fmnist.training import epochs
    clock = iter([0.0, 0.0, 5.0, *(5.0 + 0.1 * i for i in range(1, 100))])
    monkeypatch.setattr(epochs.time, "perf_counter", lambda: next(clock))
    trainer = _fake_trainer(steps=100, batch=10, val_images=300, epochs=3)
    forecast = epochs.Forecast(heartbeat_s=None, min_steps=5, min_seconds=2.0)
    forecast.on_train_start(trainer, None)
    forecast.on_train_epoch_start(trainer, None)
    batch = (torch.zeros(10, 1, 28, 28), torch.zeros(10))
    with caplog.at_level("INFO", logger="fmnist.training.epochs"):
        for i in range(99):
            forecast.on_train_batch_end(trainer, None, None, batch, i)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["3 epochs x ~11 s = ~33 s on this CPU (from the first steps' speed)"], lines


@pytest.mark.parametrize("seconds,text", [(42, "42 s"), (95 * 20, "32 min"), (3 * 3600 + 600, "3.2 h")])
def test_durations_read_as_a_person_says_them(seconds, text):
    from fmnist.training.epochs import duration
    assert duration(seconds) == text


def test_an_epoch_line_says_what_the_epoch_measured_and_how_long_is_left():
    from fmnist.training.epochs import epoch_line
    row = {"epoch": 3, "train/loss": 0.3, "train/acc": 0.9, "val/loss": 0.31, "val/acc": 0.89, "val/acc_best": 0.895}
    assert epoch_line(row, 20, 60) == ("epoch 3/20: train loss 0.3000 acc 90.00% | val loss 0.3100 acc 89.00% "
                                       "(best 89.50%) | 60 s, ~17 min left")
    unvalidated = {k: v for k, v in row.items() if not k.startswith("val/")}
    assert epoch_line(unvalidated, 3, 60) == "epoch 3/3: train loss 0.3000 acc 90.00% | no validation this epoch | 60 s"
    assert epoch_line(row, -1, 60).startswith("epoch 3: ")  # no bound on the epochs: nothing is left to count


@pytest.mark.slow
def test_a_run_without_a_bar_forecasts_once_and_shows_life_inside_epochs_and_the_test(make_cfg, tmp_path, caplog):
    from fmnist.training.epochs import Forecast
    with caplog.at_level("INFO"):
        train(make_cfg("model=simple", "trainer.max_epochs=2", "trainer.enable_model_summary=true"), tmp_path,
              callbacks=[Forecast(heartbeat_s=0)])
    lines = [r.getMessage() for r in caplog.records]
    forecasts = [line for line in lines if " epochs x ~" in line]
    assert len(forecasts) == 2 and all(line.startswith("2 epochs x ~") for line in forecasts), forecasts  # ours and the run's
    assert any(line.startswith("epoch 2/2: step 2/2, ") and "img/s, loss " in line for line in lines), lines
    assert any(line.startswith("test: batch 1/1, done in ~") for line in lines), lines
    assert any(line.startswith("model simple: ") and "MFLOP per training image" in line for line in lines), lines


@pytest.mark.parametrize("loss,steps,diverged", [(2.3, 500, False), (99.0, 500, False), (1.8e16, 500, True),
                                                 (float("nan"), 1, True), (float("inf"), 1, True),
                                                 (117.0, 2, False)])  # a 2-step smoke run: batch norm unsettled
def test_an_absurd_loss_counts_as_a_divergence(loss, steps, diverged):
    from fmnist.training.callbacks import loss_diverged
    assert loss_diverged(loss, steps) is diverged


@pytest.mark.slow
def test_adam_at_an_absurd_learning_rate_is_recorded_diverged_not_completed(make_cfg, tmp_path):
    with pytest.raises(DivergedError):
        # Past JUDGE_AFTER_STEPS: 4 epochs of 16 steps
        run_job(make_cfg("model=simple", "optim.lr=1000", "trainer.precision=32-true", "trainer.limit_train_batches=null",
                         "trainer.max_epochs=4"), tmp_path)
    assert read_record(tmp_path)["status"] == "diverged"


def test_the_hparams_row_holds_the_keys_that_differ_between_runs_of_one_log_directory(make_cfg):
    from fmnist.training.trackers import hparams_row

    row = hparams_row(make_cfg("optim.lr=0.01", "data.augment.hflip=true"), ["optim.lr=0.01",
                      "data.augment.hflip=true", "trainer.accelerator=cpu"], "32-true")
    assert list(row)[:2] == ["optim.lr", "data.augment.hflip"] and "trainer.accelerator" not in row
    for key in ("data.train_subset", "trainer.max_epochs", "tta", "optim.ema_decay", "seed", "precision"):
        assert key in row and isinstance(row[key], (int, float, str, bool)), key
    assert row["data.train_subset"] == "null"


def test_fast_path_is_ignored_on_a_cpu_with_one_log_line(make_cfg, tmp_path, caplog):
    """fast_path captures CUDA graphs; on a CPU the run says so once and trains exactly as without it."""
    deterministic = ["model=simple", "trainer.deterministic=true", "trainer.precision=32-true"]
    with caplog.at_level(logging.INFO, logger="fmnist"):
        fast = train(make_cfg(*deterministic, "fast_path=true"), tmp_path / "fast")
    lines = [r.getMessage() for r in caplog.records if "fast_path=" in r.getMessage()]
    assert len(lines) == 1 and "ignored on cpu" in lines[0]
    plain = train(make_cfg(*deterministic), tmp_path / "plain")
    assert fast["val/acc_best"] == plain["val/acc_best"] and fast["test/acc"] == plain["test/acc"]
    weights = [torch.load(tmp_path / run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
               for run in ("fast", "plain")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[1])


def test_a_training_step_keeps_its_loss_and_accuracy_in_a_few_device_operations_and_reads_none():
    """Per step the training metrics are sums on the device; torchmetrics' per-step updates took about 20
    operations (and as much host time as a small model's whole step on a GPU)."""
    from dataclasses import asdict

    from fmnist.config import OptimConfig

    torch.manual_seed(0)
    module = LitClassifier(model=OmegaConf.to_container(compose_cfg("model=simple").model), optim=asdict(OptimConfig()))
    images, labels = make_images(32, 0)
    batch = (torch.from_numpy(images).float().unsqueeze(1) / 255, torch.from_numpy(labels))
    module.on_train_epoch_start()
    with TensorOps() as loss_alone:
        module._loss(batch)
    with TensorOps() as step:
        loss = module.training_step(batch, 1)
    assert step.ops - loss_alone.ops <= 5 and step.reads == 0, (step.ops, loss_alone.ops, step.reads)
    assert module.training_images == 32 and module.training_sums[0].item() == pytest.approx(32 * loss.item())


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["32-true", "bf16-true"])  # bf16-true converts the module's float states too
def test_each_epochs_training_loss_and_accuracy_are_those_of_its_steps_also_of_an_epoch_cut_short(make_cfg, tmp_path,
                                                                                                  monkeypatch, precision):
    """epochs.csv's train/loss and train/acc: the image-weighted mean of the epoch's step losses and the share of its
    images classified right, the second epoch stopped after 3 of its 5 steps (as max_time stops one); and the best
    validation accuracy, the largest of the epochs', in fp32 whatever the precision."""
    import lightning as L

    steps, loss_of = [], LitClassifier._loss

    def recorded(self, batch, tta="none"):
        loss, logits, y = loss_of(self, batch, tta)
        if self.training:
            steps.append((self.current_epoch, loss.item() * len(y), (logits.argmax(1) == y).sum().item(), len(y)))
        return loss, logits, y

    class StopInSecondEpoch(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            trainer.should_stop = trainer.should_stop or (trainer.current_epoch == 1 and batch_idx == 2)

    monkeypatch.setattr(LitClassifier, "_loss", recorded)
    metrics = train(make_cfg("model=simple", "trainer.max_epochs=3", "trainer.limit_train_batches=5",
                             f"trainer.precision={precision}"), tmp_path, callbacks=[StopInSecondEpoch()])
    epochs = pd.read_csv(tmp_path / "epochs.csv")
    assert epochs["epoch"].tolist() == [1, 2] and [sum(s[0] == e for s in steps) for e in (0, 1)] == [5, 3]
    for e, row in epochs.iterrows():
        loss_sum, correct, images = (sum(s[i] for s in steps if s[0] == e) for i in (1, 2, 3))
        assert row["train/loss"] == pytest.approx(loss_sum / images, abs=2e-6)
        assert row["train/acc"] == pytest.approx(correct / images, abs=2e-6)
    assert metrics["val/acc_best"] == pytest.approx(epochs["val/acc"].max(), abs=2e-6)


@pytest.mark.slow
@pytest.mark.parametrize("settings", [["trainer.precision=bf16-true"], ["optim.ema_decay=0.9"],
                                      ["trainer.precision=bf16-true", "optim.ema_decay=0.9"]],
                         ids=["bf16-true", "ema", "bf16-true with ema"])
def test_a_resume_keeps_the_best_validation_accuracy_so_far_exactly(make_cfg, tmp_path, settings):
    # bf16-true converts the whole module after the checkpoint is restored, torchmetrics' states with it: the best
    # so far would come back rounded to bf16's 8 bits (0.1 as 0.1001), and with it val/acc_best and the epoch it
    # names. With an EMA, the checkpoint's `state_dict` is the averaged copy's, whose best is never set.
    import lightning as L

    settings = ["model=simple", "data.eval_batch_size=100", *settings]  # k/100: few are bf16 numbers
    best = torch.tensor(train(make_cfg(*settings), tmp_path)["val/acc_best"])
    assert "trainer.precision=bf16-true" not in settings or best.item() != best.to(torch.bfloat16).item()

    class BestAtStart(L.Callback):
        def on_train_start(self, trainer, pl_module):
            self.best = pl_module.val_acc_best.max_value.clone()

    seen = BestAtStart()
    train(make_cfg(*settings, "trainer.max_epochs=2", "ckpt_path=last"), tmp_path, callbacks=[seen])
    assert seen.best.dtype == torch.float32 and seen.best.item() == best.float().item()


@pytest.mark.parametrize("path", ["outputs/runs/a", "outputs/a b", "it's", "ü dir", "a\\b", "ends in \\", "a\\'b",
                                  "outputs/seed=0,lr=1"])
def test_a_run_directory_quoted_for_the_resume_command_reads_back_as_itself(path):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from fmnist.overrides import hydra_quote

    parsed = OverridesParser.create().parse_override(f"hydra.run.dir={hydra_quote(path)}")
    assert parsed.value() == path


def test_the_records_validation_figures_come_from_epochs_csv_whatever_it_holds(tmp_path):
    from fmnist.training.train import _validations

    assert _validations(tmp_path) == (None, None)  # no epoch finished
    (tmp_path / "epochs.csv").write_text("")
    assert _validations(tmp_path) == (None, None)
    (tmp_path / "epochs.csv").write_text("epoch,val/loss,val/acc\n1,0.5,0.8\n2,0.4,0.9\n3,,\n")
    assert _validations(tmp_path) == (2, 0.4)  # the last validated epoch's loss, not the unvalidated third's
    (tmp_path / "epochs.csv").write_text("epoch,val/acc\n1,0.8\n")  # a file of an older version
    assert _validations(tmp_path) == (1, None)


@pytest.mark.slow
def test_a_compiled_network_is_compiled_before_training_and_trains_as_an_uncompiled_one(make_cfg, tmp_path,
                                                                                       monkeypatch):
    """`compile=true`: every compilation happens before the first epoch starts (outside train_seconds), and the
    warm-up leaves nothing behind: the same weights, batch-norm statistics and dropout draws as without compiling.
    Compiled with torch.compile's "eager" backend (dynamo traces, recompiles per shape and mode as with inductor,
    without generating code, which takes minutes on a CPU)."""
    import lightning as L

    compiled, compile_of = [], torch.nn.Module.compile

    def counted(gm, example_inputs):
        compiled.append(gm)
        return gm.forward

    class CompilationsByEpochStart(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 0:
                self.at_first_epoch = len(compiled)

        def on_train_end(self, trainer, pl_module):
            self.at_fit_end = len(compiled)  # the test's batches come after, outside train_seconds

    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kwargs: compile_of(self, backend=counted))
    torch._dynamo.reset()
    try:
        deterministic = ["model=optimized", "model.dropout=0.3", "data.augment.shift=2", "trainer.deterministic=true",
                         "trainer.precision=32-true", "trainer.limit_val_batches=4", "trainer.max_epochs=2",
                         "optim.ema_decay=0.9"]
        seen = CompilationsByEpochStart()
        metrics = train(make_cfg(*deterministic, "compile=true"), tmp_path / "compiled", callbacks=[seen])
    finally:
        torch._dynamo.reset()
    assert seen.at_first_epoch >= 2 and seen.at_fit_end == seen.at_first_epoch  # train and eval mode; none in the fit
    assert metrics["warmup_seconds"] >= 0 and read_record(tmp_path / "compiled")["metrics"]["warmup_seconds"] >= 0
    plain = train(make_cfg(*deterministic), tmp_path / "plain")
    assert "warmup_seconds" not in plain
    assert metrics["val/acc_best"] == plain["val/acc_best"] and metrics["test/acc"] == plain["test/acc"]
    weights = [torch.load(tmp_path / run / "checkpoints" / "last.ckpt", weights_only=True)
               for run in ("compiled", "plain")]
    for key in ("state_dict", "current_model_state"):
        assert weights[0][key].keys() == weights[1][key].keys()
        for name in weights[1][key]:
            assert torch.equal(weights[0][key][name], weights[1][key][name]), (key, name)
