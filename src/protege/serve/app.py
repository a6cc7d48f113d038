"""`protege serve`: a trained specialist behind an OpenAI-compatible endpoint.

    protege serve run:RUN_ID --port 8000 --fallback openai:gpt-4.1-mini@https://api.openai.com/v1 --threshold 0.8

- `POST /v1/chat/completions` (plain and `stream: true`), `GET /v1/models`, `GET /healthz`,
  `GET /metrics` (Prometheus text: requests, latency histogram, fallback rate, errors).
- Concurrent requests are batched: one worker thread owns the model; whenever it is free
  it takes every request waiting (up to `max_batch`) and answers them in one forward pass.
  An idle server answers a lone request at once, with no batching delay; under load it
  lets `batch_wait_s` pass (or `max_batch` requests gather) before each batch.
- Cascade: the specialist's confidence (for classification, the probability of the label
  it picked) below `--threshold` sends the request, exactly as the client sent it, to the
  `--fallback` model; the client gets that answer. The response's `model`, the header
  `X-Protege-Answered-By` and the `protege` field say who answered and how sure the
  specialist was.
- Every request is stored as a trace (source `serve`) with who answered and the
  confidence: the next `protege dataset build` can use them.
- Bearer-token auth (`--api-key` or PROTEGE_SERVE_API_KEY), a request size limit, and
  OpenAI-style error bodies with 4xx codes for every malformed request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Callable

import orjson

from ..capture.writer import TraceWriter
from ..ids import uuid7
from ..traces import normalize
from ..traces.record import TraceRecord
from .batcher import Batcher
from .fallback import Fallback, fallback_answer
from .metrics import Metrics
from .shadow import Shadow

log = logging.getLogger("protege.serve")


class RequestError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def body(self) -> bytes:
        return orjson.dumps({"error": {"message": self.message, "type": self.kind, "param": self.param,
                                       "code": self.kind if self.status != 401 else "invalid_api_key"}})


@dataclass(frozen=True)
class Served:
    """What answers: the specialist and its cascade. Swapped whole by `ServeApp.switch`; each
    batch is answered by the one that was current when the batch started."""

    name: str
    predict: Callable
    run_id: str | None = None
    threshold: float | None = None
    fallback: Fallback | None = None
    deployment: str | None = None
    alarm: dict | None = None
    """The deployment's own alarm settings (protege deploy --alarm-*), over the server's."""


class ServeApp:
    """ASGI app serving one specialist (or a task's deployment, switching when it changes)."""

    def __init__(self, name: str, predict, *, task: str | None, writer: TraceWriter | None = None,
                 fallback: Fallback | None = None, threshold: float | None = None, api_key: str | None = None,
                 max_body_bytes: int = 1_000_000, max_batch: int = 32, run_id: str | None = None,
                 batch_wait_s: float = 0.005, deployment: str | None = None, background: tuple = (),
                 shadow: Shadow | None = None, drift=None, alarm: dict | None = None):
        self.served = Served(name, predict, run_id, threshold, fallback, deployment, alarm)
        self.task, self.writer, self.api_key = task, writer, api_key
        self.max_body_bytes = max_body_bytes
        self.metrics = Metrics()
        self.batcher = Batcher(self._answer, max_batch=max_batch, metrics=self.metrics, wait_s=batch_wait_s)
        self.background, self.tasks = background, []
        """Coroutine functions run beside the server (`f(app)`), e.g. following a deployment."""
        self.retired: list[Fallback] = []
        self.shadow = shadow
        """Shadow evaluation (shadow.py): a sampled share of the specialist's answers checked
        against the frontier in the background, after the client has its answer."""
        self.drift = drift
        """Drift statistics (drift.py): every answered input, observed after the client has its answer."""
        self.started = time.time()

    @property
    def name(self) -> str:
        return self.served.name

    @property
    def run_id(self) -> str | None:
        return self.served.run_id

    @property
    def threshold(self) -> float | None:
        return self.served.threshold

    @property
    def fallback(self) -> Fallback | None:
        return self.served.fallback

    def _answer(self, rows: list[dict]) -> list[tuple]:
        served = self.served  # read once: a switch applies from the next batch on
        return [(p, served) for p in served.predict(rows)]

    def switch(self, served: Served, *, deployment_changed: bool = True) -> None:
        """Answer with `served` from the next batch on; requests in flight finish as they began
        (the old fallback client is closed at shutdown, never under a request using it).
        `deployment_changed`: False for the guard's own changes (an alarm's threshold)."""
        old = self.served
        self.served = served
        self.metrics.switches += deployment_changed
        if old.fallback is not None and old.fallback is not served.fallback:
            self.retired.append(old.fallback)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    self.tasks = [asyncio.create_task(f(self)) for f in self.background]
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    for t in self.tasks:
                        t.cancel()
                    self.batcher.close()
                    for fb in [self.fallback, *self.retired]:
                        if fb is not None:
                            await fb.close()
                    if self.shadow is not None:
                        await self.shadow.close()
                    if self.drift is not None:
                        self.drift.close()
                    if self.writer:
                        await asyncio.get_running_loop().run_in_executor(None, self.writer.close)
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        try:
            await self._handle(scope, receive, send)
        except RequestError as exc:
            self.metrics.errors[exc.status] = self.metrics.errors.get(exc.status, 0) + 1
            headers = [(b"www-authenticate", b"Bearer")] if exc.status == 401 else []
            await _send(send, exc.status, exc.body(), headers=headers)
        except Exception as exc:  # a bug of ours still answers in the API's shape, and is logged
            log.exception("protege serve: unexpected error")
            self.metrics.errors[500] = self.metrics.errors.get(500, 0) + 1
            await _send(send, 500, RequestError(500, f"protege serve failed: {type(exc).__name__}: {exc}",
                                                kind="server_error").body())

    async def _handle(self, scope, receive, send):
        method, path = scope["method"], scope["path"].rstrip("/") or "/"
        if path == "/healthz":
            await _send(send, 200, orjson.dumps({"status": "ok", "model": self.name, "run_id": self.run_id,
                                                 "deployment": self.served.deployment,
                                                 "uptime_s": round(time.time() - self.started, 1)}))
            return
        if path == "/metrics":
            text = self.metrics.render(self.name)
            for part in (self.shadow, self.drift):
                if part is not None:
                    text += ("\n".join(part.metrics()) + "\n").encode()
            if self.writer is not None:
                text += ("\n".join(self.writer.metrics("protege_serve")) + "\n").encode()
            await _send(send, 200, text, content_type=b"text/plain; version=0.0.4")
            return
        self._authorize(scope)
        if path == "/v1/models":
            if method != "GET":
                raise RequestError(405, f"{method} is not allowed on /v1/models; use GET")
            models = [{"id": self.name, "object": "model", "created": int(self.started), "owned_by": "protege"}]
            if self.fallback:
                models.append({"id": self.fallback.model, "object": "model", "created": int(self.started),
                               "owned_by": "fallback"})
            await _send(send, 200, orjson.dumps({"object": "list", "data": models}))
            return
        if path != "/v1/chat/completions":
            raise RequestError(404, f"unknown path {scope['path']}: this server answers /v1/chat/completions, "
                               "/v1/models, /healthz and /metrics", kind="not_found_error")
        if method != "POST":
            raise RequestError(405, f"{method} is not allowed on /v1/chat/completions; use POST")
        body = await self._body(scope, receive)
        await self._complete(body, send)

    def _authorize(self, scope) -> None:
        if not self.api_key:
            return
        auth = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        if not auth.startswith("Bearer ") or auth[7:].strip() != self.api_key:
            raise RequestError(401, "missing or wrong API key: send Authorization: Bearer KEY",
                               kind="authentication_error")

    async def _body(self, scope, receive) -> dict:
        declared = dict(scope["headers"]).get(b"content-length")
        if declared and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise RequestError(413, f"request body of {int(declared):,} bytes is over the {self.max_body_bytes:,}-byte "
                               "limit")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise RequestError(400, "client disconnected")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise RequestError(413, f"request body is over the {self.max_body_bytes:,}-byte limit")
            chunks.append(chunk)
            if not message.get("more_body"):
                break
        try:
            body = orjson.loads(b"".join(chunks))
        except orjson.JSONDecodeError as exc:
            raise RequestError(400, f"the request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise RequestError(400, "the request body must be a JSON object")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError(400, "'messages' is required: a non-empty list of {role, content} objects",
                               param="messages")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise RequestError(400, f"messages[{i}] must be an object with a 'role' and 'content'",
                                   param=f"messages[{i}]")
        if not any(m.get("role") == "user" for m in messages):
            raise RequestError(400, "'messages' has no user message for the specialist to answer", param="messages")
        if "stream" in body and not isinstance(body["stream"], bool):
            raise RequestError(400, "'stream' must be true or false", param="stream")
        return body

    async def _complete(self, body: dict, send) -> None:
        from ..datasets.build import example_from_request

        t0 = time.perf_counter()
        row = example_from_request(body)
        if row is None or not row["input"].strip():
            raise RequestError(400, "the last user message has no text content", param="messages")
        loop = asyncio.get_running_loop()
        try:
            pred, served = await self.batcher.submit(row, loop)
        except Exception as exc:
            self._trace(self.served, body, None, "specialist", None, time.perf_counter() - t0, error=str(exc),
                        status=500)
            raise RequestError(500, f"the specialist failed: {type(exc).__name__}: {exc}", kind="server_error") \
                from None
        confidence = pred.confidence
        fb, threshold = served.fallback, served.threshold
        answered_by, model, text, usage, upstream_status = "specialist", served.name, pred.output, None, 200
        if fb and threshold is not None and (confidence is None or confidence < threshold):
            data, upstream_status = await fb.complete(body)
            text, problem = fallback_answer(data, upstream_status)
            if problem is not None:
                status = upstream_status if upstream_status >= 400 else 502
                self.metrics.errors[status] = self.metrics.errors.get(status, 0) + 1
                self._trace(served, body, None, "fallback", confidence, time.perf_counter() - t0, error=problem,
                            status=upstream_status, response=data)
                error = data.get("error") if isinstance(data, dict) and upstream_status >= 400 else None
                payload = {"error": error if isinstance(error, dict) else
                           {"message": f"the fallback {fb.model} failed: {problem}",
                            "type": "upstream_error", "param": None, "code": "upstream_error"}}
                await _send(send, status, orjson.dumps(payload))
                return
            answered_by, model = "fallback", normalize.model_name(data) or fb.model
            usage = data.get("usage") if isinstance(data.get("usage"), dict) else None
        elapsed = time.perf_counter() - t0
        self.metrics.observe(elapsed, answered_by)
        trace_id = self._trace(served, body, text, answered_by, confidence, elapsed, model=model, usage=usage)
        cid = "chatcmpl-" + uuid7().replace("-", "")
        extra = {"answered_by": answered_by, "confidence": confidence, "specialist": served.name}
        headers = [(b"x-protege-answered-by", answered_by.encode())]
        if confidence is not None:
            headers.append((b"x-protege-confidence", f"{confidence:.6f}".encode()))
        if usage is None:
            usage = {"prompt_tokens": pred.prompt_tokens or 0, "completion_tokens": pred.completion_tokens or 0,
                     "total_tokens": (pred.prompt_tokens or 0) + (pred.completion_tokens or 0)}
        created = int(time.time())
        if body.get("stream"):
            await _stream(send, cid, created, model, text, usage, extra, headers,
                          include_usage=bool((body.get("stream_options") or {}).get("include_usage")))
        else:
            await _send(send, 200, orjson.dumps(self._completion(cid, created, model, text, usage, extra)),
                        headers=headers)
        if self.shadow is not None and answered_by == "specialist":  # the client has its answer already
            self.shadow.maybe(body, text, trace_id, served.name)
        if self.drift is not None:
            self.drift.observe(row["input"], pred.output, confidence)

    @staticmethod
    def _completion(cid, created, model, text, usage, extra) -> dict:
        return {"id": cid, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop",
                             "logprobs": None}],
                "usage": usage, "protege": extra}

    def _trace(self, served: Served, body, text, answered_by, confidence, seconds, *, model=None, usage=None,
               error=None, status=200, response=None) -> str | None:
        """Store the request as a trace; returns its id (None when traces are off)."""
        if self.writer is None:
            return None
        usage = usage or {}
        record = TraceRecord(
            request=body, response=response, output_text=text, source="serve", task=self.task or (body.get("metadata") or {}).get(
                "protege_task"), provider="protege" if answered_by == "specialist" else "fallback",
            model=model or served.name, prompt_tokens=usage.get("prompt_tokens"),
            completion_tokens=usage.get("completion_tokens"), latency_ms=seconds * 1000, stream=bool(body.get("stream")),
            status="ok" if error is None else "error", http_status=status, error=error,
            metadata={"answered_by": answered_by, "confidence": confidence, "specialist": served.name,
                      "run_id": served.run_id, "threshold": served.threshold,
                      **({"deployment": served.deployment} if served.deployment else {})})
        self.writer.submit(record)
        return record.id


async def _send(send, status: int, body: bytes, *, content_type: bytes = b"application/json",
                headers: list | None = None) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


async def _stream(send, cid, created, model, text, usage, extra, headers, include_usage: bool) -> None:
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"), *headers]})

    def chunk(delta: dict, finish: str | None = None, **more) -> bytes:
        data = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}], **more}
        return b"data: " + orjson.dumps(data) + b"\n\n"

    parts = [chunk({"role": "assistant", "content": ""}), chunk({"content": text}),
             chunk({}, "stop", protege=extra)]
    if include_usage:
        parts.append(b"data: " + orjson.dumps({"id": cid, "object": "chat.completion.chunk", "created": created,
                                               "model": model, "choices": [], "usage": usage}) + b"\n\n")
    parts.append(b"data: [DONE]\n\n")
    for p in parts:
        await send({"type": "http.response.body", "body": p, "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


def run_server(app: ServeApp, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning") -> None:
    from ..asgi import run_asgi

    run_asgi(app, host, port, log_level)
