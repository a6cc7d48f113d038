"""`protege.wrap(client, task=...)`: record every call an official `openai` client makes.

    import openai, protege
    client = protege.wrap(openai.OpenAI(), task="intent")
    client.chat.completions.create(model="gpt-4o-mini", messages=[...])   # stored as a trace

Works for `OpenAI` and `AsyncOpenAI`, plain and `stream=True`, on `chat.completions`,
`completions` and `embeddings`. The caller gets back exactly what the client returned
(streams are handed through chunk by chunk); errors are recorded and re-raised unchanged.
Traces go through the same batched writer as the proxy, to the store named by
`PROTEGE_DATABASE_URL` / `PROTEGE_HOME` (or the `db=` / `home=` arguments).
"""

from __future__ import annotations

import atexit
import functools
import inspect
import threading
import time
from datetime import datetime, timezone
from typing import Any

from ..config import Settings
from ..traces import normalize
from ..traces.record import TraceRecord
from .writer import TraceWriter

_writers: dict[tuple[str, str], TraceWriter] = {}
_writers_lock = threading.Lock()
_SKIP_KWARGS = {"extra_headers", "extra_query", "extra_body", "timeout"}


def _writer_for(settings: Settings) -> TraceWriter:
    key = (settings.database_url, str(settings.home))
    with _writers_lock:
        if key not in _writers:
            writer = TraceWriter.for_settings(settings)
            atexit.register(writer.close)
            _writers[key] = writer
        return _writers[key]


def _jsonable(value: Any) -> Any:
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json", exclude_unset=True)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)


def _request_of(kwargs: dict) -> dict:
    return {k: _jsonable(v) for k, v in kwargs.items()
            if k not in _SKIP_KWARGS and type(v).__name__ not in ("NotGiven", "Omit")}


class _Recorder:
    """State of one call being recorded."""

    def __init__(self, wrapper: "_Wrapper", endpoint: str, kwargs: dict):
        self.w = wrapper
        self.endpoint = endpoint
        self.request = _request_of(kwargs)
        headers = kwargs.get("extra_headers") or {}
        header_task = next((v for k, v in headers.items() if k.lower() == "x-protege-task"), None)
        self.task = normalize.task_from(self.request, header_task) or wrapper.task
        self.started = datetime.now(timezone.utc)
        self.t0 = time.perf_counter()
        self.ttft_ms: float | None = None
        self.chunks: list[dict] = []
        self.done = False

    def chunk(self, chunk: Any) -> None:
        data = chunk.model_dump(mode="json") if hasattr(chunk, "model_dump") else chunk
        if self.ttft_ms is None:
            for choice in data.get("choices") or []:
                if (choice.get("delta") or {}).get("content") or choice.get("text"):
                    self.ttft_ms = (time.perf_counter() - self.t0) * 1000
                    break
        self.chunks.append(data)

    def finish(self, response: Any = None, error: BaseException | None = None, stream: bool = False,
               problem: str | None = None) -> None:
        if self.done:
            return
        self.done = True
        latency = (time.perf_counter() - self.t0) * 1000
        try:
            record = self._record(latency, response, error, stream, problem)
        except Exception as exc:  # noqa: BLE001 - a normaliser bug must not cost the trace
            record = TraceRecord(request=self.request, response=None, source="sdk", task=self.task,
                                 endpoint=self.endpoint, latency_ms=latency, status="error", stream=stream,
                                 error=f"protege could not normalise this call ({type(exc).__name__}: {exc})",
                                 metadata={**self.w.metadata, "protege_unparsed": True}, created_at=self.started)
        self.w.writer.submit(record)

    def _record(self, latency, response, error, stream, problem) -> TraceRecord:
        if stream:
            body, stream_problem = normalize.assemble_events(self.chunks, self.endpoint)
            problem = problem or stream_problem
        else:
            body = response.model_dump(mode="json") if hasattr(response, "model_dump") else response
        status_code = getattr(error, "status_code", None)
        if error is not None:
            err_body = getattr(error, "body", None)
            message = f"{type(error).__name__}: {error}"
            body = body if body is not None else (err_body if isinstance(err_body, dict) else None)
        else:
            message = problem
        prompt, completion, cached = normalize.usage(body)
        model = normalize.model_name(body) or normalize.model_name(self.request)
        prices = self.w.prices
        metadata = dict(self.w.metadata)
        if problem == normalize.CLIENT_CLOSED:
            metadata["client_disconnected"] = True
        return TraceRecord(
            request=self.request, response=body, output_text=normalize.output_text(self.endpoint, body),
            source="sdk", task=self.task, provider=normalize.provider_for(model, prices, self.w.base_url),
            model=model, endpoint=self.endpoint, prompt_tokens=prompt, completion_tokens=completion,
            cached_tokens=cached, latency_ms=latency, ttft_ms=self.ttft_ms,
            cost_usd=prices.cost(model, prompt, completion, cached), status="error" if message else "ok",
            http_status=status_code if error is not None else 200, error=message, stream=stream,
            metadata=metadata, created_at=self.started)


