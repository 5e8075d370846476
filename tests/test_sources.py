import gzip
import hashlib
import io
import logging
import re
import struct

import numpy as np
import pytest

from fmnist.data import sources
from fmnist.data.csv_io import parse_csv, write_csv
from fmnist.data.sources import CSV_NAMES, obtain, read_idx
from fmnist.errors import DataError
from tests.conftest import make_images, snapshot


def write_idx(path, array: np.ndarray) -> None:
    header = b"\x00\x00\x08" + bytes([array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


@pytest.fixture
def idx_dir(tmp_path):
    d = tmp_path / "idx"
    d.mkdir()
    for prefix, n, seed in (("train", 30, 0), ("t10k", 10, 1)):
        images, labels = make_images(n, seed)
        write_idx(d / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(d / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return d


def test_idx_files_become_kaggle_csvs(tmp_path, idx_dir):
    data = tmp_path / "data"
    message = obtain(data, idx_dir=idx_dir, allow_install=False, allow_download=False)
    assert "converted IDX files" in message
    images, labels = parse_csv(data / CSV_NAMES["train"])
    expected_images, expected_labels = make_images(30, 0)
    np.testing.assert_array_equal(images, expected_images)
    np.testing.assert_array_equal(labels, expected_labels)
    assert len(parse_csv(data / CSV_NAMES["test"])[1]) == 10


def test_each_idx_file_may_be_gzipped_or_not_on_its_own(tmp_path, idx_dir):
    unpacked = idx_dir / "train-labels-idx1-ubyte"  # e.g. one file gunzipped by hand
    unpacked.write_bytes(gzip.decompress((idx_dir / "train-labels-idx1-ubyte.gz").read_bytes()))
    (idx_dir / "train-labels-idx1-ubyte.gz").unlink()
    message = obtain(tmp_path / "data", idx_dir=idx_dir, allow_install=False, allow_download=False)
    assert "converted IDX files" in message
    np.testing.assert_array_equal(parse_csv(tmp_path / "data" / CSV_NAMES["train"])[1], make_images(30, 0)[1])


def test_existing_csvs_are_never_touched(tmp_path, idx_dir):
    data = tmp_path / "data"
    data.mkdir()
    for name, (images, labels) in zip(CSV_NAMES.values(), (make_images(30, 0), make_images(20, 1))):
        write_csv(data / name, images, labels)
    before = {name: (data / name).read_bytes() for name in CSV_NAMES.values()}
    message = obtain(data, idx_dir=idx_dir, allow_install=False, allow_download=False)
    # The --idx-dir named on purpose is not read, and the message says so rather than passing over it.
    assert message.endswith(f"left untouched (30 train and 20 test images); --idx-dir {idx_dir} was not read")
    assert obtain(data, idx_dir=None, allow_install=False, allow_download=False).endswith("(30 train and 20 test images)")
    assert all((data / name).read_bytes() == content for name, content in before.items())


# CSVs a run would refuse (a header alone: an interrupted copy) are not reported as ready, and stay as they are.
@pytest.mark.parametrize("content", ["mine", "label," + ",".join(f"pixel{i}" for i in range(1, 785)) + "\n"])
def test_existing_csvs_that_a_run_would_refuse_are_named_and_left_as_they_are(tmp_path, idx_dir, content):
    data = tmp_path / "data"
    data.mkdir()
    for name in CSV_NAMES.values():
        (data / name).write_text(content)
    with pytest.raises(DataError, match=rf"{data / CSV_NAMES['train']}\b.* The CSVs in {data} are left as they are"):
        obtain(data, idx_dir=idx_dir, allow_install=False, allow_download=False)
    assert all((data / name).read_text() == content for name in CSV_NAMES.values())


def test_a_refused_test_csv_leaves_no_parse_cache_of_the_training_one(tmp_path, idx_dir):
    data = tmp_path / "data"
    data.mkdir()
    write_csv(data / CSV_NAMES["train"], *make_images(30, 0))
    (data / CSV_NAMES["test"]).write_text("label,pixel1\n1,2\n")  # a run would refuse it
    before = snapshot(data)
    with pytest.raises(DataError, match=rf"{data / CSV_NAMES['test']}, line 1: .* The CSVs in {data} are left as they are"):
        obtain(data, idx_dir=idx_dir, allow_install=False, allow_download=False)
    assert snapshot(data) == before


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_a_lone_csv_is_not_overwritten(tmp_path, idx_dir, suffix):
    # compressed too: a plain copy written beside it would make every run refuse the directory
    data = tmp_path / "data"
    data.mkdir()
    lone = data / (CSV_NAMES["train"] + suffix)
    lone.write_text("mine")
    with pytest.raises(DataError, match=f"holds only {lone.name} of the two CSVs; refusing to overwrite"):
        obtain(data, idx_dir=idx_dir, allow_install=False, allow_download=False)
    assert lone.read_text() == "mine" and [p.name for p in data.iterdir()] == [lone.name]


def test_data_dir_takes_the_home_directory_as_ckpt_and_out_do(tmp_path, monkeypatch):
    from fmnist.data.sources import find_csv

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "sd").mkdir()
    (tmp_path / "sd" / CSV_NAMES["test"]).write_text("x")
    assert find_csv("~/sd", "test") == tmp_path / "sd" / CSV_NAMES["test"]


def test_a_stopped_writes_leftover_is_removed_and_swapped_csvs_are_warned_of(tmp_path, idx_dir, caplog):
    # A kill while a CSV was written left its hidden 22 MB temporary file, which nothing named or removed.
    data = tmp_path / "data"
    data.mkdir()
    leftover, other = data / ".fashion-mnist_test.csv.4242-0123abcd.tmp", data / ".mine.4242-0123abcd.tmp"
    leftover.write_text("half a CSV")
    other.write_text("not a CSV's")
    with caplog.at_level(logging.INFO, logger="fmnist.data.sources"):
        obtain(data, idx_dir=idx_dir, allow_install=False, allow_download=False)
    assert not leftover.exists() and other.exists() and f"removed {leftover}" in caplog.text
    caplog.clear()
    train, test = data / CSV_NAMES["train"], data / CSV_NAMES["test"]  # 30 and 10 images: swapped, 10 and 30
    train_text = train.read_text()
    train.write_text(test.read_text())
    test.write_text(train_text)
    with caplog.at_level(logging.INFO, logger="fmnist.data.sources"):
        obtain(data, idx_dir=None, allow_install=False, allow_download=False)
    assert "fewer images (10) than the test CSV (30)" in caplog.text


def test_links_to_nothing_at_the_csv_names_are_neither_replaced_nor_written_through(tmp_path, idx_dir):
    # Links into a volume not mounted: both replaced by regular files, with exit 0.
    data = tmp_path / "data"
    data.mkdir()
    for name in CSV_NAMES.values():
        (data / name).symlink_to(tmp_path / "unmounted" / name)
    with pytest.raises(DataError, match=r"fashion-mnist_train.csv and fashion-mnist_test.csv are links to nothing "
                                        r"\(a volume not mounted\?\); refusing to write through or over a link"):
        obtain(data, idx_dir=idx_dir, allow_install=False, allow_download=False)
    assert all((data / name).is_symlink() for name in CSV_NAMES.values()) and not (tmp_path / "unmounted").exists()


def test_a_failed_command_removes_the_parents_it_made_and_says_what_it_did_not_try(tmp_path, monkeypatch):
    monkeypatch.setattr("fmnist.data.sources.DEBIAN_DIR", tmp_path / "nowhere")
    with pytest.raises(DataError, match=r"did not install Debian's dataset-fashion-mnist \(--no-install\)"):
        obtain(tmp_path / "a" / "b" / "data", idx_dir=None, allow_install=False, allow_download=False)
    assert list(tmp_path.iterdir()) == []


def test_a_split_both_plain_and_gzipped_is_refused_as_every_run_would(tmp_path, idx_dir):
    data = tmp_path / "data"
    data.mkdir()
    for name in (CSV_NAMES["train"], CSV_NAMES["train"] + ".gz", CSV_NAMES["test"]):
        (data / name).write_text("mine")
    with pytest.raises(DataError, match="holds both fashion-mnist_train.csv and fashion-mnist_train.csv.gz"):
        obtain(data, idx_dir=idx_dir, allow_install=False, allow_download=False)
    assert sorted(p.read_text() for p in data.iterdir()) == ["mine"] * 3


def test_nothing_available_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr("fmnist.data.sources.DEBIAN_DIR", tmp_path / "nowhere")
    with pytest.raises(DataError, match="Could not obtain Fashion-MNIST.*Do one of: \\(1\\) put Kaggle's"):
        obtain(tmp_path / "data", idx_dir=None, allow_install=False, allow_download=False)
    assert not (tmp_path / "data").exists()


def test_a_named_idx_dir_is_converted_or_refused_never_passed_over(tmp_path, idx_dir, monkeypatch):
    monkeypatch.setattr("fmnist.data.sources.DEBIAN_DIR", idx_dir)  # another source that would work
    with pytest.raises(DataError, match="--idx-dir .*missing: no such directory"):
        obtain(tmp_path / "data", idx_dir=tmp_path / "missing", allow_install=False, allow_download=False)
    (tmp_path / "afile").write_text("mine")
    with pytest.raises(DataError, match="--idx-dir .*afile: a file, not a directory"):
        obtain(tmp_path / "data", idx_dir=tmp_path / "afile", allow_install=False, allow_download=False)
    dotted = tmp_path / "dotted"  # another spelling of the names, and a train split alone
    dotted.mkdir()
    (dotted / "train-images.idx3-ubyte").write_bytes((idx_dir / "train-images-idx3-ubyte.gz").read_bytes())
    with pytest.raises(DataError, match="dotted: no train-images-idx3-ubyte.*t10k-labels-idx1-ubyte.gz.*Nothing was"):
        obtain(tmp_path / "data", idx_dir=dotted, allow_install=False, allow_download=False)
    assert not (tmp_path / "data").exists()


def test_bad_idx_magic(tmp_path):
    path = tmp_path / "x-idx1-ubyte"
    path.write_bytes(b"\x00\x00\x09\x01" + b"\x00" * 8)
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(path, 1)
    for damaged, words in ((b"not gzip at all", "not gzip-compressed"),
                           (gzip.compress(b"\x00\x00\x08\x01" + b"\x00" * 100)[:20], "its gzip data is cut short")):
        (tmp_path / "x-idx1-ubyte.gz").write_bytes(damaged)
        with pytest.raises(DataError, match=f"x-idx1-ubyte.gz: {words}"):
            read_idx(tmp_path / "x-idx1-ubyte.gz", 1)


LABELS = b"\x00\x00\x08\x01" + struct.pack(">I", 30) + bytes(30)  # an IDX file of 30 labels


def test_a_gzip_file_of_several_members_or_zero_padded_reads_as_gzip_d_reads_it(tmp_path):
    path = tmp_path / "x-idx1-ubyte.gz"  # e.g. `cat part1.gz part2.gz`: gzip -d and Python's gzip join the members
    path.write_bytes(gzip.compress(LABELS[:10]) + gzip.compress(LABELS[10:]))
    assert read_idx(path, 1).tolist() == [0] * 30
    path.write_bytes(gzip.compress(LABELS) + bytes(512))  # zero padding after the data (a tape's block), as gzip -d
    assert read_idx(path, 1).tolist() == [0] * 30


# Each a paragraph naming the file, what is wrong with it and what was expected, never Python's words alone.
@pytest.mark.parametrize("content,words", [
    (b"", "the file is empty (0 bytes)"),
    (b"<html>Not Found</html>", "not gzip-compressed (it starts with bytes 3c 68 74 6d, where gzip starts 1f 8b)"),
    (gzip.compress(b""), "holds 0 bytes once decompressed, fewer than the 4 of an IDX file's magic number"),
    (gzip.compress(b"<html>Not Found</html>"), "not an IDX file of unsigned bytes: it starts with bytes 3c 68 74 6d "
                                               "once decompressed, where such a file starts 00 00 08"),
    (gzip.compress(LABELS)[:-12], "its gzip data is cut short after"),
    (gzip.compress(LABELS) + b"junk", "its gzip data ends after 30 bytes, and 4 more bytes follow that are not gzip "
                                      "data (starting 6a 75 6e 6b)"),
    (gzip.compress(LABELS)[:-8] + bytes(4) + gzip.compress(LABELS)[-4:], "its gzip data is damaged (zlib: "),
    (gzip.compress(LABELS[:20]), "its header says [30] (30 bytes of labels); the file holds 12 once decompressed: cut short"),
    (gzip.compress(LABELS + b"\x00"), "the file holds 31 once decompressed: longer than its header says"),
    (gzip.compress(b"\x00\x00\x08\x03" + struct.pack(">III", 30, 28, 28)), "expected 1 (an images file under a labels "
                                                                           "file's name?)"),
], ids=["empty", "a web page", "gzip of nothing", "gzip of a web page", "cut gzip", "bytes after the gzip data", "bad CRC",
        "fewer labels", "more labels", "images for labels"])
def test_a_damaged_idx_file_is_one_paragraph_saying_what_was_expected(tmp_path, idx_dir, run_in_process, content, words):
    (idx_dir / "train-labels-idx1-ubyte.gz").write_bytes(content)
    result = run_in_process("scripts/get_data.py", "--data-dir", str(tmp_path / "data"), "--idx-dir", str(idx_dir),
                            "--no-install", "--no-download")
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.startswith(f"error: {idx_dir}/train-labels-idx1-ubyte.gz: ") and result.stderr.count("\n") == 1
    assert words in result.stderr, result.stderr
    assert result.stderr.endswith(" Expected an IDX file of Fashion-MNIST labels, gzip-compressed, as Zalando publishes "
                                  "them: a damaged or cut download? Fetch it again.\n")
    assert not (tmp_path / "data").exists()


def test_an_idx_file_gunzipped_under_its_gz_name_is_named_so(tmp_path):
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    path.write_bytes(LABELS)
    with pytest.raises(DataError, match=r"ubyte.gz: not gzip-compressed but an uncompressed IDX file \(it starts with "
                                        r"bytes 00 00 08 01\): name it without .gz, or gzip it.$"):
        read_idx(path, 1)


@pytest.mark.parametrize("images,labels,words", [
    (np.zeros((30, 32, 32)), np.zeros(30), "train-images-idx3-ubyte.gz: holds 32x32 images; expected Fashion-MNIST's 28x28."),
    (np.zeros((30, 28, 28)), np.zeros(31), "train-images-idx3-ubyte.gz holds 30 images but {idx}/train-labels-idx1-ubyte.gz "
                                           "holds 31 labels; expected one label per image"),
])
def test_idx_files_that_do_not_fit_together_are_named_each_by_its_file(tmp_path, idx_dir, images, labels, words):
    write_idx(idx_dir / "train-images-idx3-ubyte.gz", images)
    write_idx(idx_dir / "train-labels-idx1-ubyte.gz", labels)
    with pytest.raises(DataError, match=re.escape(f"{idx_dir}/" + words.format(idx=idx_dir))):
        obtain(tmp_path / "data", idx_dir=idx_dir, allow_install=False, allow_download=False)
    assert not (tmp_path / "data").exists()


def test_an_idx_header_whose_sizes_multiply_past_64_bits_is_named_not_a_crash(tmp_path, idx_dir):
    # 2**31 * 2**31 * 4 is 0 in 64-bit arithmetic: the bytes it claims are counted exactly, not wrapped around.
    header = b"\x00\x00\x08\x03" + struct.pack(">III", 2 ** 31, 2 ** 31, 4)
    (idx_dir / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(header))
    with pytest.raises(DataError, match=re.escape(f"train-images-idx3-ubyte.gz: its header says [2147483648, 2147483648, 4] "
                                                  f"({2 ** 64:,} bytes of images); the file holds 0 once decompressed: cut short.")):
        obtain(tmp_path / "data", idx_dir=idx_dir, allow_install=False, allow_download=False)
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("name,header,words", [
    ("train-labels-idx1-ubyte", b"\x00\x00\x08\x00", "its header gives 0 dimensions; expected 1"),
    ("train-labels-idx1-ubyte", b"\x00\x00\x08\x02\x00\x00\x00\x02\x00\x00\x00\x02" + b"\x00" * 4,
     "its header gives 2 dimensions; expected 1"),
    ("train-images-idx3-ubyte", b"\x00\x00\x08\x03" + b"\x00" * 4,
     "its header is cut short (8 bytes; 3 dimensions take 16)"),
    ("train-labels-idx1-ubyte", b"\x00\x00\x08\x01" + struct.pack(">I", 0), "holds no images"),
])
def test_an_idx_file_of_other_dimensions_is_named_and_nothing_is_written(tmp_path, idx_dir, name, header, words):
    (idx_dir / f"{name}.gz").write_bytes(gzip.compress(header))
    if words == "holds no images":  # and none in the images either: a CSV of no rows
        no_images = b"\x00\x00\x08\x03" + struct.pack(">III", 0, 28, 28)
        (idx_dir / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(no_images))
    with pytest.raises(DataError, match=re.escape(f"{name}.gz: {words}")):
        obtain(tmp_path / "data", idx_dir=idx_dir, allow_install=False, allow_download=False)
    assert not (tmp_path / "data").exists()


def test_a_bad_test_split_writes_neither_csv_so_a_second_try_can_succeed(tmp_path, idx_dir):
    good = (idx_dir / "t10k-images-idx3-ubyte.gz").read_bytes()
    (idx_dir / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"garbage"))
    data = tmp_path / "data"
    with pytest.raises(DataError):
        obtain(data, idx_dir=idx_dir, allow_install=False, allow_download=False)
    assert not data.exists()  # not even the directory it made
    existing = tmp_path / "existing"
    existing.mkdir()
    with pytest.raises(DataError):
        obtain(existing, idx_dir=idx_dir, allow_install=False, allow_download=False)
    assert existing.is_dir() and list(existing.iterdir()) == []  # the user's directory stays, empty as it was
    (idx_dir / "t10k-images-idx3-ubyte.gz").write_bytes(good)
    assert "converted IDX files" in obtain(data, idx_dir=idx_dir, allow_install=False, allow_download=False)


def test_labels_outside_the_ten_classes_are_refused_before_any_csv_is_written(tmp_path, idx_dir):
    write_idx(idx_dir / "t10k-labels-idx1-ubyte.gz", np.full(10, 200))
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz: holds label 200; expected Fashion-MNIST's classes 0-9"):
        obtain(tmp_path / "data", idx_dir=idx_dir, allow_install=False, allow_download=False)
    assert not (tmp_path / "data").exists()


def test_a_data_dir_that_is_a_file_is_one_paragraph(tmp_path, idx_dir):
    from fmnist.errors import StorageError

    (tmp_path / "a-file").write_text("mine")
    with pytest.raises(StorageError, match=r"a file is in the way of a directory to create.*\(--data-dir=\.\.\.\)"):
        obtain(tmp_path / "a-file", idx_dir=idx_dir, allow_install=False, allow_download=False)
    assert (tmp_path / "a-file").read_text() == "mine"


def test_a_full_disk_while_the_csvs_are_written_is_one_paragraph_and_leaves_nothing(tmpfs, idx_dir):
    from fmnist.errors import StorageError

    disk = tmpfs("size=8k")  # less than the first CSV
    with pytest.raises(StorageError, match=r"cannot write .*fashion-mnist_train.csv: the disk is full .*--data-dir"):
        obtain(disk / "data", idx_dir=idx_dir, allow_install=False, allow_download=False)
    assert list(disk.iterdir()) == []


def test_a_second_writer_into_the_data_directory_waits_then_leaves_the_first_ones_csvs(tmp_path, idx_dir):
    import fcntl
    import os
    import threading

    data = tmp_path / "data"
    data.mkdir()
    lock = os.open(data, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(lock, fcntl.LOCK_EX)  # another `make data` is writing there
    messages = []
    second = threading.Thread(target=lambda: messages.append(
        obtain(data, idx_dir=idx_dir, allow_install=False, allow_download=False)))
    second.start()
    second.join(timeout=1)
    assert list(data.iterdir()) == []  # it waits: nothing written beside the other writer's files
    images, labels = make_images(30, 0)  # what the first writer puts there meanwhile
    for split in CSV_NAMES.values():
        write_csv(data / split, images, labels)
    os.close(lock)
    second.join(timeout=120)
    assert messages and "CSVs already in" in messages[0] and "left untouched" in messages[0]


def test_the_download_keeps_only_whole_verified_files(tmpfs, monkeypatch):
    """Each file is checked against its MD5 before it is written, and written whole or not at all: a full disk
    leaves no partial file for the next try to find."""
    payloads = {name: bytes([i]) * 40_000 for i, name in enumerate(sources.OFFICIAL_MD5)}
    monkeypatch.setattr(sources, "OFFICIAL_MD5", {n: hashlib.md5(b).hexdigest() for n, b in payloads.items()})
    monkeypatch.setattr(sources.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(payloads[url.split("/")[-1]]))
    roomy = tmpfs("size=1m") / "raw"
    sources._download(roomy, "http://mirror/")
    assert {p.name: p.read_bytes() for p in roomy.iterdir()} == payloads
    full = tmpfs("size=100k") / "raw"  # room for two of the four files
    with pytest.raises(OSError):
        sources._download(full, "http://mirror/")
    kept = {p.name: p.read_bytes() for p in full.iterdir()}
    assert 0 < len(kept) < len(payloads) and all(kept[name] == payloads[name] for name in kept), list(kept)
    monkeypatch.setattr(sources, "OFFICIAL_MD5", {n: "0" * 32 for n in payloads})
    corrupt = tmpfs("size=1m") / "raw"
    with pytest.raises(DataError, match="MD5 mismatch"):
        sources._download(corrupt, "http://mirror/")
    assert list(corrupt.iterdir()) == []
