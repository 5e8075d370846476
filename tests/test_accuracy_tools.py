"""Accuracy tools: weight EMA, test-time augmentation, batched augmentations."""

import json
import logging
import re
import shutil

import lightning as L
import pandas as pd
import pytest
import torch
from lightning.pytorch.plugins.precision import Precision

from fmnist.data.augment import augment, cutmix
from fmnist.data.csv_io import write_csv
from fmnist.data.datamodule import FashionMNISTDataModule
from fmnist.errors import CheckpointError, ConfigError
from fmnist.inference.evaluate import evaluate
from fmnist.models import tta_logits
from fmnist.training.averaging import WeightEMA
from fmnist.training.train import train
from tests.conftest import TensorOps, build, compose_named, make_images, snapshot

EMA = ["model=simple", "optim.ema_decay=0.5", "trainer.deterministic=true", "trainer.precision=32-true"]


def _net():
    torch.manual_seed(0)
    return build("resnet", widths=[8, 16], blocks=[1, 1]).eval()


@torch.no_grad()
def test_tta_of_a_flip_and_shift_invariant_image_equals_the_plain_logits():
    net = _net()
    symmetric = torch.rand(4, 1, 28, 14)
    symmetric = torch.cat([symmetric, symmetric.flip(-1)], dim=-1)
    assert torch.equal(tta_logits(net, symmetric, "flip"), tta_logits(net, symmetric, "none"))
    constant = torch.full((4, 1, 28, 28), 0.3)  # unchanged by a flip and by a one-pixel shift with edges replicated
    assert torch.allclose(tta_logits(net, constant, "flip_shift"), net(constant), atol=1e-6)
    # ...while an ordinary image's views disagree, so the comparisons above could fail
    x = torch.rand(4, 1, 28, 28)
    plain, flip, flip_shift = (tta_logits(net, x, m) for m in ("none", "flip", "flip_shift"))
    assert not torch.allclose(plain, flip) and not torch.allclose(flip, flip_shift)
    assert torch.allclose(flip, (net(x) + net(x.flip(-1))) / 2)


@torch.no_grad()
def test_tta_reads_each_views_logits_before_the_next_call_overwrites_them():
    """A network in CUDA graphs (fast_path) returns one output buffer, overwritten at its next call."""
    net = _net()

    class OneOutputBuffer:
        buffer = None

        def __call__(self, x):
            y = net(x)
            self.buffer = y.clone() if self.buffer is None else self.buffer.copy_(y)
            return self.buffer

    x = torch.rand(4, 1, 28, 28)
    for mode in ("flip", "flip_shift"):
        assert torch.allclose(tta_logits(OneOutputBuffer(), x, mode), tta_logits(net, x, mode), atol=1e-6), mode


@pytest.mark.slow
@pytest.mark.parametrize("tta", ["none", "flip_shift"])
def test_training_runs_with_tta_on_and_off_and_evaluate_reproduces_its_test(make_cfg, tmp_path, tta):
    metrics = train(make_cfg("model=resnet", "model.widths=[8,16]", "model.blocks=[1,1]", f"tta={tta}",
                             "data.eval_batch_size=1000"), tmp_path)
    assert 0.0 <= metrics["test/acc"] <= 1.0 and metrics["val/acc_best"] > 0
    again = evaluate(compose_named("evaluate", f"ckpt={tmp_path}", "data.batch_size=1000"), tmp_path / "evaluation")
    assert again["tta"] == tta  # by default an evaluation uses the run's own TTA...
    # ...and scores the 200 test images as the run's own test did (its smoke test is 1 batch of 1000)
    assert again["metrics"]["accuracy"] == pytest.approx(metrics["test/acc"], abs=1e-6)


@pytest.mark.slow
def test_bad_tta_ema_and_bias_lr_values_are_refused(make_cfg, tmp_path):
    with pytest.raises(ConfigError, match="config key tta must be one of"):
        train(make_cfg("model=simple", "tta=mirror"), tmp_path / "a")
    with pytest.raises(ConfigError, match="optim.ema_decay must be in"):
        train(make_cfg("model=simple", "optim.ema_decay=1.0"), tmp_path / "b")
    with pytest.raises(ConfigError, match="optim.bias_lr_scale must be positive"):
        train(make_cfg("model=simple", "optim.bias_lr_scale=0"), tmp_path / "c")


