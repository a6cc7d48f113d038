"""When the store is down the proxy keeps serving, spools traces locally, and replays the
spool exactly once when the store returns."""

from __future__ import annotations

import asyncio
import threading

import httpx
import pytest

from conftest import free_port
from protege.capture.writer import TraceWriter
from protege.traces.record import TraceRecord
from protege.traces.store import Store
from test_proxy import CHAT, wait_for


class TcpRelay:
    """A TCP forwarder on 127.0.0.1 that can be cut and restored: a database that goes away."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self.server = None
        self.conns: set = set()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    async def _pipe(self, reader, writer):
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.transport.abort()

    async def _client(self, reader, writer):
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self.conns.update({writer, up_writer})
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    def up(self):
        async def start():
            self.server = await asyncio.start_server(self._client, "127.0.0.1", self.port, reuse_address=True)
        asyncio.run_coroutine_threadsafe(start(), self.loop).result(5)

    def down(self):
        async def stop():
            self.server.close()
            for w in list(self.conns):
                w.transport.abort()
            self.conns.clear()
        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(5)

    def close(self):
        self.down()

        async def cancel_rest():
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        asyncio.run_coroutine_threadsafe(cancel_rest(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.mark.postgres
def test_postgres_down_then_up_spool_replayed_exactly_once(pg_schema, upstream, make_proxy, tmp_path):
    relay = TcpRelay(5432)
    relay.up()
    url = pg_schema.with_host(f"127.0.0.1:{relay.port}")
    direct = Store(pg_schema.url)
    try:
        server, app = make_proxy(upstream.url, url, retry_s=0.2)
        with httpx.Client(base_url=server.url) as c:
            for i in range(5):
                assert c.post("/v1/chat/completions", json=CHAT).status_code == 200
            assert wait_for(lambda: direct.count() == 5)

            relay.down()  # the database disappears
            for i in range(20):
                r = c.post("/v1/chat/completions", json={**CHAT, "messages": [{"role": "user", "content": f"down {i}"}]})
                assert r.status_code == 200  # the proxy keeps serving
            assert wait_for(lambda: app.writer.spooled == 20)
            assert app.writer.store_down and app.writer.spool_path.exists()
            assert direct.count() == 5

            relay.up()  # and comes back
            assert wait_for(lambda: not app.writer.stats()["spool_pending"], timeout=20)
            assert direct.count() == 25
            for i in range(3):
                assert c.post("/v1/chat/completions", json=CHAT).status_code == 200
            assert wait_for(lambda: direct.count() == 28)
        outputs = [t["output_text"] for t in direct.iter_traces()]
        assert sorted(o for o in outputs if "down" in o) == sorted(f"echo: down {i}" for i in range(20))
        assert app.writer.replayed == 20
    finally:
        direct.close()
        relay.close()


def test_replaying_a_spool_twice_stores_each_trace_once(store, tmp_path):
    """A replay interrupted after its insert but before the spool is deleted must not
    duplicate anything when it runs again."""
    writer = TraceWriter(store, tmp_path / "spool")
    records = [TraceRecord(request={"messages": [{"role": "user", "content": str(i)}]}, output_text=str(i),
                           source="proxy") for i in range(7)]
    writer.close()
    writer._spool(records)
    spool_copy = writer.spool_path.read_bytes()
    assert writer._try_replay()
    writer.spool_dir.mkdir(exist_ok=True)
    writer.replaying_path.write_bytes(spool_copy)  # as if the process died before unlinking
    assert writer._try_replay()
    assert store.count() == 7
    assert not writer.spool_path.exists() and not writer.replaying_path.exists()


def test_store_unreachable_at_startup_spools_then_replays(tmp_path):
    """SQLite whose folder cannot be created (a file is in the way) is down; once the way
    is clear, the writer opens it and replays the spool."""
    blocker = tmp_path / "state"
    blocker.write_text("not a folder")
    url = f"sqlite:///{blocker / 'store.db'}"

    def open_store():
        return Store(url)

    writer = TraceWriter(None, tmp_path / "spool", store_factory=open_store, retry_s=0.1)
    for i in range(4):
        writer.submit(TraceRecord(request={"messages": []}, output_text=str(i), source="sdk"))
    assert wait_for(lambda: writer.spooled == 4)
    assert writer.store_down
    blocker.unlink()
    assert wait_for(lambda: writer.written == 4 and not writer.store_down, timeout=10)
    writer.close()
    s = Store(url)
    assert sorted(t["output_text"] for t in s.iter_traces()) == ["0", "1", "2", "3"]
    s.close()
    writer.store.close()


def test_writer_close_drains_queue(store, tmp_path):
    writer = TraceWriter(store, tmp_path / "spool", flush_interval_s=1.0)
    for i in range(1234):
        writer.submit(TraceRecord(request={}, output_text=str(i), source="sdk"))
    writer.close()
    assert store.count() == 1234
