"""How commands print: tables that never cut an id, UTC times, durations, JSON for scripts."""

from __future__ import annotations

import json
import sys
from datetime import datetime
from typing import Any

from rich.console import Console
from rich.table import Table

out = Console(highlight=False)
err = Console(stderr=True, soft_wrap=True, highlight=False)

WIDE = 100_000
"""Console width for `--wide`: rows are never folded, whatever their length."""


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def say(line: str, *, console: Console = out) -> None:
    """Print text as it is: ids, errors and JSON may hold brackets rich would read as markup."""
    console.print(line, markup=False, highlight=False, soft_wrap=True)


def time_text(value: datetime | None) -> str:
    """`2026-05-01 12:00:03` (UTC, seconds), or `-`."""
    return value.strftime("%Y-%m-%d %H:%M:%S") if value is not None else "-"


def span(seconds: float) -> str:
    """`850 ms`, `12 s`, `3 m 05 s`, `2 h 10 m`, `3 d 4 h`."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))} ms"
    if seconds < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{round(seconds)} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} m {round(seconds % 60):02d} s"
    if seconds < 86400:
        return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} m"
    return f"{int(seconds // 86400)} d {int(seconds % 86400 // 3600)} h"


def table(title: str, columns: list[str], rows: list[list[Any]], *, wide: bool = False) -> None:
    """A table whose cells fold onto more lines when narrow, never cut (`--wide`: never fold)."""
    grid = Table(title=title, title_justify="left")
    for column in columns:
        grid.add_column(column, overflow="fold")
    for row in rows:
        grid.add_row(*("-" if v is None or v == "" else str(v) for v in row))
    if wide:
        Console(width=WIDE, highlight=False).print(grid, crop=False, markup=False)
    else:
        out.print(grid, markup=False)