class WeightsSeenByTest(L.Callback):
    def on_test_start(self, trainer, pl_module):
        self.weights = {k: v.clone() for k, v in pl_module.state_dict().items() if k.startswith("net.")}


@pytest.mark.slow
def test_ema_weights_are_the_ones_checkpointed_and_tested(make_cfg, tmp_path):
    probe = WeightsSeenByTest()
    train(make_cfg(*EMA), tmp_path, callbacks=[probe])
    ckpt = torch.load(next((tmp_path / "checkpoints").glob("best-*.ckpt")), weights_only=True)
    averaged, raw = ckpt["state_dict"], ckpt["current_model_state"]
    assert any(not torch.equal(averaged[k], raw[k]) for k in probe.weights)  # two different sets of weights...
    for k, tested in probe.weights.items():  # ...and the test scored the averaged one
        assert torch.equal(tested, averaged[k]), k


@pytest.mark.slow
def test_ema_survives_a_resume(make_cfg, tmp_path):
    """1 epoch, then resumed for a 2nd, ends with the averaged weights of 2 uninterrupted epochs.

    Were the average restarted from the raw weights on resume, the two would differ.
    """
    train(make_cfg(*EMA, "trainer.max_epochs=2"), tmp_path / "whole")
    train(make_cfg(*EMA), tmp_path / "resumed")
    train(make_cfg(*EMA, "trainer.max_epochs=2", "ckpt_path=last"), tmp_path / "resumed")
    whole, resumed = (torch.load(tmp_path / d / "checkpoints" / "last.ckpt", weights_only=True)
                      for d in ("whole", "resumed"))
    for key in ("state_dict", "current_model_state"):
        for name, value in whole[key].items():
            if name.startswith("net."):
                assert torch.equal(value, resumed[key][name]), (key, name)


@pytest.mark.slow
def test_a_resume_whose_average_cannot_be_restored_is_refused_before_its_record_changes(make_cfg, tmp_path):
    train(make_cfg(*EMA), tmp_path)
    last = tmp_path / "checkpoints" / "last.ckpt"
    good = torch.load(last, weights_only=True)
    head = next(k for k in good["current_model_state"] if k.startswith("net.") and k.endswith("bias"))
    for damage, words in [({"averaging_state": {}}, r"its `averaging_state` cannot be restored \(RuntimeError"),
                          ({"current_model_state": {**good["current_model_state"], head: torch.zeros(3)}},
                           r"its `current_model_state` cannot be restored \(RuntimeError"),
                          ({"current_model_state": {**good["current_model_state"],
                                                    head: torch.full_like(good["current_model_state"][head], float("inf"))}},
                           f"its `current_model_state` holds NaN or infinite weights \\(e.g. {head}\\)")]:
        torch.save({**good, **damage}, last)
        before = snapshot(tmp_path)
        with pytest.raises(CheckpointError, match=f"last.ckpt: cannot resume from it: {words}"):
            train(make_cfg(*EMA, "trainer.max_epochs=2", "ckpt_path=last"), tmp_path)
        assert snapshot(tmp_path) == before


def test_the_ema_reads_its_step_count_once_per_fit_not_at_every_step(make_cfg, tmp_path, monkeypatch):
    syncs, calls, update = TensorOps(), [], WeightEMA.on_train_batch_end

    def counted(self, *args):
        calls.append(1)
        with syncs:
            update(self, *args)

    monkeypatch.setattr(WeightEMA, "on_train_batch_end", counted)
    train(make_cfg(*EMA, "trainer.max_epochs=2"), tmp_path)
    assert len(calls) >= 4 and syncs.reads <= 1  # was 2 per step: AveragedModel.update_parameters reads it twice


