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
import base64
import time
from datetime import datetime, timezone
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import orjson

from ..asgi import run_asgi
from ..config import redact_text, redact_url, url_secrets
from ..prices import PriceTable
from ..traces import normalize
from .raw import ProxyCapture
from .writer import TraceWriter

HOP_BY_HOP = {b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te", b"trailer",
              b"trailers", b"transfer-encoding", b"upgrade", b"host", b"content-length"}
TASK_HEADER = b"x-protege-task"
LOGGED = {("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("POST", "/v1/embeddings"),
          ("GET", "/v1/models")}


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


class Upstream:
    """The upstream base URL, split once: where requests go, and what of it is secret.

    Credentials in the URL (`https://user:pass@host/v1`, or a key in its query) are sent
    upstream (user:pass as HTTP Basic auth, unless the client sends its own
    Authorization) and shown nowhere: `shown` and `redact()` replace them with ***."""

    def __init__(self, url: str):
        parts = urlsplit(url)
        path = parts.path.rstrip("/")
        if path.endswith("/v1"):
            path = path[:-3]
        host = parts.hostname or ""
        netloc = (f"[{host}]" if ":" in host else host) + (f":{parts.port}" if parts.port else "")
        self.base = urlunsplit((parts.scheme, netloc, path, "", ""))
        self.query = parts.query
        self.auth = None
        if parts.username or parts.password:
            from urllib.parse import unquote

            pair = f"{unquote(parts.username or '')}:{unquote(parts.password or '')}"
            self.auth = ("Authorization", "Basic " + base64.b64encode(pair.encode()).decode())
        self.secrets = url_secrets(url)
        self.shown = redact_url(urlunsplit((parts.scheme, parts.netloc, path, parts.query, "")))

    def url_for(self, path: str, query: str) -> str:
        """The upstream URL of a request: the base's path and query, then the request's."""
        joined = "&".join(q for q in (self.query, query) if q)
        return self.base + path + ("?" + joined if joined else "")

    def redact(self, text: str) -> str:
        return redact_text(text, self.secrets)


class ProxyApp:
    """ASGI app. `upstream` is the API base, with or without a trailing `/v1`."""

    def __init__(self, upstream: str, writer: TraceWriter, prices: PriceTable | None = None,
                 timeout_s: float = 600.0, connect_timeout_s: float = 10.0):
        self.target = Upstream(upstream)
        self.upstream = self.target.shown
        self.writer = writer
        self.prices = prices
        self.timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout_s, sock_read=timeout_s)
        self.timeout_s = timeout_s
        self.session: aiohttp.ClientSession | None = None
        self.requests = {"logged": 0, "forwarded": 0, "client_disconnects": 0}

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
        if scope["path"] == "/metrics" and scope["method"] == "GET":
            body = self.metrics()
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/plain; version=0.0.4"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        await self._handle(scope, receive, send)

    def metrics(self) -> bytes:
        lines = ["# HELP protege_proxy_requests_total Requests through the proxy: logged as traces, or only forwarded.",
                 "# TYPE protege_proxy_requests_total counter"]
        lines += [f'protege_proxy_requests_total{{kind="{k}"}} {self.requests[k]}' for k in ("logged", "forwarded")]
        lines += ["# HELP protege_proxy_client_disconnects_total Streams the client closed before their end.",
                  "# TYPE protege_proxy_client_disconnects_total counter",
                  f"protege_proxy_client_disconnects_total {self.requests['client_disconnects']}"]
        lines += self.writer.metrics("protege_proxy")
        return ("\n".join(lines) + "\n").encode()

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
        client_auth = False
        for name, value in scope["headers"]:
            lname = name.lower()
            if lname == TASK_HEADER:
                task_header = value.decode("latin-1")
            elif lname not in HOP_BY_HOP:
                client_auth |= lname == b"authorization"
                headers.append((name.decode("latin-1"), value.decode("latin-1")))
        if self.target.auth and not client_auth:
            headers.append(self.target.auth)
        url = self.target.url_for((scope.get("raw_path") or path.encode()).decode("latin-1"),
                                  scope.get("query_string", b"").decode("latin-1"))
        logged = (method, path) in LOGGED
        self.requests["logged" if logged else "forwarded"] += 1
        capture = ProxyCapture(endpoint=normalize.ENDPOINTS.get(path, path), upstream=self.upstream,
                               request_body=body, task_header=task_header,
                               started=datetime.now(timezone.utc), prices=self.prices) if logged else None
        session = await self._session()
        t0 = time.perf_counter()
        started_response = False
        data_parts: list[bytes] = []
        watch = None
        try:
            async with session.request(method, url, data=body or None, headers=headers,
                                       allow_redirects=False) as resp:
                out_headers = [(k, v) for k, v in resp.raw_headers if k.lower() not in HOP_BY_HOP]
                streamed = resp.content_type == "text/event-stream"
                if capture:
                    capture.status_code = resp.status
                    capture.content_encoding = resp.headers.get("Content-Encoding")
                    capture.streamed = streamed
                if not streamed:
                    data = await resp.read()
                    out_headers.append((b"content-length", str(len(data)).encode()))
                    if capture:  # journaled before the client has the answer: a kill now loses nothing
                        capture.latency_ms = (time.perf_counter() - t0) * 1000
                        capture.response_body = data
                        self.writer.submit(capture)
                    await send({"type": "http.response.start", "status": resp.status, "headers": out_headers})
                    started_response = True
                    await send({"type": "http.response.body", "body": data})
                    return
                await send({"type": "http.response.start", "status": resp.status, "headers": out_headers})
                started_response = True
                watch = asyncio.ensure_future(receive())  # done once the client goes away
                async for chunk in resp.content.iter_any():
                    if capture and capture.ttft_ms is None and _has_content(chunk):
                        capture.ttft_ms = (time.perf_counter() - t0) * 1000
                    data_parts.append(chunk)
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    if watch.done():
                        break
                if capture:
                    capture.latency_ms = (time.perf_counter() - t0) * 1000
                    capture.response_body = b"".join(data_parts)
                    if watch.done():
                        self.requests["client_disconnects"] += 1
                        capture.failure = normalize.CLIENT_CLOSED
                        capture.extra["client_disconnected"] = True
                    self.writer.submit(capture)
                if not watch.done():
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
        except (asyncio.TimeoutError, aiohttp.ClientError, ConnectionError) as exc:
            elapsed = (time.perf_counter() - t0) * 1000
            if isinstance(exc, asyncio.TimeoutError):
                status, kind = 504, "upstream_timeout"
                message = f"protege proxy: upstream {self.upstream} sent nothing for {self.timeout_s:g} s"
            else:
                status, kind = 502, "upstream_connection_error"
                message = self.target.redact(f"protege proxy: upstream {self.upstream} failed: "
                                             f"{type(exc).__name__}: {exc}")
            if capture:
                capture.latency_ms = elapsed
                capture.failure = message if not started_response else self.target.redact(
                    f"stream cut mid-way: {type(exc).__name__}: {exc}")
                if started_response:
                    capture.streamed = True
                    capture.response_body = b"".join(data_parts)
                else:
                    capture.status_code = status
                self.writer.submit(capture)
            if started_response:
                # The upstream cut the response after it began: cut ours too, so the client
                # sees the same truncated stream rather than a clean end.
                raise UpstreamCut(self.target.redact(str(exc))) from None
            payload = _error_body(message, kind)
            await send({"type": "http.response.start", "status": status,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(payload)).encode())]})
            await send({"type": "http.response.body", "body": payload})
        finally:
            if watch is not None and not watch.done():
                watch.cancel()


def build_proxy(settings, upstream: str, timeout_s: float = 600.0) -> ProxyApp:
    """The proxy app with its trace writer, from resolved settings. If the store cannot be
    opened now, the proxy still starts and spools traces until it can."""
    writer = TraceWriter.for_settings(settings)
    return ProxyApp(upstream, writer, prices=writer.prices, timeout_s=timeout_s)


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
