"""protege.wrap() on the official openai client: sync, async, streams, errors."""

from __future__ import annotations

import asyncio

import openai
import pytest

import protege
from protege.capture.sdk import flush
from protege.traces.store import Store

MESSAGES = [{"role": "user", "content": "reset my pin"}]


@pytest.fixture
def sdk_store(db_url, monkeypatch):
    monkeypatch.setenv("PROTEGE_DATABASE_URL", db_url)
    s = Store(db_url)
    yield s
    s.close()


def client_for(upstream, cls=openai.OpenAI):
    return cls(api_key="sk-test-WRAPSECRET", base_url=upstream.url, max_retries=0)


def test_sync_plain_call_is_unchanged_and_recorded(upstream, sdk_store):
    raw = client_for(upstream).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    client = protege.wrap(client_for(upstream), task="pin", metadata={"app": "support"})
    resp = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, temperature=0)
    assert type(resp) is type(raw)
    assert resp.choices[0].message.content == "echo: reset my pin"
    assert flush(client)
    [t] = sdk_store.list_traces()
    assert t["source"] == "sdk" and t["task"] == "pin" and t["status"] == "ok"
    assert t["request"] == {"model": "gpt-4o-mini", "messages": MESSAGES, "temperature": 0}
    assert t["output_text"] == "echo: reset my pin"
    assert t["metadata"] == {"app": "support"}
    assert t["prompt_tokens"] == 3 and t["cost_usd"] is not None and t["latency_ms"] > 0


def test_sync_stream_is_handed_through_and_recorded(upstream, sdk_store):
    client = protege.wrap(client_for(upstream), task="pin")
    stream = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True,
                                            stream_options={"include_usage": True})
    pieces = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == "echo: reset my pin"
    assert flush(client)
    [t] = sdk_store.list_traces()
    assert t["stream"] is True and t["output_text"] == "echo: reset my pin"
    assert t["completion_tokens"] == 4 and 0 < t["ttft_ms"] <= t["latency_ms"]


def test_stream_closed_early_is_recorded_as_partial(upstream, sdk_store):
    client = protege.wrap(client_for(upstream))
    with client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True) as stream:
        next(iter(stream))
    assert flush(client)
    [t] = sdk_store.list_traces()
    # the same meaning as the proxy's (test_capture_faults): an error, the partial output, the flag
    assert t["status"] == "error" and t["error"] == "client closed the stream before its end"
    assert t["metadata"]["client_disconnected"] is True
    assert t["output_text"] == ""  # the role chunk was all the caller read


def test_async_plain_and_stream(upstream, sdk_store):
    client = protege.wrap(client_for(upstream, openai.AsyncOpenAI), task="async")

    async def run():
        resp = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES,
                                                    metadata={"protege_task": "override"})
        stream = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
        pieces = [c.choices[0].delta.content async for c in stream if c.choices and c.choices[0].delta.content]
        await client.close()
        return resp, "".join(pieces)

    resp, streamed = asyncio.run(run())
    assert resp.choices[0].message.content == streamed == "echo: reset my pin"
    assert flush(client)
    traces = sdk_store.list_traces(newest_first=False)
    assert [(t["task"], t["stream"], t["output_text"]) for t in traces] == [
        ("override", False, "echo: reset my pin"), ("async", True, "echo: reset my pin")]


def test_api_error_is_recorded_and_reraised_unchanged(upstream, sdk_store):
    client = protege.wrap(client_for(upstream), task="pin")
    upstream.push(("status", 429, {"error": {"message": "slow down", "type": "rate_limit"}}))
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert info.value.status_code == 429
    assert flush(client)
    [t] = sdk_store.list_traces()
    assert t["status"] == "error" and t["http_status"] == 429 and "slow down" in t["error"]


def test_completions_and_embeddings_and_no_key_stored(upstream, sdk_store):
    client = protege.wrap(client_for(upstream), task="misc")
    client.completions.create(model="gpt-4o-mini", prompt="hello")
    client.embeddings.create(model="text-embedding-3-small", input="hello world")
    assert flush(client)
    traces = sdk_store.list_traces(newest_first=False)
    assert [t["endpoint"] for t in traces] == ["completions", "embeddings"]
    assert "WRAPSECRET" not in repr(traces)
    # wrapping twice does not record twice
    protege.wrap(client)
    client.completions.create(model="gpt-4o-mini", prompt="again")
    assert flush(client)
    assert sdk_store.count() == 3
