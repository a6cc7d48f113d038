"""The trace store: one row per captured LLM call, SQLite by default, PostgreSQL at scale."""

from .record import TraceRecord
from .store import Store

__all__ = ["Store", "TraceRecord"]
