"""The logging proxy: an OpenAI-compatible reverse proxy that records every call as a trace.

Run it with `protege proxy --upstream https://api.openai.com/v1` and point your client's
base URL at `http://127.0.0.1:8787/v1`. Requests and responses pass through untouched
(streams chunk by chunk); the request path only measures time and queues the raw bytes.
Parsing, cost and the database write happen on the trace writer's thread (capture/writer.py).

It is a bare ASGI app on uvicorn with an aiohttp client rather than FastAPI + httpx:
the proxy's whole job is to add as little latency as possible, and both layers cost
measurable time per request at hundreds of requests per second (benchmarks/proxy_overhead.py).
"""

from __future__ import annotations

import asyncio
import gzip
import time
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import aiohttp
import orjson

from ..prices import PriceTable
from ..traces.record import TraceRecord
from . import normalize
from .writer import TraceWriter

HOP_BY_HOP = {b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te", b"trailer",
              b"trailers", b"transfer-encoding", b"upgrade", b"host", b"content-length"}
TASK_HEADER = b"x-protege-task"
LOGGED = {("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("POST", "/v1/embeddings"),
          ("GET", "/v1/models")}


@dataclass
class ProxyCapture:
    """What the request path hands to the writer: raw bytes and timings, nothing parsed."""

    endpoint: str
    upstream: str
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

    def to_record(self) -> TraceRecord:
        if self.request_body:
            try:
                request = orjson.loads(self.request_body)
            except orjson.JSONDecodeError:
                request = {"_unparsed": self.request_body.decode("utf-8", "replace")[:100_000]}
        else:
            request = {}
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
        ok = self.failure is None and self.status_code is not None and self.status_code < 400 and problem is None
        error = None
        if not ok:
            error = self.failure or problem or normalize.error_text(body)
        prompt, completion, cached = normalize.usage(response)
        model = (response.get("model") if isinstance(response, dict) else None) or (
            request.get("model") if isinstance(request, dict) else None)
        prices = self.prices
        return TraceRecord(
            request=request if isinstance(request, dict) else {"_body": request},
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
            metadata=self.extra,
            created_at=self.started,
        )


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


def _has_content(chunk: bytes) -> bool:
    """Does an SSE chunk carry output text (not just the role or an empty delta)?"""
    for marker in (b'"content":"', b'"text":"'):
        i = chunk.find(marker)
        while i != -1:
            if chunk[i + len(marker):i + len(marker) + 1] != b'"':
                return True
            i = chunk.find(marker, i + 1)
    return False


def _error_body(message: str, kind: str) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": kind, "param": None, "code": kind}})


class UpstreamCut(Exception):
    """Raised to make uvicorn drop the client connection when the upstream dropped ours."""


class ProxyApp:
    """ASGI app. `upstream` is the API base, with or without a trailing `/v1`."""

    def __init__(self, upstream: str, writer: TraceWriter, prices: PriceTable | None = None,
                 timeout_s: float = 600.0, connect_timeout_s: float = 10.0):
        base = upstream.rstrip("/")
        if base.endswith("/v1"):
            base = base[:-3]
        self.upstream = base
        self.writer = writer
        self.prices = prices
        self.timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout_s, sock_read=timeout_s)
        self.timeout_s = timeout_s
        self.session: aiohttp.ClientSession | None = None

    async def _session(self) -> aiohttp.ClientSession:
        if self.session is None or self.session.closed:
            connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=60)
            self.session = aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                                 skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept",
                                                                    "Content-Type"), timeout=self.timeout)
        return self.session

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        await self._handle(scope, receive, send)

    async def _lifespan(self, receive, send):
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self._session()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.session is not None:
                    await self.session.close()
                await asyncio.get_running_loop().run_in_executor(None, self.writer.close)
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _handle(self, scope, receive, send):
        method, path = scope["method"], scope["path"]
        chunks = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        task_header = None
        headers = []
        for name, value in scope["headers"]:
            lname = name.lower()
            if lname == TASK_HEADER:
                task_header = value.decode("latin-1")
            elif lname not in HOP_BY_HOP:
                headers.append((name.decode("latin-1"), value.decode("latin-1")))
        url = self.upstream + (scope.get("raw_path") or path.encode()).decode("latin-1")
        if scope.get("query_string"):
            url += "?" + scope["query_string"].decode("latin-1")
        logged = (method, path) in LOGGED
        capture = ProxyCapture(endpoint=normalize.ENDPOINTS.get(path, path), upstream=self.upstream,
                               request_body=body, task_header=task_header,
                               started=datetime.now(timezone.utc), prices=self.prices) if logged else None
        session = await self._session()
        t0 = time.perf_counter()
        started_response = False
        data_parts: list[bytes] = []
        try:
            async with session.request(method, url, data=body or None, headers=headers,
                                       allow_redirects=False) as resp:
                out_headers = [(k, v) for k, v in resp.raw_headers if k.lower() not in HOP_BY_HOP]
                streamed = resp.content_type == "text/event-stream"
                if not streamed:
                    data = await resp.read()
                    if capture:
                        capture.latency_ms = (time.perf_counter() - t0) * 1000
                    out_headers.append((b"content-length", str(len(data)).encode()))
                    await send({"type": "http.response.start", "status": resp.status, "headers": out_headers})
                    started_response = True
                    await send({"type": "http.response.body", "body": data})
                else:
                    await send({"type": "http.response.start", "status": resp.status, "headers": out_headers})
                    started_response = True
                    if capture:
                        capture.status_code = resp.status
                    async for chunk in resp.content.iter_any():
                        if capture and capture.ttft_ms is None and _has_content(chunk):
                            capture.ttft_ms = (time.perf_counter() - t0) * 1000
                        data_parts.append(chunk)
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    if capture:
                        capture.latency_ms = (time.perf_counter() - t0) * 1000
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                    data = b"".join(data_parts)
                if capture:
                    capture.status_code = resp.status
                    capture.response_body = data
                    capture.content_encoding = resp.headers.get("Content-Encoding")
                    capture.streamed = streamed
        except (asyncio.TimeoutError, aiohttp.ClientError, ConnectionError) as exc:
            elapsed = (time.perf_counter() - t0) * 1000
            timed_out = isinstance(exc, asyncio.TimeoutError)
            if timed_out:
                status, kind = 504, "upstream_timeout"
                message = f"protege proxy: upstream {self.upstream} sent nothing for {self.timeout_s:g} s"
            else:
                status, kind = 502, "upstream_connection_error"
                message = f"protege proxy: upstream {self.upstream} failed: {type(exc).__name__}: {exc}"
            if capture:
                capture.latency_ms = elapsed
                capture.failure = message if not started_response else f"stream cut mid-way: {type(exc).__name__}: {exc}"
                if started_response:
                    capture.streamed = True
                    capture.response_body = b"".join(data_parts)
                else:
                    capture.status_code = status
                self.writer.submit(capture)
            if started_response:
                # The upstream cut the response after it began: cut ours too, so the client
                # sees the same truncated stream rather than a clean end.
                raise UpstreamCut(str(exc)) from None
            payload = _error_body(message, kind)
            await send({"type": "http.response.start", "status": status,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(payload)).encode())]})
            await send({"type": "http.response.body", "body": payload})
            return
        if capture:
            self.writer.submit(capture)


