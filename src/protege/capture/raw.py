"""What the proxy's request path hands to the trace writer: raw bytes and timings, nothing parsed.

Parsing, pricing and the database write happen later on the writer's thread
(`ProxyCapture.to_record`); a capture is also written to the journal as bytes
(`to_bytes`), so a killed proxy loses none. The trace id is fixed when the capture is made,
which makes a replayed capture store once.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson

from ..ids import uuid7
from ..prices import PriceTable
from ..traces import normalize
from ..traces.record import TraceRecord

_LEN = struct.Struct("<I")
_BYTES_FIELDS = ("request_body", "response_body")


@dataclass
class ProxyCapture:
    endpoint: str
    upstream: str
    """The upstream base URL with its credentials redacted."""
    request_body: bytes
    task_header: str | None
    started: datetime
    prices: PriceTable | None
    status_code: int | None = None
    response_body: bytes = b""
    content_encoding: str | None = None
    streamed: bool = False
    latency_ms: float | None = None
    ttft_ms: float | None = None
    failure: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    id: str = field(default_factory=uuid7)

    # -- journal form -----------------------------------------------------------------

    def to_bytes(self) -> bytes:
        meta = {k: v for k, v in self.__dict__.items() if k not in _BYTES_FIELDS and k != "prices"}
        meta["started"] = self.started.isoformat()
        meta["request_len"] = len(self.request_body)
        head = orjson.dumps(meta, option=orjson.OPT_NON_STR_KEYS)
        return _LEN.pack(len(head)) + head + self.request_body + self.response_body

    @classmethod
    def from_bytes(cls, data: bytes, prices: PriceTable | None = None) -> "ProxyCapture":
        (n,) = _LEN.unpack_from(data)
        meta = orjson.loads(data[_LEN.size:_LEN.size + n])
        body = data[_LEN.size + n:]
        split = meta.pop("request_len")
        meta["started"] = datetime.fromisoformat(meta["started"])
        return cls(**meta, request_body=body[:split], response_body=body[split:], prices=prices)

    # -- the trace --------------------------------------------------------------------

    def to_record(self) -> TraceRecord:
        """The trace; a capture whose payloads defeat the normaliser still gives one
        (`raw_record`), so every call that reached the proxy is stored."""
        try:
            return self._parsed_record()
        except Exception as exc:  # noqa: BLE001 - any parser bug must still yield a trace
            return self.raw_record(exc)

    def _parsed_record(self) -> TraceRecord:
        request = self._request()
        body = _decode(self.response_body, self.content_encoding)
        response: Any = None
        problem = None
        if self.streamed:
            response, problem = normalize.assemble_sse(body, self.endpoint)
        elif body:
            try:
                response = orjson.loads(body)
            except orjson.JSONDecodeError:
                response = {"_unparsed": body.decode("utf-8", "replace")[:100_000]}
                if self.status_code is not None and self.status_code < 400:
                    problem = (f"upstream answered {self.status_code} with a body that is not JSON: "
                               f"{normalize.error_text(body, 200)!r}")
        ok = self.failure is None and self.status_code is not None and self.status_code < 400 and problem is None
        error = None
        if not ok:
            error = self.failure or problem or normalize.error_text(body)
        prompt, completion, cached = normalize.usage(response)
        model = normalize.model_name(response) or normalize.model_name(request)
        prices = self.prices
        return TraceRecord(
            id=self.id,
            request=request,
            response=response,
            output_text=normalize.output_text(self.endpoint, response),
            source="proxy",
            task=normalize.task_from(request, self.task_header),
            provider=normalize.provider_for(model, prices, self.upstream),
            model=model,
            endpoint=self.endpoint,
            prompt_tokens=prompt,
            completion_tokens=completion,
            cached_tokens=cached,
            latency_ms=self.latency_ms,
            ttft_ms=self.ttft_ms,
            cost_usd=prices.cost(model, prompt, completion, cached) if prices is not None else None,
            status="ok" if ok else "error",
            http_status=self.status_code,
            error=error,
            stream=self.streamed,
            metadata=dict(self.extra),
            created_at=self.started,
        )

    def _request(self) -> dict:
        if not self.request_body:
            return {}
        try:
            request = orjson.loads(self.request_body)
        except orjson.JSONDecodeError:
            return {"_unparsed": self.request_body.decode("utf-8", "replace")[:100_000]}
        return request if isinstance(request, dict) else {"_body": request}

    def raw_record(self, exc: BaseException) -> TraceRecord:
        """The call as text, for a capture the normaliser failed on."""
        return TraceRecord(
            id=self.id, request={"_unparsed": self.request_body.decode("utf-8", "replace")[:100_000]},
            response={"_unparsed": _decode(self.response_body, self.content_encoding).decode("utf-8", "replace")[:100_000]},
            source="proxy", task=self.task_header, endpoint=self.endpoint, latency_ms=self.latency_ms,
            ttft_ms=self.ttft_ms, status="error", http_status=self.status_code, stream=self.streamed,
            error=f"protege could not normalise this call ({type(exc).__name__}: {exc}); raw payloads kept"
                  + (f"; {self.failure}" if self.failure else ""),
            metadata={**self.extra, "protege_unparsed": True}, created_at=self.started)


def _decode(body: bytes, encoding: str | None) -> bytes:
    if not body or not encoding or encoding == "identity":
        return body
    try:
        if encoding == "gzip":
            return gzip.decompress(body)
        if encoding == "deflate":
            return zlib.decompress(body)
        if encoding == "br":
            import brotli  # optional; aiohttp[speedups] brings it

            return brotli.decompress(body)
    except Exception:
        pass
    return body
