"""Batched, off-the-request-path trace writing that loses no trace: journal, spool, quarantine.

Callers (the proxy's event loop, the SDK wrapper, `protege serve`) hand captures to
`TraceWriter.submit`, which appends them to the journal (capture/journal.py: on disk before
the caller answers, so a killed process loses none) and to a bounded queue. A background
thread turns captures into `TraceRecord`s and writes them in batches. Where each one goes:

1. the store, a batch at a time;
2. a batch the store refuses for its *data* (a NUL for PostgreSQL, an over-long `model`,
   a token count past 2^31) is retried row by row; a row that still fails is cleaned
   (traces/clean.py; each change noted in `metadata.protege_cleaned`) and stored, or, if
   even that fails, appended to `<home>/spool/quarantine.jsonl`, which
   `protege traces import FILE --format traces` reads back;
3. when the store itself is unreachable (a connection-level failure), the batch is
   appended to `<home>/spool/traces.jsonl` (fsynced) and the store is retried every
   `retry_s`; once it answers, the spool is replayed a chunk at a time between new
   batches, through the same steps, so no trace waits behind another;
4. when the spool cannot be written either (disk full, permissions), records wait in
   memory, up to `max_held`, and both are retried; past that bound they are dropped,
   counted and logged as an error.

The thread never dies: an unexpected error is logged and the loop goes on. `metrics()`
(served on `/metrics` by the proxy and `protege serve`) gives every count.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Protocol

from ..traces.clean import clean
from ..traces.record import TraceRecord
from ..traces.store import Store, error_summary, is_connection_error
from . import journal as wal
from .spool import Spool

log = logging.getLogger("protege.writer")
_STOP = object()


def _error(exc: BaseException) -> str:
    return f"{type(getattr(exc, 'orig', None) or exc).__name__}: {error_summary(exc)}"[:300]


class _StoreDown(Exception):
    """The store failed as a whole (not for a row's data) in the middle of a row-by-row pass."""
REPLAY_CHUNK = 1000


class Capture(Protocol):
    def to_record(self) -> TraceRecord: ...


class TraceWriter:
    def __init__(self, store: Store | None, spool_dir: str | os.PathLike, *, batch_size: int = 500,
                 flush_interval_s: float = 0.05, retry_s: float = 1.0, store_factory=None,
                 max_queue: int = 100_000, max_held: int = 100_000, journal: bool = True, prices=None):
        """`store` may be None when the store could not be opened at start-up; then
        `store_factory()` is retried every `retry_s` and captures are spooled meanwhile.
        `max_queue` bounds the captures waiting for the thread, `max_held` the records
        kept in memory while neither the store nor the spool can be written."""
        self.store = store
        self.store_factory = store_factory
        self.spool_dir = Path(spool_dir)
        self.spool = Spool(self.spool_dir)
        self.spool_path, self.quarantine_path = self.spool.path, self.spool.quarantine_path
        self.batch_size, self.flush_interval_s, self.retry_s = batch_size, flush_interval_s, retry_s
        self.max_held, self.prices = max_held, prices
        # SimpleQueue (C, lock-free put) with the bound checked by hand: queue.Queue's Python
        # locking on every put and get cost a third of the proxy's throughput
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.max_queue = max_queue
        self.submitted = self.written = self.spooled = self.replayed = 0
        self.cleaned = self.quarantined = self.recovered = self.errors = 0
        self.dropped: dict[str, int] = {}
        self._dropped_logged = 0
        self.held: list[tuple[TraceRecord, int | None]] = []
        self.store_down = store is None
        self.spool_broken = False
        self.stopped = self._closing = False
        self._next_try = 0.0
        self._replay_held = False  # some replayed records are only in memory: keep the file
        self._last_periodic = 0.0
        self._submit_lock = threading.Lock()
        self.journal = None
        if journal:
            try:
                self.journal = wal.Journal(self.spool_dir / "journal")
            except OSError as exc:
                log.error("cannot create the capture journal under %s (%s): a killed process would lose the "
                          "traces in memory", self.spool_dir, exc)
        self._idle = threading.Event()
        self._idle.set()
        self._thread = threading.Thread(target=self._run, name="protege-trace-writer", daemon=True)
        self._thread.start()

    @classmethod
    def for_settings(cls, settings, **kwargs) -> "TraceWriter":
        """A writer for the store and home folder in `settings`. If the store cannot be
        opened now, the writer starts anyway and spools until it can."""
        from ..prices import cached_prices

        settings.ensure_home()

        def open_store():
            return Store(settings.database_url)

        try:
            store = open_store()
        except Exception:
            store = None
        kwargs.setdefault("prices", cached_prices(str(settings.prices_path) if settings.prices_path else None))
        return cls(store, settings.home / "spool", store_factory=open_store, **kwargs)

    # -- caller side (cheap) ----------------------------------------------------------

    def submit(self, capture: Capture | TraceRecord) -> None:
        """Journal the capture and queue it; never raises, never blocks on the store."""
        if self.stopped:
            self._drop(1, "submitted after close", [])
            return
        seq = None
        if self.journal is not None:
            try:
                seq = self.journal.append(wal.encode(capture))
            except Exception:  # an unencodable capture is still queued; only the journal misses it
                log.exception("could not journal a capture")
        with self._submit_lock:
            self.submitted += 1
        self._idle.clear()
        if self.queue.qsize() >= self.max_queue:
            self._drop(1, "queue full", [seq])
        else:
            self.queue.put((capture, seq))

    def flush(self, timeout: float = 30.0) -> bool:
        """Block until everything submitted so far is stored, spooled or quarantined."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.queue.empty() and self._idle.wait(0.01) and self.queue.empty() and not self.held:
                return True
        return False

    def close(self, timeout: float = 30.0) -> None:
        self._closing = True
        self.queue.put(_STOP)
        self._thread.join(timeout)

    @property
    def state(self) -> str:
        if self.stopped:
            return "stopped"
        if self.spool_broken and self.store_down:
            return "holding"  # neither store nor spool: records wait in memory
        return "store_down" if self.store_down else "ok"

    def stats(self) -> dict[str, Any]:
        return {"state": self.state, "submitted": self.submitted, "written": self.written,
                "spooled": self.spooled, "replayed": self.replayed, "cleaned": self.cleaned,
                "quarantined": self.quarantined, "recovered": self.recovered,
                "dropped": sum(self.dropped.values()), "dropped_by_reason": dict(self.dropped),
                "queued": self.queue.qsize(), "held": len(self.held), "errors": self.errors,
                "store_down": self.store_down, "spool_writable": not self.spool_broken,
                "spool_pending": self.spool.pending, "spool_bytes": self.spool.bytes,
                "journal_unreleased": self.journal.unreleased if self.journal else None,
                "journal_write_errors": self.journal.write_errors if self.journal else None}

    def metrics(self, prefix: str) -> list[str]:
        """Prometheus text lines for the writer, names starting with `prefix`."""
        s = self.stats()
        counters = (("submitted", "Captures handed to the trace writer."),
                    ("written", "Traces stored (replayed spool included)."),
                    ("spooled", "Traces written to the local spool while the store was down."),
                    ("replayed", "Spooled traces stored once the store was back."),
                    ("cleaned", "Traces stored after cleaning what the store refused (see metadata.protege_cleaned)."),
                    ("quarantined", "Traces the store refused even cleaned, kept in spool/quarantine.jsonl."),
                    ("recovered", "Traces recovered from the journal of a process that was killed."))
        lines = []
        for name, text in counters:
            lines += [f"# HELP {prefix}_traces_{name}_total {text}", f"# TYPE {prefix}_traces_{name}_total counter",
                      f"{prefix}_traces_{name}_total {s[name]}"]
        lines += [f"# HELP {prefix}_traces_dropped_total Traces lost, by reason (each also logged as an error).",
                  f"# TYPE {prefix}_traces_dropped_total counter"]
        for reason in sorted(set(self.dropped) | {"queue full", "memory full"}):
            lines.append(f'{prefix}_traces_dropped_total{{reason="{reason}"}} {self.dropped.get(reason, 0)}')
        gauges = (("queued", "Captures waiting for the writer thread."),
                  ("held", "Records in memory because neither the store nor the spool can be written."),
                  ("spool_bytes", "Bytes in the spool awaiting replay."))
        for name, text in gauges:
            lines += [f"# HELP {prefix}_traces_{name} {text}", f"# TYPE {prefix}_traces_{name} gauge",
                      f"{prefix}_traces_{name} {s[name]}"]
        lines += [f"# HELP {prefix}_trace_writer_state 1 for the writer's current state.",
                  f"# TYPE {prefix}_trace_writer_state gauge"]
        for state in ("ok", "store_down", "holding", "stopped"):
            lines.append(f'{prefix}_trace_writer_state{{state="{state}"}} {int(s["state"] == state)}')
        return lines

    # -- writer thread ----------------------------------------------------------------

    def _run(self) -> None:
        self._guarded(self._recover_orphans)
        stop = False
        while not stop:
            try:
                stop = self._step()
            except Exception:  # the writer must outlive any bug: log, count, go on
                self.errors += 1
                log.exception("trace writer: unexpected error; it keeps running")
                time.sleep(min(self.retry_s, 1.0))
        self._guarded(self._finish)
        self.stopped = True
        self._idle.set()

    def _guarded(self, fn) -> None:
        try:
            fn()
        except Exception:
            self.errors += 1
            log.exception("trace writer: unexpected error in %s", fn.__name__)

    def _step(self) -> bool:
        """One batch (or, when idle, the periodic work). True once told to stop."""
        if self._closing and self.queue.empty():
            return True
        replaying = self.spool.replaying and not self.store_down
        try:
            first = self.queue.get(timeout=0.001 if replaying else self.retry_s)
        except queue.Empty:
            self._periodic()
            self._maybe_idle()
            return False
        batch, stop = self._gather(first)
        self._deliver(*self._records(batch))
        if replaying or time.monotonic() - self._last_periodic >= self.retry_s:
            self._periodic()
        self._maybe_idle()
        return stop

    def _maybe_idle(self) -> None:
        if self.queue.empty() and (not self.spool.replaying or self.store_down):
            self._idle.set()

    def _periodic(self) -> None:
        self._last_periodic = time.monotonic()
        self._retry_held()
        if self._store_ready() and self.spool.pending:  # reconnects when the retry time has come
            self._replay_some()
        if self.journal is not None:
            self.journal.release([])
        self._report_drops()

    def _retry_held(self) -> None:
        held, self.held = self.held, []
        self._deliver([r for r, _ in held], [s for _, s in held])

    def _gather(self, first) -> tuple[list, bool]:
        if first is _STOP:
            return [], True
        batch = [first]
        deadline = time.monotonic() + self.flush_interval_s
        while len(batch) < self.batch_size:
            remaining = deadline - time.monotonic()
            try:
                item = self.queue.get(timeout=remaining) if remaining > 0 else self.queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                return batch, True
            batch.append(item)
        return batch, False

    def _records(self, batch: list) -> tuple[list[TraceRecord], list[int | None]]:
        records, seqs = [], []
        for item, seq in batch:
            try:
                records.append(item if isinstance(item, TraceRecord) else item.to_record())
                seqs.append(seq)
            except Exception:  # a capture with no record at all: nothing to store, so it counts as lost
                log.exception("could not build a trace from a capture")
                self._drop(1, "unreadable capture", [seq])
        return records, seqs

    # -- where records go -------------------------------------------------------------

    def _deliver(self, records: list[TraceRecord], seqs: list[int | None]) -> None:
        """Store, else spool, else hold in memory; release the journal entries made durable."""
        if not records:
            return
        if not self._store_ready():
            self._spool_or_hold(records, seqs)
            return
        try:
            self.written += self.store.insert_traces(records)
        except Exception as exc:
            if is_connection_error(exc):
                self._mark_down(exc)
                self._spool_or_hold(records, seqs)
            else:
                self._one_by_one(records, seqs)
            return
        self._release(seqs)

    def _one_by_one(self, records: list[TraceRecord], seqs: list[int | None]) -> None:
        """A batch refused for its data: find the rows at fault and clean or quarantine them."""
        for i, (record, seq) in enumerate(zip(records, seqs)):
            try:
                error = self._insert_one(record)
                notes = clean(record) if error is not None else []
                if notes:
                    record.metadata["protege_cleaned"] = notes
                    refused, error = error, self._insert_one(record)
                    if error is None:
                        self.cleaned += 1
                        log.warning("trace %s stored after cleaning (%s): %s", record.id, refused, "; ".join(notes))
            except _StoreDown:
                self._spool_or_hold(records[i:], seqs[i:])
                return
            if error is None:
                self._release([seq])
            else:
                self._quarantine(record, seq, error)

    def _insert_one(self, record: TraceRecord) -> str | None:
        """None once stored, or why the store refused its data; `_StoreDown` when the store
        itself failed (it is marked down)."""
        try:
            self.written += self.store.insert_traces([record])
            return None
        except Exception as exc:
            if is_connection_error(exc):
                self._mark_down(exc)
                raise _StoreDown from exc
            return _error(exc)

    def _quarantine(self, record: TraceRecord, seq: int | None, error: str) -> None:
        record.metadata["protege_quarantine"] = {"error": error, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                    time.gmtime())}
        try:
            self.spool.quarantine([record])
        except OSError as exc:
            log.error("cannot write the quarantine file %s (%s); the trace waits in memory", self.quarantine_path, exc)
            self._hold([record], [seq])
            return
        self.quarantined += 1
        self._release([seq])
        log.error("the store refused trace %s even cleaned (%s); kept in %s: fix the cause, then "
                  "`protege traces import %s --format traces`", record.id, error, self.quarantine_path,
                  self.quarantine_path)

    def _spool_or_hold(self, records: list[TraceRecord], seqs: list[int | None]) -> None:
        try:
            self.spool.append(records)
        except OSError as exc:
            if not self.spool_broken:
                log.error("cannot write the spool %s (%s) while the store is down: traces wait in memory "
                          "(at most %d) and both are retried every %g s", self.spool_path, exc, self.max_held,
                          self.retry_s)
            self.spool_broken = True
            self._hold(records, seqs)
            return
        if self.spool_broken:
            log.warning("the spool %s is writable again", self.spool_path)
        self.spool_broken = False
        self.spooled += len(records)
        self._release(seqs)

    def _hold(self, records: list[TraceRecord], seqs: list[int | None]) -> None:
        room = max(self.max_held - len(self.held), 0)
        self.held.extend(zip(records[:room], seqs[:room]))
        if len(records) > room:
            self._drop(len(records) - room, "memory full", seqs[room:])

    def _drop(self, n: int, reason: str, seqs: list[int | None]) -> None:
        with self._submit_lock:
            self.dropped[reason] = self.dropped.get(reason, 0) + n
        if self.journal is not None:
            self.journal.release(seqs)

    def _report_drops(self) -> None:
        total = sum(self.dropped.values())
        if total > self._dropped_logged:
            log.error("%d traces dropped since the last report (%d in all; by reason: %s)",
                      total - self._dropped_logged, total,
                      ", ".join(f"{k} {v}" for k, v in sorted(self.dropped.items())))
            self._dropped_logged = total

    def _release(self, seqs: list[int | None]) -> None:
        if self.journal is not None:
            self.journal.release(seqs)

    # -- the store's health -----------------------------------------------------------

    def _store_ready(self) -> bool:
        """True when the store can be written now (reconnecting when the retry time has come)."""
        if not self.store_down:
            return True
        if time.monotonic() < self._next_try:
            return False
        try:
            if self.store is None:
                self.store = self.store_factory()
            with self.store.engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1")
        except Exception as exc:
            self._mark_down(exc)
            return False
        log.warning("trace store is back")
        self.store_down = False
        return True

    def _mark_down(self, exc: BaseException) -> None:
        if not self.store_down:
            log.warning("trace store unavailable (%s); spooling traces to %s", _error(exc), self.spool_path)
        self.store_down = True
        self._next_try = time.monotonic() + self.retry_s

    # -- the spool's replay -----------------------------------------------------------

    def _replay_some(self) -> None:
        """Store the next chunk of the spool; the spool is deleted once all of it is durable."""
        if not self.spool.replaying:
            self._replay_held = False
        chunk, unreadable, at_end = self.spool.next_chunk(REPLAY_CHUNK)
        if unreadable:
            self._drop(unreadable, "unreadable spool line", [])
        before_written, before_held = self.written, len(self.held)
        self._deliver(chunk, [None] * len(chunk))
        self.replayed += self.written - before_written
        self._replay_held |= len(self.held) > before_held
        if at_end:
            self.spool.end_replay(delete=not self._replay_held)
            if self.replayed and not self._replay_held:
                log.warning("spool replayed: %d traces stored so far", self.replayed)

    # -- start and stop ---------------------------------------------------------------

    def _recover_orphans(self) -> None:
        """Store what a killed writer with this spool folder had journaled but not stored."""
        for folder, lock in wal.orphans(self.spool_dir / "journal"):
            try:
                items = []
                for payload in wal.read_entries(folder):
                    try:
                        items.append((wal.decode(payload, self.prices), None))
                    except Exception:
                        log.exception("an unreadable journal entry in %s is skipped", folder)
                        self._drop(1, "unreadable journal entry", [])
                records, seqs = self._records(items)
                held_before, written_before = len(self.held), self.written
                for i in range(0, len(records), REPLAY_CHUNK):
                    self._deliver(records[i:i + REPLAY_CHUNK], seqs[i:i + REPLAY_CHUNK])
                # entries the dead process had stored are skipped by id: count only what it lost
                self.recovered += self.written - written_before
                if self.written > written_before:
                    log.warning("recovered %d traces from the journal of a stopped process (%s; %d entries read)",
                                self.written - written_before, folder.name, len(records))
                if len(self.held) == held_before:
                    shutil.rmtree(folder, ignore_errors=True)
            finally:
                lock.close()

    def _finish(self) -> None:
        """Drain what is queued, finish a replay, and say what could not be kept."""
        items = []
        while not self.queue.empty():
            item = self.queue.get_nowait()
            if item is not _STOP:
                items.append(item)
        self._deliver(*self._records(items))
        self._next_try = 0.0  # one last try of the store, now
        self._retry_held()
        while self.spool.replaying and not self.store_down:
            self._replay_some()
        if self.held:
            kept = sum(1 for _, s in self.held if s is not None)
            if len(self.held) > kept:
                self._drop(len(self.held) - kept, "stopped with store and spool unwritable",
                           [s for _, s in self.held if s is None])
            if kept:
                log.error("%d traces could be neither stored nor spooled before exit; they stay in the journal",
                          kept)
            self.held = []
        self._report_drops()
        self.spool.end_replay(delete=False)
        if self.journal is not None:
            self.journal.close()
