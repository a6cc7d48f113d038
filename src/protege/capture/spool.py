"""The trace writer's files on local disk: the spool, its replay, and the quarantine.

- `traces.jsonl`: traces written while the store is unreachable, one `TraceRecord` JSON a
  line, appended and fsynced. To replay it the writer renames it `traces.replaying.jsonl`
  and reads it a chunk at a time; a replay cut short by a crash is simply run again (the
  store skips ids it has).
- `quarantine.jsonl`: traces the store refused even cleaned, in the same format;
  `protege traces import FILE --format traces` reads them back.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import BinaryIO

import orjson

from ..traces.clean import clean
from ..traces.record import TraceRecord

log = logging.getLogger("protege.writer")


class Spool:
    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.path = self.folder / "traces.jsonl"
        self.replaying_path = self.folder / "traces.replaying.jsonl"
        self.quarantine_path = self.folder / "quarantine.jsonl"
        self._replay: BinaryIO | None = None

    def append(self, records: list[TraceRecord]) -> None:
        """Spool records, on disk (fsynced) when this returns; OSError when the disk refuses."""
        _append_fsync(self.path, records)

    def quarantine(self, records: list[TraceRecord]) -> None:
        _append_fsync(self.quarantine_path, records)

    @property
    def pending(self) -> bool:
        return self._replay is not None or self.path.exists() or self.replaying_path.exists()

    @property
    def replaying(self) -> bool:
        return self._replay is not None

    @property
    def bytes(self) -> int:
        return _size(self.path) + _size(self.replaying_path)

    def next_chunk(self, n: int) -> tuple[list[TraceRecord], int, bool]:
        """(up to n spooled records, unreadable lines skipped, whether the file is at its end);
        starts a replay when none is under way."""
        if self._replay is None:
            if not self.replaying_path.exists():
                if not self.path.exists():
                    return [], 0, True
                os.replace(self.path, self.replaying_path)
            self._replay = open(self.replaying_path, "rb")
        chunk, unreadable = [], 0
        for raw in self._replay:
            try:
                chunk.append(TraceRecord.from_json(orjson.loads(raw)))
            except (orjson.JSONDecodeError, TypeError, ValueError):
                # a torn last line from a crash mid-write: nothing in it can be recovered
                log.error("skipping an unreadable spool line (%d bytes)", len(raw))
                unreadable += 1
                continue
            if len(chunk) >= n:
                return chunk, unreadable, False
        return chunk, unreadable, True

    def end_replay(self, *, delete: bool) -> None:
        """Close the replay; delete the replayed file once all of it is durable elsewhere."""
        if self._replay is not None:
            self._replay.close()
            self._replay = None
        if delete:
            self.replaying_path.unlink(missing_ok=True)


def _append_fsync(path: Path, records: list[TraceRecord]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = b"".join(_json_line(r) for r in records)
    with open(path, "ab") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _json_line(record: TraceRecord) -> bytes:
    try:
        return orjson.dumps(record.to_json(), option=orjson.OPT_NON_STR_KEYS) + b"\n"
    except TypeError:  # what JSON cannot carry (big ints, surrogates) is cleaned first
        notes = clean(record)
        record.metadata.setdefault("protege_cleaned", notes)
        return orjson.dumps(record.to_json(), option=orjson.OPT_NON_STR_KEYS, default=repr) + b"\n"


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0
