"""Writing files so that a reader never sees half of one, OS errors a user can fix as one paragraph, and
reading a checkpoint only with `weights_only=True` (no code from a file ever runs).

Also what a refused command leaves behind: nothing. Hydra writes a few files before a command's checks run (a
sweep's multirun.yaml, a job's log); they are noted as early writes and put back if the command is refused or
stopped before its checks pass (`early_writes_undone_if_stopped`), and a job's log lines are held in memory until
then (`hold_log_until_kept`)."""

from __future__ import annotations

import argparse
import errno
import fcntl
import hashlib
import logging
import os
import pickle
import re
import secrets
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import yaml

from fmnist.errors import CheckpointError, ConfigError, StorageError, first_line

RUN_DIR_KEY, SWEEP_DIR_KEY = "hydra.run.dir", "hydra.sweep.dir"  # where Hydra puts a run's or a sweep's files

# Causes a user can act on (free space, a writable directory), with the words that say so.
_CAUSES = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
           errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
           errno.EPERM: "permission denied",
           # Output paths that cannot be made: a file where a directory is needed, or a name too long.
           errno.EEXIST: "a file is in the way of a directory to create", errno.ENOTDIR: "a part of the path is a file",
           errno.EISDIR: "it is a directory", errno.ENAMETOOLONG: "the name is too long for the file system"}
_SPACE = {errno.ENOSPC, errno.EDQUOT}
NAME_MAX = 255  # bytes in a file's name on Linux's file systems (ext4, xfs, btrfs, tmpfs)


_TOKEN_BYTES = 4  # of the random part of a temporary file's name (`atomic_output`)


def cut_short_write(path: Path) -> bool:
    """Whether `path` is the temporary file of an `atomic_output` write (with its default suffix) that a kill cut
    short: `.NAME.PID-TOKEN.tmp`, which a finished or failed write removes."""
    return re.fullmatch(rf"\..+\.\d+-[0-9a-f]{{{2 * _TOKEN_BYTES}}}\.tmp", Path(path).name) is not None


