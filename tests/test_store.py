"""The store itself: migrations, ids, reads; price look-ups; stream assembly."""

from __future__ import annotations

import os

import pytest
import sqlalchemy as sa

from protege.config import Settings, normalize_db_url, redact_url
from protege.errors import ConfigError, NotFoundError, StoreError
from protege.ids import uuid7
from protege.prices import load_prices
from protege.traces.normalize import assemble_sse, usage
from protege.traces.record import TraceRecord
from protege.traces.store import HEAD_REVISION, Store


def test_migrations_applied_once_and_tables_exist(db_url):
    s = Store(db_url)
    assert s.current_revision() == HEAD_REVISION
    with s.engine.connect() as conn:
        names = set(sa.inspect(conn).get_table_names())
    assert {"traces", "datasets", "runs", "alembic_version"} <= names
    s.insert_traces([TraceRecord(request={"messages": []}, output_text="kept")])
    s.close()
    again = Store(db_url)  # reopening an up-to-date store changes nothing
    assert again.count() == 1 and again.current_revision() == HEAD_REVISION
    again.close()


def test_sqlite_uses_wal(tmp_path):
    s = Store(f"sqlite:///{tmp_path / 'w.db'}")
    with s.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    s.close()


def test_insert_is_idempotent_by_id_and_reads(store):
    records = [TraceRecord(request={"messages": [{"role": "user", "content": str(i)}]}, output_text=str(i),
                           task="a" if i % 2 else "b", status="ok" if i < 8 else "error") for i in range(10)]
    store.insert_traces(records)
    store.insert_traces(records[:5])
    assert store.count() == 10
    assert store.count(task="a") == 5 and store.count(status="error") == 2
    assert [r["output_text"] for r in store.list_traces(limit=3)] == ["9", "8", "7"]
    assert [r["output_text"] for r in store.iter_traces(batch=3, task="b")] == ["0", "2", "4", "6", "8"]
    assert store.get_trace(records[3].id)["output_text"] == "3"
    with pytest.raises(NotFoundError):
        store.get_trace("nope-nope")


def test_unreachable_postgres_is_a_clear_error():
    with pytest.raises(StoreError, match=r"cannot open the trace store at postgresql\+psycopg://u:\*\*\*@127.0.0.1:1/x"):
        Store("postgresql://u:secret@127.0.0.1:1/x")


def test_urls_and_settings(tmp_path, monkeypatch):
    assert normalize_db_url("postgres://u@h/d") == "postgresql+psycopg://u@h/d"
    assert normalize_db_url("postgresql://u@h/d") == "postgresql+psycopg://u@h/d"
    assert redact_url("postgresql://u:pw@h/d") == "postgresql://u:***@h/d"
    with pytest.raises(ConfigError, match="not supported"):
        normalize_db_url("mysql://x")
    monkeypatch.setenv("PROTEGE_HOME", str(tmp_path / "h"))
    s = Settings.resolve()
    assert s.database_url == f"sqlite:///{(tmp_path / 'h' / 'protege.db').resolve()}"
    assert Settings.resolve(db="postgresql://a@b/c").database_url == "postgresql+psycopg://a@b/c"
    (tmp_path / "h").mkdir()
    (tmp_path / "h" / "prices.csv").write_text("x")
    assert Settings.resolve().prices_path == tmp_path / "h" / "prices.csv"


def test_uuid7_sorts_in_creation_order():
    ids = [uuid7() for _ in range(20000)]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert all(i[14] == "7" for i in ids[:10])


def test_price_lookup():
    prices = load_prices()
    assert prices.lookup("gpt-4o-mini-2024-07-18").model == "gpt-4o-mini"
    assert prices.lookup("openai/gpt-4o").model == "gpt-4o"
    assert prices.lookup("gpt-5-pro") is None  # not silently priced as gpt-5
    assert prices.lookup("llama-3-8b") is None
    assert prices.cost("gpt-4o", 1000, 100, cached_tokens=400) == pytest.approx((600 * 2.5 + 400 * 1.25 + 100 * 10) / 1e6)
    assert prices.cost("gpt-4o", None, 3) is None


def test_assemble_sse_and_usage():
    body = (b'data: {"id":"c1","model":"m","choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n'
            b'data: {"id":"c1","choices":[{"index":0,"delta":{"content":"Hel"}}]}\n\n'
            b'data: {"id":"c1","choices":[{"index":0,"delta":{"content":"lo"},"finish_reason":"stop"}]}\n\n'
            b'data: {"id":"c1","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,'
            b'"prompt_tokens_details":{"cached_tokens":1}}}\n\ndata: [DONE]\n\n')
    response, problem = assemble_sse(body, "chat/completions")
    assert problem is None
    assert response["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "Hello"},
                                    "finish_reason": "stop"}]
    assert usage(response) == (3, 2, 1)
    _, problem = assemble_sse(body.replace(b"data: [DONE]\n\n", b""), "chat/completions")
    assert problem == "stream ended before data: [DONE]"
    _, problem = assemble_sse(b'data: {"error":{"message":"overloaded"}}\n\n', "chat/completions")
    assert "overloaded" in problem


def test_id_prefixes_match_literally(store):
    """`_` and `%` are LIKE wildcards: a prefix holding them is refused, never matched loosely."""
    records = [TraceRecord(request={"messages": []}, output_text=str(i)) for i in range(3)]
    store.insert_traces(records)
    target = records[1]
    assert store.get_trace(target.id[:-4])["output_text"] == "1"
    assert store.get_trace(target.id.upper())["output_text"] == "1"  # ids are lowercase; case is forgiven
    for bad in ("____", "%", target.id[:8] + "%", target.id[:8] + "_", "0'; --", "run:01"):
        with pytest.raises(NotFoundError, match=r"is not a trace id or id prefix: ids hold only hex digits and '-'"):
            store.get_trace(bad)
    with pytest.raises(NotFoundError, match="give a trace id"):
        store.get_trace("")
    with pytest.raises(NotFoundError, match="is ambiguous"):
        store.get_trace(os.path.commonprefix([r.id for r in records]))
    with pytest.raises(NotFoundError, match="no trace with id 'ffff'"):
        store.get_trace("ffff")


def test_run_prefixes_match_literally(store):
    from datetime import datetime, timezone

    from protege.runs.registry import get_run
    from protege.traces import schema

    ids = [uuid7(), uuid7()]
    with store.engine.begin() as conn:
        for run_id, kind in zip(ids, ("train", "bench")):
            conn.execute(schema.runs.insert().values(id=run_id, kind=kind, status="done", config={},
                                                     created_at=datetime.now(timezone.utc)))
    assert get_run(store, ids[0][:6])["id"] == ids[0]  # the bench run does not count for kind=train
    assert get_run(store, ids[1], kind=None)["kind"] == "bench"
    for bad in ("%", "_", "", ids[0][:6] + "%"):
        with pytest.raises(NotFoundError, match="run id"):
            get_run(store, bad)
    with pytest.raises(NotFoundError, match="is ambiguous"):
        get_run(store, os.path.commonprefix(ids), kind=None)


def test_largest_cli_limit_and_offset_reach_the_store(store):
    from protege.cli.common import MAX_ROWS

    store.insert_traces([TraceRecord(request={"messages": []})])
    assert store.list_traces(limit=MAX_ROWS, offset=MAX_ROWS) == []
    assert len(store.list_traces(limit=MAX_ROWS)) == 1
