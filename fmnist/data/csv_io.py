"""Kaggle-format Fashion-MNIST CSVs: strict vectorised parsing, writing, and a cache of parsed arrays.

A CSV has a header naming `label` and `pixel1`..`pixel784` (in any order) and one image per row,
every cell an integer (labels 0-9, pixels 0-255). Where labels are optional (`predict.py`), a file
may have the 784 pixel columns alone. Parsing works on the raw bytes with numpy (its speed against pandas:
docs/architecture.md), and every malformed cell is reported with its 1-based line and column instead of
being coerced.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import zipfile
import zlib
from pathlib import Path
from typing import Iterable

import numpy as np

from fmnist import IMAGE_SIDE, NUM_CLASSES
from fmnist.errors import DataError
from fmnist.fsio import atomic_output, atomic_write, file_digest, not_a_file

log = logging.getLogger(__name__)

N_PIXELS = IMAGE_SIDE * IMAGE_SIDE
LABELS = f"0-{NUM_CLASSES - 1}"  # the class ids a label cell may hold
HEADER = ["label"] + [f"pixel{i}" for i in range(1, N_PIXELS + 1)]
CACHE_VERSION = 1
BLOCK_BYTES = 1 << 22
_NL, _CR, _COMMA, _ZERO = 10, 13, 44, 48


def require_file(path: Path) -> None:
    """Raise DataError if `path` is not an existing file."""
    if not path.is_file():
        raise DataError(f"{path}: {not_a_file(path)}. Expected a Kaggle-format Fashion-MNIST CSV; `make data` (or "
                        "`python scripts/get_data.py`) creates one, or name the directory holding it (data.dir=DIR; "
                        "--data-dir DIR for the scripts).")


GZIP_MAGIC = b"\x1f\x8b"  # the first bytes of every gzip file

# What reading a .csv or .csv.gz raises for a file that is there but cannot be read (zlib.error: a corrupt
# deflate stream; gzip.BadGzipFile is an OSError).
_UNREADABLE = (OSError, EOFError, zlib.error)


def _unreadable(path: Path, error: BaseException) -> DataError:
    """The paragraph for a CSV that is there but cannot be read (`_UNREADABLE`)."""
    # Python's words for a .csv.gz cut short ("end-of-stream marker") or not gzip at all ("Not a gzipped file (b'la')")
    # do not say what is wrong with the file.
    if isinstance(error, EOFError):
        cause = "its gzip data is cut short, as by an interrupted copy or download"
    elif isinstance(error, gzip.BadGzipFile) and _first_bytes(path, len(GZIP_MAGIC)) != GZIP_MAGIC:
        cause = "it is not gzip-compressed, though its name ends in .gz"
    else:
        cause = str(error)
    return DataError(f"{path}: could not be read ({cause}). Expected a readable .csv, or a .csv.gz that `gunzip -t` "
                     "accepts.")


def _first_bytes(path: Path, n: int) -> bytes | None:
    """The first `n` bytes of `path`, or None if it cannot be read."""
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError:
        return None


def csv_digest(path: Path) -> str:
    """SHA-1 of a CSV's text, decompressed from a `.csv.gz`: what identifies a run's data (`data_digest` in its
    record), so that the same rows, plain or gzipped, are the same data. DataError if it cannot be read."""
    try:
        return file_digest(path, opener=gzip.open if path.name.endswith(".gz") else open)
    except _UNREADABLE as e:
        raise _unreadable(path, e) from e


def read_raw(path: Path, max_bytes: int | None = None) -> bytes:
    """Return the bytes of a `.csv` or `.csv.gz` file, or raise DataError if it cannot be read or holds
    more than `max_bytes` (decompressed: a small .gz can expand to gigabytes)."""
    require_file(path)
    gz = path.name.endswith(".gz")
    try:
        if max_bytes is None:
            raw = path.read_bytes()
            return gzip.decompress(raw) if gz else raw
        with (gzip.open if gz else open)(path, "rb") as f:
            raw = f.read(max_bytes + 1)
        if len(raw) > max_bytes:
            raise DataError(f"{path}: more than the {max_bytes // 2 ** 20} MB accepted here"
                            f"{' once decompressed' if gz else ''}; split it into smaller CSVs.")
        return raw
    except _UNREADABLE as e:
        raise _unreadable(path, e) from e


def parse_csv(path: Path, require_label: bool = True, max_bytes: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Parse a Kaggle-format CSV into (images uint8 [N, 28, 28], labels int64 [N]).

    With `require_label=False` a file without a `label` column is accepted too; its labels are None.
    `max_bytes` refuses a larger file (its decompressed size), for inputs that are not the training data.
    Raises DataError naming the file, line, column and what was expected for any malformed input.
    """
    path = Path(path)
    return _parse_text(path, read_raw(path, max_bytes), require_label)