@contextmanager
def atomic_output(path: Path, suffix: str = ".tmp", replace: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write to; once the block succeeds, flush it to disk and
    rename it into place, in one step. On any error the temporary file is removed and `path` is untouched.

    A crash, a kill or a full disk leaves the previous file (or none), never a truncated one. The
    temporary name is unique to the process and the call, so two writers of one path never share it
    (the last rename wins, whole). `suffix` keeps an extension that a writer needs (e.g. `.onnx`).
    `replace=False`: a file that appeared at `path` meanwhile (another command writing the same output)
    is kept, and ConfigError says so; the file goes into place by a hard link, which fails if one exists.
    """
    path = Path(path)
    tail = f".{os.getpid()}-{secrets.token_hex(_TOKEN_BYTES)}{suffix}"
    head = f".{path.name}"
    while len((head + tail).encode()) > NAME_MAX and len(head) > 1:  # a name the file system takes for `path`
        head = head[:-1]
    tmp = path.with_name(head + tail)
    try:
        yield tmp
        flush_to_disk(tmp)
        if replace:
            os.replace(tmp, path)
        else:
            _link_new(tmp, path)
    except OSError as e:
        # Name the file the user asked for, not our temporary; an OSError without an errno (raised by a library
        # with its own message) keeps that message, which a filename would replace with "[Errno None] None".
        if e.errno is not None and (not e.filename or e.filename == str(tmp)):
            e.filename = str(path)
        raise
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # a read-only file system refuses even this: the error above is the one to report
            pass


def flush_to_disk(path: Path) -> None:
    """Wait until the file `path` is on disk: a full disk that the writes did not report (delayed allocation, a
    network file system) is reported here, as OSError."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _link_new(tmp: Path, path: Path) -> None:
    """Put `tmp` in place as `path` only if no file is there (the test and the write are one step)."""
    taken = ConfigError(f"{path} was created by another process while this command ran; it is kept as that "
                        "process wrote it, and this command's output was not written.")
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise taken from None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        if path.exists():  # a file system without hard links: tested, then renamed
            raise taken from None
        os.replace(tmp, path)


def shown(text: str | Path) -> str:
    """`text` as a figure or a terminal can show it: bytes of a file's name that are not UTF-8 (Python's surrogate
    escapes) become U+FFFD, which matplotlib and a UTF-8 console take."""
    return str(text).encode("utf-8", errors="surrogateescape").decode("utf-8", errors="replace")


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write `data` to `path` atomically (see `atomic_output`). Text is written as UTF-8, and a path in it whose
    name holds bytes that are not UTF-8 (Python's surrogate escapes) as those bytes, as the file system holds it."""
    with atomic_output(path) as tmp:
        tmp.write_bytes(data.encode("utf-8", errors="surrogateescape") if isinstance(data, str) else data)


# Files that something outside this code (Hydra) writes before a command's checks can run, with what
# they held before (None: they did not exist), so that a refused command puts them back.
_EARLY_WRITES: dict[Path, bytes | None] = {}


# The output directories Hydra was about to make and that existed already (`note_dirs_to_be_made`): a
# refusal never removes them, even when it leaves them empty.
_DIRS_BEFORE: set[Path] = set()

# The ones that did not exist yet, with their missing parents: a refusal removes those it leaves empty, so that a
# refused command leaves no `outputs/evaluations/` behind.
_DIRS_TO_BE_MADE: list[Path] = []


def path_argument(text: str) -> Path:
    """An argparse `type` for a path option: an empty one (`--data-dir ''`, an unset shell variable) is refused
    rather than read as the current directory."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path; give a file or directory name (`.` for this directory)")
    return Path(text)


def output_path_argument(text: str) -> Path:
    """`path_argument` for a path a command writes: `-` is refused too, which would be a file of that name here,
    not the standard output it means to many commands."""
    if text.strip() == "-":
        raise argparse.ArgumentTypeError("`-` (standard output) is not written to here: give a file name (`./-` for a "
                                         "file of that name)")
    return path_argument(text)


@contextmanager
def exclusive_lock(path: Path, when_busy: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold an exclusive lock (`flock`) on `path` for the block: one writer at a time. When another process holds
    it, `when_busy` is called first (to say so, or to raise and refuse), then the lock is waited for.

    `path` is a directory (a run's, the data's: no lock file is written, so a refused command leaves the directory
    as it was) or a lock file, made if missing (for what shares its directory with others: the lock is the open
    file's, so a process that locks a directory and then a lock file inside it does not wait on itself). The OS
    releases the lock when its holder exits, even by SIGKILL."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY) if Path(path).is_dir() else \
        os.open(path, os.O_RDONLY | os.O_CREAT | os.O_NONBLOCK, 0o644)  # a pipe there is not waited on
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            busy = False
        except BlockingIOError:
            busy = True
        if busy:  # outside the `except`: a refusal raised by `when_busy` is not chained to the BlockingIOError
            if when_busy is not None:
                when_busy()
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def some_names(names: list[str], shown: int = 3) -> str:
    """The first `shown` of `names` for a message, and how many more there are: `a, b, c and 4 more`."""
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def not_a_directory(path: Path) -> str:
    """What `path`, which is not a directory, is instead, for a message: a file, or nothing."""
    return "a file, not a directory" if Path(path).exists() else "no such directory"


def check_working_directory() -> None:
    """ConfigError if the directory the command was started in has been deleted: relative paths (`outputs/`,
    `data/`) mean nothing then, and Hydra and torch fail on it with a traceback or a misleading message."""
    try:
        os.getcwd()
    except FileNotFoundError:
        raise ConfigError("the directory this command was started in no longer exists (deleted or moved while the "
                          "shell was in it), so relative paths such as outputs/ and data/ name nothing: `cd` into "
                          "the project directory and run the command again.") from None


def note_dirs_to_be_made(path: Path) -> None:
    """Just before Hydra makes the output directory `path`: remember which of it and its parents do not exist
    yet (a refusal removes them when left empty), or, if it exists, that it is the user's (never removed)."""
    path = Path(path)
    if path.is_dir():  # named by the command line, a config or an interpolation alike
        _DIRS_BEFORE.add(path.resolve())
    _DIRS_TO_BE_MADE.extend(d.absolute() for d in missing_dirs(path))


def missing_dirs(path: Path) -> list[Path]:
    """`path` and those of its parents that do not exist yet, deepest first: what making `path` would create."""
    return [d for d in (Path(path), *Path(path).parents) if not d.exists()]


@contextmanager
def dirs_made(directory: Path):
    """Make `directory` and its missing parents for the block; if the block fails (an error, a signal, a refusal),
    remove those it made that are still empty, so that a failed command leaves no empty directories behind."""
    made = missing_dirs(directory)
    try:
        Path(directory).mkdir(parents=True, exist_ok=True)  # may fail partway (a name too long): inside the try
        yield
    except BaseException:
        for directory in made:  # the deepest first
            try:
                remove_if_empty(directory)
            except OSError:  # one that could not be made (a name too long) cannot be looked at either
                continue
        raise


def remove_if_empty(directory: Path) -> None:
    """Remove `directory` if it is an empty directory and not one the user had before the command
    (`note_dirs_to_be_made`): what a refused or stopped command made and left empty."""
    directory = Path(directory)
    try:
        here = Path.cwd()
    except FileNotFoundError:  # deleted meanwhile: nothing can be inside it
        here = None
    if directory.is_dir() and not any(directory.iterdir()) and directory.resolve() not in _DIRS_BEFORE \
            and not (here and here.is_relative_to(directory.resolve())):  # where the command runs is not its to remove
        directory.rmdir()


# Of those, the ones put back only when the command is refused (exit 2), not when it is stopped or fails: where
# the checks that would keep them run in other processes (a parallel sweep's jobs), a stop cannot tell whether
# jobs have trained under the file.
_UNDONE_IF_REFUSED_ONLY: set[Path] = set()


def note_early_write(path: Path, refused_only: bool = False) -> None:
    """Remember what `path` holds now, before it is rewritten ahead of the command's checks. `refused_only`: put it
    back only if the command is refused."""
    path = Path(path)
    _EARLY_WRITES.setdefault(path, path.read_bytes() if path.is_file() else None)
    if refused_only:
        _UNDONE_IF_REFUSED_ONLY.add(path)


def early_writes() -> set[Path]:
    """The files noted by `note_early_write` in this command so far."""
    return set(_EARLY_WRITES)


def keep_early_writes() -> None:
    """The command's checks passed: what it noted so far stays as it is written, even if a later part of the
    command (a sweep's next job) is refused; a held log file gets its lines (`hold_log_until_kept`)."""
    _EARLY_WRITES.clear()
    _UNDONE_IF_REFUSED_ONLY.clear()
    _DIRS_TO_BE_MADE.clear()
    write_held_logs()


def write_held_logs() -> None:
    """Write the lines held for the log files (`hold_log_until_kept`), in order, and log to the files directly from
    here on: the checks passed (`keep_early_writes`), or the job ended without reaching them (a sweep's job that
    is skipped because it finished)."""
    root = logging.getLogger()
    for file_handler, held in _HELD_LOGS.values():
        for line_filter in held.filters:  # added while the lines were held (console.setup): the file keeps them
            file_handler.addFilter(line_filter)
        if held in root.handlers:  # a sweep's next job sets up its own logging, without it
            root.handlers[root.handlers.index(held)] = file_handler
        for record in held.records:
            file_handler.handle(record)
        held.records.clear()
    _HELD_LOGS.clear()


class _HeldLines(logging.Handler):
    """A log handler that keeps its lines until `write_held_logs` writes them. Unlike logging's MemoryHandler it
    never writes them by itself: not when it is closed, as logging does at exit and Hydra does when it sets up a
    sweep's next job in the same worker process, so the lines of a refused job are never written."""

    def __init__(self, level: int):
        super().__init__(level)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


# Log files whose lines are held until the command's checks pass (`hold_log_until_kept`): path -> (the root
# logger's handler for it, the handler holding its lines).
_HELD_LOGS: dict[Path, tuple[logging.FileHandler, _HeldLines]] = {}


def hold_log_until_kept(path: Path) -> None:
    """Hold the lines the root logger writes to the log file `path` until the command's checks pass
    (`keep_early_writes`): a refused or stopped command writes none of them. Another process may be writing the
    same log (a run directory in use, which is why the command is refused), so the file cannot be put back
    afterwards, as `note_early_write` does, without cutting off that process's lines. The handler must open its
    file at its first line (`delay`), or a refused command would leave the file it made."""
    path = Path(path).absolute()
    handlers = logging.getLogger().handlers
    for handler in handlers:
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename) == path and path not in _HELD_LOGS:
            held = _HeldLines(handler.level)
            handlers[handlers.index(handler)] = held
            _HELD_LOGS[path] = (handler, held)


def held_logs() -> set[Path]:
    """The log files whose lines are held now (`hold_log_until_kept`): the command's own, though not written yet."""
    return set(_HELD_LOGS)


def drop_held_logs() -> None:
    """A refused or stopped command: the lines held for its log files are dropped, and the files closed unwritten."""
    for path, (file_handler, held) in _HELD_LOGS.items():
        logging.getLogger().removeHandler(held)  # what the command logs from here on is not the run's either
        held.records.clear()
        file_handler.close()
        try:
            if not path.exists():
                remove_if_empty(path.parent)  # the job's directory, which Hydra made for it
        except OSError:  # another command put something there meanwhile: it is not ours to remove
            pass
    _HELD_LOGS.clear()


@contextmanager
def early_writes_undone_if_stopped():
    """Run a command; if it ends before its checks pass (`keep_early_writes`): refused (exit 2), stopped by
    Ctrl-C or failed, put each file noted by `note_early_write` back as it was, removing the ones that did not
    exist (and their directory, when that is left empty), and remove the directories noted by
    `note_dirs_to_be_made` that are left empty (a file noted `refused_only`: only if refused)."""
    keep_early_writes()
    _DIRS_BEFORE.clear()
    try:
        yield
    except BaseException as e:
        if not (isinstance(e, SystemExit) and e.code in (0, None)):
            refused = isinstance(e, SystemExit) and e.code == 2
            drop_held_logs()
            for path, before in reversed(_EARLY_WRITES.items()):  # the last written first: a job's, then its sweep's
                if path in _UNDONE_IF_REFUSED_ONLY and not refused:
                    continue
                try:
                    if before is not None:
                        if not path.is_file() or path.read_bytes() != before:  # unchanged: nothing to put back
                            atomic_write(path, before)
                    else:
                        path.unlink(missing_ok=True)
                        remove_if_empty(path.parent)  # the directory Hydra made for it
                except OSError as error:  # a read-only or full disk, which is likely why the command was refused
                    if before is None and isinstance(error, NotADirectoryError):
                        continue  # its directory is a file: Hydra never wrote it there, so there is nothing to undo
                    logging.getLogger(__name__).warning("could not put %s back as it was (%s)", path,
                                                        error.strerror or error)
            for directory in _DIRS_TO_BE_MADE:  # deepest first
                try:
                    remove_if_empty(directory)
                except OSError:  # another command put something there meanwhile: it is not ours to remove
                    pass
        raise
    finally:
        keep_early_writes()


HEAD_BYTES = 4096  # how much of an existing output file is read to recognise who wrote it


def check_output_file(path: Path, key: str, overwrite: bool | None, is_ours: Callable[[bytes], bool],
                      writer: str) -> None:
    """Refuse an output path that would replace what the user has: a directory, a special file, or an
    existing file, unless `overwrite` is set and `is_ours` recognises the file's first bytes as `writer`'s output.
    `overwrite` None: the command has no such option (`key` may then be a command-line option, `--csv`).

    Called before any work, so that a refusal writes nothing. ConfigError names the key and the path.
    """
    path = Path(path)
    named = f"{key} names" if key.startswith("-") else f"config key {key} names"
    if not path.exists() and not path.is_symlink():
        return
    if path.is_dir():
        raise ConfigError(f"{named} a directory ({path}); give a file name inside it.")
    if not path.is_file():
        raise ConfigError(f"{named} {path}, which exists and is not a regular file (a pipe, a device or a broken "
                          "link); give the name of a new file.")
    if not overwrite:
        replace = "" if overwrite is None else f", or add overwrite=true to replace a file that {writer} wrote earlier"
        raise ConfigError(f"{named} {path}, which already exists; nothing was written. Choose a new file "
                          f"name{replace}.")
    with open(path, "rb") as f:
        ours = is_ours(f.read(HEAD_BYTES))
    if not ours:
        raise ConfigError(f"{named} {path}, which {writer} did not write (it does not begin as {writer}'s output "
                          "does), so overwrite=true does not replace it; nothing was written. Choose a new file name.")


def not_a_file(path: Path, missing: str = "file not found") -> str:
    """What is at `path`, which is not a regular file, in words: a directory, a link to a file that does not
    exist, a pipe or a device, or nothing (`missing`)."""
    path = Path(path)
    if path.is_dir():
        return "a directory, not a file"
    if path.is_symlink() and not path.exists():
        return f"a link to {os.readlink(path)}, which does not exist"
    if path.exists():
        return "not a regular file (a pipe or a device)"
    return missing


def check_not_directories(paths: Iterable[Path]) -> None:
    """Raise IsADirectoryError for the first of `paths` that is a directory: an atomic write cannot replace
    one. Called for all of a command's outputs before it writes any, so that a refusal leaves them as they were."""
    for path in paths:
        if Path(path).is_dir():
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))


