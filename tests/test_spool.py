"""When the store is down the proxy keeps serving, spools traces locally, and replays the
spool exactly once when the store returns."""

from __future__ import annotations

import httpx
import orjson
import pytest
from helpers import CHAT, wait_for

from protege.capture.writer import TraceWriter
from protege.testing import TcpRelay
from protege.traces.record import TraceRecord
from protege.traces.store import Store


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
    duplicate anything when it runs again: a process that died mid-replay leaves both the
    replaying file and a newer spool, and the next writer stores each trace once."""
    records = [TraceRecord(request={"messages": [{"role": "user", "content": str(i)}]}, output_text=str(i),
                           source="proxy") for i in range(7)]
    lines = b"".join(orjson.dumps(r.to_json()) + b"\n" for r in records)
    spool = tmp_path / "spool"
    spool.mkdir()
    store.insert_traces(records[:4])  # the dead replay had stored these
    (spool / "traces.replaying.jsonl").write_bytes(lines)
    (spool / "traces.jsonl").write_bytes(lines[: lines.index(b"\n") + 1])  # and one more was spooled again
    writer = TraceWriter(store, spool, retry_s=0.05)
    assert wait_for(lambda: not writer.stats()["spool_pending"])
    writer.close()
    assert store.count() == 7
    assert not (spool / "traces.jsonl").exists() and not (spool / "traces.replaying.jsonl").exists()


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