def test_the_ema_update_matches_torchs_averaged_model():
    from torch.optim.swa_utils import AveragedModel

    from dataclasses import asdict

    from omegaconf import OmegaConf

    from fmnist.config import OptimConfig
    from fmnist.training.averaging import ema_with_warmup
    from fmnist.training.module import LitClassifier

    torch.manual_seed(0)
    module = LitClassifier(model=OmegaConf.to_container(compose_named("train", "model=simple").model),
                           optim=asdict(OptimConfig()))
    ema = WeightEMA(0.9)
    ema.setup(None, module, "fit")
    reference = AveragedModel(module, multi_avg_fn=ema_with_warmup(0.9), use_buffers=True)
    for _ in range(4):  # the first update copies; the next ones average, batch-norm step counters copied
        with torch.no_grad():
            for tensor in [*module.parameters(), *module.buffers()]:
                tensor.add_(torch.randn_like(tensor.float()).to(tensor.dtype) if tensor.is_floating_point() else 1)
        ema.update_average(module)
        reference.update_parameters(module)
    mine, theirs = ema._average_model.state_dict(), reference.state_dict()
    assert mine.keys() == theirs.keys() and int(mine["n_averaged"]) == 4
    for name in mine:
        assert torch.equal(mine[name], theirs[name]), name


@pytest.mark.parametrize("options", [dict(flip=True), dict(max_shift=2), dict(erase_p=0.5),
                                     dict(flip=True, max_shift=2, erase_p=0.5)])
def test_each_augmentation_keeps_shape_range_and_is_seeded(options):
    x = torch.rand(64, 1, 28, 28)
    torch.manual_seed(1)
    out = augment(x, **options)
    torch.manual_seed(1)
    again = augment(x, **options)
    torch.manual_seed(2)
    other = augment(x, **options)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert torch.equal(out, again) and not torch.equal(out, other) and not torch.equal(out, x)


def test_augmentation_changes_images_never_labels(data_dir):
    dm = FashionMNISTDataModule(dir=str(data_dir), val_size=100, batch_size=64, seed=0,
                                augment={"hflip": True, "shift": 2, "erase": 0.5})
    dm.setup("fit")
    images, labels = next(iter(dm.train_dataloader()))
    dm.trainer = type("T", (), {"training": True, "precision_plugin": Precision()})()  # a training fit's, in fp32
    x, y = dm.on_after_batch_transfer((images, labels.clone()), 0)
    assert torch.equal(y, labels) and x.shape == images.shape and x.dtype == torch.float32
    plain = images.float() / 255
    assert not torch.equal(x, plain)


def test_cutmix_targets_give_each_label_the_share_of_pixels_it_shows():
    labels = torch.arange(10)
    x = (labels + 1).float().view(10, 1, 1, 1).expand(10, 1, 28, 28).contiguous()  # image i is all i + 1
    torch.manual_seed(0)
    mixed, target = cutmix(x, labels, p=1.0)
    assert mixed.shape == x.shape and target.shape == (10, 10)
    assert torch.allclose(target.sum(1), torch.ones(10))
    for i in range(10):
        share = torch.bincount(mixed[i].flatten().long() - 1, minlength=10).float() / (28 * 28)
        assert torch.allclose(target[i], share), i  # every pixel's source image is its label
    assert (target.max(1).values < 1).sum() >= 5  # most images got a piece of another
    torch.manual_seed(0)
    again, _ = cutmix(x, labels, p=1.0)
    same, one_hot = cutmix(x, labels, p=0.0)
    assert torch.equal(again, mixed) and torch.equal(same, x) and torch.equal(one_hot, torch.eye(10))


@pytest.mark.slow
def test_a_run_with_cutmix_trains_validates_and_tests(make_cfg, tmp_path):
    # Mixed (B, classes) targets reach the loss and the training accuracy only: validation and test
    # would fail on them.
    metrics = train(make_cfg("model=simple", "data.augment.cutmix=0.5"), tmp_path)
    assert 0.0 <= metrics["val/acc_best"] <= 1.0 and 0.0 <= metrics["test/acc"] <= 1.0
    assert 0.0 <= pd.read_csv(tmp_path / "epochs.csv")["train/acc"].iloc[-1] <= 1.0