def _read_with_digest(path: Path) -> tuple[bytes, str]:
    """The text of a `.csv` or `.csv.gz` and the SHA-1 of the file's bytes it came from: a cache keyed by it holds
    the rows of those bytes, even if the file was replaced since its digest was looked up."""
    require_file(path)
    try:
        data = path.read_bytes()
        return gzip.decompress(data) if path.name.endswith(".gz") else data, hashlib.sha1(data).hexdigest()
    except _UNREADABLE as e:
        raise _unreadable(path, e) from e


def _parse_text(path: Path, raw: bytes, require_label: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """`parse_csv` of the text `raw` read from `path` (named in the messages)."""
    if raw.startswith(b"\xef\xbb\xbf"):  # UTF-8 byte-order mark, as Excel writes it
        raw = raw[3:]
    if not raw.strip():
        raise DataError(f"{path}: the file is empty. Expected a header line and one row per image.")
    header_end = raw.find(b"\n")
    header_end = len(raw) if header_end < 0 else header_end
    header = raw[:header_end].decode("utf-8", errors="replace").rstrip("\r").split(",")
    order = _column_order(path, header, require_label)
    has_label = len(order) == len(HEADER)

    body = np.frombuffer(raw, np.uint8)[header_end + 1:]
    end = len(body)
    while end and body[end - 1] in (_NL, _CR):  # trailing newlines are fine
        end -= 1
    if end == 0:
        raise DataError(f"{path}: has a header but no data rows. Expected one row per image.")
    body = body[:end]
    # Blocks of whole lines: small temporaries are reused by the allocator instead of being
    # page-faulted in afresh, which made one pass over the whole file 3-4x slower.
    offset = header_end + 1  # body[i] is raw[offset + i]
    blocks, line, start = [], 2, 0
    while start < len(body):
        target = min(start + BLOCK_BYTES, len(body))
        newline = raw.find(b"\n", offset + target - 1)  # the first line end at or after the target
        stop = len(body) if newline < 0 else min(len(body), newline - offset + 1)
        blocks.append(_parse_block(path, header, body[start:stop], line, len(order)))
        line += len(blocks[-1])
        start = stop
    table = np.concatenate(blocks)[:, order]
    labels, pixels = (table[:, 0], table[:, 1:]) if has_label else (None, table)
    checks = ([(table[:, :1], "label", LABELS, NUM_CLASSES - 1)] if has_label else []) + [(pixels, "pixel", "0-255", 255)]
    for values, kind, allowed, limit in checks:
        if (values > limit).any():
            row, col = np.argwhere(values > limit)[0]
            file_col = int(order[col + (kind == "pixel" and has_label)])
            text = _line_text(body, int(row)).split(",")[file_col]
            raise DataError(f"{path}, line {row + 2}, column {file_col + 1} ({column_name(header[file_col])}): "
                            f"expected a {kind} in {allowed}, found {quote(text)}.")
    return (pixels.astype(np.uint8).reshape(-1, IMAGE_SIDE, IMAGE_SIDE),
            None if labels is None else labels.astype(np.int64))


def _parse_block(path: Path, header: list[str], block: np.ndarray, first_line: int,
                 n_cols: int = len(HEADER)) -> np.ndarray:
    """Cells of whole CSV lines as an int16 table [rows, n_cols] in the file's column order.

    Values with more than three digits become 1000 (out of range, reported by the caller).
    """
    cr = block == _CR
    if cr.any():  # CRLF line endings: drop each CR that precedes a LF; any other CR is an error
        at = np.flatnonzero(cr)
        follows = np.append(block, np.uint8(_NL))[at + 1]
        if (follows != _NL).any():
            raise _cell_error(path, header, block, int(at[follows != _NL][0]), "an integer", first_line,
                              found="a carriage return inside the cell")
        block = block[~cr]
    if block[-1] != _NL:
        block = np.append(block, np.uint8(_NL))

    digit = block - np.uint8(_ZERO)  # wraps around for non-digits, so `< 10` means a digit
    is_digit = digit < 10
    bad = ~is_digit & (block != _COMMA) & (block != _NL)
    if bad.any():
        raise _cell_error(path, header, block, int(np.argmax(bad)), "an integer", first_line)

    seps = np.flatnonzero(~is_digit)  # every cell ends at a comma or a newline
    lengths = np.diff(seps, prepend=-1) - 1
    row_last_cell = np.flatnonzero(block[seps] == _NL)
    counts = np.diff(row_last_cell, prepend=-1)
    if (counts != n_cols).any():
        row = int(np.argmax(counts != n_cols))
        line = first_line + row
        if counts[row] == 1 and lengths[row_last_cell[row]] == 0:
            raise DataError(f"{path}, line {line}: empty line. Expected {n_cols} comma-separated integers.")
        hint = " (the file may be truncated)" if counts[row] < n_cols else ""
        what = f"label and {N_PIXELS} pixels" if n_cols == len(HEADER) else f"{N_PIXELS} pixels"
        raise DataError(f"{path}, line {line}: expected {n_cols} values ({what}), "
                        f"found {counts[row]}{hint}.")
    if (lengths == 0).any():
        raise _cell_error(path, header, block, int(seps[np.argmax(lengths == 0)]), "an integer", first_line)

    values = digit[seps - 1].astype(np.int16)
    values += np.where(lengths >= 2, digit[seps - 2], 0).astype(np.int16) * 10
    values += np.where(lengths >= 3, digit[seps - 3], 0).astype(np.int16) * 100
    values[lengths > 3] = 1000
    return values.reshape(-1, n_cols)


QUOTE_CHARS = 40  # the most of a bad cell or name a message repeats: a bad "line" may be a gigabyte long


def quote(text: str | bytes | np.ndarray) -> str:
    """`text` in quotes for a message; cut to QUOTE_CHARS, with its full length, when longer."""
    size = len(text)
    head = text[:QUOTE_CHARS]
    if not isinstance(head, str):  # bytes that are not UTF-8 (a Windows-1252 'é') shown as what they are: '\xe9'
        head = bytes(head).decode("utf-8", errors="backslashreplace")
    # Control characters as escapes ('\x00', '\x1b'): printed as they are, they are invisible or act on the terminal,
    # and the message would show a cell ('' or ' ') that the reader cannot find in the file.
    head = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in head)
    return f"'{head}'" if size <= QUOTE_CHARS else f"'{head}...' ({size:,} characters)"