def storage_error(error: OSError, path: Path | str | None = None,
                  key: str | None = RUN_DIR_KEY) -> StorageError | None:
    """The user-fixable form of an OSError (disk full, read-only, no permission, a path that cannot be made),
    else None; `key` is the config key that chooses where the command writes (None: the place is fixed,
    e.g. a sweep's own directory)."""
    cause = _CAUSES.get(error.errno)
    if cause is None and error.errno == errno.ENOENT and error.filename and creation_refused(error.filename):
        cause = "its file system does not let files be created there"
    if cause is None:
        return None
    where = error.filename or path or "a file"
    if key is None:
        fix = "Free some space" if error.errno in _SPACE else "Make that path writable, or move what is in the way"
    else:
        fix = ("Free some space or choose another place" if error.errno in _SPACE
               else "Choose a place that can be written") + f" ({key}=...)"
    return StorageError(f"cannot write {where}: {cause} ({error.strerror}). {fix}; files already "
                        "written are intact.")


def _creation_error(directory: Path) -> OSError | None:
    """The error the file system gives when something is created in `directory` (None: it can be), found by
    making an empty directory there and removing it at once."""
    probe = Path(directory) / f".fmnist-probe-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        probe.mkdir()
    except OSError as e:
        return e
    probe.rmdir()
    return None