class _RecordingStream:
    """Hands a sync `Stream` through unchanged and records it when it ends."""

    def __init__(self, stream, recorder: _Recorder):
        self._stream = stream
        self._recorder = recorder

    def __iter__(self):
        try:
            for chunk in self._stream:
                self._recorder.chunk(chunk)
                yield chunk
        except GeneratorExit:  # the caller stopped iterating early
            self._recorder.finish(stream=True, problem=normalize.CLIENT_CLOSED)
            raise
        except BaseException as exc:
            self._recorder.finish(error=exc, stream=True)
            raise
        self._recorder.finish(stream=True)

    def __next__(self):
        if not hasattr(self, "_it"):
            self._it = iter(self)
        return next(self._it)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self._recorder.finish(stream=True, problem=normalize.CLIENT_CLOSED)
        self._stream.close()

    def __getattr__(self, name):
        return getattr(self._stream, name)


class _AsyncRecordingStream:
    """Hands an `AsyncStream` through unchanged and records it when it ends."""

    def __init__(self, stream, recorder: _Recorder):
        self._stream = stream
        self._recorder = recorder

    async def __aiter__(self):
        try:
            async for chunk in self._stream:
                self._recorder.chunk(chunk)
                yield chunk
        except GeneratorExit:  # the caller stopped iterating early
            self._recorder.finish(stream=True, problem=normalize.CLIENT_CLOSED)
            raise
        except BaseException as exc:
            self._recorder.finish(error=exc, stream=True)
            raise
        self._recorder.finish(stream=True)

    async def __anext__(self):
        if not hasattr(self, "_it"):
            self._it = self.__aiter__()
        return await self._it.__anext__()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()

    async def close(self):
        self._recorder.finish(stream=True, problem=normalize.CLIENT_CLOSED)
        await self._stream.close()

    def __getattr__(self, name):
        return getattr(self._stream, name)


class _Wrapper:
    def __init__(self, client, task, writer, prices, metadata):
        self.task = task
        self.writer = writer
        self.prices = prices
        self.metadata = metadata or {}
        self.base_url = str(getattr(client, "base_url", "") or "")

    def instrument(self, resource, endpoint: str) -> None:
        original = resource.create
        if getattr(original, "__protege_wrapped__", False):
            return
        # openai decorates `create`, hiding its coroutine-ness: look through the wrappers
        if inspect.iscoroutinefunction(inspect.unwrap(original)) or type(resource).__name__.startswith("Async"):
            @functools.wraps(original)
            async def create(*args, **kwargs):
                rec = _Recorder(self, endpoint, kwargs)
                try:
                    result = await original(*args, **kwargs)
                except BaseException as exc:
                    rec.finish(error=exc)
                    raise
                if kwargs.get("stream") is True:
                    return _AsyncRecordingStream(result, rec)
                rec.finish(result)
                return result
        else:
            @functools.wraps(original)
            def create(*args, **kwargs):
                rec = _Recorder(self, endpoint, kwargs)
                try:
                    result = original(*args, **kwargs)
                except BaseException as exc:
                    rec.finish(error=exc)
                    raise
                if kwargs.get("stream") is True:
                    return _RecordingStream(result, rec)
                rec.finish(result)
                return result
        create.__protege_wrapped__ = True
        resource.create = create


def wrap(client, task: str | None = None, *, home: str | None = None, db: str | None = None,
         metadata: dict | None = None, writer: TraceWriter | None = None):
    """Instrument an `openai.OpenAI` / `openai.AsyncOpenAI` client in place and return it.

    `task` tags every trace (a call's `metadata={"protege_task": ...}` or an
    `X-Protege-Task` extra header overrides it); `metadata` is stored on every trace.
    """
    from ..prices import cached_prices

    settings = Settings.resolve(home=home, db=db)
    writer = writer or _writer_for(settings)
    prices = cached_prices(str(settings.prices_path) if settings.prices_path else None)
    w = _Wrapper(client, task, writer, prices, metadata)
    w.instrument(client.chat.completions, "chat/completions")
    w.instrument(client.completions, "completions")
    w.instrument(client.embeddings, "embeddings")
    client._protege_writer = writer
    return client


def flush(client, timeout: float = 30.0) -> bool:
    """Wait until the traces of a wrapped client are stored (or spooled)."""
    return client._protege_writer.flush(timeout)
