"""Tables that stay readable in any terminal width (80 columns included): `run:` ids are
abbreviated the way git abbreviates commits, long cells wrap instead of being cut, and when
the columns cannot fit side by side they are stacked: several tables, each repeating the
first (key) column. `--json` is the machine-readable form of every table."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from ..runs.registry import short_id

MAX_CELL = 28
"""Cells wider than this wrap (a long candidate spec, a basis sentence)."""


def abbreviate(store, spec: str) -> str:
    """`run:ID` with the shortest unique prefix of ID (8 characters or more); any other spec as it is."""
    if store is None or not spec.startswith("run:") or "?" in spec:
        return spec
    return "run:" + short_id(store, spec[4:])


def _width(header: str, cells: list[str]) -> int:
    longest_word = max((len(w) for text in [header, *cells] for w in text.split()), default=1)
    natural = max([len(header), *(len(c) for c in cells)], default=1)
    return max(min(natural, MAX_CELL), min(longest_word, MAX_CELL))


def print_table(console: Console, title: str | None, header: list[str], rows: list[list[str]],
                right: set[int] = frozenset(), keep: int = 1) -> None:
    """Print `rows` under `header`; the first `keep` columns are the key, repeated in every
    stacked part. Column indices in `right` are right-aligned (numbers)."""
    widths = [_width(h, [r[i] for r in rows]) for i, h in enumerate(header)]
    budget = max(console.width - 1, 40)
    key_width = sum(widths[:keep]) + 3 * keep + 1
    groups: list[list[int]] = []
    for i in range(keep, len(header)):
        if groups and key_width + sum(widths[j] + 3 for j in groups[-1]) + widths[i] + 3 <= budget:
            groups[-1].append(i)
        else:
            groups.append([i])
    for n, group in enumerate(groups or [[]]):
        t = Table(title=title if n == 0 else None, title_justify="left", expand=False)
        for i in [*range(keep), *group]:
            t.add_column(header[i], justify="right" if i in right else "left", overflow="fold",
                         max_width=MAX_CELL, min_width=min(widths[i], MAX_CELL) if i < keep else None)
        for r in rows:
            t.add_row(*(r[i] for i in [*range(keep), *group]))
        console.print(t)
