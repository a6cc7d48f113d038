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
import os
import queue
import threading
import time
from typing import Any

import orjson

from ..capture import normalize
from ..capture.writer import TraceWriter
from ..errors import ProtegeError
from ..ids import uuid7
from ..traces.record import TraceRecord
from .metrics import Metrics

log = logging.getLogger("protege.serve")


class RequestError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def body(self) -> bytes:
        return orjson.dumps({"error": {"message": self.message, "type": self.kind, "param": self.param,
                                       "code": self.kind if self.status != 401 else "invalid_api_key"}})


class Batcher:
    """One thread owns the model and answers whatever is waiting, up to `max_batch` at once.

    A lone request on an idle server is answered at once. Under load (the last batch held
    more than one request) the thread lets `wait_s` pass, or `max_batch` requests gather,
    before it starts: clients in a closed loop send their next requests a moment apart, and
    without the wait the first of them would go alone and the rest one batch later (at 8
    clients, batches of 1 and 7 by turns). A batch of one ends the waiting."""

    def __init__(self, predict, max_batch: int = 32, metrics: Metrics | None = None, wait_s: float = 0.005):
        self.predict, self.max_batch, self.metrics = predict, max_batch, metrics or Metrics()
        self.wait_s = wait_s
        self.last = 1
        self.queue: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="protege-serve-model", daemon=True)
        self.thread.start()

    def submit(self, row: dict, loop: asyncio.AbstractEventLoop) -> asyncio.Future:
        fut = loop.create_future()
        self.queue.put((row, fut, loop))
        return fut

    def _take(self) -> list | None:
        """The next batch; None once closed."""
        first = self.queue.get()
        if first is None:
            return None
        items = [first]
        deadline = time.monotonic() + self.wait_s if self.last > 1 and self.wait_s > 0 else None
        while len(items) < self.max_batch:
            try:
                nxt = self.queue.get_nowait()
            except queue.Empty:
                remaining = deadline - time.monotonic() if deadline is not None else 0.0
                if remaining <= 0:
                    break
                try:
                    nxt = self.queue.get(timeout=remaining)
                except queue.Empty:
                    break
            if nxt is None:
                self.queue.put(None)
                break
            items.append(nxt)
        self.last = len(items)
        return items

    def _run(self) -> None:
        while True:
            items = self._take()
            if items is None:
                return
            self.metrics.observe_batch(len(items))
            try:
                preds = self.predict([row for row, _, _ in items])
                for (_, fut, loop), pred in zip(items, preds):
                    loop.call_soon_threadsafe(_resolve, fut, pred, None)
            except Exception as exc:  # the model failed: every waiting request gets the error
                for _, fut, loop in items:
                    loop.call_soon_threadsafe(_resolve, fut, None, exc)

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join(timeout=10)


def _resolve(fut: asyncio.Future, value, exc) -> None:
    if fut.cancelled():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(value)


class Fallback:
    """The frontier model the cascade hands low-confidence requests to: `openai:MODEL@URL`."""

    def __init__(self, spec: str, timeout_s: float = 120.0):
        from ..models.base import parse_spec

        scheme, rest, options = parse_spec(spec)
        if scheme != "openai" or "@" not in rest:
            raise ProtegeError(f"--fallback {spec!r}: write openai:MODEL@BASE_URL, e.g. "
                               "openai:gpt-4.1-mini@https://api.openai.com/v1")
        self.spec = spec
        self.model, base = rest.split("@", 1)
        self.url = base.rstrip("/") + "/chat/completions"
        key_env = options.get("key_env", "OPENAI_API_KEY")
        self.key = os.environ.get(key_env)
        if not self.key and "api.openai.com" in base:
            raise ProtegeError(f"--fallback {spec}: no API key; set {key_env} (or add ?key_env=NAME)")
        self.timeout_s = timeout_s
        self.session = None

    async def complete(self, body: dict) -> tuple[dict, int]:
        import aiohttp

        if self.session is None or self.session.closed:
            self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s))
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        payload = {**body, "model": self.model, "stream": False}
        payload.pop("stream_options", None)
        try:
            async with self.session.post(self.url, data=orjson.dumps(payload), headers=headers) as resp:
                data = await resp.read()
                try:
                    parsed = orjson.loads(data)
                except orjson.JSONDecodeError:
                    parsed = {"error": {"message": data[:500].decode("utf-8", "replace"), "type": "upstream_error"}}
                return parsed, resp.status
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            return {"error": {"message": f"fallback {self.model} unreachable: {type(exc).__name__}: {exc}",
                              "type": "upstream_error"}}, 502

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()