@pytest.mark.slow
def test_eval_tricks_scores_raw_and_averaged_weights_on_validation(make_cfg, tmp_path, data_dir, capsys):
    from fmnist.inference.tricks import compare
    from fmnist.results.__main__ import main
    from fmnist.results.compare import tricks_markdown

    whole = "data.eval_batch_size=1000"  # the runs validate the whole split, as eval_tricks scores it
    metrics = train(make_cfg(*EMA, whole), tmp_path / "ema" / "seed=0", overrides=[*EMA, whole])
    train(make_cfg("model=simple", whole), tmp_path / "plain" / "seed=0", overrides=["model=simple", whole])
    table = compare([tmp_path / "ema"]).set_index(["weights", "tta"])
    assert list(table.index) == [(w, t) for w in ("raw", "ema") for t in ("none", "flip", "flip_shift")]
    # the averaged weights without TTA are what the run itself validated (and selected on)
    assert table.loc[("ema", "none"), "val_acc_mean"] == pytest.approx(metrics["val/acc_best"], abs=1e-6)
    assert table.loc[("raw", "none"), "change_mean"] == 0.0 and (table.n == 1).all()
    (tmp_path / "plain" / "seed=1" / ".hydra").mkdir(parents=True)  # a job that never finished: not evaluated
    plain = compare([tmp_path / "plain"])
    assert set(plain.weights) == {"raw"} and len(plain) == 3 and (plain.n == 1).all()  # no EMA: one set of weights
    shutil.rmtree(tmp_path / "plain" / "seed=1")
    # A copy of a sweep given beside it would count its seeds twice: refused before any evaluation.
    shutil.copytree(tmp_path / "plain", tmp_path / "copy" / "plain")
    pooled_twice = r"the directories given: jobs .*copy/plain/seed=0, .*plain/seed=0 are the same setting with seed 0; "
    with pytest.raises(ConfigError, match=pooled_twice + r".* Give the sweeps without their copies"):
        compare([tmp_path / "plain", tmp_path / "copy" / "plain"])
    shutil.copytree(tmp_path / "plain" / "seed=0", tmp_path / "copy" / "plain" / "copy_of_seed0")  # inside a sweep too
    with pytest.raises(ConfigError, match=r"jobs copy_of_seed0, seed=0 are the same setting with seed 0"):
        compare([tmp_path / "copy" / "plain"])
    # Another seed in a sweep of the same name elsewhere is pooled: its runs are keyed by their paths.
    train(make_cfg("model=simple", "seed=1", whole), tmp_path / "other machine" / "plain" / "seed=1",
          overrides=["model=simple", "seed=1", whole])
    both = compare([tmp_path / "plain", tmp_path / "other machine" / "plain"])
    assert (both.n == 2).all() and (both.change_mean == 0.0).all()  # two runs, each paired with itself
    # Run directories are taken one by one (one setting's jobs of a sweep of several), by the command too.
    runs = compare([tmp_path / "plain" / "seed=0", tmp_path / "other machine" / "plain" / "seed=1"])
    assert runs.equals(both)
    assert main(["tricks", str(tmp_path / "plain" / "seed=0")]) == 0 and "| raw | flip |" in capsys.readouterr().out
    # Runs of different settings are not averaged as if they were seeds of one (a learning-rate sweep's jobs, two
    # recipes), whatever their overrides say (an experiment's keys are not among them).
    with pytest.raises(ConfigError, match=r"the completed runs differ in optim.ema_decay, trainer.deterministic, "
                                          r"trainer.precision \(optim.ema_decay: 0.5, 0.0\), and the table's mean and "
                                          r"interval are over the seeds of one setting; nothing was evaluated. Give one "
                                          r"setting's runs: a sweep of its seeds, or its run directories \(.*ema/seed=0\)"):
        compare([tmp_path / "ema", tmp_path / "plain"])
    # A config.yaml emptied, or edited into a list: named, not left out of the check (its runs were pooled).
    config = tmp_path / "plain" / "seed=0" / "config.yaml"
    saved = config.read_text()
    for emptied, words in (("", "holds no config keys"), ("- a\n", "expected a mapping with a `data` section")):
        config.write_text(emptied)
        with pytest.raises(ConfigError, match=f"config.yaml: .*{re.escape(words)}"):
            compare([tmp_path / "ema", tmp_path / "plain"], data_dir)
    config.write_text(saved)
    with pytest.raises(ConfigError, match=r"its status is interrupted .*; tricks scores completed runs"):
        interrupted = shutil.copytree(tmp_path / "plain" / "seed=0", tmp_path / "interrupted" / "seed=0")
        record = json.loads((interrupted / "metrics.json").read_text())
        (interrupted / "metrics.json").write_text(json.dumps({**record, "status": "interrupted", "error": "Ctrl-C"}))
        compare([interrupted])
    assert "| ema | flip |" in tricks_markdown(table.reset_index())
    # --data-dir is for the runs' data moved elsewhere: another training CSV is refused before any evaluation
    moved, other = tmp_path / "moved", tmp_path / "other"
    shutil.copytree(data_dir, moved)
    shutil.copytree(data_dir, other)
    write_csv(other / "fashion-mnist_train.csv", *make_images(600, 9))
    assert (compare([tmp_path / "plain"], moved).n == 1).all()
    with pytest.raises(ConfigError, match=r"--data-dir .*other: its training CSV .*other/fashion-mnist_train.csv "
                                          r"\(SHA-1 [0-9a-f]{12}\) is not the one .*plain/seed=0 recorded"):
        compare([tmp_path / "plain"], other)
    # Nor is a run's own data directory trusted when its training CSV was rewritten since the run read it.
    rewritten = shutil.copytree(tmp_path / "plain", tmp_path / "rewritten" / "plain")
    config = rewritten / "seed=0" / "config.yaml"
    config.write_text(config.read_text().replace(f"dir: {data_dir}", f"dir: {other}"))
    with pytest.raises(ConfigError, match=r"the run's training CSV .*other/fashion-mnist_train.csv .* is not the one"):
        compare([rewritten])
    # Raw weights that are not finite (a damaged file) are named, not scored at chance beside the averaged ones.
    best = next((tmp_path / "ema" / "seed=0" / "checkpoints").glob("best-*.ckpt"))
    payload = torch.load(best, weights_only=True)
    name = next(k for k, v in payload["current_model_state"].items() if v.is_floating_point())
    payload["current_model_state"][name] = torch.full_like(payload["current_model_state"][name], float("nan"))
    torch.save(payload, best)
    with pytest.raises(CheckpointError, match=r"best-\S+\.ckpt: its raw weights \(current_model_state\) hold NaN"):
        compare([tmp_path / "ema"])


