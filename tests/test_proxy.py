"""The logging proxy, end to end: a real client, a real proxy server, a real upstream."""

from __future__ import annotations

import asyncio

import aiohttp
import httpx
import orjson
import pytest
from helpers import CHAT, free_port, stored, wait_for


def test_non_streaming_passthrough_is_byte_for_byte(upstream, make_proxy, store, db_url):
    server, app = make_proxy(upstream.url, db_url)
    r = httpx.post(f"{server.url}/v1/chat/completions", json=CHAT,
                   headers={"X-Protege-Task": "intent", "Authorization": "Bearer sk-test-SECRET-123"})
    assert r.status_code == 200
    assert r.content == upstream.bodies[-1]
    assert r.headers["content-type"] == "application/json"
    # the upstream got the caller's key, and not protege's own header
    sent_headers = upstream.requests[-1]["headers"]
    assert sent_headers["authorization"] == "Bearer sk-test-SECRET-123"
    assert "x-protege-task" not in sent_headers
    assert upstream.requests[-1]["body"] == orjson.dumps(CHAT)

    [trace] = stored(app, store, 1)
    assert trace["source"] == "proxy" and trace["status"] == "ok" and trace["http_status"] == 200
    assert trace["task"] == "intent"
    assert trace["endpoint"] == "chat/completions"
    assert trace["request"] == CHAT
    assert trace["response"] == orjson.loads(r.content)
    assert trace["output_text"] == "echo: where is my card"
    assert trace["model"] == "gpt-4o-mini-2024-07-18"
    assert trace["provider"] == "openai"
    assert (trace["prompt_tokens"], trace["completion_tokens"]) == (4, 5)
    # gpt-4o-mini: $0.15 in / $0.60 out per 1M tokens (shipped price table)
    assert trace["cost_usd"] == pytest.approx((4 * 0.15 + 5 * 0.60) / 1e6)
    assert trace["latency_ms"] > 0 and trace["ttft_ms"] is None
    assert trace["stream"] is False


def test_streaming_passthrough_chunk_by_chunk(upstream, make_proxy, store, db_url):
    upstream.delay_s = 0.0
    upstream.chunk_delay_s = 0.05
    server, app = make_proxy(upstream.url, db_url)
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True},
            "metadata": {"protege_task": "intent-stream"}}

    async def run():
        chunks = []
        async with aiohttp.ClientSession() as s:
            async with s.post(f"{server.url}/v1/chat/completions", json=body) as resp:
                assert resp.status == 200
                assert resp.content_type == "text/event-stream"
                async for chunk in resp.content.iter_any():
                    chunks.append(chunk)
        return chunks

    chunks = asyncio.run(run())
    assert b"".join(chunks) == upstream.bodies[-1]
    assert len(chunks) > 1  # it arrived in pieces, not buffered into one
    [trace] = stored(app, store, 1)
    assert trace["stream"] is True and trace["status"] == "ok"
    assert trace["task"] == "intent-stream"
    assert trace["output_text"] == "echo: where is my card"
    assert trace["response"]["choices"][0]["message"] == {"role": "assistant", "content": "echo: where is my card"}
    assert trace["completion_tokens"] == 5
    assert 0 < trace["ttft_ms"] <= trace["latency_ms"]


def test_completions_embeddings_models_and_other_paths(upstream, make_proxy, store, db_url):
    server, app = make_proxy(upstream.url, db_url)
    with httpx.Client(base_url=server.url) as c:
        assert c.post("/v1/completions", json={"model": "gpt-4o-mini", "prompt": "say hi"}).status_code == 200
        assert c.post("/v1/embeddings", json={"model": "text-embedding-3-small", "input": ["a b", "c"]}).status_code == 200
        assert c.get("/v1/models").json()["data"][0]["id"] == "gpt-4o-mini-2024-07-18"
        other = c.get("/v1/files?purpose=batch")
        assert other.status_code == 404 and upstream.requests[-1]["path"] == "/v1/files"
    traces = stored(app, store, 3)
    assert sorted(t["endpoint"] for t in traces) == ["completions", "embeddings", "models"]
    completion = next(t for t in traces if t["endpoint"] == "completions")
    assert completion["output_text"] == "echo: say hi"
    embedding = next(t for t in traces if t["endpoint"] == "embeddings")
    assert embedding["prompt_tokens"] == 3 and embedding["output_text"] is None


