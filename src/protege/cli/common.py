"""Helpers shared by the CLI's verb modules."""

from __future__ import annotations

import json
import sys

import typer
from rich.console import Console

from ..config import Settings

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
