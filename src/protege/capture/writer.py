"""Batched, off-the-request-path trace writing with a local spool for when the store is down.

Callers (the proxy's event loop, the SDK wrapper) hand captures to `TraceWriter.submit`,
which only appends to a queue. A background thread turns captures into `TraceRecord`s,
writes them in batches, and, if the store cannot be written, appends the batch to a
spool file (`HOME/spool/traces.jsonl`) instead of dropping it. Every `retry_s` it tries
the store again; once the store answers, the spool is replayed and deleted. Inserts skip
ids already stored, so a replay interrupted half-way and retried stores each trace once.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any, Protocol

import orjson

from ..traces.record import TraceRecord
from ..traces.store import Store

log = logging.getLogger("protege.writer")
_STOP = object()


class Capture(Protocol):
    def to_record(self) -> TraceRecord: ...


class TraceWriter:
    def __init__(self, store: Store | None, spool_dir: str | os.PathLike, *, batch_size: int = 500,
                 flush_interval_s: float = 0.05, retry_s: float = 1.0, store_factory=None):
        """`store` may be None when the store could not be opened at start-up; then
        `store_factory()` is retried every `retry_s` and captures are spooled meanwhile."""
        self.store = store
        self.store_factory = store_factory
        self.spool_dir = Path(spool_dir)
        self.spool_path = self.spool_dir / "traces.jsonl"
        self.replaying_path = self.spool_dir / "traces.replaying.jsonl"
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.retry_s = retry_s
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.submitted = self.written = self.spooled = self.replayed = self.failed = 0
        self.store_down = store is None
        self._next_try = 0.0
        self._idle = threading.Event()
        self._idle.set()
        self._thread = threading.Thread(target=self._run, name="protege-trace-writer", daemon=True)
        self._thread.start()

    @classmethod
    def for_settings(cls, settings, **kwargs) -> "TraceWriter":
        """A writer for the store and home folder in `settings`. If the store cannot be
        opened now, the writer starts anyway and spools until it can."""
        settings.ensure_home()

        def open_store():
            return Store(settings.database_url)

        try:
            store = open_store()
        except Exception:
            store = None
        return cls(store, settings.home / "spool", store_factory=open_store, **kwargs)

    # -- caller side (cheap) ----------------------------------------------------------

    def submit(self, capture: Capture | TraceRecord) -> None:
        self.submitted += 1
        self._idle.clear()
        self.queue.put(capture)

    def flush(self, timeout: float = 30.0) -> bool:
        """Block until everything submitted so far has been written or spooled."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.queue.empty() and self._idle.wait(0.01) and self.queue.empty():
                return True
        return False

    def close(self, timeout: float = 30.0) -> None:
        self.queue.put(_STOP)
        self._thread.join(timeout)

    def stats(self) -> dict[str, Any]:
        return {"submitted": self.submitted, "written": self.written, "spooled": self.spooled,
                "replayed": self.replayed, "failed": self.failed, "store_down": self.store_down,
                "spool_pending": self.spool_path.exists() or self.replaying_path.exists()}

    # -- writer thread ----------------------------------------------------------------

    def _run(self) -> None:
        self._try_replay()
        stop = False
        while not stop:
            try:
                first = self.queue.get(timeout=self.retry_s)
            except queue.Empty:
                if self.store_down or self.spool_path.exists():
                    self._try_replay()
                self._idle.set()
                continue
            batch, stop = self._gather(first)
            if batch:
                self._write(batch)
            if self.queue.empty():
                self._idle.set()
        self._idle.set()

    def _gather(self, first) -> tuple[list, bool]:
        if first is _STOP:
            return [], True
        batch = [first]
        deadline = time.monotonic() + self.flush_interval_s
        while len(batch) < self.batch_size:
            remaining = deadline - time.monotonic()
            try:
                item = self.queue.get(timeout=max(remaining, 0)) if remaining > 0 else self.queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                return batch, True
            batch.append(item)
        return batch, False

    def _write(self, batch: list) -> None:
        records = []
        for item in batch:
            try:
                records.append(item if isinstance(item, TraceRecord) else item.to_record())
            except Exception:  # a capture we cannot normalise must not take the writer down
                self.failed += 1
                log.exception("could not build a trace from a capture; it is dropped")
        if not records:
            return
        if self.store_down and time.monotonic() < self._next_try:
            self._spool(records)
            return
        if self.store_down and not self._try_replay():
            self._spool(records)
            return
        try:
            self.store.insert_traces(records)
            self.written += len(records)
        except Exception as exc:
            self._mark_down(exc)
            self._spool(records)

    def _mark_down(self, exc: Exception) -> None:
        if not self.store_down:
            log.warning("trace store unavailable (%s); spooling traces to %s", str(exc).splitlines()[0], self.spool_path)
        self.store_down = True
        self._next_try = time.monotonic() + self.retry_s

    def _spool(self, records: list[TraceRecord]) -> None:
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        data = b"".join(orjson.dumps(r.to_json(), option=orjson.OPT_NON_STR_KEYS) + b"\n" for r in records)
        with open(self.spool_path, "ab") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        self.spooled += len(records)

    def _try_replay(self) -> bool:
        """Reconnect if needed and replay the spool. True when the store is usable."""
        if self.store is None:
            try:
                self.store = self.store_factory()
            except Exception as exc:
                self._mark_down(exc)
                return False
        if self.spool_path.exists() and not self.replaying_path.exists():
            os.replace(self.spool_path, self.replaying_path)
        if self.replaying_path.exists():
            try:
                n = self._replay_file(self.replaying_path)
            except Exception as exc:
                self._mark_down(exc)
                return False
            self.replaying_path.unlink()
            self.replayed += n
            self.written += n
            log.warning("trace store is back; replayed %d spooled traces", n)
            # anything spooled while we replayed goes on the next pass
        else:
            try:
                with self.store.engine.connect() as conn:
                    conn.exec_driver_sql("SELECT 1")
            except Exception as exc:
                self._mark_down(exc)
                return False
        self.store_down = False
        return True

    def _replay_file(self, path: Path) -> int:
        n = 0
        chunk: list[TraceRecord] = []
        with open(path, "rb") as fh:
            lines = fh.read().splitlines()
        with self.store.engine.begin() as conn:
            for raw in lines:
                try:
                    chunk.append(TraceRecord.from_json(orjson.loads(raw)))
                except (orjson.JSONDecodeError, TypeError, ValueError):
                    # a torn last line from a crash mid-write: nothing else we can recover
                    log.warning("skipping an unreadable spool line (%d bytes)", len(raw))
                    continue
                if len(chunk) >= 1000:
                    self.store.insert_traces(chunk, conn=conn)
                    n += len(chunk)
                    chunk = []
            if chunk:
                self.store.insert_traces(chunk, conn=conn)
                n += len(chunk)
        return n