def creation_refused(path: Path | str) -> bool:
    """Whether an ENOENT for `path` means that it could not be made, not that it is missing: the directory it
    was to be made in exists, and the file system refuses, with ENOENT, to create anything there (as /proc does)."""
    path = Path(path)
    directory = path if path.is_dir() else path.parent  # an existing directory: creating in it failed
    return directory.is_dir() and isinstance(_creation_error(directory), FileNotFoundError)


def check_writable(directory: Path, key: str | None = RUN_DIR_KEY) -> None:
    """Raise StorageError if files cannot be created in `directory` (read-only file system, no permission, a
    file system that makes none, as /proc); `key` as in `storage_error`."""
    error = _creation_error(directory)
    if error is None:
        return
    error.filename = str(directory)
    raise storage_error(error, key=key) or error


def check_folder_can_hold(folder: Path, key: str, named: Path, advice: str) -> None:
    """Before a command's work: ConfigError if `folder`, made where missing, would go under a file, or StorageError
    if nothing can be created in the nearest existing folder at or above it. `named`: the output given as `key`,
    which goes into `folder`; `advice` ends the message."""
    folder = Path(folder)
    nearest = next(p for p in (folder, *folder.parents) if p.exists())
    if not nearest.is_dir():
        raise ConfigError(f"{key} names {named}, but {nearest} is a file, not a directory; {advice}")
    check_writable(nearest, key=key)


