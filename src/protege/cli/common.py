"""Helpers shared by the CLI's verb modules."""

from __future__ import annotations

import json
import sys

import typer
from rich.console import Console

from ..config import Settings

MAX_ROWS = 10**12
"""The largest --limit / --offset a verb takes: more rows than any store holds, and inside
the 64-bit integers SQL takes (a larger value would fail in the driver, as a traceback)."""

console = Console()
err = Console(stderr=True)


def settings(ctx: typer.Context) -> Settings:
    return ctx.find_root().obj


def open_store(ctx: typer.Context):
    """The store for this invocation, opened once and closed when the command ends."""
    from ..traces.store import Store

    root = ctx.find_root()
    if "store" not in root.meta:
        root.meta["store"] = Store(settings(ctx).database_url)
        root.call_on_close(root.meta["store"].close)
    return root.meta["store"]


def print_json(data) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def fmt(value, unit: str = "", digits: int = 1) -> str:
    if value is None:
        return "unknown"
    if isinstance(value, float):
        return f"{value:,.{digits}f}{unit}"
    return f"{value:,}{unit}"


def exit_on_lost_traces(writer) -> None:
    """After a server stops: a non-zero exit if its trace writer had to drop traces."""
    stats = writer.stats()
    if stats["dropped"]:
        from ..errors import ProtegeError

        reasons = ", ".join(f"{k}: {v}" for k, v in stats["dropped_by_reason"].items())
        raise ProtegeError(f"{stats['dropped']:,} traces were lost during this run ({reasons}); the log says when")
