"""Tables in the docs that come from results are generated, not typed: each sits between two markers

    <!-- generated: python -m fmnist.results VERB ARGS... -->
    ...the verb's output...
    <!-- end generated -->

and `make docs` (scripts/render_docs.py) reruns each verb on the committed results and rewrites what
lies between; `--check` (run by the tests) fails where a table no longer matches what it would print.
Every start marker needs its own end marker before the next block: one without would let a table replace the
prose up to another block's end, or (the last block) leave its table unchecked.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
from pathlib import Path

from fmnist.stops import CTRL_C_EXIT, SIGTERM_EXIT, Terminated
from fmnist.errors import ConfigError
from fmnist.fsio import atomic_output, flush_to_disk

MARKER = re.compile(r"(?P<start><!-- generated: (?P<command>[^\n]*?) -->\n)|(?P<end><!-- end generated -->)")
END = "<!-- end generated -->"
PREFIX = ["python", "-m", "fmnist.results"]


def output_of(command: str, where: str) -> str:
    """The stdout of `python -m fmnist.results ...`, run in this process; ConfigError if it fails, or if it is
    not a command that only prints a table (`--help`, or a verb that writes files: `--check` changes nothing)."""
    from fmnist.results.__main__ import WRITING_VERBS, main, parse_args

    try:
        argv = shlex.split(command)
    except ValueError as e:  # an unclosed quote
        raise ConfigError(f"{where}: cannot read the generated block's command `{command}` ({e}).") from None
    if argv[:3] != PREFIX:
        raise ConfigError(f"{where}: a generated block's command must start with `{' '.join(PREFIX)}`; got `{command}`.")
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            args = parse_args(argv[3:])
    except SystemExit:  # argparse's error, or --help: no table either way
        said = err.getvalue().strip().splitlines()
        raise ConfigError(f"{where}: `{command}` does not print a table"
                          + (f" ({said[-1]})." if said else " (it prints the command's help).")) from None
    if args.verb in WRITING_VERBS or getattr(args, "csv", None):
        raise ConfigError(f"{where}: `{command}` writes files; a generated block's command only prints its table.")
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv[3:])
    # Ctrl-C or SIGTERM while the verb ran: it said so and returned its exit code, but the block did not fail;
    # `make docs` is stopped, and stops as any command does (130 or 143), not as a refused block (2).
    if code == CTRL_C_EXIT[1]:
        raise KeyboardInterrupt
    if code == SIGTERM_EXIT[1]:
        raise Terminated
    if code:
        raise ConfigError(f"{where}: `{command}` failed (exit {code}): {err.getvalue().strip()}")
    return out.getvalue()


def blocks(text: str, where: str) -> list[tuple[str, int, int, int]]:
    """Each generated block of `text` as (command, line of its start marker, start and end of its body); a start
    marker without its own end marker, or an end marker without a start, is refused before any command runs."""
    found, opened = [], None
    for marker in MARKER.finditer(text):
        line = text.count("\n", 0, marker.start()) + 1
        if marker["start"] is not None:
            if opened is not None:
                raise unclosed(where, opened[1], f"the next block's start marker, on line {line}",
                               "its table would replace the text up to that block's end marker")
            opened = (marker, line)
        elif opened is None:
            raise ConfigError(f"{where}, line {line}: an `{END}` that closes no block: no start marker (`<!-- "
                              "generated: python -m fmnist.results ... -->`, ending its line) opens one above it since "
                              "the previous block's end; expected each end marker to close its own block. Remove it, "
                              "or mend its block's start marker.")
        else:
            start, start_line = opened
            found.append((start["command"], start_line, start.end(), marker.start()))
            opened = None
    if opened is not None:
        raise unclosed(where, opened[1], "the end of the file", "its table would never be rewritten nor checked")
    return found


def unclosed(where: str, line: int, before: str, else_: str) -> ConfigError:
    """The refusal of a start marker at `line` whose block does not end before `before`."""
    return ConfigError(f"{where}, line {line}: the generated block that starts here has no `{END}` before "
                       f"{before}; expected one after its table, else {else_}. Add the end marker.")


def render(text: str, where: str) -> str:
    """`text` with every generated block's body replaced by its command's output."""
    pieces, done = [], 0
    for command, line, start, end in blocks(text, where):
        pieces += [text[done:start], output_of(command, f"{where}, line {line}")]
        done = end
    return "".join(pieces) + text[done:]


@contextlib.contextmanager
def working_directory(path: Path | None):
    """Run in `path` (None: stay), and come back; Python 3.10 has no contextlib.chdir."""
    if path is None:
        yield
        return
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def update(paths: list[Path], check: bool = False, root: Path | None = None) -> list[Path]:
    """Rewrite the generated blocks of `paths` (or, with `check`, only list the files that would change).
    Every file is rendered before any is written, so a refused block leaves all of them as they were; and every
    page is written to a temporary file beside it and flushed to disk before any is renamed into place, so a write
    that fails (a full disk) leaves them all as they were too. The blocks' commands run in `root` (None: the current
    directory), as their paths are relative to it."""
    try:
        texts = []
        for path in paths:
            try:
                texts.append(path.read_text())
            except (OSError, UnicodeDecodeError) as e:  # a directory named *.md, a file that is not UTF-8 text
                raise ConfigError(f"{path}: cannot read it as a UTF-8 text file ({e}).") from None
        with working_directory(root):
            new = [render(text, str(path)) for path, text in zip(paths, texts)]
    except ConfigError as e:
        if check:
            raise
        said = str(e)
        raise ConfigError(f"{said}{'' if said.endswith('.') else '.'} Nothing was written.") from None
    stale = [(path, page) for path, text, page in zip(paths, texts, new) if page != text]
    if not check:
        with contextlib.ExitStack() as written:  # on leaving, each page is renamed into place, or on an error none
            for path, page in stale:
                tmp = written.enter_context(atomic_output(path))
                tmp.write_text(page)
                # Here, not as atomic_output ends: those end last page first, so a full disk found by a later flush
                # would come after the pages after it were renamed into place.
                flush_to_disk(tmp)
    return [path for path, _ in stale]
