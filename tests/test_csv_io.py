import errno
import gzip
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from fmnist.data.csv_io import cache_path, csv_digest, load_csv, parse_csv, write_csv
from fmnist.errors import DataError
from fmnist.fsio import file_digest
from tests.conftest import make_images


@pytest.fixture
def valid(tmp_path) -> tuple[Path, np.ndarray, np.ndarray]:
    images, labels = make_images(20, 3)
    path = tmp_path / "train.csv"
    write_csv(path, images, labels)
    return path, images, labels


def test_roundtrip(valid):
    path, images, labels = valid
    got_images, got_labels = parse_csv(path)
    assert got_images.dtype == np.uint8 and got_images.shape == (20, 28, 28)
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)


@pytest.mark.parametrize("variant", ["crlf", "bom", "no_trailing_newline", "extra_trailing_newlines", "gz",
                                     "reordered_columns"])
def test_valid_variants(valid, tmp_path, variant):
    path, images, labels = valid
    text = path.read_bytes()
    out = tmp_path / "variant.csv"
    if variant == "crlf":
        text = text.replace(b"\n", b"\r\n")
    elif variant == "bom":
        text = b"\xef\xbb\xbf" + text
    elif variant == "no_trailing_newline":
        text = text.rstrip(b"\n")
    elif variant == "extra_trailing_newlines":
        text = text + b"\n\n"
    elif variant == "gz":
        out = tmp_path / "variant.csv.gz"
        text = gzip.compress(text)
    elif variant == "reordered_columns":  # label last, pixels reversed
        rows = [line.split(b",") for line in text.strip().split(b"\n")]
        text = b"\n".join(b",".join(r[1:][::-1] + r[:1]) for r in rows) + b"\n"
    out.write_bytes(text)
    got_images, got_labels = parse_csv(out)
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)


def _corrupt(path: Path, line: int, column: int, value: str) -> None:
    lines = path.read_text().split("\n")
    cells = lines[line - 1].split(",")
    cells[column - 1] = value
    lines[line - 1] = ",".join(cells)
    path.write_text("\n".join(lines))


@pytest.mark.parametrize("line,column,value,expected", [
    (3, 5, "1.5", r"line 3, column 5 \(pixel4\): expected an integer 0-255, found '1.5'"),
    (4, 2, "abc", r"line 4, column 2 \(pixel1\): expected an integer 0-255, found 'abc'"),
    (5, 7, "", r"line 5, column 7 \(pixel6\): expected an integer 0-255, found an empty cell"),
    (2, 1, "10", r"line 2, column 1 \(label\): expected a label in 0-9, found '10'"),
    (6, 1, "-1", r"line 6, column 1 \(label\): expected an integer 0-9, found '-1'"),
    (7, 785, "256", r"line 7, column 785 \(pixel784\): expected a pixel in 0-255, found '256'"),
    (8, 300, "1000", r"line 8, column 300 \(pixel299\): expected a pixel in 0-255, found '1000'"),
])
def test_bad_cells_are_located(valid, line, column, value, expected):
    path = valid[0]
    _corrupt(path, line, column, value)
    with pytest.raises(DataError, match=re.escape(str(path)) + ", " + expected):
        parse_csv(path)


@pytest.mark.parametrize("cell,shown", [(b"\x00", r"'\x00'"), (b"1\x1b[2J", r"'1\x1b[2J'"), (b"\xe9", r"'\xe9'"),
                                        (b"\xef\xbb\xbf7", r"'\ufeff7'"), (b"\xc3\xa9", "'é'")])
def test_a_cell_of_control_characters_or_other_encodings_is_shown_as_it_is_in_the_file(valid, cell, shown):
    path = valid[0]
    lines = path.read_bytes().split(b"\n")
    cells = lines[2].split(b",")
    cells[4] = cell  # a NUL, an escape sequence, Windows-1252, a byte-order mark mid-file, UTF-8
    lines[2] = b",".join(cells)
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(DataError) as error:
        parse_csv(path)
    assert str(error.value).endswith(f"line 3, column 5 (pixel4): expected an integer 0-255, found {shown}.")
    assert str(error.value).isprintable()


