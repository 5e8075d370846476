"""Tables in the docs that come from results are generated, not typed: each sits between two markers

    <!-- generated: python -m fmnist.results VERB ARGS... -->
    ...the verb's output...
    <!-- end generated -->

and `make docs` (scripts/render_docs.py) reruns each verb on the committed results and rewrites what
lies between; `--check` (run by the tests) fails where a table no longer matches what it would print.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

from fmnist.errors import ConfigError
from fmnist.fsio import atomic_write

BLOCK = re.compile(r"(<!-- generated: (?P<command>[^\n]*?) -->\n)(?P<body>.*?)(<!-- end generated -->)", re.S)
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
    if code:
        raise ConfigError(f"{where}: `{command}` failed (exit {code}): {err.getvalue().strip()}")
    return out.getvalue()


def render(text: str, where: str) -> str:
    """`text` with every generated block's body replaced by its command's output."""
    def fill(match: re.Match) -> str:
        return match.group(1) + output_of(match.group("command"), where) + match.group(4)

    return BLOCK.sub(fill, text)


def update(paths: list[Path], check: bool = False) -> list[Path]:
    """Rewrite the generated blocks of `paths` (or, with `check`, only list the files that would change)."""
    stale = []
    for path in paths:
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as e:  # a directory named *.md, a file that is not UTF-8 text
            raise ConfigError(f"{path}: cannot read it as a UTF-8 text file ({e}).") from None
        new = render(text, str(path))
        if new != text:
            stale.append(path)
            if not check:
                atomic_write(path, new)
    return stale
