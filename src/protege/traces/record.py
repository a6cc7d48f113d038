"""TraceRecord: one LLM call as protege stores it.

The raw payloads (`request`, `response`) are kept beside the normalised fields
(`output_text`, token counts, latency, cost), so datasets can be rebuilt from raw data when
the normaliser improves. A key or Authorization header is never part of a record.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from typing import Any

from ..ids import uuid7

SOURCES = ("proxy", "sdk", "import", "serve")
STATUSES = ("ok", "error")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


@dataclass
class TraceRecord:
    request: dict[str, Any]
    """The OpenAI-style request body (messages + params) as sent."""
    response: Any = None
    """The response body (parsed JSON); for streams, the assembled completion object."""
    output_text: str | None = None
    source: str = "import"
    task: str | None = None
    provider: str | None = None
    model: str | None = None
    endpoint: str = "chat/completions"
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    latency_ms: float | None = None
    """Wall time from request sent to last byte received, measured; None when unknown."""
    ttft_ms: float | None = None
    """Streams only: time to the first chunk carrying output content."""
    cost_usd: float | None = None
    status: str = "ok"
    http_status: int | None = None
    error: str | None = None
    stream: bool = False
    metadata: dict[str, Any] = field(default_factory=dict)
    feedback: dict[str, Any] | None = None
    content_hash: str | None = None
    """For imported traces: hash of the source content, which makes re-imports idempotent."""
    id: str = field(default_factory=uuid7)
    created_at: datetime = field(default_factory=utcnow)

    def to_row(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> dict[str, Any]:
        """The record's fields for a JSON encoder, the nested values shared, not copied: a deep
        copy (dataclasses.asdict) was 40 us a request on the event loop of protege serve."""
        row = {name: getattr(self, name) for name in _FIELDS}
        row["created_at"] = self.created_at.isoformat()
        return row

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "TraceRecord":
        data = dict(data)
        created = data.get("created_at")
        if isinstance(created, str):
            data["created_at"] = parse_time(created)
        return cls(**data)


_FIELDS = tuple(f.name for f in fields(TraceRecord))


def parse_time(value: str) -> datetime:
    """ISO-8601 (a trailing Z allowed) or unix seconds, as an aware UTC datetime."""
    text = value.strip()
    try:
        ts = float(text)
    except ValueError:
        pass
    else:
        return datetime.fromtimestamp(ts, timezone.utc)
    if text.endswith("Z"):
        text = text[:-1] + "+00:00"
    parsed = datetime.fromisoformat(text)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.astimezone(timezone.utc)