def test_thousand_concurrent_requests_give_thousand_traces(upstream, make_proxy, store, db_url):
    upstream.delay_s = 0.02
    upstream.record_requests = False
    server, app = make_proxy(upstream.url, db_url)

    async def run():
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as s:
            async def one(i):
                body = {**CHAT, "messages": [{"role": "user", "content": f"request {i}"}]}
                async with s.post(f"{server.url}/v1/chat/completions", json=body) as r:
                    return r.status, await r.json()
            return await asyncio.gather(*(one(i) for i in range(1000)))

    results = asyncio.run(run())
    assert all(status == 200 for status, _ in results)
    assert wait_for(lambda: app.writer.submitted >= 1000)
    assert app.writer.flush(30)
    assert store.count(source="proxy") == 1000
    outputs = {t["output_text"] for t in store.iter_traces(source="proxy")}
    assert outputs == {f"echo: request {i}" for i in range(1000)}


@pytest.mark.parametrize("status", [400, 429, 500, 503])
def test_upstream_http_errors_reach_client_and_are_stored(upstream, make_proxy, store, db_url, status):
    server, app = make_proxy(upstream.url, db_url)
    error = {"error": {"message": f"scripted {status}", "type": "test"}}
    upstream.push(("status", status, error))
    r = httpx.post(f"{server.url}/v1/chat/completions", json=CHAT)
    assert r.status_code == status
    assert r.content == orjson.dumps(error)
    [trace] = stored(app, store, 1)
    assert trace["status"] == "error" and trace["http_status"] == status
    assert f"scripted {status}" in trace["error"]
    assert trace["response"] == error


def test_upstream_timeout_gives_504_and_error_trace(upstream, make_proxy, store, db_url):
    server, app = make_proxy(upstream.url, db_url, timeout_s=0.3)
    upstream.push(("stall", 2.0))
    r = httpx.post(f"{server.url}/v1/chat/completions", json=CHAT, timeout=10)
    assert r.status_code == 504
    assert r.json()["error"]["type"] == "upstream_timeout"
    [trace] = stored(app, store, 1)
    assert trace["status"] == "error" and trace["http_status"] == 504
    assert "sent nothing for 0.3 s" in trace["error"]
    assert trace["latency_ms"] >= 300


def test_connection_reset_gives_502_and_error_trace(upstream, make_proxy, store, db_url):
    server, app = make_proxy(upstream.url, db_url)
    upstream.push(("reset",))
    r = httpx.post(f"{server.url}/v1/chat/completions", json=CHAT)
    assert r.status_code == 502
    assert r.json()["error"]["type"] == "upstream_connection_error"
    [trace] = stored(app, store, 1)
    assert trace["status"] == "error" and trace["http_status"] == 502


def test_unreachable_upstream_gives_502(make_proxy, store, db_url):

    server, app = make_proxy(f"http://127.0.0.1:{free_port()}/v1", db_url)
    r = httpx.post(f"{server.url}/v1/chat/completions", json=CHAT)
    assert r.status_code == 502
    [trace] = stored(app, store, 1)
    assert trace["status"] == "error" and "failed" in trace["error"]


def test_stream_cut_midway_is_cut_for_client_and_stored_as_error(upstream, make_proxy, store, db_url):
    upstream.delay_s = 0.0
    server, app = make_proxy(upstream.url, db_url)
    upstream.push(("cut", 3))  # role chunk + two words, then the connection drops

    async def run():
        received = []
        async with aiohttp.ClientSession() as s:
            async with s.post(f"{server.url}/v1/chat/completions", json={**CHAT, "stream": True}) as resp:
                assert resp.status == 200
                with pytest.raises(aiohttp.ClientPayloadError):
                    async for chunk in resp.content.iter_any():
                        received.append(chunk)
        return b"".join(received)

    received = asyncio.run(run())
    assert received == upstream.bodies[-1]  # everything the upstream sent, and no clean end
    assert b"[DONE]" not in received
    [trace] = stored(app, store, 1)
    assert trace["status"] == "error" and trace["http_status"] == 200
    assert trace["error"].startswith("stream cut mid-way")
    assert trace["output_text"] == "echo: where"


def test_no_api_key_is_ever_stored(upstream, make_proxy, tmp_path):
    db = tmp_path / "keys.db"
    server, app = make_proxy(upstream.url, f"sqlite:///{db}")
    secret = "sk-proj-NEVERSTORE0123456789"
    for body in (CHAT, {**CHAT, "stream": True}):
        httpx.post(f"{server.url}/v1/chat/completions", json=body,
                   headers={"Authorization": f"Bearer {secret}", "api-key": secret, "X-Protege-Task": "k"})
    upstream.push(("status", 401, {"error": {"message": "bad key"}}))
    httpx.post(f"{server.url}/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {secret}"})
    # the proxy hands a capture over after the response's last byte: wait for all three
    assert wait_for(lambda: app.writer.submitted >= 3)
    assert app.writer.flush(10)
    assert app.writer.store.count() == 3
    app.writer.store.close()
    blob = b"".join(p.read_bytes() for p in tmp_path.glob("keys.db*"))
    assert b"NEVERSTORE" not in blob
    assert len(blob) > 0
