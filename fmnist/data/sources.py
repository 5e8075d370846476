"""Obtain the two Kaggle-format CSVs from the first source that works.

Order: CSVs already in the data directory (never overwritten); Zalando's IDX files in a directory
the user names; Debian's `dataset-fashion-mnist` package (installed with apt-get when missing and
we are root); the official download, verified against its published MD5 checksums.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import shutil
import subprocess
import urllib.request
import zlib
from pathlib import Path

import numpy as np

from fmnist import IMAGE_SIDE, NUM_CLASSES
from fmnist.data.csv_io import GZIP_MAGIC, csv_digest, load_csvs, require_file, write_csv
from fmnist.errors import DataError
from fmnist.fsio import (atomic_write, cut_short_write, exclusive_lock, missing_dirs, not_a_directory, remove_if_empty,
                         storage_errors)

log = logging.getLogger(__name__)

SPLITS = {"train": ("train", 60_000), "test": ("t10k", 10_000)}
CSV_NAMES = {"train": "fashion-mnist_train.csv", "test": "fashion-mnist_test.csv"}
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
DEBIAN_PACKAGE = "dataset-fashion-mnist"
DOWNLOAD_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
OFFICIAL_MD5 = {  # the published checksums of Zalando's gzipped IDX files
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}


def find_csv(data_dir: Path | str, split: str) -> Path:
    """The split's CSV in `data_dir`: `.csv` or `.csv.gz` (the plain name, for the error, if neither). Both
    there is DataError: which one a run read would depend on a rule the user cannot see; so is an empty
    `data_dir` (an unset shell variable), which would name the current directory, and a file. `~` is the home
    directory, as ckpt=, inputs= and out= take it (a quoted `data.dir='~/x'` reaches here unexpanded by the shell)."""
    if not str(data_dir).strip():
        raise DataError("data.dir is empty (an unset shell variable?), which would read the CSVs of the current "
                        "directory: name the directory holding them (`.` for this one).")
    data_dir = Path(data_dir).expanduser()
    if data_dir.exists() and not data_dir.is_dir():
        raise DataError(f"{data_dir}: a file, not a directory; data.dir (--data-dir for the scripts) names the "
                        f"directory that holds {' and '.join(CSV_NAMES.values())}.")
    plain = data_dir / CSV_NAMES[split]
    gz = plain.with_name(plain.name + ".gz")
    if plain.exists() and gz.exists():
        raise DataError(f"{data_dir}: holds both {plain.name} and {gz.name}; expected one {split} CSV, gzipped or "
                        "not. Move the one you do not mean away (they may differ) and run the command again.")
    return gz if gz.exists() else plain


def split_csvs(data_dir: Path) -> dict[str, Path]:
    """Each split's CSV in `data_dir` (`find_csv`), or DataError naming the first that is not there. Reads
    nothing: cheap enough to check before a command imports what it trains with."""
    paths = {split: find_csv(data_dir, split) for split in CSV_NAMES}
    for path in paths.values():
        require_file(path)
    return paths


def data_digests(data_dir: Path | str) -> dict[str, str]:
    """The SHA-1 of each split's CSV (`split_csvs`; its text, decompressed from a .csv.gz: `csv_digest`): what
    identifies a run's data (`data_digest` in its record), wherever the files live and however they are compressed."""
    return {split: csv_digest(path) for split, path in split_csvs(data_dir).items()}


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read an IDX file (gzipped or not) of unsigned bytes with `ndim` dimensions: labels [N] (1) or images
    [N, 28, 28] (3), or DataError naming the file, what is wrong with it and what was expected."""
    gz = path.suffix == ".gz"
    what = "labels" if ndim == 1 else "images"
    # Every refusal ends so: the bytes alone (a cut download, a web page saved under the name) say little.
    expected = (f"Expected an IDX file of Fashion-MNIST {what}{', gzip-compressed' if gz else ''}, as Zalando publishes "
                f"them{'' if gz else ' (gunzipped)'}: a damaged or cut download? Fetch it again.")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror}).") from e
    if not raw:
        raise DataError(f"{path}: the file is empty (0 bytes). {expected}")
    if gz:
        if raw.startswith(b"\x00\x00\x08"):  # gunzipped by hand, the name kept
            raise DataError(f"{path}: not gzip-compressed but an uncompressed IDX file (it starts with bytes "
                            f"{raw[:4].hex(' ')}): name it without .gz, or gzip it.")
        if not raw.startswith(GZIP_MAGIC):
            raise DataError(f"{path}: not gzip-compressed (it starts with bytes {raw[:4].hex(' ')}, where gzip "
                            f"starts 1f 8b). {expected}")
        raw = _gunzip(path, raw, expected)
    unpacked = " once decompressed" if gz else ""
    if len(raw) < 4:
        raise DataError(f"{path}: holds {len(raw)} bytes{unpacked}, fewer than the 4 of an IDX file's magic number. "
                        f"{expected}")
    if raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise DataError(f"{path}: not an IDX file of unsigned bytes: it starts with bytes {raw[:4].hex(' ')}{unpacked}, "
                        f"where such a file starts 00 00 08. {expected}")
    if raw[3] != ndim:
        other = {1: " (a labels file under an images file's name?)", 3: " (an images file under a labels file's name?)"}
        raise DataError(f"{path}: its header gives {raw[3]} dimensions; expected {ndim}{other.get(raw[3], '')}. "
                        f"{expected}")
    if len(raw) < 4 + 4 * ndim:
        raise DataError(f"{path}: its header is cut short ({len(raw)} bytes; {ndim} dimensions take {4 + 4 * ndim}). "
                        f"{expected}")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    size = math.prod(dims)  # exact: np.prod wraps around at 2**64, and [2**31, 2**31, 4] would then "match" no bytes
    if data.size != size:
        cause = "cut short" if data.size < size else "longer than its header says"
        raise DataError(f"{path}: its header says {dims} ({size:,} bytes of {what}); the file holds {data.size:,}"
                        f"{unpacked}: {cause}. {expected}")
    return data.reshape(dims)


def _gunzip(path: Path, raw: bytes, expected: str) -> bytes:
    """The bytes of every gzip member in `raw` (as `gzip -d` joins them, ignoring zero bytes after the last), or
    DataError naming what is wrong: cut short, damaged, or followed by bytes that are not gzip data (which
    gzip.decompress calls "not a gzipped file", although the file starts as one)."""
    members, rest = [], raw
    while rest and not (members and not rest.strip(b"\0")):  # zero bytes after a member: padding, as gzip -d takes it
        if not rest.startswith(GZIP_MAGIC):
            raise DataError(f"{path}: its gzip data ends after {len(raw) - len(rest):,} bytes, and {len(rest):,} more "
                            f"bytes follow that are not gzip data (starting {rest[:4].hex(' ')}). {expected}")
        member = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)  # a gzip header and trailer, the CRC checked
        try:
            members.append(member.decompress(rest))
        except zlib.error as e:
            raise DataError(f"{path}: its gzip data is damaged (zlib: {e}). {expected}") from e
        if not member.eof:
            raise DataError(f"{path}: its gzip data is cut short after {len(raw):,} bytes. {expected}")
        rest = member.unused_data
    return b"".join(members)


def find_idx(directory: Path, split: str) -> tuple[Path, Path] | None:
    """(images, labels) IDX paths for a split in `directory`, gzipped or not, or None."""
    prefix = SPLITS[split][0]
    found = []
    for kind in ("images-idx3", "labels-idx1"):  # each file gzipped or not, on its own (one may be unpacked)
        names = [directory / f"{prefix}-{kind}-ubyte{suffix}" for suffix in (".gz", "")]
        found.append(next((name for name in names if name.is_file()), None))
    return (found[0], found[1]) if all(found) else None


def idx_to_csv(idx_dir: Path, data_dir: Path) -> None:
    """Convert both splits' IDX files in `idx_dir` to Kaggle-format CSVs in `data_dir`: both read and checked
    before either is written, and a failed write leaves neither (a lone CSV would block the next try)."""
    splits = {}
    for split, (_, expected_rows) in SPLITS.items():
        found = find_idx(idx_dir, split)
        if found is None:
            prefix = SPLITS[split][0]
            raise DataError(f"{idx_dir}: no {prefix}-images-idx3-ubyte[.gz] and {prefix}-labels-idx1-ubyte[.gz]; "
                            f"expected Zalando's four files under their own names ({', '.join(OFFICIAL_MD5)}). "
                            "Nothing was written.")
        images, labels = read_idx(found[0], 3), read_idx(found[1], 1)
        # Each named by its file: images of another size are no fault of the labels, a count differs between the two.
        if images.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE):
            raise DataError(f"{found[0]}: holds {images.shape[1]}x{images.shape[2]} images; expected Fashion-MNIST's "
                            f"{IMAGE_SIDE}x{IMAGE_SIDE}. Nothing was written.")
        if len(images) != len(labels):
            raise DataError(f"{found[0]} holds {len(images):,} images but {found[1]} holds {len(labels):,} labels; "
                            "expected one label per image (files of two downloads?). Nothing was written.")
        if not len(labels):  # a CSV of no rows: every command would refuse it
            raise DataError(f"{found[1]}: holds no images; expected Fashion-MNIST's {expected_rows:,} {split} images. "
                            "Nothing was written.")
        if labels.max() >= NUM_CLASSES:  # a CSV holding them would be refused by every command
            raise DataError(f"{found[1]}: holds label {int(labels.max())}; expected Fashion-MNIST's classes 0-"
                            f"{NUM_CLASSES - 1}. Nothing was written.")
        if len(labels) != expected_rows:
            log.warning("%s: %s split has %d images, Fashion-MNIST has %d", idx_dir, split, len(labels), expected_rows)
        splits[split] = images, labels, found[0]
    written = []
    try:
        for split, (images, labels, source) in splits.items():
            write_csv(data_dir / CSV_NAMES[split], images, labels)
            written.append(data_dir / CSV_NAMES[split])
            log.info("wrote %s (%d rows) from %s", data_dir / CSV_NAMES[split], len(labels), source)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise


def _install_debian_package() -> bool:
    """Try `apt-get install dataset-fashion-mnist`; True if the IDX files are there afterwards."""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return False
    log.info("installing Debian package %s", DEBIAN_PACKAGE)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}

    def apt(*args: str) -> bool:  # waits for the package manager's lock, which a fresh machine's daily apt jobs hold
        return subprocess.run(["apt-get", "-o", "DPkg::Lock::Timeout=600", "-o", "Acquire::Retries=3", *args],
                              capture_output=True, env=env).returncode == 0

    # A fresh machine's package lists may be empty or stale: update only when the first try fails.
    installed = apt("install", "-y", "-q", DEBIAN_PACKAGE) or (
        apt("update", "-q") and apt("install", "-y", "-q", DEBIAN_PACKAGE))
    return installed and find_idx(DEBIAN_DIR, "train") is not None


def _download(dest: Path, base_url: str = DOWNLOAD_URL) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for name, md5 in OFFICIAL_MD5.items():
        target = dest / name
        if not (target.is_file() and hashlib.md5(target.read_bytes()).hexdigest() == md5):
            log.info("downloading %s", base_url + name)
            with urllib.request.urlopen(base_url + name, timeout=60) as response:
                payload = response.read()
            if hashlib.md5(payload).hexdigest() != md5:
                raise DataError(f"{base_url + name}: MD5 mismatch, expected {md5}; the download is corrupt.")
            atomic_write(target, payload)  # a full disk leaves no partial file


def obtain(data_dir: Path, idx_dir: Path | None = None, allow_install: bool = True,
           allow_download: bool = True) -> str:
    """Make sure `data_dir` holds both CSVs; return a line saying where they came from. A failure leaves
    `data_dir` as it was (not even created, nor its missing parents)."""
    made = missing_dirs(data_dir)  # deepest first
    with storage_errors(key="--data-dir"):
        data_dir.mkdir(parents=True, exist_ok=True)
    try:
        # One writer at a time: a second `make data` into the directory waits, then finds the first one's CSVs,
        # instead of checking for them at the same moment and writing a pair from two sources.
        with exclusive_lock(data_dir, when_busy=lambda: log.info(
                "another process is putting the CSVs into %s: waiting for it to finish", data_dir)):
            with storage_errors(key="--data-dir"):  # a full disk while the CSVs are written
                return _obtain(data_dir, idx_dir, allow_install, allow_download)
    except BaseException:
        if made:
            shutil.rmtree(data_dir, ignore_errors=True)
            for parent in made[1:]:
                remove_if_empty(parent)
        raise


def _obtain(data_dir: Path, idx_dir: Path | None, allow_install: bool, allow_download: bool) -> str:
    csvs = [data_dir / name for name in CSV_NAMES.values()]
    # A CSV's write that a kill cut short leaves its hidden temporary file (`.NAME.PID-TOKEN.tmp`, the CSV's size);
    # under this command's lock no other writer of the CSVs is at work, so each one is a leftover.
    names = {name for p in csvs for name in (p.name, f"{p.name}.gz")}
    for leftover in sorted(data_dir.glob(".*.tmp")):
        if cut_short_write(leftover) and leftover.name[1:].rsplit(".", 2)[0] in names:
            leftover.unlink()
            log.info("removed %s, left by a write of the CSVs that was stopped", leftover)
    if all(p.is_file() or Path(f"{p}.gz").is_file() for p in csvs):
        # A split both plain and gzipped, or a CSV a run would refuse (an interrupted copy, a header alone):
        # refused here, not reported as ready. Parsing also caches the arrays that the first run reads.
        try:
            loaded = load_csvs([find_csv(data_dir, split) for split in CSV_NAMES])
        except DataError as e:
            raise DataError(f"{e} The CSVs in {data_dir} are left as they are: replace that file, or move both "
                            "away and run `make data` again.") from e
        counts = [f"{len(labels)} {split}" for split, (_, labels) in zip(CSV_NAMES, loaded)]
        (_, train), (_, test) = loaded
        if len(train) < len(test):  # Fashion-MNIST's are 60,000 and 10,000: the two files swapped, or a subset
            log.warning("%s: the training CSV has fewer images (%d) than the test CSV (%d); Fashion-MNIST's have "
                        "60,000 and 10,000: are the two files swapped?", data_dir, len(train), len(test))
        unread = f"; --idx-dir {idx_dir} was not read" if idx_dir is not None else ""  # said, not ignored silently
        return f"CSVs already in {data_dir}: left untouched ({' and '.join(counts)} images){unread}"
    # A link to nothing (a volume not mounted) is there too: the CSVs are never written through or over it.
    present = [q for p in csvs for q in (p, Path(f"{p}.gz")) if q.exists() or q.is_symlink()]
    dangling = [q.name for q in present if not q.exists()]
    if dangling:
        raise DataError(f"{data_dir}: {' and '.join(dangling)} {'is a link' if len(dangling) == 1 else 'are links'} to "
                        "nothing (a volume not mounted?); refusing to write through or over a link. Mend or mount what "
                        "it names, or move it away and run `make data` again.")
    if present:
        shown = ", ".join(f"{q.name}{'' if q.is_file() else ' (not a file)'}" for q in present)
        raise DataError(f"{data_dir} holds only {shown} of the two CSVs; refusing to overwrite anything. Put both "
                        "CSVs there, or move what is there away and run `make data` again.")
    if idx_dir is not None:  # named on purpose: converted, or refused naming what is missing; never another source
        if not idx_dir.is_dir():
            raise DataError(f"--idx-dir {idx_dir}: {not_a_directory(idx_dir)}; expected the directory holding Zalando's four "
                            "*-idx?-ubyte.gz files.")
        idx_to_csv(idx_dir, data_dir)
        return f"converted IDX files from {idx_dir}"
    tried = []
    if find_idx(DEBIAN_DIR, "train") and find_idx(DEBIAN_DIR, "test"):
        idx_to_csv(DEBIAN_DIR, data_dir)
        return f"converted IDX files from {DEBIAN_DIR}"
    tried.append(f"no IDX files in {DEBIAN_DIR}")
    if allow_install and _install_debian_package():
        idx_to_csv(DEBIAN_DIR, data_dir)
        return f"installed {DEBIAN_PACKAGE} and converted {DEBIAN_DIR}"
    tried.append(f"could not install Debian's {DEBIAN_PACKAGE} (needs root and apt-get)" if allow_install else
                 f"did not install Debian's {DEBIAN_PACKAGE} (--no-install)")
    if allow_download:
        raw = data_dir / "raw"
        try:
            _download(raw)
            idx_to_csv(raw, data_dir)
            return f"downloaded and verified {DOWNLOAD_URL}"
        except (OSError, DataError) as e:
            remove_if_empty(raw)  # what was downloaded stays for the next try, checked by its MD5
            tried.append(f"download from {DOWNLOAD_URL} failed ({e})")
    raise DataError(
        "Could not obtain Fashion-MNIST: " + "; ".join(tried) + ". Do one of: (1) put Kaggle's "
        f"{' and '.join(CSV_NAMES.values())} into {data_dir}; (2) put Zalando's four "
        "*-idx?-ubyte.gz files into a directory and run `python scripts/get_data.py --idx-dir DIR`; "
        f"(3) as root on Debian/Ubuntu: `apt-get install {DEBIAN_PACKAGE}`, then `make data`.")