@pytest.mark.slow
@pytest.mark.parametrize("experiment", ["best", "cpu_best", "speedrun_gpu", "speedrun_gpu_95"])
def test_accuracy_recipes_train_on_a_cpu_for_a_few_batches(make_cfg, tmp_path, experiment, caplog):
    # The GPU recipes on a CPU: the same model, augmentations, EMA and TTA, on 2 batches of 4 (best's ResNet
    # takes 3 GFLOP to classify one image, and its TTA classifies 6 views of each).
    cfg = make_cfg(f"experiment={experiment}", "trainer.accelerator=cpu", "trainer.precision=32-true",
                   "data.batch_size=4", "data.eval_batch_size=4")
    with caplog.at_level(logging.WARNING, logger="fmnist.training.module"):
        metrics = train(cfg, tmp_path)
    # One epoch of a recipe whose warm-up is longer (best: 2 epochs) says that it never reaches its learning rate.
    said = [r.getMessage() for r in caplog.records if "is longer than trainer.max_epochs" in r.getMessage()]
    assert len(said) == (cfg.optim.warmup_epochs > cfg.trainer.max_epochs)
    assert not said or "reaches at most 50% of optim.lr" in said[0]
    if said:  # and epochs.csv shows the rate its last step trained with, not the next step's (75%)
        assert pd.read_csv(tmp_path / "epochs.csv").lr.iloc[-1] == pytest.approx(0.5 * cfg.optim.lr)
    assert 0.0 <= metrics["test/acc"] <= 1.0
    assert "current_model_state" in torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
