"""No trace lost: poison rows, a dead store, an unwritable spool, credentials in the upstream
URL, odd upstream answers, a client that hangs up, and a proxy killed with SIGKILL.

Every test runs a real proxy (or writer) against the real store; faults are real too: a
SQLite trigger that refuses rows, a store folder blocked by a file, a spool that is
/dev/full (ENOSPC on every write), a process killed with SIGKILL."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time

import aiohttp
import httpx
import orjson
import pytest
from helpers import CHAT, free_port, run, stored, wait_for

from protege.capture.writer import TraceWriter
from protege.traces.record import TraceRecord
from protege.traces.store import Store


def chat(text: str, **more) -> dict:
    return {**CHAT, "messages": [{"role": "user", "content": text}], **more}


def completion(text: str, usage: dict) -> dict:
    return {"id": "x", "object": "chat.completion", "model": "gpt-4o-mini", "usage": usage,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]}


def test_poison_traces_are_cleaned_stored_and_hold_nothing_back(upstream, make_proxy, store, db_url):
    upstream.model = None  # answers carry the request's model, so an over-long one reaches the store
    server, app = make_proxy(upstream.url, db_url)
    huge = 2**64 - 1
    with httpx.Client(base_url=server.url) as c:
        assert c.post("/v1/chat/completions", json=chat("before")).status_code == 200
        assert c.post("/v1/chat/completions", json=chat("nul \x00 inside")).status_code == 200
        assert c.post("/v1/chat/completions", json=chat("long task"), headers={"X-Protege-Task": "t" * 300}).status_code == 200
        assert c.post("/v1/chat/completions", json={**chat("long model"), "model": "m" * 300}).status_code == 200
        assert c.post("/v1/chat/completions", json={**chat("numeric model"), "model": 123}).status_code == 200
        upstream.push(("status", 200, completion("huge usage", {"prompt_tokens": huge, "completion_tokens": 2**31})))
        assert c.post("/v1/chat/completions", json=chat("huge usage")).status_code == 200
        assert c.post("/v1/chat/completions", json=chat("after")).status_code == 200
    traces = {t["output_text"]: t for t in stored(app, store, 7)}
    assert len(traces) == 7 and "echo: after" in traces  # nothing held back, nothing lost
    postgres = not store.is_sqlite
    nul = traces["echo: nul \\u0000 inside" if postgres else "echo: nul \x00 inside"]
    assert nul["request"]["messages"][0]["content"] == ("nul \\u0000 inside" if postgres else "nul \x00 inside")
    assert ("protege_cleaned" in nul["metadata"]) == postgres
    long_task = traces["echo: long task"]
    assert long_task["task"] == "t" * (200 if postgres else 300)
    assert traces["echo: long model"]["model"] == "m" * (200 if postgres else 300)
    assert traces["echo: numeric model"]["model"] == "123" and traces["echo: numeric model"]["status"] == "ok"
    big = traces["huge usage"]
    assert big["prompt_tokens"] is None and big["response"]["usage"]["prompt_tokens"] == huge  # the raw payload kept
    assert any(n.startswith("prompt_tokens: 18446744073709551615 out of range") for n in big["metadata"]["protege_cleaned"])
    stats = app.writer.stats()
    assert stats["quarantined"] == 0 and stats["dropped"] == 0 and stats["cleaned"] == (4 if postgres else 1)


def test_spooled_poison_is_replayed_without_blocking_the_spool(db_url, tmp_path):
    """The old failure: the spool replayed as one transaction, so one bad row failed every
    replay and every later batch queued behind it."""
    ready = []

    def open_store():
        if not ready:
            raise ConnectionError("store still down")
        return Store(db_url)

    writer = TraceWriter(None, tmp_path / "spool", store_factory=open_store, retry_s=0.05)
    poison = [TraceRecord(request={"messages": []}, output_text="big", prompt_tokens=2**64 - 1, source="sdk"),
              TraceRecord(request={"messages": [{"role": "user", "content": "a\x00b"}]}, output_text="nul",
                          source="sdk"),
              TraceRecord(request={}, output_text="task", task="x" * 500, source="sdk")]
    for i in range(3):
        writer.submit(TraceRecord(request={}, output_text=f"ok {i}", source="sdk"))
    for record in poison:
        writer.submit(record)
    assert wait_for(lambda: writer.spooled == 6)
    ready.append(True)
    assert wait_for(lambda: not writer.stats()["spool_pending"] and writer.written == 6, timeout=15)
    writer.submit(TraceRecord(request={}, output_text="later", source="sdk"))
    assert writer.flush(10)
    writer.close()
    writer.store.close()
    s = Store(db_url)
    outputs = sorted(t["output_text"] for t in s.iter_traces())
    s.close()
    assert outputs == sorted(["ok 0", "ok 1", "ok 2", "big", "nul", "task", "later"])
    assert writer.replayed == 6 and writer.quarantined == 0


def test_a_row_refused_even_cleaned_is_quarantined_then_imported_back(sqlite_store, tmp_path, capsys, home):
    with sqlite_store.engine.begin() as conn:  # a real refusal that no cleaning can fix
        conn.exec_driver_sql("CREATE TRIGGER refuse BEFORE INSERT ON traces WHEN NEW.task = 'evil' "
                             "BEGIN SELECT RAISE(ABORT, 'refused by policy'); END")
    writer = TraceWriter(sqlite_store, tmp_path / "spool")
    for task in ("good", "evil", "good"):
        writer.submit(TraceRecord(request={"messages": [{"role": "user", "content": task}]}, output_text=task,
                                  task=task, source="sdk"))
    assert writer.flush(10)
    stats = writer.stats()
    writer.close()
    assert sqlite_store.count() == 2 and stats["quarantined"] == 1 and stats["dropped"] == 0
    [line] = writer.quarantine_path.read_bytes().splitlines()
    quarantined = orjson.loads(line)
    assert quarantined["task"] == "evil" and "refused by policy" in quarantined["metadata"]["protege_quarantine"]["error"]

    with sqlite_store.engine.begin() as conn:
        conn.exec_driver_sql("DROP TRIGGER refuse")
    code, out, err = run(capsys, "--db", sqlite_store.url, "traces", "import", str(writer.quarantine_path),
                         "--format", "traces")
    assert code == 0, err
    assert "1 added" in out
    assert sqlite_store.get_trace(quarantined["id"])["task"] == "evil"


def test_unwritable_spool_holds_traces_in_memory_counts_drops_and_recovers(tmp_path, caplog):
    blocker = tmp_path / "state"
    blocker.write_text("a file where the store's folder should be: the store is down")
    url = f"sqlite:///{blocker / 'store.db'}"
    spool = tmp_path / "spool"
    spool.mkdir()
    (spool / "traces.jsonl").symlink_to("/dev/full")  # every write: ENOSPC, a full disk

    writer = TraceWriter(None, spool, store_factory=lambda: Store(url), retry_s=0.05, max_held=5)
    with caplog.at_level(logging.ERROR, logger="protege.writer"):
        for i in range(8):
            writer.submit(TraceRecord(request={}, output_text=str(i), source="sdk"))
        assert wait_for(lambda: writer.stats()["held"] == 5 and writer.stats()["dropped"] == 3)
        assert wait_for(lambda: any("3 traces dropped" in r.getMessage() for r in caplog.records))
    assert writer.state == "holding" and writer._thread.is_alive()
    metrics = "\n".join(writer.metrics("protege_test"))
    assert 'protege_test_traces_dropped_total{reason="memory full"} 3' in metrics
    assert "protege_test_traces_held 5" in metrics
    assert 'protege_test_trace_writer_state{state="holding"} 1' in metrics

    (spool / "traces.jsonl").unlink()  # the disk has room again: the held traces go to the spool
    assert wait_for(lambda: writer.spooled == 5 and writer.stats()["held"] == 0)
    assert writer.state == "store_down"
    blocker.unlink()  # and the store comes back
    assert wait_for(lambda: writer.written == 5 and not writer.stats()["spool_pending"], timeout=10)
    writer.close()
    s = Store(url)
    assert sorted(t["output_text"] for t in s.iter_traces()) == ["0", "1", "2", "3", "4"]
    s.close()
    writer.store.close()


def test_credentials_in_the_upstream_url_are_used_and_never_shown(upstream, make_proxy, store, db_url):
    secret_url = upstream.url.replace("http://", "http://gateway:PA55w0rdX@") + "?key=QUERYSECRETX&api-version=2024"
    server, app = make_proxy(secret_url, db_url)
    assert "PA55w0rdX" not in app.upstream and "QUERYSECRETX" not in app.upstream
    r = httpx.post(f"{server.url}/v1/chat/completions?trace=1", json=CHAT)
    assert r.status_code == 200
    sent = upstream.requests[-1]
    assert sent["path"] == "/v1/chat/completions" and sent["query"] == "key=QUERYSECRETX&api-version=2024&trace=1"
    assert sent["headers"]["authorization"].startswith("Basic ")  # user:password as Basic auth
    r = httpx.post(f"{server.url}/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer sk-client"})
    assert upstream.requests[-1]["headers"]["authorization"] == "Bearer sk-client"  # the client's own key wins

    dead = f"http://gateway:PA55w0rdX@127.0.0.1:{free_port()}/v1?key=QUERYSECRETX"
    server2, app2 = make_proxy(dead, db_url)
    r = httpx.post(f"{server2.url}/v1/chat/completions", json=CHAT)
    assert r.status_code == 502
    assert "PA55w0rdX" not in r.text and "QUERYSECRETX" not in r.text and "***" in r.text
    [trace] = stored(app2, store, 1, status="error")
    assert "PA55w0rdX" not in trace["error"] and "QUERYSECRETX" not in trace["error"]


def test_a_200_that_is_not_json_is_an_error_trace(upstream, make_proxy, store, db_url):
    server, app = make_proxy(upstream.url, db_url)
    upstream.push(("raw", 200, b"text/html", b"<html>a captive portal</html>"))
    r = httpx.post(f"{server.url}/v1/chat/completions", json=CHAT)
    assert r.status_code == 200 and r.text == "<html>a captive portal</html>"  # passed through untouched
    [trace] = stored(app, store, 1)
    assert trace["status"] == "error" and trace["http_status"] == 200
    assert "not JSON" in trace["error"] and "captive portal" in trace["response"]["_unparsed"]


def test_client_that_hangs_up_mid_stream_is_recorded_as_the_sdk_records_it(upstream, make_proxy, store, db_url):
    upstream.chunk_delay_s = 0.3
    server, app = make_proxy(upstream.url, db_url)

    async def read_one_chunk_and_leave():
        async with aiohttp.ClientSession() as s:
            async with s.post(f"{server.url}/v1/chat/completions", json={**CHAT, "stream": True}) as resp:
                return await resp.content.readany()

    first = asyncio.run(read_one_chunk_and_leave())
    assert first.startswith(b"data: ")
    [trace] = stored(app, store, 1)
    assert trace["status"] == "error" and trace["error"] == "client closed the stream before its end"
    assert trace["metadata"]["client_disconnected"] is True
    assert trace["output_text"] != "echo: where is my card"  # what was sent before the client left
    assert "protege_proxy_client_disconnects_total 1" in httpx.get(f"{server.url}/metrics").text


def test_proxy_metrics_expose_the_writer(upstream, make_proxy, store, db_url):
    server, app = make_proxy(upstream.url, db_url)
    httpx.post(f"{server.url}/v1/chat/completions", json=CHAT)
    stored(app, store, 1)
    text = httpx.get(f"{server.url}/metrics").text
    for line in ("protege_proxy_traces_written_total 1", 'protege_proxy_trace_writer_state{state="ok"} 1',
                 "protege_proxy_traces_quarantined_total 0", 'protege_proxy_traces_dropped_total{reason="queue full"} 0',
                 "protege_proxy_traces_queued 0", 'protege_proxy_requests_total{kind="logged"} 1'):
        assert line in text
    assert upstream.count == 1  # /metrics is the proxy's own, not forwarded


@pytest.mark.parametrize("verb", [["proxy", "--upstream", "http://127.0.0.1:9"], ["serve", "run:x"]])
def test_port_out_of_range_is_refused_before_anything_starts(capsys, verb):
    code, out, err = run(capsys, *verb, "--port", "70000")
    assert code == 2 and "Invalid value for '--port'" in err and "65535" in err and "protege proxy on" not in err


# -- a real proxy process, killed ---------------------------------------------------------

def start_proxy(home, db, upstream_url: str, port: int, log) -> subprocess.Popen:
    with open(log, "ab") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "protege", "--home", str(home), "--db", db, "proxy",
                                 "--upstream", upstream_url, "--port", str(port)],
                                stderr=stderr, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=1)
            return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"proxy did not start: {open(log).read()}")


async def load(url: str, seconds: float, concurrency: int, tag: str) -> list[str]:
    """Closed-loop clients until `seconds` pass or the proxy dies; the contents acknowledged."""
    acked: list[str] = []
    deadline = time.monotonic() + seconds

    async def client(k: int, session):
        i = 0
        while time.monotonic() < deadline:
            text = f"{tag} {k}-{i}"
            i += 1
            try:
                async with session.post(f"{url}/v1/chat/completions", json=chat(text)) as r:
                    if r.status == 200 and (await r.json())["choices"][0]["message"]["content"] == f"echo: {text}":
                        acked.append(text)
            except (aiohttp.ClientError, asyncio.TimeoutError):
                return

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        await asyncio.gather(*(client(k, session) for k in range(concurrency)))
    return acked


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_killed_proxy_loses_no_acknowledged_trace(upstream, tmp_path, sig):
    upstream.delay_s = 0.005
    upstream.record_requests = False
    home, db = tmp_path / "home", f"sqlite:///{tmp_path / 'kill.db'}"
    port = free_port()
    secret = upstream.url.replace("http://", "http://u:BANNERSECRET@")
    log = tmp_path / "proxy.log"
    proc = start_proxy(home, db, secret, port, log)

    async def kill_under_load():
        task = asyncio.ensure_future(load(f"http://127.0.0.1:{port}", 30, 50, "kill"))
        await asyncio.sleep(1.5)
        proc.send_signal(sig)
        return await task

    acked = asyncio.run(kill_under_load())
    proc.wait(30)
    banner = log.read_text()
    assert "BANNERSECRET" not in banner and "u:***@" in banner
    assert len(acked) > 50
    restarted = start_proxy(home, db, upstream.url, port, tmp_path / "restarted.log")  # recovers the dead proxy's journal
    restarted.send_signal(signal.SIGTERM)
    assert restarted.wait(30) == 0, (tmp_path / "restarted.log").read_text()
    s = Store(db)
    outputs = {t["output_text"] for t in s.iter_traces()}
    s.close()
    lost = [a for a in acked if f"echo: {a}" not in outputs]
    assert lost == []
    assert not list((home / "spool" / "journal").iterdir())  # every journal released or recovered


def test_a_dead_writers_journal_is_recovered_once_and_a_torn_tail_skipped(sqlite_store, tmp_path, caplog):
    from protege.capture import journal as wal

    spool = tmp_path / "spool"
    dead = wal.Journal(spool / "journal")
    records = [TraceRecord(request={"messages": [{"role": "user", "content": str(i)}]}, output_text=str(i),
                           source="sdk") for i in range(3)]
    for r in records:
        dead.append(wal.encode(r))
    os.write(dead.fd, b"\x40\x00\x00\x00torn")  # the kill cut this write short
    sqlite_store.insert_traces(records[:1])  # the dead writer had stored the first one
    dead._lock_fh.close()  # its process is gone: the kernel dropped the lock

    with caplog.at_level(logging.WARNING, logger="protege.writer"):
        writer = TraceWriter(sqlite_store, spool)
        assert wait_for(lambda: writer.recovered == 2)
        writer.close()
    assert sorted(t["output_text"] for t in sqlite_store.iter_traces()) == ["0", "1", "2"]
    assert any("torn or corrupt" in r.getMessage() for r in caplog.records)
    assert not dead.dir.exists() and not list((spool / "journal").iterdir())

    live = wal.Journal(spool / "journal")  # a living writer's journal is never taken
    live.append(wal.encode(TraceRecord(request={}, output_text="live", source="sdk")))
    other = TraceWriter(sqlite_store, spool)
    other.close()
    assert live.dir.exists() and sqlite_store.count() == 3
    live.release([1])
    live.close()
    assert not live.dir.exists()