def column_name(name: str) -> str:
    """A header name for a message: as it is, or quoted and cut when it is too long to repeat."""
    return name if len(name) <= QUOTE_CHARS else quote(name)


def _line_text(body: np.ndarray, row: int) -> str:
    """The text of data row `row` (0-based), for error messages."""
    ends = np.flatnonzero(body == _NL)
    start = int(ends[row - 1]) + 1 if row > 0 else 0
    stop = int(ends[row]) if row < len(ends) else len(body)
    return bytes(body[start:stop]).decode("utf-8", errors="replace").rstrip("\r")


def _column_order(path: Path, header: list[str], require_label: bool = True) -> np.ndarray:
    """Indices that put the file's columns into HEADER order; the header may list them in any order.

    Without `require_label`, a header of the pixel columns alone gives the pixels' order only.
    """
    found = [name.strip().strip('"') for name in header]
    if not require_label and len(found) == N_PIXELS and set(found) == set(HEADER[1:]):
        return np.array([found.index(name) for name in HEADER[1:]])
    if len(found) != len(HEADER) or set(found) != set(HEADER):
        missing = [n for n in HEADER if n not in found][:3]
        extra = [n if len(n) <= QUOTE_CHARS else n[:QUOTE_CHARS] + "..." for n in found if n not in HEADER][:3]
        raise DataError(
            f"{path}, line 1: expected a header with {len(HEADER)} columns named label, pixel1, ..., "
            f"pixel{N_PIXELS} (any order{'' if require_label else '; the label column may be left out'}); "
            f"found {len(found)} columns"
            + (f", missing {missing}" if missing else "") + (f", unexpected {extra}" if extra else "") + ".")
    if len(set(found)) != len(found):
        raise DataError(f"{path}, line 1: the header names a column twice.")
    return np.array([found.index(name) for name in HEADER])


