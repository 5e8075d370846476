"""evaluate.py, predict.py and export.py on a tiny model trained once (per module) on garment-like images."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image, ImageOps

from fmnist import CLASS_NAMES
from fmnist.data.csv_io import HEADER, load_csv, parse_csv, write_csv
from fmnist.errors import CheckpointError, ConfigError, DataError, StorageError
from fmnist.stops import Terminated
from fmnist.inference import evaluate as evaluate_module
from fmnist.inference import export as export_module
from fmnist.inference.evaluate import evaluate
from fmnist.inference.export import ExportFailed, export
from fmnist.inference.images import ImageRejected, load_image, to_dataset_format
from fmnist.inference.loading import DATAMODULE_STATE_KEY, LoadedModel, load_model, resolve
from fmnist.inference.config import check_export
from fmnist.inference.predict import predict
from fmnist.training.train import train
from fmnist.fsio import file_digest
from tests.conftest import FAST, compose_cfg, compose_named, import_script, snapshot


def garment_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Dataset-like images: a light 'garment' on black, full height and centred, its width and
    brightness set by the class (something to learn, and a background like Fashion-MNIST's)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    rng.shuffle(labels)
    images = np.zeros((n, 28, 28), np.uint8)
    for i, c in enumerate(labels):
        width = 8 + 2 * c
        left = (28 - width) // 2
        images[i, :, left:left + width] = rng.integers(60, 100, (28, width)) + 15 * c
    return images, labels


@pytest.fixture(scope="module")
def garments(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("garments")
    write_csv(d / "fashion-mnist_train.csv", *garment_images(600, 0))
    write_csv(d / "fashion-mnist_test.csv", *garment_images(200, 1))
    return d


@pytest.fixture(scope="module")
def run_dir(garments, tmp_path_factory) -> Path:
    """A finished run: 12 steps of the simple CNN, standardised inputs, tested in 4 batches of 64, in fp32
    (evaluate, predict and export compute in fp32, so that is what reproduces its test accuracy exactly)."""
    run = tmp_path_factory.mktemp("run")
    train(compose_cfg(*FAST, f"data.dir={garments}", "model=simple", "data.normalize=true", "optim.lr=0.003",
                      "trainer.limit_train_batches=12", "trainer.limit_test_batches=null",
                      "data.eval_batch_size=64", "trainer.precision=32-true"), run)
    return run


@pytest.mark.slow
def test_evaluate_reproduces_the_runs_test_accuracy(run_dir, tmp_path, capsys):
    before = snapshot(run_dir)
    record = evaluate(compose_named("evaluate", f"ckpt={run_dir}"), tmp_path / "eval")
    own = json.loads((run_dir / "metrics.json").read_text())["metrics"]
    m = record["metrics"]
    assert f"(run's own test/acc {own['test/acc']:.4%})" in capsys.readouterr().out
    assert m["n_images"] == 200 and abs(m["accuracy"] - own["test/acc"]) < 1e-6  # 1e-6 << one image (0.005)
    assert m["loss"] == pytest.approx(own["test/loss"], abs=1e-5)  # no label smoothing in this run
    ckpt = Path(record["checkpoint"]["path"])
    assert ckpt.parent == run_dir / "checkpoints" and ckpt.name.startswith("best-")
    assert record["checkpoint"]["sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert set(m["per_class"]) == set(CLASS_NAMES) and 0 <= m["ece"] <= 1 and 0 <= m["macro_f1"] <= 1
    cm = np.loadtxt(tmp_path / "eval" / "confusion_matrix.csv", delimiter=",")
    assert cm.sum() == 200 and np.trace(cm) / 200 == pytest.approx(m["accuracy"])
    assert (tmp_path / "eval" / "confusion_matrix.png").stat().st_size > 0
    assert snapshot(run_dir) == before, "the run's own files are never written"
    with pytest.raises(ConfigError, match="is not empty; an evaluation writes into a new directory"):
        evaluate(compose_named("evaluate", f"ckpt={run_dir}"), tmp_path / "eval")


@pytest.mark.slow
def test_an_evaluation_that_finds_anothers_results_written_meanwhile_keeps_them(run_dir, tmp_path, monkeypatch):
    from fmnist.inference import evaluate as module

    computed = module.classification_metrics

    def another_evaluation_finishes_meanwhile(logits, labels):
        (tmp_path / "eval" / "metrics.json").write_text('{"status": "completed"}')
        return computed(logits, labels)

    monkeypatch.setattr(module, "classification_metrics", another_evaluation_finishes_meanwhile)
    (tmp_path / "eval").mkdir()
    with pytest.raises(ConfigError, match="another evaluation wrote its results there while this one ran"):
        evaluate(compose_named("evaluate", f"ckpt={run_dir}"), tmp_path / "eval")
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == ["metrics.json"]
    # One writing there at this moment holds the directory's lock: this one is refused and writes nothing.
    from fmnist.training.rundir import RunDirInUse, own_run_dir

    monkeypatch.setattr(module, "classification_metrics", computed)
    with own_run_dir(tmp_path / "busy"), pytest.raises(RunDirInUse, match="busy is in use by"):
        evaluate(compose_named("evaluate", f"ckpt={run_dir}"), tmp_path / "busy")
    assert list((tmp_path / "busy").iterdir()) == []


@pytest.mark.slow
def test_an_evaluation_stopped_before_its_record_leaves_no_half_of_its_files(run_dir, tmp_path, monkeypatch):
    from fmnist.inference import evaluate as module

    def stopped(out_dir, record):
        raise KeyboardInterrupt  # as Ctrl-C or SIGTERM would, between the confusion matrix and the record

    monkeypatch.setattr(module, "write_record", stopped)
    with pytest.raises(KeyboardInterrupt):
        evaluate(compose_named("evaluate", f"ckpt={run_dir}"), tmp_path / "eval")
    assert list((tmp_path / "eval").iterdir()) == []  # so the same command can run there again


@pytest.mark.slow
def test_evaluate_with_tta_on_another_test_set(run_dir, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    write_csv(other / "fashion-mnist_test.csv", *garment_images(50, 7))
    plain = evaluate(compose_named("evaluate", f"ckpt={run_dir}", f"data.dir={other}"), tmp_path / "plain")
    own = json.loads((run_dir / "metrics.json").read_text())["metrics"]["test/acc"]
    # the run's own accuracy counted other images: said beside it, not offered as what this reproduces
    assert plain["run_tested_on_this_csv"] is False
    assert f"(run's own test/acc {own:.4%} on another test CSV)" in capsys.readouterr().out
    part = shutil.copytree(run_dir, tmp_path / "part")  # as if tested with trainer.limit_test_batches=1
    np.savetxt(part / "confusion_matrix.csv", np.diag([64] + [0] * 9), fmt="%d", delimiter=",")
    evaluate(compose_named("evaluate", f"ckpt={part}"), tmp_path / "part_eval")
    assert f"(run's own test/acc {own:.4%} on 64 of these images)" in capsys.readouterr().out
    # Its last checkpoint is another model than the best one the run tested.
    assert plain["run_tested_this_checkpoint"] is True
    last = evaluate(compose_named("evaluate", f"ckpt={run_dir / 'checkpoints' / 'last.ckpt'}"), tmp_path / "last")
    assert last["run_tested_this_checkpoint"] is False
    assert f"(run's own test/acc {own:.4%} of its best checkpoint, not this one)" in capsys.readouterr().out
    untested = shutil.copytree(run_dir, tmp_path / "untested")  # test=false: the run tested no checkpoint
    record = json.loads((untested / "metrics.json").read_text())
    del record["tested"], record["metrics"]["test/acc"], record["metrics"]["test/loss"]
    (untested / "metrics.json").write_text(json.dumps(record))
    assert evaluate(compose_named("evaluate", f"ckpt={untested}"), tmp_path / "u")["run_tested_this_checkpoint"] is None
    tta = evaluate(compose_named("evaluate", f"ckpt={run_dir}", f"data.dir={other}", "tta=flip"), tmp_path / "tta")
    assert (plain["tta"], tta["tta"]) == ("none", "flip") and tta["metrics"]["n_images"] == 50
    assert tta["data"]["test_csv"].startswith(str(other))
    assert tta["metrics"]["loss"] != plain["metrics"]["loss"]  # the flipped images count


@pytest.mark.slow
def test_a_sweep_directory_picks_the_best_job_by_validation_accuracy(run_dir, tmp_path, run_in_process):
    sweep = tmp_path / "sweep"
    # (val/acc_best, test/acc, status): the best on test and a failed job must not be chosen.
    for job, (val, test, status) in {"lr=a": (0.5, 0.99, "completed"), "lr=b": (0.9, 0.10, "completed"),
                                     "lr=c": (0.7, 0.50, "completed"), "lr=d": (1.0, 0.90, "failed")}.items():
        shutil.copytree(run_dir, sweep / job)
        record = json.loads((sweep / job / "metrics.json").read_text())
        record["status"] = status
        record["metrics"].update({"val/acc_best": val, "test/acc": test})
        (sweep / job / "metrics.json").write_text(json.dumps(record))
    resolved = resolve(sweep)
    assert resolved.run_dir == sweep / "lr=b" and resolved.path.parent == sweep / "lr=b" / "checkpoints"
    result = run_in_process("evaluate.py", f"ckpt='{sweep}'", f"hydra.run.dir={tmp_path / 'eval'}")
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert record["checkpoint"]["run_dir"] == str((sweep / "lr=b").resolve()) and "lr=b" in record["checkpoint"]["chosen"]
    lines = [line.split("] ", 1)[-1] for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert sum(record["checkpoint"]["chosen"] in line for line in lines) == 1, lines  # the choice is said once
    # Runs on other training CSVs validated on other images: their accuracies do not rank them.
    record = json.loads((sweep / "lr=c" / "metrics.json").read_text())
    record["data_digest"] = {**record["data_digest"], "train": "0" * 40}
    (sweep / "lr=c" / "metrics.json").write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match=r"its completed runs trained on different CSVs \(lr=a: training CSV "
                                              r"SHA-1 \w+, lr=c: 000000000000\).*nothing was chosen"):
        resolve(sweep)


@pytest.mark.slow
def test_a_sweep_jobs_directory_is_taken_by_ckpt_without_quotes(run_dir, tmp_path, run_in_process):
    # Its name holds `=` and `,`, which Hydra's grammar refused unquoted ("cannot read the override").
    job = tmp_path / "study" / "optim.lr=0.01,seed=1"
    shutil.copytree(run_dir, job)
    result = run_in_process("evaluate.py", f"ckpt={job}", f"hydra.run.dir={tmp_path / 'eval'}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["checkpoint"]["run_dir"] == str(job.resolve())


@pytest.mark.slow
def test_predict_on_pngs_agrees_with_evaluate(run_dir, tmp_path, monkeypatch):
    images, labels = garment_images(40, 1)
    pngs = tmp_path / "pngs"
    pngs.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(pngs / f"{i:02d}.png")
    data = tmp_path / "data"
    data.mkdir()
    write_csv(data / "fashion-mnist_test.csv", images, labels)
    evaluate(compose_named("evaluate", f"ckpt={run_dir}", f"data.dir={data}"), tmp_path / "eval")
    cm = np.loadtxt(tmp_path / "eval" / "confusion_matrix.csv", delimiter=",").astype(int)
    monkeypatch.setenv("HOME", str(tmp_path))  # out= takes `~`, as ckpt= and inputs= do
    rows = predict(compose_named("predict", f"ckpt={run_dir}", f"inputs=[{pngs}]", "top_k=2", "out='~/p.csv'"))
    assert (tmp_path / "p.csv").is_file()
    assert [Path(r["input"]).name for r in rows] == [f"{i:02d}.png" for i in range(40)]
    top1 = np.array([CLASS_NAMES.index(r["class_1"]) for r in rows])
    assert len(set(top1)) > 2, "a model that predicts one class would agree trivially"
    ours = np.zeros((10, 10), int)
    np.add.at(ours, (labels, top1), 1)
    assert (ours == cm).all(), "same top-1 per image as evaluate on the same images"
    written = (tmp_path / "p.csv").read_text().splitlines()
    assert written[0] == "input,class_1,prob_1,class_2,prob_2,class_id,label,error" and len(written) == 41
    assert all(r["prob_1"] >= r["prob_2"] for r in rows) and [r["class_id"] for r in rows] == top1.tolist()


@pytest.mark.slow
def test_a_white_background_photo_is_inverted_and_classified_the_same(run_dir, tmp_path):
    images, _ = garment_images(10, 3)
    originals, copies = [], []
    for i, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / f"orig{i}.png")
        # What a product photo looks like: dark garment on white, colour, larger than 28x28.
        big = np.kron(255 - image, np.ones((2, 2), np.uint8))
        Image.fromarray(np.stack([big] * 3, axis=-1)).save(tmp_path / f"white{i}.png")
        assert (load_image(tmp_path / f"white{i}.png") == image).all()
        originals.append(str(tmp_path / f"orig{i}.png"))
        copies.append(str(tmp_path / f"white{i}.png"))
    rows = predict(compose_named("predict", f"ckpt={run_dir}", f"inputs=[{','.join(originals + copies)}]"))
    assert [r["class_1"] for r in rows[:10]] == [r["class_1"] for r in rows[10:]]


def test_image_conversion_fits_the_garment_keeping_its_aspect_ratio():
    photo = np.full((300, 200), 240, np.uint8)  # light grey background
    photo[50:250, 60:160] = 30  # a dark 200x100 garment
    out = to_dataset_format(photo)
    rows, cols = np.flatnonzero(out.any(axis=1)), np.flatnonzero(out.any(axis=0))
    assert out.shape == (28, 28) and len(rows) == 28 and len(cols) == 14 and cols[0] == 7
    # Inverted (background 15, garment 225), then the background mapped to 0: (225 - 15) * 255 / 240 = 223.1
    assert out[0, 0] == 0 and out[14, 14] == 223
    with pytest.raises(ImageRejected, match="nothing but background"):
        to_dataset_format(np.full((50, 40), 255, np.uint8))


@pytest.mark.parametrize("level", [0, 100, 255])
def test_a_blank_28x28_image_is_refused_like_a_blank_image_of_any_other_size(level):
    # Every Fashion-MNIST image has a pixel of 254 or more: a blank one in the dataset's size is no garment either.
    for side in (28, 29):
        with pytest.raises(ImageRejected, match="nothing but background"):
            to_dataset_format(np.full((side, side), level, np.uint8))
    faint = np.zeros((28, 28), np.uint8)
    faint[10:18, 12:16] = 30  # a dim garment is still one, and taken as it is
    assert (to_dataset_format(faint) == faint).all()


@pytest.mark.parametrize("make,message", [
    (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40), "corrupt|not a readable"),
    (lambda p: p.write_bytes(b""), "empty file"),
    (lambda p: p.write_text("hello"), "not a readable"),
    (lambda p: Image.new("1", (10_000, 6_000)).save(p), "megapixels"),
    (lambda p: Image.new("L", (1000, 40)).save(p), "aspect ratio"),
])
def test_unusable_images_are_refused_with_a_reason(tmp_path, make, message):
    path = tmp_path / "x.png"
    make(path)
    with pytest.raises(ImageRejected, match=message):
        load_image(path)


@pytest.mark.slow
def test_predict_cli_reports_a_corrupt_png_and_goes_on(run_dir, tmp_path, run_in_process):
    images, _ = garment_images(3, 5)
    for i, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / f"ok{i}.png")
    (tmp_path / "broken.png").write_bytes((tmp_path / "ok0.png").read_bytes()[:60])
    no_label = tmp_path / "rows.csv"  # a Kaggle-format CSV without its label column
    no_label.write_text(",".join(HEADER[1:]) + "\n" + ",".join(map(str, images[0].ravel())) + "\n")
    out = tmp_path / "p.json"
    (tmp_path / "notes.txt").write_text("skipped: a directory contributes its images and CSVs only")
    # rows.csv is in the directory and named too: read once.
    result = run_in_process("predict.py", f"ckpt={run_dir}", f"inputs=[{tmp_path},{no_label},/dev/null]", f"out={out}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "2 of 6 inputs could not be used" in result.stderr and "broken.png" in result.stderr
    assert "/dev/null: not a regular file" in result.stderr  # there, but nothing to read an image from
    rows = {Path(r["input"]).name: r for r in json.loads(out.read_text())}
    assert len(rows) == 6 and rows["broken.png"]["error"] and not rows["broken.png"]["top_k"]
    assert all(len(rows[f"ok{i}.png"]["top_k"]) == 3 for i in range(3))
    assert rows["rows.csv:2"]["top_k"][0] == rows["ok0.png"]["top_k"][0] and rows["rows.csv:2"]["label"] is None


def test_inputs_that_all_fail_say_none_was_predicted_and_write_nothing(run_dir, tmp_path, run_in_process):
    # A file of errors alone made the corrected command need overwrite=true, and with it replaced good predictions.
    result = run_in_process("predict.py", f"ckpt={run_dir}", "inputs=/dev/null", f"out={tmp_path}/p.csv")
    assert result.returncode == 2 and "1 of 1 inputs could not be used" in result.stderr
    assert f"None was predicted; nothing was written to {tmp_path}/p.csv." in result.stderr
    assert "overwrite=true" not in result.stderr and "The other 0" not in result.stderr
    assert not (tmp_path / "p.csv").exists()
    images, _ = garment_images(2, 3)
    (tmp_path / "in").mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / "in" / f"{i}.png")
    out = tmp_path / "in" / "p.csv"  # among the inputs: a rerun does not read its own output as a CSV
    for overwrite in ("false", "true"):
        result = run_in_process("predict.py", f"ckpt={run_dir}", f"inputs=[{tmp_path / 'in'}]", f"out={out}",
                                f"overwrite={overwrite}")
        assert result.returncode == 0, result.stderr[-2000:]
        assert [r.split(",")[0] for r in out.read_text().splitlines()[1:]] == [str(tmp_path / "in" / f"{i}.png")
                                                                              for i in range(2)]
    written = out.read_bytes()
    result = run_in_process("predict.py", f"ckpt={run_dir}", "inputs=/dev/null", f"out={out}", "overwrite=true")
    assert result.returncode == 2 and out.read_bytes() == written  # the good predictions kept


def test_a_directory_input_follows_links_reads_a_linked_file_once_and_names_a_link_to_nothing(run_dir, tmp_path,
                                                                                               run_in_process):
    # A linked folder's images were passed over, as was a link to nothing, and a link to a file gave a second row.
    images, _ = garment_images(2, 4)
    (tmp_path / "other").mkdir()
    (tmp_path / "in").mkdir()
    Image.fromarray(images[0]).save(tmp_path / "other" / "a.png")
    Image.fromarray(images[1]).save(tmp_path / "in" / "b.png")
    (tmp_path / "in" / "linked").symlink_to(tmp_path / "other")
    (tmp_path / "in" / "loop").symlink_to(tmp_path / "in")  # a link back up: each real folder is read once
    (tmp_path / "in" / "c.png").symlink_to(tmp_path / "in" / "b.png")
    (tmp_path / "in" / "broken.png").symlink_to(tmp_path / "nowhere.png")
    (tmp_path / "in" / "loop.png").symlink_to(tmp_path / "in" / "loop.png")  # resolve() raised on it
    (tmp_path / "in" / "real").mkdir()  # reached through a link first in the walk's order: listed by its own path
    Image.fromarray(images[0]).save(tmp_path / "in" / "real" / "d.png")
    (tmp_path / "in" / "a_link").symlink_to(tmp_path / "in" / "real")
    result = run_in_process("predict.py", f"ckpt={run_dir}", f"inputs=[{tmp_path / 'in'}]", f"out={tmp_path}/p.csv")
    assert result.returncode == 2 and "2 of 5 inputs could not be used" in result.stderr, result.stderr[-2000:]
    assert f"{tmp_path / 'in' / 'broken.png'}: a link to nothing" in result.stderr
    rows = [r.split(",")[0] for r in (tmp_path / "p.csv").read_text().splitlines()[1:]]
    assert sorted(Path(r).name for r in rows) == ["a.png", "b.png", "broken.png", "d.png", "loop.png"]
    assert str(tmp_path / "in" / "real" / "d.png") in rows


def test_a_file_name_that_is_not_utf8_is_written_escaped_to_a_csv(run_dir, tmp_path, run_in_process):
    images, _ = garment_images(1, 5)
    (tmp_path / "in").mkdir()
    Image.fromarray(images[0]).save(tmp_path / "in" / "ok.png")
    os.rename(tmp_path / "in" / "ok.png", os.fsencode(tmp_path / "in") + b"/bad\xffname.png")  # bytes Linux allows
    result = run_in_process("predict.py", f"ckpt={run_dir}", f"inputs=[{tmp_path / 'in'}]", f"out={tmp_path}/p.csv")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "bad\\udcffname.png" in (tmp_path / "p.csv").read_text(encoding="utf-8")  # as the JSON escapes it


def test_csv_label_column_is_optional_only_where_asked(tmp_path):
    images, _ = garment_images(2, 0)
    path = tmp_path / "rows.csv"
    path.write_text(",".join(HEADER[1:]) + "\n" + "\n".join(",".join(map(str, im.ravel())) for im in images) + "\n")
    parsed, labels = parse_csv(path, require_label=False)
    assert labels is None and (parsed == images).all()
    with pytest.raises(Exception, match="expected a header with 785 columns"):
        parse_csv(path)


@pytest.mark.slow
def test_predict_config_errors(run_dir, tmp_path):
    with pytest.raises(ConfigError, match="config key top_k must be between 1 and 10; got 0"):
        predict(compose_named("predict", f"ckpt={run_dir}", "inputs=x.png", "top_k=0"))
    with pytest.raises(ConfigError, match="config key out must be null or a file name ending in .csv or .json"):
        predict(compose_named("predict", f"ckpt={run_dir}", "inputs=x.png", "out=p.txt"))
    for inputs in ("inputs=", "inputs=[a.png,'']"):  # an unset shell variable, not the whole working tree
        with pytest.raises(ConfigError, match="config key inputs must be paths that are not empty"):
            predict(compose_named("predict", f"ckpt={run_dir}", inputs))
    # `.json` alone names a hidden file without a suffix, which would be written as CSV
    for name in (tmp_path / ".json", tmp_path / "out" / ".csv"):
        with pytest.raises(ConfigError, match="config key out must be null or a file name ending in .csv or .json, "
                                              "with a name before it"):
            predict(compose_named("predict", f"ckpt={run_dir}", "inputs=x.png", f"out={name}"))
    with pytest.raises(ConfigError, match="config key out must be a file name ending in .onnx, with a name before it"):
        check_export(compose_named("export", f"ckpt={run_dir}", f"out={tmp_path / '.onnx'}"))


@pytest.mark.slow
def test_export_writes_one_file_that_agrees_with_pytorch(run_dir, garments, tmp_path, monkeypatch):
    import onnx
    import onnxruntime as ort

    out = tmp_path / "onnx" / "model.onnx"
    monkeypatch.setenv("HOME", str(tmp_path))  # out= takes `~`, as ckpt= does
    agreement = export(compose_named("export", f"ckpt={run_dir}", "out='~/onnx/model.onnx'"))
    assert agreement.ok and agreement.n_images == 200 and agreement.max_abs_diff <= 1e-3
    assert os.listdir(out.parent) == ["model.onnx"], "no external data file, no temporary left"
    model = onnx.load(str(out), load_external_data=False)
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    meta = {p.key: p.value for p in model.metadata_props}
    loaded = load_model(run_dir)
    assert json.loads(meta["class_names"]) == list(CLASS_NAMES) and meta["checkpoint_sha256"] == loaded.sha256
    (inp,), (outp,) = model.graph.input, model.graph.output
    assert inp.name == "images" and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert outp.name == "logits" and inp.type.tensor_type.shape.dim[0].dim_param  # a named, dynamic batch
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    images, _ = load_csv(garments / "fashion-mnist_test.csv")
    for n in (1, 7):  # any batch size, raw pixels in
        got = session.run(None, {"images": images[:n, None]})[0]
        want = loaded.logits(torch.from_numpy(images[:n, None])).numpy()
        assert got.shape == (n, 10) and np.abs(got - want).max() <= 1e-3
    assert "tta" not in json.loads(meta["model"]) and meta["tta"].startswith("none in this graph")

    # An existing output is refused before any work, replaced only when asked and only if export.py wrote it.
    before = out.read_bytes()
    with pytest.raises(ConfigError, match="already exists; nothing was written"):
        export(compose_named("export", f"ckpt={run_dir}", f"out={out}"))
    foreign = tmp_path / "onnx" / "notes.onnx"
    foreign.write_text("my own notes")
    with pytest.raises(ConfigError, match="export.py did not write"):
        export(compose_named("export", f"ckpt={run_dir}", f"out={foreign}", "overwrite=true"))
    assert out.read_bytes() == before and foreign.read_text() == "my own notes"
    assert export(compose_named("export", f"ckpt={run_dir}", f"out={out}", "overwrite=true")).ok
    assert sorted(os.listdir(out.parent)) == ["model.onnx", "notes.onnx"]


@pytest.mark.slow
def test_predict_never_replaces_a_file_it_did_not_write(run_dir, garments, tmp_path):
    record = run_dir / "metrics.json"
    before = record.read_bytes()
    test_csv = garments / "fashion-mnist_test.csv"
    (tmp_path / "folder.csv").mkdir()
    for out, overwrite, words in ((record, "true", "predict.py did not write"), (test_csv, "false", "already exists"),
                                  (tmp_path / "folder.csv", "false", "names a directory")):
        with pytest.raises(ConfigError, match=words):
            predict(compose_named("predict", f"ckpt={run_dir}", f"inputs=[{test_csv}]", f"out={out}",
                                  f"overwrite={overwrite}"))
    assert record.read_bytes() == before and os.listdir(tmp_path) == ["folder.csv"]
    for name in ("p.csv", "p.json"):  # its own output: refused without overwrite, replaced with it
        out = tmp_path / name
        predict(compose_named("predict", f"ckpt={run_dir}", f"inputs=[{test_csv}]", f"out={out}"))
        with pytest.raises(ConfigError, match="already exists"):
            predict(compose_named("predict", f"ckpt={run_dir}", f"inputs=[{test_csv}]", f"out={out}"))
        predict(compose_named("predict", f"ckpt={run_dir}", f"inputs=[{test_csv}]", f"out={out}", "overwrite=true"))


@pytest.mark.slow
def test_export_that_disagrees_fails_and_writes_nothing(run_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(export_module, "MIN_TOP1_AGREEMENT", 1.01)  # unreachable: the check must fail
    with pytest.raises(ExportFailed, match="not written: the exported model disagrees"):
        export(compose_named("export", f"ckpt={run_dir}", f"out={tmp_path / 'new' / 'dirs' / 'm.onnx'}"))
    assert os.listdir(tmp_path) == []  # nor the directories it made for it


@pytest.mark.slow
def test_checkpoints_without_stored_mean_std_recompute_them(run_dir, tmp_path):
    ckpt = resolve(run_dir).path
    payload = torch.load(ckpt, weights_only=True)
    stored = payload.pop(DATAMODULE_STATE_KEY)
    assert stored["std"] > 0 and stored["mean"] > 0
    torch.save(payload, tmp_path / "old.ckpt")
    old = load_model(tmp_path / "old.ckpt")
    assert (old.mean, old.std) == pytest.approx((stored["mean"], stored["std"]), abs=1e-12)


class Evil:
    def __reduce__(self):
        return (print, ("this would have run code",))


@pytest.fixture
def evil_ckpt(run_dir, tmp_path) -> Path:
    payload = torch.load(resolve(run_dir).path, weights_only=True)
    payload["extra"] = Evil()
    torch.save(payload, tmp_path / "evil.ckpt")
    return tmp_path / "evil.ckpt"


@pytest.mark.slow
def test_a_pickled_payload_is_refused_by_all_three(evil_ckpt, tmp_path, capsys):
    runs = {"evaluate": lambda: evaluate(compose_named("evaluate", f"ckpt={evil_ckpt}"), tmp_path / "eval"),
            "predict": lambda: predict(compose_named("predict", f"ckpt={evil_ckpt}", "inputs=x.png",
                                                     f"out={tmp_path / 'p.csv'}")),
            "export": lambda: export(compose_named("export", f"ckpt={evil_ckpt}", f"out={tmp_path / 'm.onnx'}"))}
    for name, run in runs.items():
        with pytest.raises(CheckpointError, match="refused to load: it holds pickled Python objects"):
            run()
    assert "this would have run code" not in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.ckpt"], "nothing written"


def test_the_cli_refuses_it_with_exit_2_and_one_paragraph(evil_ckpt, tmp_path, run_in_process):
    result = run_in_process("evaluate.py", f"ckpt={evil_ckpt}", f"hydra.run.dir={tmp_path / 'out'}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"error: {evil_ckpt}: refused to load: it holds pickled Python objects" in result.stderr
    assert "this would have run code" not in result.stdout + result.stderr
    assert not (tmp_path / "out").exists(), "the evaluation directory Hydra made is removed"
    (tmp_path / "mine").mkdir()  # one the user made beforehand stays
    assert run_in_process("evaluate.py", f"ckpt={evil_ckpt}", f"hydra.run.dir={tmp_path / 'mine'}").returncode == 2
    assert (tmp_path / "mine").is_dir()


def test_an_evaluation_stopped_by_sigterm_leaves_no_directory(run_dir, tmp_path, run_in_process, monkeypatch):
    def stopped(cfg, out_dir):
        raise Terminated  # what SIGTERM raises in evaluate.py (fmnist.stops.sigterm_unwinds), mid-evaluation

    monkeypatch.setattr(evaluate_module, "evaluate", stopped)
    result = run_in_process("evaluate.py", f"ckpt={run_dir}", f"hydra.run.dir={tmp_path / 'out'}")
    assert result.returncode == 143 and "error: stopped by SIGTERM" in result.stderr
    assert sorted(tmp_path.iterdir()) == []


def test_an_evaluation_that_fills_the_disk_is_one_paragraph_and_leaves_nothing(run_dir, tmpfs, run_in_process):
    disk = tmpfs("size=16k")  # room for the confusion matrix's CSV, not for its figure
    result = run_in_process("evaluate.py", f"ckpt={run_dir}", f"hydra.run.dir={disk / 'eval'}")
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.splitlines() == [f"error: cannot write {disk / 'eval' / 'confusion_matrix.png'}: the disk is "
                                          "full (No space left on device). Free some space or choose another place "
                                          "(hydra.run.dir=...); files already written are intact."], result.stderr
    assert list(disk.iterdir()) == []


@pytest.mark.parametrize("script, batch, lower", [("evaluate.py", None, "data.batch_size (64, the run's own "
                                                  "evaluation batch size)"),
                                                  ("evaluate.py", "data.batch_size=7", "data.batch_size (7)"),
                                                  ("predict.py", "batch_size=5", "batch_size (5)"),
                                                  ("export.py", "data.batch_size=9", "data.batch_size (9), the "
                                                   "batches that check the exported model")])
def test_an_inference_too_large_for_memory_is_one_paragraph_naming_its_batch_size(run_dir, garments, tmp_path,
                                                                                  run_in_process, monkeypatch, script,
                                                                                  batch, lower):
    def allocate_too_much(self, images, batch_size, tta="none"):
        return torch.empty(1 << 62, dtype=torch.uint8)  # the CPU allocator's own refusal

    monkeypatch.setattr(LoadedModel, "logits_batched", allocate_too_much)
    where = {"evaluate.py": f"hydra.run.dir={tmp_path / 'out'}", "predict.py": f"inputs=[{garments}]",
             "export.py": f"out={tmp_path / 'model.onnx'}"}[script]
    result = run_in_process(script, f"ckpt={run_dir}", where, *([batch] if batch else []))
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.splitlines()[-1] == ("error: this machine ran out of memory (an allocation of 4.00 EiB "
                                              f"failed): lower {lower}."), result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("batch, lower", [(None, "--batch-size (64, the run's own evaluation batch size)"),
                                          ("7", "--batch-size (7)")])
def test_results_tricks_too_large_for_memory_is_one_paragraph_naming_its_batch_size(run_dir, tmp_path, capsys,
                                                                                    monkeypatch, batch, lower):
    from fmnist.results.__main__ import main as results_main

    seen = []

    def allocate_too_much(self, images, batch_size, tta="none"):
        seen.append(batch_size)
        return torch.empty(1 << 62, dtype=torch.uint8)  # the CPU allocator's own refusal

    monkeypatch.setattr(LoadedModel, "logits_batched", allocate_too_much)
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "seed=0").symlink_to(run_dir)
    assert results_main(["tricks", str(tmp_path / "sweep"), *(["--batch-size", batch] if batch else [])]) == 2
    assert seen == [int(batch or 64)]
    assert capsys.readouterr().err.splitlines()[-1] == ("error: this machine ran out of memory (an allocation of "
                                                        f"4.00 EiB failed): lower {lower}.")


def test_export_whose_onnxruntime_check_runs_out_of_memory_is_one_paragraph(run_dir, tmp_path, run_in_process,
                                                                            monkeypatch):
    import onnxruntime
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail

    from tests.test_hardware import ONNXRUNTIME_OOM

    def refused(self, *args, **kwargs):
        raise Fail(ONNXRUNTIME_OOM)  # its own exception class, not a RuntimeError

    monkeypatch.setattr(onnxruntime.InferenceSession, "run", refused)
    result = run_in_process("export.py", f"ckpt={run_dir}", f"out={tmp_path / 'model.onnx'}", "data.batch_size=9")
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.splitlines()[-1] == ("error: this machine ran out of memory (an allocation of 5.61 GiB "
                                              "failed): lower data.batch_size (9), the batches that check the exported "
                                              "model."), result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("given, words", [(["outputs", "--batch-size", "0"], "'0': expected a whole number of 1 or more"),
                                          (["outputs", "--batch-size", "x"], "'x': expected a whole number of 1 or more"),
                                          (["--batch-size", "8", "--from-csv", "t.csv"], "--from-csv evaluates nothing")])
def test_results_tricks_refuses_a_batch_size_it_cannot_use(given, words, capsys):
    from fmnist.results.__main__ import main as results_main

    with pytest.raises(SystemExit) as stop:
        results_main(["tricks", *given])
    assert stop.value.code == 2 and words in capsys.readouterr().err


def test_results_tricks_names_a_run_without_a_best_checkpoint_without_suggesting_ckpt(tmp_path):
    # It suggested `pass ckpt=.../last.ckpt`, which tricks does not take.
    from fmnist.inference.tricks import validation_accuracies

    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "last.ckpt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"run: run directory without a best checkpoint \(checkpoints/best-epoch\*\.ckpt\)\.$"):
        validation_accuracies(tmp_path / "run")


@pytest.mark.parametrize("stop,code,words", [(KeyboardInterrupt, 130, "Ctrl-C"), (Terminated, 143, "SIGTERM")])
def test_an_export_stopped_inside_the_exporter_is_a_stop_not_a_crash(run_dir, tmp_path, run_in_process, monkeypatch,
                                                                     stop, code, words):
    def stopped_while_importing(*args, **kwargs):
        try:
            raise stop  # Ctrl-C or SIGTERM while the exporter imports torch._dynamo, its first seconds
        except BaseException as e:  # what torch's exporter then raises, from an `except` that the import left broken
            raise RuntimeError("Failed to export the model with torch.export: module 'torch._dynamo' has no "
                               "attribute 'exc'") from e

    monkeypatch.setattr(torch.onnx, "export", stopped_while_importing)
    result = run_in_process("export.py", f"ckpt={run_dir}", f"out={tmp_path / 'onnx' / 'm.onnx'}")
    assert result.returncode == code and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and f"error: stopped by {words}" in result.stderr
    assert list(tmp_path.iterdir()) == []  # neither the file, its temporary nor the directory made for it


def test_a_missing_checkpoint_is_one_paragraph(tmp_path):
    with pytest.raises(CheckpointError, match="no such file or directory; expected a .ckpt file, a run directory"):
        resolve(tmp_path / "nope")
    os.mkfifo(tmp_path / "pipe.ckpt")
    with pytest.raises(CheckpointError, match=r"pipe.ckpt: not a regular file \(a pipe or a device\); expected"):
        resolve(tmp_path / "pipe.ckpt")
    failed = tmp_path / "failed"  # a run that failed before its first epoch ended: a record, no checkpoints
    failed.mkdir()
    (failed / "metrics.json").write_text('{"status": "failed", "error": "DataError: ..."}')
    with pytest.raises(CheckpointError, match="a run directory without checkpoints \\(the run is 'failed'"):
        resolve(failed)
    shelf = tmp_path / "shelf"  # a run's checkpoints/ folder, or pretrained/: "a directory holding nothing"
    shelf.mkdir()
    for name in ("best-epoch002.ckpt", "last.ckpt"):
        (shelf / name).write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"shelf: a directory of checkpoint files \(best-epoch002.ckpt, "
                                              r"last.ckpt\), not of runs; name one of them \(ckpt=.*shelf/best-epoch002"):
        resolve(shelf)
    notes = tmp_path / "notes"  # files of one's own: named, not "a directory holding nothing"
    notes.mkdir()
    (notes / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match=r"notes: a directory holding no checkpoint, run or job \(notes.txt\); "):
        resolve(notes)


@pytest.mark.slow
def test_benchmark_infer_times_both_runtimes_side_by_side(run_dir, tmp_path, run_in_process):
    out = tmp_path / "bench.csv"
    result = run_in_process("scripts/benchmark.py", "--infer", "--ckpt", str(run_dir), "--seconds", "0.1",
                            "--repeats", "1", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("hardware: ") and "onnxruntime" in result.stdout.splitlines()[0]
    table = pd.read_csv(out)
    assert sorted(zip(table.batch_size, table.runtime)) == [(1, "onnxruntime"), (1, "pytorch eager"),
                                                           (256, "onnxruntime"), (256, "pytorch eager")]
    assert (table.img_s > 0).all() and np.allclose(table.ms_per_image * table.batch_size, table.ms_per_batch, atol=0.02)


def test_a_photo_with_damaged_exif_data_is_read_with_one_log_line_not_a_python_warning(tmp_path, caplog, recwarn):
    from fmnist.inference.images import read_image

    path = tmp_path / "phone.jpg"  # an orientation entry that claims more bytes than the EXIF block holds
    Image.new("L", (28, 28), 200).save(path, exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x01\x01\x12\x00\x03"
                                                   b"\x00\x00\x00\x05\x00")
    with caplog.at_level(logging.WARNING, logger="fmnist.inference.images"):
        assert read_image(path).shape == (28, 28)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and messages[0].startswith(f"{path}: ") and "exif" in messages[0].lower(), messages
    assert not [w for w in recwarn if "EXIF" in str(w.message)]


@pytest.mark.parametrize("mode,fmt", [("L", "PNG"), ("I;16", "PNG"), ("LA", "PNG"), ("RGB", "PNG"),
                                      ("RGBA", "PNG"), ("P", "PNG"), ("L", "BMP"), ("RGB", "BMP"), ("P", "BMP"),
                                      ("L", "JPEG"), ("RGB", "JPEG"), ("CMYK", "JPEG")])
def test_every_image_mode_reads_as_its_8_bit_grey_copy(tmp_path, mode, fmt):
    from fmnist.inference.images import read_image

    grey = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (40, 1))  # every level a column, 64 x 40
    image = Image.fromarray(grey)
    if mode == "I;16":  # a 16-bit greyscale PNG: each level v as v * 257 (0 -> 0, 255 -> 65535)
        image = Image.fromarray(grey.astype(np.uint16) * 257)
        assert image.mode == "I;16"
    elif mode == "CMYK":
        image = ImageOps.invert(image).convert("L")
        image = Image.merge("CMYK", [Image.new("L", image.size, 0)] * 3 + [image])  # black ink only
    elif mode != "L":
        image = image.convert(mode)
    path = tmp_path / f"x.{fmt.lower()}"
    image.save(path, format=fmt)
    got = read_image(path).astype(int)
    tolerance = 3 if fmt == "JPEG" else 1  # JPEG is lossy; a palette rounds by at most one level
    assert got.shape == grey.shape and np.abs(got - grey).max() <= tolerance, (mode, fmt)


def test_evaluation_metrics_match_their_definitions():
    from fmnist.inference.evaluate import classification_metrics

    labels = np.array([0, 0, 0, 1, 1, 2])
    preds = np.array([0, 0, 1, 1, 2, 2])  # class 0: P 1, R 2/3; class 1: P 1/2, R 1/2; class 2: P 1/2, R 1
    logits = torch.full((6, 10), -10.0)
    logits[torch.arange(6), torch.as_tensor(preds)] = 10.0  # confident: confidence ~1 in every image
    metrics, cm = classification_metrics(logits, labels)
    assert cm[:3, :3].tolist() == [[2, 1, 0], [0, 1, 1], [0, 0, 1]] and cm.sum() == 6
    f1 = [2 * 1 * (2 / 3) / (1 + 2 / 3), 0.5, 2 * 0.5 / 1.5]
    for name, p, r, f, n in zip(CLASS_NAMES[:3], [1, 0.5, 0.5], [2 / 3, 0.5, 1], f1, [3, 2, 1]):
        got = metrics["per_class"][name]
        assert (got["precision"], got["recall"], got["f1"]) == pytest.approx((p, r, f)) and got["support"] == n
    assert metrics["per_class"][CLASS_NAMES[5]] == {"precision": 0, "recall": 0, "f1": 0, "support": 0}
    assert metrics["accuracy"] == pytest.approx(4 / 6) and metrics["macro_f1"] == pytest.approx(sum(f1) / 10)
    assert metrics["ece"] == pytest.approx(1 - 4 / 6, abs=1e-4)  # all in the top bin: |accuracy - confidence|


@pytest.mark.slow
@pytest.mark.parametrize("damage,words", [
    (lambda p: p["hyper_parameters"].update(tta="garbage"), "hyperparameter tta is 'garbage'"),
    (lambda p: p["state_dict"].update({k: v * float("nan") for k, v in p["state_dict"].items()
                                      if k.endswith("weight")}), "NaN or infinite values"),
    (lambda p: (p["datamodule_hyper_parameters"].update(normalize=True),
                p.update({DATAMODULE_STATE_KEY: {"mean": 0.3, "std": 0.0}})), "a positive std"),
    # Fields of the wrong type: one paragraph naming the field, not a TypeError from deep inside a command.
    (lambda p: p.update(hyper_parameters=[1, 2]), "not an fmnist checkpoint"),
    (lambda p: p.update(datamodule_hyper_parameters=[1, 2]), "`datamodule_hyper_parameters` as a mapping"),
    (lambda p: p["datamodule_hyper_parameters"].update(eval_batch_size=0), r"eval_batch_size` as a positive integer \(got 0\)"),
    (lambda p: p["datamodule_hyper_parameters"].update(eval_batch_size="64"), "eval_batch_size` as a positive integer"),
    (lambda p: p["state_dict"].update({1: torch.zeros(1)}), "`state_dict` with text keys"),
    (lambda p: p.update(current_model_state=[1]), "`current_model_state`"),
    (lambda p: p.update({DATAMODULE_STATE_KEY: {"mean": "abc", "std": 1.0}}), "`mean` and `std` are finite numbers"),
    (lambda p: p.update({DATAMODULE_STATE_KEY: {"mean": 10**400, "std": 1.0}}), "`mean` and `std` are finite numbers"),
    (lambda p: p["hyper_parameters"]["model"].update(name=["simple"]), "not an fmnist checkpoint"),
    (lambda p: p["datamodule_hyper_parameters"].update(dir=123), r"`datamodule_hyper_parameters.dir` as a path"),
    (lambda p: p["datamodule_hyper_parameters"].update(val_size="abc"), "`datamodule_hyper_parameters.val_size`"),
    (lambda p: p["datamodule_hyper_parameters"].update(normalize="false"), "`datamodule_hyper_parameters.normalize`"),
    (lambda p: p["hyper_parameters"].update(channels_last="no"), "hyperparameter channels_last is 'no'"),
    (lambda p: p["hyper_parameters"]["model"].update(dropout=float("nan")),  # the constructor takes it
     r"describe no model this code builds: config key model.dropout must be in \[0, 1\); got nan"),
    (lambda p: p["hyper_parameters"]["model"].update(channels=[8]),
     r"damaged.ckpt: its hyperparameters \(hyper_parameters.model\) describe no model this code builds: config key"),
    (lambda p: p["state_dict"].pop(next(k for k in p["state_dict"] if k.startswith("net."))),  # named, not just counted
     r"its weights do not fit the architecture .*: Missing key\(s\) in state_dict: \"\w"),
])
def test_values_read_from_a_checkpoint_are_checked_like_config_values(run_dir, tmp_path, damage, words):
    payload = torch.load(resolve(run_dir).path, weights_only=True)
    damage(payload)
    torch.save(payload, tmp_path / "damaged.ckpt")
    with pytest.raises(CheckpointError, match=words):
        load_model(tmp_path / "damaged.ckpt")


@pytest.mark.slow
def test_a_shipped_model_loads_as_ckpt_pretrained_and_reproduces_its_run(run_dir, tmp_path, monkeypatch, caplog,
                                                                         garments, data_dir):
    from fmnist.inference import loading

    ship_model = import_script("ship_model")
    # A run's test CSV elsewhere (a relative data.dir, shipped from another directory) is named by --data-dir, the
    # option ship_model takes (it advised data.dir=, which it refuses), and the folders it made are removed again.
    with pytest.raises(DataError, match=r"test CSV not found in the directory given by --data-dir. Pass --data-dir DIR"):
        ship_model.ship(run_dir, "tiny", out_dir=tmp_path / "new" / "pretrained", data_dir=tmp_path)
    assert not (tmp_path / "new").exists()
    # Only the run's own test CSV: the card states its score there, and a subset of it, or its rows twice, could
    # pass the check against the recorded accuracy.
    doubled = tmp_path / "doubled"
    doubled.mkdir()
    rows = (garments / "fashion-mnist_test.csv").read_text().splitlines(keepends=True)
    (doubled / "fashion-mnist_test.csv").write_text("".join(rows + rows[1:]))
    for other in (data_dir, doubled):
        with pytest.raises(ConfigError, match=r"not the test CSV the run was tested on \(SHA-1 .*, the run's .*\).*"
                                              r"Give --data-dir the directory of the run's CSVs"):
            ship_model.ship(run_dir, "tiny", out_dir=tmp_path / "new" / "pretrained", data_dir=other)
        assert not (tmp_path / "new").exists()
    shutil.rmtree(doubled)
    ship_model.ship(run_dir, "moved", out_dir=tmp_path / "moved", data_dir=garments)
    assert sorted(p.name for p in (tmp_path / "moved").iterdir()) == ["moved.ckpt", "moved.md", "moved.onnx"]
    shutil.rmtree(tmp_path / "moved")
    card = ship_model.ship(run_dir, "tiny", out_dir=tmp_path).read_text()
    ckpt, onnx_file = tmp_path / "tiny.ckpt", tmp_path / "tiny.onnx"
    assert "on the 200 images of the run's test CSV" in card  # the run's own test set, not Fashion-MNIST's 10,000
    assert f"Use it as `ckpt={tmp_path / 'tiny.ckpt'}`" in card  # what loads it: `ckpt=pretrained` loads another
    assert ship_model.ckpt_value(loading.PRETRAINED) == "pretrained"
    assert ship_model.ckpt_value(loading.PRETRAINED_DIR / "tiny.ckpt") == "pretrained/tiny.ckpt"
    shipped = snapshot(tmp_path)
    with pytest.raises(ConfigError, match="tiny.ckpt is already shipped; nothing was written"):
        ship_model.ship(run_dir, "tiny", out_dir=tmp_path)  # another run under the same name: only with replace
    damaged = tmp_path / "damaged_run"
    shutil.copytree(run_dir, damaged)
    record = json.loads((damaged / "metrics.json").read_text())
    for damage, words in [({"metrics": {**record["metrics"], "test/acc": "0.9"}}, "metrics.test/acc is '0.9', not a number"),
                          ({"precision": {**record["precision"], "resolved": 5}}, "precision.resolved is 5, not one of"),
                          ({"data_digest": "abc"}, "is not a run record: data_digest of the wrong type")]:
        (damaged / "metrics.json").write_text(json.dumps({**record, **damage}))  # the card states these fields
        with pytest.raises(ConfigError, match=re.escape(words) + ".*; not shipped"):
            ship_model.ship(damaged, "other", out_dir=tmp_path)
    shutil.rmtree(damaged)
    for wrong, words in ((tmp_path / "missing", "no such directory"), (tmp_path, "holds no metrics.json (a sweep's")):
        with pytest.raises(ConfigError, match=re.escape(f"{wrong}: {words}")):
            ship_model.ship(wrong, "other", out_dir=tmp_path)
    for name, words in (("../evil", f"--name must be a name, not a path (.*), since it names the shipped files in {tmp_path}"),
                        (".hidden", "--name .hidden: a name starting with '.' would ship hidden files"),
                        ("n" * 251, "--name is 251 bytes long; it names the shipped files")):  # not OSError's ENAMETOOLONG
        with pytest.raises(ConfigError, match=words):
            ship_model.ship(run_dir, name, out_dir=tmp_path)
    bad = shutil.copytree(run_dir, tmp_path / "bad")  # its best checkpoint's weights are not finite
    best = next((bad / "checkpoints").glob("best-*.ckpt"))
    payload = torch.load(best, weights_only=True)
    first = next(iter(payload["state_dict"]))
    payload["state_dict"][first] = torch.full_like(payload["state_dict"][first], float("nan"))
    torch.save(payload, best)
    with pytest.raises(CheckpointError, match=re.escape(str(best))):  # the run's file, not a staged copy
        ship_model.ship(bad, "bad", out_dir=tmp_path)
    best.unlink()  # only its last checkpoint left: ship_model takes no ckpt=, so none is suggested
    with pytest.raises(CheckpointError, match="without a best checkpoint") as refused:
        ship_model.ship(bad, "bad", out_dir=tmp_path)
    assert "ckpt=" not in str(refused.value)
    shutil.rmtree(bad)
    assert snapshot(tmp_path) == shipped
    part = shutil.copytree(run_dir, tmp_path / "part")  # tested on one batch (preset=smoke): nothing to check against
    config = OmegaConf.load(part / "config.yaml")
    config.trainer.limit_test_batches = 1
    OmegaConf.save(config, part / "config.yaml")
    with pytest.raises(ConfigError, match=r"covers part of the test set \(trainer.limit_test_batches=1\)"):
        ship_model.ship(part, "part", out_dir=tmp_path)
    # A run tested in bf16-mixed may score a few images apart when its shipped model is scored in fp32.
    tested = int(np.loadtxt(run_dir / "confusion_matrix.csv", delimiter=",").sum())
    for images_apart, ships in ((5, True), (50, False)):
        mixed = tmp_path / f"mixed_{images_apart}"
        shutil.copytree(run_dir, mixed)
        acc = record["metrics"]["test/acc"] + images_apart / tested * (1 if record["metrics"]["test/acc"] < 0.5 else -1)
        (mixed / "metrics.json").write_text(json.dumps({**record, "precision": {"resolved": "bf16-mixed"},
                                                        "metrics": {**record["metrics"], "test/acc": acc}}))
        if ships:
            ship_model.ship(mixed, f"mixed_{images_apart}", out_dir=tmp_path / "mixed_out")
        else:
            with pytest.raises(ConfigError, match=f"in bf16-mixed: {images_apart} of .* images, where at most 10 may"):
                ship_model.ship(mixed, f"mixed_{images_apart}", out_dir=tmp_path / "mixed_out")
    assert f"`{file_digest(ckpt, 'sha256')}`" in card and f"`{file_digest(onnx_file, 'sha256')}`" in card
    payload = torch.load(ckpt, weights_only=True)
    assert "optimizer_states" not in payload and ckpt.stat().st_size < resolve(run_dir).path.stat().st_size
    recorded = json.loads((run_dir / "metrics.json").read_text())["metrics"]["test/acc"]
    assert f"**{recorded:.2%}** (the run recorded {recorded:.2%})" in card
    import onnx

    meta = {p.key: p.value for p in onnx.load(onnx_file).metadata_props}  # where it is shipped, not where it was staged
    assert meta["checkpoint_path"] == str(ckpt.resolve()) and meta["checkpoint_sha256"] == file_digest(ckpt, "sha256")

    monkeypatch.setattr(loading, "PRETRAINED", tmp_path / "missing.ckpt")
    with pytest.raises(CheckpointError, match="ckpt=pretrained: .*missing.ckpt is missing"):
        load_model("pretrained")
    monkeypatch.setattr(loading, "PRETRAINED", ckpt)
    with caplog.at_level(logging.INFO):
        assert load_model("pretrained").sha256 == file_digest(ckpt, "sha256")
    assert "ckpt=pretrained: the shipped model (" in caplog.text  # what was tested is said


@pytest.mark.slow
def test_a_shipped_model_is_replaced_whole_or_not_at_all(run_dir, tmp_path, monkeypatch):
    import errno

    ship_model = import_script("ship_model")
    (tmp_path / "tiny.md").mkdir()  # in the way of the card: refused before the test set is scored
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path / 'tiny.md'} is a directory, not a shipped file; "
                                                    "nothing was written")):
        ship_model.ship(run_dir, "tiny", out_dir=tmp_path, replace=True)
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.md"]
    (tmp_path / "tiny.md").rmdir()
    for suffix in (".ckpt", ".onnx", ".md"):  # another run's model, shipped before
        (tmp_path / f"tiny{suffix}").write_bytes(f"the model shipped before{suffix}".encode())
    before = snapshot(tmp_path)
    real_replace = os.replace

    def replace(src, dst):  # the card cannot be replaced (an immutable file, a directory without write permission)
        if tmp_path / "tiny.md" in (Path(src), Path(dst)):
            raise PermissionError(errno.EPERM, "Operation not permitted", str(src))
        real_replace(src, dst)

    monkeypatch.setattr(ship_model.os, "replace", replace)
    with pytest.raises(StorageError, match=re.escape(f"cannot write {tmp_path / 'tiny.md'}: permission denied")):
        ship_model.ship(run_dir, "tiny", out_dir=tmp_path, replace=True)
    assert snapshot(tmp_path) == before  # not a new checkpoint and ONNX file under the old card
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.ckpt", "tiny.md", "tiny.onnx"]  # no staging left
    monkeypatch.setattr(ship_model.os, "replace", real_replace)
    card = ship_model.ship(run_dir, "tiny", out_dir=tmp_path, replace=True).read_text()
    assert all(f"`{file_digest(tmp_path / name, 'sha256')}`" in card for name in ("tiny.ckpt", "tiny.onnx"))


@pytest.mark.slow
def test_shipping_to_a_full_or_read_only_disk_is_one_paragraph_naming_the_shipped_file(run_dir, tmpfs):
    ship_model = import_script("ship_model")
    # No room for the checkpoint (torch.save says so as a RuntimeError); room for it but not for the ONNX file
    # (export.py's paragraph names its out=, which ship_model.py does not take); nothing can be written at all.
    for options, file, words in (("size=64k", "tiny.ckpt", "the disk is full"),
                                 ("size=2500k", "tiny.onnx", "the disk is full"),
                                 ("ro,size=64k", "", "the file system is read-only")):
        disk = tmpfs(options)
        with pytest.raises(StorageError) as refused:
            ship_model.ship(run_dir, "tiny", out_dir=disk)
        assert str(refused.value).startswith(f"cannot write {disk / file if file else disk}: {words}"), refused.value
        assert "=...)" not in str(refused.value) and list(disk.iterdir()) == []


def test_ship_model_names_an_unknown_option_as_such_not_taken_for_a_missing_run(run_in_process):
    result = run_in_process("scripts/ship_model.py", "--bogus")
    assert result.returncode == 2 and "error: unrecognized arguments: --bogus" in result.stderr, result.stderr
    assert "required" not in result.stderr
    result = run_in_process("scripts/ship_model.py")
    assert result.returncode == 2 and "error: the following arguments are required: run_dir" in result.stderr


@pytest.mark.parametrize("damage, text, words", [("yaml", "model: [\n", "cannot read it as YAML"),
                                                 ("list", "- a list\n", "expected a mapping with a `{section}` section"),
                                                 ("scalar", "{section}: 3\n", "expected a mapping with a `{section}` section")])
@pytest.mark.parametrize("command, section", [("ship_model", "trainer"), ("tricks", "data")])
def test_a_run_whose_config_yaml_is_damaged_is_named_by_ship_model_and_tricks(run_dir, tmp_path, run_in_process, capfd,
                                                                               command, section, damage, text, words):
    # Both read one key of a run's config.yaml (trainer.limit_test_batches, data.dir): a damaged file is one
    # paragraph naming it, exit 2, before anything is evaluated or written.
    run = shutil.copytree(run_dir, tmp_path / "sweep" / "seed=0", ignore=shutil.ignore_patterns("*.onnx"))
    (run / "config.yaml").write_text(text.format(section=section))
    before = snapshot(tmp_path)
    if command == "ship_model":  # ships into the repository's pretrained/, as the command has no other place
        from fmnist.inference.loading import PRETRAINED_DIR

        try:
            # a name of its own: the workers of `make test` run the other damages at the same time
            result = run_in_process("scripts/ship_model.py", str(run), "--name", f"damaged-{damage}", cwd=tmp_path)
        finally:
            shipped = sorted(PRETRAINED_DIR.glob(f"damaged-{damage}.*"))
            for path in shipped:
                path.unlink()
        assert shipped == []
    else:
        from fmnist.results.__main__ import main as results_main

        code = results_main(["tricks", str(tmp_path / "sweep")])
        result = subprocess.CompletedProcess("tricks", code, *capfd.readouterr())
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.splitlines()[-1].startswith(f"error: {run / 'config.yaml'}: "), result.stderr
    assert words.format(section=section) in result.stderr and "Traceback" not in result.stderr
    assert snapshot(tmp_path) == before


def test_a_checkpoint_from_before_a_model_key_existed_builds_as_the_code_did_then(tmp_path):
    # The shipped checkpoint predates model.dirac_init and model.whiten_stem; one from before
    # model.zero_init_residual lacks that too. Each builds with its ADDED_KEYS value, the same network.
    from fmnist.config import ADDED_KEYS
    from fmnist.inference.loading import PRETRAINED

    payload = torch.load(PRETRAINED, weights_only=True)
    assert {"dirac_init", "whiten_stem"}.isdisjoint(payload["hyper_parameters"]["model"])
    del payload["hyper_parameters"]["model"]["zero_init_residual"]
    torch.save(payload, tmp_path / "older.ckpt")
    older, shipped = load_model(tmp_path / "older.ckpt"), load_model("pretrained")
    assert {k: older.model[k] for k in ("zero_init_residual", "dirac_init", "whiten_stem")} == \
        {k: ADDED_KEYS[f"model.{k}"] for k in ("zero_init_residual", "dirac_init", "whiten_stem")}
    images = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(older.net(images), shipped.net(images))


def test_the_shipped_model_is_the_one_its_card_describes():
    from fmnist.inference.loading import PRETRAINED, PRETRAINED_DIR

    card = (PRETRAINED_DIR / "speedrun_cpu.md").read_text()
    for name in ("speedrun_cpu.ckpt", "speedrun_cpu.onnx"):
        assert f"| `{name}` | {(PRETRAINED_DIR / name).stat().st_size:,} | `{file_digest(PRETRAINED_DIR / name, 'sha256')}` |" in card
    loaded = load_model("pretrained")
    assert loaded.path == PRETRAINED and loaded.model["name"] == "resnet" and loaded.tta == "flip"
    import onnx

    meta = {p.key: p.value for p in onnx.load(PRETRAINED_DIR / "speedrun_cpu.onnx").metadata_props}
    assert meta["checkpoint_path"] == "pretrained/speedrun_cpu.ckpt" and meta["checkpoint_sha256"] == loaded.sha256


def test_a_run_that_has_not_completed_is_used_with_a_warning_saying_so(tmp_path, caplog):
    from fmnist.runs import update_record

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "best-epoch001.ckpt").write_bytes(b"")
    update_record(run, status="running")  # still training: its best checkpoint may yet change
    assert resolve(run).path.name == "best-epoch001.ckpt"
    assert "the run's status is 'running', not completed: using its best checkpoint so far, best-epoch001.ckpt" \
        in caplog.text
    caplog.clear()
    from fmnist.provenance import this_process

    ended = subprocess.Popen(["true"])
    ended.wait()
    update_record(run, **{**this_process(), "pid": ended.pid})  # killed: its process is gone, its record unchanged
    resolve(run)
    assert "the run's status is 'interrupted' (its metrics.json says 'running', but its process has ended)" in caplog.text
    with pytest.raises(ConfigError, match=r"its status is 'interrupted' \(its metrics.json says 'running', but its "
                                          r"process has ended\)"):
        import_script("ship_model").ship(run, "killed", out_dir=tmp_path / "out")
    caplog.clear()
    update_record(run, status="completed")
    resolve(run)
    assert "not completed" not in caplog.text