def build_proxy(settings, upstream: str, timeout_s: float = 600.0) -> ProxyApp:
    """The proxy app with its trace writer, from resolved settings. If the store cannot be
    opened now, the proxy still starts and spools traces until it can."""
    from ..prices import cached_prices

    writer = TraceWriter.for_settings(settings)
    prices = cached_prices(str(settings.prices_path) if settings.prices_path else None)
    return ProxyApp(upstream, writer, prices=prices, timeout_s=timeout_s)


class _QuietUpstreamCut:
    """Log filter: a cut upstream stream is expected traffic, not a proxy crash."""

    def filter(self, record) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, UpstreamCut):
            record.msg, record.args, record.exc_info = "upstream cut a stream mid-way: %s", (exc,), None
        return True


def run_proxy(app: ProxyApp, host: str = "127.0.0.1", port: int = 8787, log_level: str = "warning") -> None:
    import logging

    logging.getLogger("uvicorn.error").addFilter(_QuietUpstreamCut())
    run_asgi(app, host, port, log_level)


def run_asgi(app, host: str, port: int, log_level: str = "warning") -> None:
    """uvicorn with uvloop and httptools where installed, no access log: the proxy's and the server's loop."""
    import uvicorn

    try:
        import uvloop  # noqa: F401

        loop = "uvloop"
    except ImportError:
        loop = "asyncio"
    config = uvicorn.Config(app, host=host, port=port, loop=loop, http="httptools", lifespan="on",
                            access_log=False, log_level=log_level, timeout_keep_alive=75)
    try:
        uvicorn.Server(config).run()
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C / SIGINT it shut down on: a normal stop
        pass