def _locate(block: np.ndarray, pos: int, first_line: int) -> tuple[int, int, str]:
    """(1-based file line, 1-based column, the cell quoted by `quote`) of the byte at `pos` of a block of lines."""
    newlines = np.flatnonzero(block[:pos] == _NL)
    line_start = int(newlines[-1]) + 1 if len(newlines) else 0
    line = first_line + len(newlines)
    commas = np.flatnonzero(block[line_start:pos] == _COMMA)
    column = len(commas) + 1
    cell_start = line_start + int(commas[-1]) + 1 if len(commas) else line_start
    ends = np.flatnonzero((block[pos:] == _COMMA) | (block[pos:] == _NL))
    cell_end = pos + int(ends[0]) if len(ends) else len(block)
    return line, column, quote(block[cell_start:cell_end])


def _cell_error(path: Path, header: list[str], block: np.ndarray, pos: int, expected: str,
                first_line: int, found: str | None = None) -> DataError:
    line, column, quoted = _locate(block, pos, first_line)
    name = column_name(header[column - 1]) if column <= len(header) else "?"
    found = found or (quoted if quoted != "''" else "an empty cell")
    if expected == "an integer":
        expected = f"an integer {LABELS}" if name.strip().strip("\"'") == "label" else "an integer 0-255"
    hint = " (cells in quotes are not read: save the CSV without quoting)" if '"' in found else ""
    return DataError(f"{path}, line {line}, column {column} ({name}): expected {expected}, found {found}{hint}.")


def write_csv(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """Write images [N, 28, 28] and labels [N] as a Kaggle-format CSV (atomically)."""
    table = np.concatenate([np.asarray(labels).reshape(-1, 1), np.asarray(images).reshape(len(labels), -1)], axis=1)
    # Build the text from a lookup of the 256 possible cells: much faster than np.savetxt.
    cells = np.array([str(i).encode() for i in range(256)], dtype=object)
    lines = [b",".join(row) for row in cells[table.astype(np.int64)]]
    opener = gzip.open if path.name.endswith(".gz") else open
    with atomic_output(path) as tmp, opener(tmp, "wb") as f:
        f.write((",".join(HEADER) + "\n").encode())
        f.write(b"\n".join(lines) + b"\n")


def cache_path(path: Path) -> Path:
    """Where the parsed arrays of the CSV `path` are cached: a hidden `.npz` beside it."""
    return path.with_name(f".{path.name}.cache.npz")


def _cache_problem(images: np.ndarray, labels: np.ndarray) -> str | None:
    """What is wrong with cached arrays (a digest only says which file they came from), or None."""
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE):
        return f"images are {images.dtype} {images.shape}, expected uint8 [N, {IMAGE_SIDE}, {IMAGE_SIDE}]"
    if labels.dtype != np.int64 or labels.shape != (len(images),):
        return f"labels are {labels.dtype} {labels.shape}, expected int64 [{len(images)}]"
    if len(labels) == 0 or labels.min() < 0 or labels.max() >= NUM_CLASSES:
        return f"labels outside {LABELS}" if len(labels) else "no rows"
    return None


