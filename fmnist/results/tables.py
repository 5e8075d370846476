"""Reading the CSV tables that runs (`epochs.csv`) and `tricks --csv` write: a damaged file is named with the
line and column of its first damaged cell, never a pandas error from the code that uses the table."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from fmnist.errors import ConfigError


def read_table(path: Path, what: str, columns: tuple[str, ...], numbers: tuple[str, ...] = (),
               counts: tuple[str, ...] = ()) -> pd.DataFrame:
    """The CSV table at `path`, or ConfigError naming the file when it is not `what` (as a message says it: `a table
    tricks --csv wrote`): it lacks one of `columns`, a cell of `numbers` is not a number (an empty cell is a missing
    value, as a diverged run's loss), or a cell of `counts` is not a whole number of 0 or more. Columns of either
    kind that the file lacks are not checked (older runs lack some)."""
    try:
        table = pd.read_csv(path)
    except (OSError, ValueError) as e:  # a binary file, unbalanced quotes, a ragged row
        reason = str(e).strip().splitlines()[0].rstrip(".") if str(e).strip() else type(e).__name__
        raise ConfigError(f"{path}: cannot read it as a CSV table ({reason}); expected {what}.") from e
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ConfigError(f"{path}: not {what}: it lacks the columns {', '.join(missing)}.")
    for column in (c for c in (*numbers, *counts) if c in table.columns):
        values = pd.to_numeric(table[column], errors="coerce")
        bad = table[column].notna() & values.isna()  # text where a number belongs
        if column in counts:
            bad |= ~np.isfinite(values) | (values < 0) | (values != values.round())
        if bad.any():
            row = int(np.argmax(bad.to_numpy()))
            found = table[column].iloc[row]
            expected = "a whole number of 0 or more" if column in counts else "a number"
            # Line 1 is the header, so the first row of values is line 2.
            raise ConfigError(f"{path}, line {row + 2}, column {column}: expected {expected}, found {_cell(found)}.")
        table[column] = values
    return table


def _cell(value) -> str:
    """A cell as a message quotes it: text in quotes, a number as written."""
    if isinstance(value, str):
        return repr(value)
    return "an empty cell" if pd.isna(value) else str(value)