def test_a_quoted_csv_is_located_with_its_label_named_and_the_quotes_named_as_the_cause(valid):
    path = valid[0]
    lines = path.read_text().split("\n")
    quoted = [",".join(f'"{cell}"' for cell in line.split(",")) if line else line for line in lines]
    path.write_text("\n".join(quoted))  # as some spreadsheets save it: every cell in quotes, the header too
    with pytest.raises(DataError, match=re.escape(f"{path}, line 2, column 1 (\"label\"): expected an integer 0-9, "
                                                  f"found '{quoted[1].split(',')[0]}' (cells in quotes are not read")):
        parse_csv(path)


@pytest.mark.parametrize("mutate,expected", [
    (lambda t: "", "the file is empty"),
    (lambda t: t.split("\n")[0] + "\n", "has a header but no data rows"),
    (lambda t: t.replace("pixel5,", "pixelX,", 1), r"line 1: expected a header with 785 columns.*missing \['pixel5'\].*unexpected \['pixelX'\]"),
    (lambda t: t.replace(",pixel784", "", 1), "line 1: expected a header with 785 columns.*found 784 columns"),
    (lambda t: t.replace("\n", ",7\n", 3).replace(",7\n", "\n", 2), r"line 3: expected 785 values \(label and 784 pixels\), found 786"),
    (lambda t: t[: len(t) // 2], r"expected 785 values .*found \d+ \(the file may be truncated\)"),
    (lambda t: t.replace("\n", "\n\n", 2).replace("\n\n", "\n", 1), "line 3: empty line"),
])
def test_bad_structure(valid, mutate, expected):
    path = valid[0]
    path.write_text(mutate(path.read_text()))
    with pytest.raises(DataError, match=re.escape(str(path)) + ".*" + expected):
        parse_csv(path)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="missing.csv: file not found.*make data"):
        parse_csv(tmp_path / "missing.csv")
    # What is there instead of a file is named: a link to nothing, a pipe (never opened: that would wait).
    (tmp_path / "linked.csv").symlink_to(tmp_path / "moved.csv")
    with pytest.raises(DataError, match=f"linked.csv: a link to {tmp_path}/moved.csv, which does not exist"):
        parse_csv(tmp_path / "linked.csv")
    os.mkfifo(tmp_path / "pipe.csv")
    with pytest.raises(DataError, match=r"pipe.csv: not a regular file \(a pipe or a device\)"):
        parse_csv(tmp_path / "pipe.csv")


def test_cache_is_used_and_invalidated(valid):
    path, images, labels = valid
    load_csv(path)
    assert cache_path(path).exists()
    np.testing.assert_array_equal(load_csv(path)[1], labels)
    # Same size, new content: a stale cache must not be served.
    text = path.read_text().split("\n")
    first = text[1].split(",")
    first[0] = str((int(first[0]) + 1) % 10)
    text[1] = ",".join(first)
    path.write_text("\n".join(text))
    assert load_csv(path)[1][0] == (labels[0] + 1) % 10


def test_a_csv_replaced_while_it_is_read_is_cached_under_the_bytes_that_were_parsed(valid, monkeypatch):
    path, images, labels = valid
    first = path.read_bytes()
    other_images, other_labels = make_images(20, 4)
    digest = file_digest

    def replaced_after_its_digest(*args, **kwargs):
        found = digest(*args, **kwargs)
        write_csv(path, other_images, other_labels)  # another writer renames a new CSV into place
        return found

    monkeypatch.setattr("fmnist.data.csv_io.file_digest", replaced_after_its_digest)
    np.testing.assert_array_equal(load_csv(path)[0], other_images)
    monkeypatch.undo()
    path.write_bytes(first)  # the first CSV back: its own rows, not those parsed under its digest
    got_images, got_labels = load_csv(path)
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)


def test_a_csv_that_cannot_be_read_is_named_so_not_as_a_place_that_cannot_be_written(valid, monkeypatch):
    path, _, _ = valid

    def denied(name, *args, **kwargs):  # as opening a file of another user's, mode 600, is
        raise PermissionError(errno.EACCES, "Permission denied", str(name))

    monkeypatch.setattr("fmnist.data.csv_io.file_digest", denied)
    with pytest.raises(DataError, match=r"train.csv: could not be read \(\[Errno 13\] Permission denied"):
        load_csv(path)
    assert not cache_path(path).exists()