# CSVs parsed in this process whose cache could not be written (a read-only or full data directory), by path and
# digest: a run loads each CSV several times (its checks, then its data module), and would parse it, and warn, each time.
_NOT_CACHED: dict[tuple[Path, str], tuple[np.ndarray, np.ndarray]] = {}


def load_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Parse `path`, or return the arrays cached beside it if the cache was built from identical bytes."""
    return load_csvs([path])[0]


def load_csvs(paths: Iterable[Path]) -> list[tuple[np.ndarray, np.ndarray]]:
    """`load_csv` of each path, their caches written only once every one has parsed: a command that refuses
    one CSV of a pair (the test split of `make data`'s or a run's) leaves no cache of the other behind."""
    loaded, parsed = [], []
    for path in map(Path, paths):
        require_file(path)
        try:
            digest = file_digest(path)
        except _UNREADABLE as e:  # no permission: said so, not taken for a place that cannot be written
            raise _unreadable(path, e) from e
        arrays = _cached(path, digest)
        if arrays is None:
            raw, digest = _read_with_digest(path)
            arrays = _parse_text(path, raw)
            parsed.append((path, digest, arrays))
        loaded.append(arrays)
    for path, digest, (images, labels) in parsed:
        _write_cache(path, digest, images, labels)
    return loaded


def _cached(path: Path, digest: str) -> tuple[np.ndarray, np.ndarray] | None:
    """The arrays of `path` parsed before from bytes of this digest (its cache, or this process's memory), or None."""
    if (path.resolve(), digest) in _NOT_CACHED:
        images, labels = _NOT_CACHED[path.resolve(), digest]
        return images.copy(), labels.copy()  # as fresh as a cache's: a caller may change them
    cache = cache_path(path)
    try:
        with np.load(cache, allow_pickle=False) as z:
            if int(z["version"]) == CACHE_VERSION and str(z["digest"]) == digest:
                images, labels = z["images"], z["labels"]
                problem = _cache_problem(images, labels)
                if problem is None:
                    return images, labels
                log.warning("ignoring cache %s: %s; parsing %s again", cache, problem, path.name)
            else:
                log.info("%s changed since it was cached: parsing it again", path)
    except FileNotFoundError:
        pass
    except (OSError, ValueError, TypeError, KeyError, EOFError, zipfile.BadZipFile) as e:  # any damage: parse again
        log.warning("ignoring unreadable cache %s (%s)", cache, e)
    return None


def _write_cache(path: Path, digest: str, images: np.ndarray, labels: np.ndarray) -> None:
    """Cache the arrays parsed from `path`'s bytes of this digest beside it, or in this process's memory if it
    cannot be written."""
    cache = cache_path(path)
    buffer = io.BytesIO()
    np.savez(buffer, images=images, labels=labels, digest=np.array(digest), version=np.array(CACHE_VERSION))
    try:
        atomic_write(cache, buffer.getvalue())
    except OSError as e:  # a read-only data directory still trains, only slower to start
        log.warning("could not write the parse cache %s (%s)", cache, e)
        _NOT_CACHED[path.resolve(), digest] = images.copy(), labels.copy()