class ServeApp:
    """ASGI app serving one specialist."""

    def __init__(self, name: str, predict, *, task: str | None, writer: TraceWriter | None = None,
                 fallback: Fallback | None = None, threshold: float | None = None, api_key: str | None = None,
                 max_body_bytes: int = 1_000_000, max_batch: int = 32, run_id: str | None = None,
                 batch_wait_s: float = 0.005):
        self.name, self.task, self.writer = name, task, writer
        self.fallback, self.threshold, self.api_key = fallback, threshold, api_key
        self.max_body_bytes, self.run_id = max_body_bytes, run_id
        self.metrics = Metrics()
        self.batcher = Batcher(predict, max_batch=max_batch, metrics=self.metrics, wait_s=batch_wait_s)
        self.started = time.time()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    self.batcher.close()
                    if self.fallback:
                        await self.fallback.close()
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
            await _send(send, 200, orjson.dumps({"status": "ok", "model": self.name,
                                                 "uptime_s": round(time.time() - self.started, 1)}))
            return
        if path == "/metrics":
            text = self.metrics.render(self.name)
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
            pred = await self.batcher.submit(row, loop)
        except Exception as exc:
            self._trace(body, None, "specialist", None, time.perf_counter() - t0, error=str(exc), status=500)
            raise RequestError(500, f"the specialist failed: {type(exc).__name__}: {exc}", kind="server_error") \
                from None
        confidence = pred.confidence
        answered_by, model, text, usage, upstream_status = "specialist", self.name, pred.output, None, 200
        if self.fallback and self.threshold is not None and (confidence is None or confidence < self.threshold):
            data, upstream_status = await self.fallback.complete(body)
            text, problem = fallback_answer(data, upstream_status)
            if problem is not None:
                status = upstream_status if upstream_status >= 400 else 502
                self.metrics.errors[status] = self.metrics.errors.get(status, 0) + 1
                self._trace(body, None, "fallback", confidence, time.perf_counter() - t0, error=problem,
                            status=upstream_status, response=data)
                error = data.get("error") if isinstance(data, dict) and upstream_status >= 400 else None
                payload = {"error": error if isinstance(error, dict) else
                           {"message": f"the fallback {self.fallback.model} failed: {problem}",
                            "type": "upstream_error", "param": None, "code": "upstream_error"}}
                await _send(send, status, orjson.dumps(payload))
                return
            answered_by, model = "fallback", normalize.model_name(data) or self.fallback.model
            usage = data.get("usage") if isinstance(data.get("usage"), dict) else None
        elapsed = time.perf_counter() - t0
        self.metrics.observe(elapsed, answered_by)
        self._trace(body, text, answered_by, confidence, elapsed, model=model, usage=usage)
        cid = "chatcmpl-" + uuid7().replace("-", "")
        extra = {"answered_by": answered_by, "confidence": confidence, "specialist": self.name}
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
            return
        out = {"id": cid, "object": "chat.completion", "created": created, "model": model,
               "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop",
                            "logprobs": None}],
               "usage": usage, "protege": extra}
        await _send(send, 200, orjson.dumps(out), headers=headers)

    def _trace(self, body, text, answered_by, confidence, seconds, *, model=None, usage=None, error=None,
               status=200, response=None) -> None:
        if self.writer is None:
            return
        usage = usage or {}
        self.writer.submit(TraceRecord(
            request=body, response=response, output_text=text, source="serve", task=self.task or (body.get("metadata") or {}).get(
                "protege_task"), provider="protege" if answered_by == "specialist" else "fallback",
            model=model or self.name, prompt_tokens=usage.get("prompt_tokens"),
            completion_tokens=usage.get("completion_tokens"), latency_ms=seconds * 1000, stream=bool(body.get("stream")),
            status="ok" if error is None else "error", http_status=status, error=error,
            metadata={"answered_by": answered_by, "confidence": confidence, "specialist": self.name,
                      "run_id": self.run_id, "threshold": self.threshold}))