def test_corrupt_cache_is_rebuilt(valid):
    path, _, labels = valid
    cache_path(path).write_bytes(b"not a zip")
    np.testing.assert_array_equal(load_csv(path)[1], labels)


def test_small_blocks_parse_the_same_and_locate_errors(valid, monkeypatch):
    path, images, labels = valid
    original = path.read_text()
    monkeypatch.setattr("fmnist.data.csv_io.BLOCK_BYTES", 3000)  # about two lines per block
    got_images, got_labels = parse_csv(path)
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)
    _corrupt(path, 15, 100, "x")
    with pytest.raises(DataError, match=r"line 15, column 100 \(pixel99\): expected an integer 0-255, found 'x'"):
        parse_csv(path)
    path.write_text(original)
    _corrupt(path, 17, 3, "300")
    path.write_text(path.read_text().replace("\n", "\r\n"))
    with pytest.raises(DataError, match=r"line 17, column 3 \(pixel2\): expected a pixel in 0-255, found '300'"):
        parse_csv(path)


@pytest.mark.parametrize("cell", ["x" * 1_000_000, "7" * 1_000_000])  # not a number; a number far out of range
def test_a_huge_bad_cell_is_quoted_by_a_short_prefix_with_its_length(valid, cell):
    path, _, _ = valid
    lines = path.read_text().splitlines()
    lines[2] = cell + lines[2][lines[2].index(","):]  # line 3, column 1
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as error:
        parse_csv(path)
    message = str(error.value)
    assert "line 3, column 1 (label)" in message and f"'{cell[:40]}...' (1,000,000 characters)" in message
    assert len(message) < 400


def test_a_size_limit_counts_decompressed_bytes(valid, tmp_path):
    path, images, _ = valid
    packed = tmp_path / "train.csv.gz"
    packed.write_bytes(gzip.compress(path.read_bytes()))
    size = len(path.read_bytes())
    assert len(parse_csv(packed, max_bytes=size)[0]) == len(images)
    with pytest.raises(DataError, match=r"train.csv.gz: more than the 0 MB accepted here once decompressed"):
        parse_csv(packed, max_bytes=size - 1)


@pytest.mark.parametrize("damage,words", [
    (lambda packed: packed[:len(packed) // 2], "its gzip data is cut short, as by an interrupted copy or download"),
    (gzip.decompress, "it is not gzip-compressed, though its name ends in .gz"),  # a plain CSV under a .gz name
], ids=["cut short", "not gzip"])
def test_a_csv_gz_cut_short_or_not_gzip_is_named_so(valid, tmp_path, damage, words):
    path, _, _ = valid
    packed = tmp_path / "fashion-mnist_train.csv.gz"
    packed.write_bytes(damage(gzip.compress(path.read_bytes())))
    with pytest.raises(DataError, match=re.escape(f"{packed}: could not be read ({words}). Expected a readable .csv, "
                                                  "or a .csv.gz that `gunzip -t` accepts.")):
        load_csv(packed)
    assert not cache_path(packed).exists()


def test_the_same_rows_plain_or_gzipped_are_the_same_data(tmp_path):
    # A run's data_digest identifies its rows, not how they were stored: a .csv.gz of them is the same data.
    plain, packed, other = tmp_path / "a.csv", tmp_path / "b.csv.gz", tmp_path / "c.csv"
    write_csv(plain, *make_images(20, 0))
    write_csv(other, *make_images(20, 1))
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    assert csv_digest(plain) == csv_digest(packed) != csv_digest(other)
    packed.write_bytes(packed.read_bytes()[:40])  # truncated
    with pytest.raises(DataError, match="b.csv.gz: could not be read"):
        csv_digest(packed)


def test_a_csv_whose_cache_cannot_be_written_is_parsed_once_per_process(tmpfs, caplog):
    disk = tmpfs("size=1m")
    images, labels = make_images(20, 0)
    write_csv(disk / "train.csv", images, labels)
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    for _ in range(3):  # a run's checks, then its data module
        got_images, got_labels = load_csv(disk / "train.csv")
        np.testing.assert_array_equal(got_images, images)
    assert caplog.text.count("could not write the parse cache") == 1