@contextmanager
def storage_errors(key: str | None = RUN_DIR_KEY):
    """Turn an OSError a user can fix (disk full, read-only, no permission) into a StorageError naming `key`."""
    try:
        yield
    except OSError as e:
        mapped = storage_error(e, key=key)
        if mapped is None:
            raise
        raise mapped from e


def file_digest(path: Path, algorithm: str = "sha1", opener: Callable = open) -> str:
    """Hex digest of a file's bytes, read in 4 MiB chunks (a cache key, a data identity, a checkpoint's hash);
    `opener`: how to open it (`gzip.open`: the digest of what it decompresses to)."""
    h = hashlib.new(algorithm)
    with opener(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def read_yaml(path: Path) -> Any:
    """A YAML file's data (plain dicts, lists and scalars), read by libyaml where PyYAML was built with it, as
    safe_load reads it: a sweep reads its multirun.yaml at every job, and OmegaConf's and PyYAML's Python
    parsers take an order of magnitude longer. Bytes, so that libyaml reads the UTF-8 that Hydra and OmegaConf
    write whatever the locale. yaml.YAMLError for a file that is not YAML."""
    return yaml.load(Path(path).read_bytes(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict:
    """Load a checkpoint dict of tensors and plain values; refuse anything that would unpickle objects."""
    # Imported here: every command imports this module (`make data` too), and only this function needs torch.
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: " + ("a directory, not a checkpoint file." if path.is_dir() else
                                             "checkpoint not found."))
    try:
        with warnings.catch_warnings():
            # A file pickled outside torch.save (refused below, or read if it holds only tensors): torch's note on
            # its pickle protocol says nothing a user can act on.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message advises retrying with weights_only=False, exactly what must not be done: name the class.
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if not found:  # not a class it refused but bytes it could not read: random data, another format
            raise CheckpointError(f"{path}: not a checkpoint torch.save wrote (unreadable as one; truncated, or "
                                  "another kind of file?).") from e
        raise CheckpointError(f"{path}: refused to load: it holds pickled Python objects, not only tensors and "
                              f"plain values (an object of class {found.group(1)}). Loading it could run code; "
                              "fmnist never does.") from e
    except Exception as e:  # a text file, random bytes, a truncated zip: torch raises many kinds
        # Only an OS or torch message says something to a user (a KeyError of a byte value does not).
        detail = first_line(e) if isinstance(e, (OSError, RuntimeError)) else ""
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated, or another kind of file?)"
                              + (f": {detail}" if detail else ".")) from e
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path}: holds a {type(checkpoint).__name__}, not a checkpoint (a dict of weights "
                              "and hyperparameters, as train.py writes it).")
    return checkpoint