def fallback_answer(data: Any, status: int) -> tuple[str | None, str | None]:
    """(the fallback's reply text, None) or (None, what is wrong with its answer)."""
    if status >= 400:
        error = data.get("error") if isinstance(data, dict) else None
        detail = orjson.dumps(error).decode() if error is not None else orjson.dumps(data).decode()
        return None, f"HTTP {status}: {detail[:500]}"
    if not isinstance(data, dict):
        return None, f"HTTP {status} with a JSON {type(data).__name__}, not a chat completion object"
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices:
        return None, f"HTTP {status} with no choices ({orjson.dumps(choices).decode()[:100]})"
    message = choices[0].get("message") if isinstance(choices[0], dict) else None
    if not isinstance(message, dict):
        return None, f"HTTP {status} whose choices[0] has no message ({orjson.dumps(choices[0]).decode()[:100]})"
    content = message.get("content")
    if content is not None and not isinstance(content, str):
        return None, f"HTTP {status} whose choices[0].message.content is a {type(content).__name__}, not text"
    return content or "", None


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


def load_specialist(target: str, store, home, task_file: str | None = None, options: dict | None = None):
    """(name, predict function, task, run id) for `run:ID`, a run id, or a model folder made by
    protege train."""
    from pathlib import Path

    from ..models.base import Context
    from ..models.trained import finished_run_model
    from ..tasks.spec import load_task

    run = None
    folder = Path(target)
    if (folder / "protege.json").exists():
        meta = orjson.loads((folder / "protege.json").read_bytes())
    else:
        run, folder, meta = finished_run_model(store, target[4:] if target.startswith("run:") else target)
    if task_file is None and run is not None:
        task_file = run["config"].get("task_file") or None
        if not task_file and run.get("dataset_id"):
            from ..datasets.registry import get_dataset, manifest

            task_file = manifest(get_dataset(store, run["dataset_id"])).get("task_file")
    if not task_file or not Path(task_file).exists():
        raise ProtegeError(f"{target}: cannot find the task file it was trained for ({task_file or 'not recorded'}); "
                           "pass --task TASK_FILE")
    task = load_task(task_file)
    if meta.get("task") and meta["task"] != task.name:
        raise ProtegeError(f"{target} was trained for task {meta['task']!r}, not {task.name!r}")
    ctx = Context(task=task, dataset={}, home=Path(home), store=store)
    run_id = meta.get("run_id") or (run or {}).get("id")
    if meta.get("method") == "classifier":
        from ..models.trained import TrainedClassifier

        cand: Any = TrainedClassifier(run_id or folder.name, folder, meta, dict(options or {}), ctx)
    else:
        from ..models.causal import CausalLM

        cand = CausalLM(str(folder), {"instructed": "0", **(options or {})}, ctx, spec=f"run:{run_id}",
                        instructed_default=False)
    name = f"protege-{task.name}-{(run_id or folder.name)[:13]}" + (
        f"-{options['quantize']}" if (options or {}).get("quantize", "none") != "none" else "")
    return name, cand.predict, task, run_id


def run_server(app: ServeApp, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning") -> None:
    from ..capture.proxy import run_asgi

    run_asgi(app, host, port, log_level)
