"""Make a trace storable without losing it: what every store can hold, and what to do when it can't.

A trace is user-controlled data (prompts, replies, headers, upstream usage figures), and a
store rejects some of it: PostgreSQL holds no NUL character in text or JSON, every store
caps the short text columns (`task`, `model`, ...) and 32-bit integer columns, and JSON
cannot carry lone surrogates or integers past 64 bits. `problems()` names what a record
holds that a store would refuse (the importers turn each into `file:line: ...`); `clean()`
fixes each in place and returns one note per change, which the trace writer stores in the
trace's `metadata["protege_cleaned"]` so a cleaned trace says what was changed.
"""

from __future__ import annotations

import math
from typing import Any

import sqlalchemy as sa

from . import schema
from .record import TraceRecord

INT_MIN, INT_MAX = -(2**31), 2**31 - 1
"""The range of the store's INTEGER columns (token counts, HTTP status)."""
JSON_INT_LIMIT = 2**64
"""orjson, the store's JSON encoder, writes integers up to 64 bits."""

TEXT_LIMITS = {c.name: c.type.length for c in schema.traces.columns
               if isinstance(c.type, sa.String) and c.type.length}
INT_COLUMNS = tuple(c.name for c in schema.traces.columns if isinstance(c.type, sa.Integer))
FLOAT_COLUMNS = ("latency_ms", "ttft_ms", "cost_usd")
TEXT_COLUMNS = ("output_text", "error")
JSON_COLUMNS = ("request", "response", "metadata", "feedback")
NUL_ESCAPE = "\\u0000"
"""What a NUL character becomes: the six characters of its JSON escape, so a reader still sees it."""


def problems(record: TraceRecord) -> list[str]:
    """What in `record` some store would refuse, one sentence each; [] when it is storable."""
    probe = TraceRecord(**{**record.__dict__})
    return clean(probe, describe=True)


def clean(record: TraceRecord, *, describe: bool = False) -> list[str]:
    """Fix, in place, everything a store would refuse; one note per field changed.

    NUL characters become `\\u0000` (text), lone surrogates U+FFFD, short text columns are
    cut to their length (non-text values become text), integers out of the columns' range
    (or not integers) become null, NaN and infinite floats null, JSON integers past 64
    bits become strings. `describe` words the notes as problems for the importers."""
    notes: list[str] = []
    for name, limit in TEXT_LIMITS.items():
        value = getattr(record, name)
        if value is None:
            continue
        if not isinstance(value, str):
            notes.append(f"'{name}' must be a string, found {type(value).__name__} {_short(value)}"
                         if describe else f"{name}: {type(value).__name__} {_short(value)} stored as text")
            value = str(value)
        fixed = _text_column(name, value, notes, describe)
        if len(fixed) > limit:
            notes.append(f"'{name}' is {len(fixed):,} characters; the store holds at most {limit}" if describe
                         else f"{name}: cut from {len(fixed):,} to {limit} characters")
            fixed = fixed[:limit]
        setattr(record, name, fixed)
    for name in INT_COLUMNS:
        value = getattr(record, name)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or not INT_MIN <= value <= INT_MAX:
            kind = "out of range" if isinstance(value, int) and not isinstance(value, bool) else \
                f"not an integer ({type(value).__name__})"
            notes.append(f"'{name}' is {_short(value)}, {kind}: the store holds integers from {INT_MIN} to {INT_MAX}"
                         if describe else f"{name}: {_short(value)} {kind}, stored as null")
            setattr(record, name, None)
    for name in FLOAT_COLUMNS:
        value = getattr(record, name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or abs(value) > 1e300:
            notes.append(f"'{name}' is {_short(value)}, not a finite number" if describe
                         else f"{name}: {_short(value)} is not a finite number, stored as null")
            setattr(record, name, None)
    for name in TEXT_COLUMNS:
        value = getattr(record, name)
        if value is None:
            continue
        if not isinstance(value, str):
            notes.append(f"'{name}' must be a string, found {type(value).__name__}" if describe
                         else f"{name}: {type(value).__name__} stored as text")
            value = str(value)
        setattr(record, name, _text_column(name, value, notes, describe))
    for name in JSON_COLUMNS:
        value = getattr(record, name)
        if value is None:
            continue
        counts: dict[str, int] = {}
        fixed = _clean_json(value, counts)
        _note(name, counts, notes, describe)
        setattr(record, name, fixed)
    if not isinstance(record.request, dict):
        notes.append("'request' must be an object" if describe else "request: not an object, wrapped as {_body}")
        record.request = {"_body": record.request}
    if not isinstance(record.metadata, dict):
        notes.append("'metadata' must be an object" if describe else "metadata: not an object, wrapped as {_value}")
        record.metadata = {"_value": record.metadata}
    return notes


def _text_column(name: str, value: str, notes: list[str], describe: bool) -> str:
    counts: dict[str, int] = {}
    fixed = _clean_text(value, counts)
    _note(name, counts, notes, describe)
    return fixed


def _note(name: str, counts: dict[str, int], notes: list[str], describe: bool) -> None:
    if counts:
        what = ", ".join(f"{n} {kind}" for kind, n in counts.items())
        notes.append(f"'{name}' holds {what}, which the store cannot hold" if describe else f"{name}: {what} replaced")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _clean_text(text: str, counts: dict[str, int]) -> str:
    """The text with NULs escaped and lone surrogates replaced; adds what it fixed to `counts`."""
    nul = text.count("\x00")
    if nul:
        text = text.replace("\x00", NUL_ESCAPE)
        counts["NUL characters"] = counts.get("NUL characters", 0) + nul
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
        counts["strings with lone surrogates"] = counts.get("strings with lone surrogates", 0) + 1
    return text


def _count(counts: dict[str, int], what: str) -> None:
    counts[what] = counts.get(what, 0) + 1


def _clean_json(value: Any, counts: dict[str, int]) -> Any:
    if isinstance(value, str):
        return _clean_text(value, counts)
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        if not -JSON_INT_LIMIT < value < JSON_INT_LIMIT:
            _count(counts, "integers past 64 bits")
            return str(value)
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            _count(counts, "non-finite numbers")
            return None
        return value
    if isinstance(value, dict):
        return {_clean_text(k if isinstance(k, str) else str(k), counts): _clean_json(v, counts)
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean_json(v, counts) for v in value]
    _count(counts, f"{type(value).__name__} values")
    return repr(value)
