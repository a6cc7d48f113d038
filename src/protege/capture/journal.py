"""The capture journal: every acknowledged call is on disk before its response is finished.

The trace writer batches captures in memory; a SIGKILL or an out-of-memory kill would lose
that memory. So each capture is first appended to a journal file, by the thread that hands
it over (the proxy's event loop, the SDK caller, the server), with one unbuffered
`os.write`: the kernel holds the bytes from then on, so a killed process loses none of them
(a power cut can: the journal is not fsynced; the spool, which holds traces while the store
is down, is). Once the writer has stored, spooled or quarantined a capture, its journal
entry is released; a segment whose entries are all released is deleted.

Layout: `<spool>/journal/<writer id>/` holds a `lock` file, flock'ed by the living writer,
and segments `000001.wal`, ... Each entry is a frame: 4-byte length, 4-byte CRC-32, then
the payload (see `encode`). A writer that starts finds the folders whose lock it can take
(their writer is dead: the kernel drops a flock with its process, SIGKILL included),
replays their entries, and deletes them. Trace ids are fixed when a capture is made, so
an entry stored before the kill and replayed after it is stored once.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import struct
import threading
import time
import zlib
from pathlib import Path
from typing import Iterator

import orjson

from ..ids import uuid7
from ..traces.record import TraceRecord
from .raw import ProxyCapture

log = logging.getLogger("protege.writer")
_FRAME = struct.Struct("<II")
SEGMENT_BYTES = 8 << 20
SEGMENT_SECONDS = 5.0


def encode(item) -> bytes:
    """A capture as journal bytes: `R` + a TraceRecord's JSON, or `P` + a proxy capture."""
    if isinstance(item, ProxyCapture):
        return b"P" + item.to_bytes()
    return b"R" + orjson.dumps(item.to_json(), option=orjson.OPT_NON_STR_KEYS)


def decode(payload: bytes, prices=None):
    kind, body = payload[:1], payload[1:]
    if kind == b"P":
        return ProxyCapture.from_bytes(body, prices)
    if kind == b"R":
        return TraceRecord.from_json(orjson.loads(body))
    raise ValueError(f"unknown journal entry kind {kind!r}")


class Journal:
    """One writer's journal. `append` is called from any thread; the rest from the writer's."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.dir = self.root / uuid7()
        self.dir.mkdir(parents=True)
        self._lock_fh = open(self.dir / "lock", "wb")
        fcntl.flock(self._lock_fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._mutex = threading.Lock()
        self.seq = 0
        self.pending: dict[int, int] = {}
        self.write_errors = 0
        self._open_segment()

    def _segment(self, seq: int) -> Path:
        return self.dir / f"{seq:06d}.wal"

    def _open_segment(self) -> None:
        self.seq += 1
        self.pending[self.seq] = 0
        self.size = 0
        self.opened = time.monotonic()
        self.fd = os.open(self._segment(self.seq), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def append(self, payload: bytes) -> int | None:
        """Write one entry; its segment number, or None when the disk refused it (counted)."""
        frame = _FRAME.pack(len(payload), zlib.crc32(payload)) + payload
        with self._mutex:
            try:
                view = memoryview(frame)
                while view:
                    view = view[os.write(self.fd, view):]
            except OSError as exc:
                self.write_errors += 1
                if self.write_errors == 1 or self.write_errors % 1000 == 0:
                    log.error("cannot write the capture journal %s (%s); %d captures are in memory only",
                              self.dir, exc, self.write_errors)
                return None
            self.pending[self.seq] += 1
            self.size += len(frame)
            return self.seq

    def release(self, seqs: list[int | None]) -> None:
        """These entries are durable elsewhere (stored, spooled, quarantined) or given up."""
        with self._mutex:
            for seq in seqs:
                if seq is not None:
                    self.pending[seq] -= 1
            if self.size >= SEGMENT_BYTES or (self.size and time.monotonic() - self.opened >= SEGMENT_SECONDS):
                os.close(self.fd)
                self._open_segment()
            for seq in [s for s, n in self.pending.items() if n <= 0 and s != self.seq]:
                del self.pending[seq]
                _unlink(self._segment(seq))

    @property
    def unreleased(self) -> int:
        return sum(self.pending.values())

    def close(self) -> None:
        """Remove the journal if every entry was released; else leave it for the next start."""
        with self._mutex:
            os.close(self.fd)
            left = self.unreleased
        if left:
            log.error("%d captures could not be stored or spooled; they stay in %s and the next protege "
                      "process with this home stores them", left, self.dir)
            self._lock_fh.close()
        else:
            self._lock_fh.close()
            shutil.rmtree(self.dir, ignore_errors=True)


def orphans(root: str | os.PathLike) -> Iterator[tuple[Path, object]]:
    """Journal folders under `root` whose writer is dead, each with its lock held by us
    until the caller deletes the folder (or the process ends)."""
    root = Path(root)
    if not root.is_dir():
        return
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        try:
            fh = open(folder / "lock", "ab")
        except OSError:
            continue
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # a living writer holds it
            fh.close()
            continue
        yield folder, fh


def read_entries(folder: Path) -> Iterator[bytes]:
    """The payloads of a journal folder's segments, oldest first; a torn or corrupt tail
    (a write cut by the kill) ends a segment."""
    for segment in sorted(folder.glob("*.wal")):
        data = segment.read_bytes()
        pos = 0
        while pos + _FRAME.size <= len(data):
            length, crc = _FRAME.unpack_from(data, pos)
            payload = data[pos + _FRAME.size:pos + _FRAME.size + length]
            if len(payload) < length or zlib.crc32(payload) != crc:
                log.error("journal %s: an entry at byte %d is torn or corrupt; the rest of the segment is skipped",
                          segment, pos)
                break
            yield payload
            pos += _FRAME.size + length


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
