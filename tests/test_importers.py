"""Importers: every format, idempotent re-import, and every bad-input path (file:line
message, store unchanged)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from protege.errors import InputError, ProtegeError
from protege.prices import load_prices
from protege.traces.importers import ImportOptions, import_file
from protege.traces.store import Store

EXAMPLES = Path(__file__).parents[1] / "examples" / "banking77"


def jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def chat(user, reply, **extra):
    return {"messages": [{"role": "system", "content": "classify"}, {"role": "user", "content": user},
                         {"role": "assistant", "content": reply}], **extra}


def test_openai_jsonl_chat_and_request_response(store, tmp_path):
    f = jsonl(tmp_path / "t.jsonl", [
        chat("hi", "greeting", model="gpt-4o-mini", created_at="2026-01-02T03:04:05Z", latency_ms=812.5,
             usage={"prompt_tokens": 10, "completion_tokens": 2}, metadata={"user": "u1"}),
        {"request": {"model": "gpt-4o", "messages": [{"role": "user", "content": "bye"}], "temperature": 0},
         "response": {"model": "gpt-4o-2024-08-06", "choices": [{"message": {"role": "assistant", "content": "farewell"}}],
                      "usage": {"prompt_tokens": 5, "completion_tokens": 1}}, "task": "line-task"},
        "",
    ])
    result = import_file(store, f, ImportOptions(task=None), prices=load_prices())
    assert (result.read, result.added, result.already_present) == (2, 2, 0)
    first, second = store.list_traces(newest_first=False)
    assert first["output_text"] == "greeting" and first["source"] == "import"
    assert first["request"] == {"model": "gpt-4o-mini", "messages": [{"role": "system", "content": "classify"},
                                                                      {"role": "user", "content": "hi"}]}
    assert first["latency_ms"] == 812.5 and first["metadata"] == {"user": "u1"}
    assert str(first["created_at"]).startswith("2026-01-02 03:04:05")
    assert first["cost_usd"] == pytest.approx((10 * 0.15 + 2 * 0.60) / 1e6)
    assert second["task"] == "line-task" and second["model"] == "gpt-4o-2024-08-06"
    assert second["request"]["temperature"] == 0
    assert second["cost_usd"] == pytest.approx((5 * 2.5 + 1 * 10.0) / 1e6)
    assert second["latency_ms"] is None  # imported without a measurement: unknown, not zero


def test_reimport_adds_nothing_and_duplicate_lines_are_kept(store, tmp_path):
    rows = [chat("same", "x"), chat("same", "x"), chat("other", "y")]
    f = jsonl(tmp_path / "t.jsonl", rows)
    assert import_file(store, f, ImportOptions(task="t")).added == 3
    again = import_file(store, f, ImportOptions(task="t"))
    assert (again.read, again.added, again.already_present) == (3, 0, 3)
    assert store.count() == 3
    # one more line appended: only that line is new
    jsonl(f, rows + [chat("new", "z")])
    assert import_file(store, f, ImportOptions(task="t")).added == 1
    assert store.count() == 4


def test_demo_files_import_with_the_review_attached(store, tmp_path):
    """The demo's logged GPT-4 calls carry GPT-4's own reply as the output and the human review
    as feedback; the tickets carry the agent's label. Both survive a round trip through the
    `traces` format (what the quarantine and `--format traces` read)."""
    calls = import_file(store, EXAMPLES / "gpt4_calls.jsonl.gz", ImportOptions(task="banking77"))
    tickets = import_file(store, EXAMPLES / "tickets.jsonl.gz", ImportOptions(task="banking77"))
    assert (calls.added, tickets.added) == (3080, 10003)
    labels = set(json.loads((EXAMPLES / "categories.json").read_text()))
    assert len(labels) == 77
    rows = store.list_traces(limit=20_000, model="gpt-4")
    assert len(rows) == 3080 and all(r["request"]["messages"][0]["role"] == "system" for r in rows)
    assert all(r["output_text"] in labels and r["feedback"]["correction"] in labels for r in rows)
    assert sum(r["output_text"] == r["feedback"]["correction"] for r in rows) == 2558  # GPT-4 as it answered
    assert all(r["feedback"] is None and r["output_text"] in labels
               for r in store.list_traces(limit=20_000) if r["model"] is None)

    dump = tmp_path / "traces.jsonl"
    from protege.traces.record import TraceRecord

    with gzip.open(EXAMPLES / "gpt4_calls.jsonl.gz", "rt") as fh:
        n = sum(1 for _ in fh)
    dump.write_bytes(b"".join(json.dumps(TraceRecord(**r).to_json(),
                                         default=str).encode() + b"\n" for r in rows))
    other = Store(f"sqlite:///{tmp_path / 'other.db'}")
    assert import_file(other, dump, ImportOptions(format="traces")).added == n
    back = {r["id"]: r for r in other.list_traces(limit=20_000)}
    assert all(back[r["id"]]["feedback"] == r["feedback"] and back[r["id"]]["output_text"] == r["output_text"]
               for r in rows)


def test_batch_format_joined_with_input(store, tmp_path):
    inp = jsonl(tmp_path / "in.jsonl", [
        {"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "one"}]}},
        {"custom_id": "r2", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "two"}]}},
    ])
    out = jsonl(tmp_path / "out.jsonl", [
        {"id": "b1", "custom_id": "r2", "error": None, "response": {"status_code": 200, "body": {
            "model": "gpt-4o-mini", "created": 1760000000,
            "choices": [{"message": {"role": "assistant", "content": "TWO"}}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1}}}},
        {"id": "b2", "custom_id": "r1", "error": None, "response": {"status_code": 500, "body": {
            "error": {"message": "server error"}}}},
    ])
    result = import_file(store, out, ImportOptions(format="openai-batch", task="b", batch_input=str(inp)),
                         prices=load_prices())
    assert result.added == 2
    by_id = {t["metadata"]["batch_custom_id"]: t for t in store.iter_traces()}
    assert by_id["r2"]["output_text"] == "TWO" and by_id["r2"]["status"] == "ok"
    assert by_id["r2"]["request"]["messages"][0]["content"] == "two"
    assert by_id["r2"]["cost_usd"] is not None
    assert by_id["r1"]["status"] == "error" and by_id["r1"]["http_status"] == 500
    assert "server error" in by_id["r1"]["error"]


def test_csv_with_system_prompt(store, tmp_path):
    (tmp_path / "sys.txt").write_text("You route queries.\n")
    f = tmp_path / "t.csv"
    f.write_text('query,route,team\n"hello, there",greet,a\nrefund please,billing,b\n')
    opts = ImportOptions(format="csv", task="route", input_col="query", output_col="route",
                         system_prompt_file=str(tmp_path / "sys.txt"), model="gpt-4o-mini")
    assert import_file(store, f, opts).added == 2
    assert import_file(store, f, opts).added == 0
    first = store.list_traces(newest_first=False)[0]
    assert first["request"]["messages"] == [{"role": "system", "content": "You route queries."},
                                            {"role": "user", "content": "hello, there"}]
    assert first["output_text"] == "greet" and first["metadata"] == {"team": "a"} and first["model"] == "gpt-4o-mini"


GOOD = json.dumps(chat("fine", "ok"))


@pytest.mark.parametrize("bad_line, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object, found list"),
    ('{"foo": 1}', "expected a 'messages' list"),
    (json.dumps({"messages": []}), "'messages' must be a non-empty list"),
    (json.dumps({"messages": [{"role": "user", "content": "q"}]}), "last message must be the assistant's reply"),
    (json.dumps({"messages": [{"role": "robot", "content": "q"}, {"role": "assistant", "content": "a"}]}),
     "'messages[0].role' must be"),
    (json.dumps({"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}), "'messages[0]' has no 'content'"),
    (json.dumps({**chat("q", "a"), "created_at": "yesterday"}), "'created_at' is not an ISO-8601"),
    (json.dumps({**chat("q", "a"), "latency_ms": -3}), "'latency_ms' must be a non-negative number"),
    (json.dumps({**chat("q", "a"), "metadata": [1]}), "'metadata' must be an object"),
    (json.dumps({"request": {"messages": [{"role": "user", "content": "q"}]}, "response": "text"}),
     "'response' must be an object"),
    (json.dumps({"request": {"messages": [{"role": "user", "content": "q"}]}, "response": {"choices": []}}),
     "'response' has no choices[0].message.content"),
])
def test_bad_jsonl_line_fails_whole_import(store, tmp_path, bad_line, message):
    # more than one chunk of good lines first, so a partial write would be visible
    f = jsonl(tmp_path / "bad.jsonl", [json.dumps(chat(f"good {i}", "ok")) for i in range(2500)] + [bad_line, GOOD])
    with pytest.raises(InputError) as info:
        import_file(store, f, ImportOptions(task="t"))
    assert str(info.value).startswith(f"{f}:2501: ")
    assert message in str(info.value)
    assert store.count() == 0


@pytest.mark.parametrize("out_rows, in_rows, message", [
    (['{"custom_id": "zz", "response": {"status_code": 200, "body": {}}}'],
     [{"custom_id": "a", "body": {"messages": []}}], "custom_id 'zz' is not in the batch input file"),
    (['{"custom_id": "a", "response": {"status_code": 200, "body": {}}}'],
     [{"custom_id": "a", "body": {}}, {"custom_id": "a", "body": {}}], "custom_id 'a' appears twice"),
    (["{}"], [{"custom_id": "a", "body": {}}], "expected a batch output line"),
    (['{"custom_id": "a", "response": {"status_code": 200, "body": "x"}}'],
     [{"custom_id": "a", "body": {}}], "'response.body' must be"),
])
def test_bad_batch_files(store, tmp_path, out_rows, in_rows, message):
    inp = jsonl(tmp_path / "in.jsonl", in_rows)
    out = jsonl(tmp_path / "out.jsonl", out_rows)
    with pytest.raises(InputError, match=message):
        import_file(store, out, ImportOptions(format="openai-batch", batch_input=str(inp)))
    assert store.count() == 0


def test_batch_without_input_file_says_what_to_pass(store, tmp_path):
    out = jsonl(tmp_path / "out.jsonl", ["{}"])
    with pytest.raises(ProtegeError, match="needs --batch-input FILE"):
        import_file(store, out, ImportOptions(format="openai-batch"))


@pytest.mark.parametrize("content, opts, message", [
    ("text,label\nhi,greet\n", {"input_col": "query", "output_col": "label"}, ":1: no column 'query' (named by --input-col)"),
    ("input,output\nhi,greet\nbye\n", {}, ":3: expected 2 fields as in the header, found 1"),
    ("input,output\nhi,greet\n,empty\n", {}, ":3: column 'input' is empty"),
    ("", {}, ":1: empty file"),
    (b"input,output\nhi,\xff\xfe\n", {}, "not UTF-8"),
])
def test_bad_csv(store, tmp_path, content, opts, message):
    f = tmp_path / "bad.csv"
    f.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(InputError) as info:
        import_file(store, f, ImportOptions(format="csv", **opts))
    assert message in str(info.value) and str(info.value).startswith(str(f))
    assert store.count() == 0


def test_missing_and_corrupt_files(store, tmp_path):
    with pytest.raises(InputError, match="no such file"):
        import_file(store, tmp_path / "nope.jsonl", ImportOptions())
    gz = tmp_path / "broken.jsonl.gz"
    gz.write_bytes(gzip.compress(GOOD.encode() + b"\n")[:-8] + b"garbage!")  # bad CRC
    with pytest.raises(InputError, match="cannot read"):
        import_file(store, gz, ImportOptions())
    with pytest.raises(ProtegeError, match="unknown import format 'xml'"):
        import_file(store, gz, ImportOptions(format="xml"))
    assert store.count() == 0


def user_then(content):
    return {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": content}]}


@pytest.mark.parametrize("bad_row, message", [
    (chat("q", "a", model=123), "'model' must be a string, found int 123"),
    ({"request": {"model": "m", "messages": [{"role": "user", "content": "q"}]},
      "response": {"model": ["m"], "choices": [{"message": {"content": "a"}}]}},
     "'response.model' must be a string, found list"),
    (chat("q", "a", created_at=1e20), "'created_at' is not an ISO-8601 time or unix seconds in the years 1 to 9999: 1e+20"),
    (chat("q", "a", created_at="99999-01-01T00:00:00"), "'created_at' is not an ISO-8601 time"),
    (chat("q", "a", created_at="0001-01-01T00:00:00+14:00"), "'created_at' is not an ISO-8601 time"),
    (chat("q", "a", created_at=[2026]), "'created_at' must be an ISO-8601 time or unix seconds, found list"),
    (chat("q", "a", usage={"prompt_tokens": 2**63 + 1, "completion_tokens": 1}),
     "'prompt_tokens' is 9223372036854775809, out of range: the store holds integers from -2147483648 to 2147483647"),
    (chat("q", "a", usage={"prompt_tokens": 10, "completion_tokens": 2**31}), "'completion_tokens' is 2147483648, out of range"),
    (user_then(5), "'messages[1].content' must be a string or a list of content parts, found int 5"),
    (user_then({"text": "a"}), "'messages[1].content' must be a string or a list of content parts, found dict"),
    (user_then([{"type": "text", "text": 5}]), "'messages[1].content[0].text' must be a string, found int"),
    (user_then(["a"]), "'messages[1].content[0]' must be a content part object, found str"),
    ({"request": {"messages": [{"role": "user", "content": "q"}]},
      "response": {"choices": [{"message": {"content": [{"text": 1}]}}]}},
     "'response.choices[0].message.content[0].text' must be a string"),
    (chat("a\u0000b", "a"), "'request' holds 1 NUL characters, which the store cannot hold"),
    (chat("q", "a\u0000"), "'output_text' holds 1 NUL characters"),
    (chat("q", "a", metadata={"note": "\u0000"}), "'metadata' holds 1 NUL characters"),
    (chat("q", "a", task="t" * 201), "'task' is 201 characters; the store holds at most 200"),
    (chat("q", "a", model="m" * 201), "'model' is 201 characters; the store holds at most 200"),
    (chat("q", "a", task=7), "'task' must be a string, found int 7"),
])
def test_unstorable_line_fails_whole_import(store, tmp_path, bad_row, message):
    """What a store would refuse (PostgreSQL: NUL, over-long text, 32-bit overflow) is a
    file:line error on either store, before anything is written."""
    f = jsonl(tmp_path / "bad.jsonl", [json.dumps(chat(f"good {i}", "ok")) for i in range(2500)] + [bad_row, GOOD])
    with pytest.raises(InputError) as info:
        import_file(store, f, ImportOptions(), prices=load_prices())
    assert str(info.value).startswith(f"{f}:2501: ") and message in str(info.value)
    assert "\n" not in str(info.value)
    assert store.count() == 0


def test_wide_json_integers_in_metadata_are_kept(store, tmp_path):
    """Integers past 2^63 are fine inside JSON columns (orjson writes up to 2^64): stored exactly."""
    f = jsonl(tmp_path / "t.jsonl", [chat("q", "a", metadata={"big": 2**63 + 1, "small": -(2**63)})])
    assert import_file(store, f, ImportOptions()).added == 1
    assert store.list_traces()[0]["metadata"] == {"big": 2**63 + 1, "small": -(2**63)}


def test_store_errors_past_validation_are_one_line(store, tmp_path, monkeypatch):
    """The backstop: a row the store refuses that validation let through names the chunk's lines."""
    from protege.traces import clean

    monkeypatch.setattr(clean, "problems", lambda record: [])
    bad = chat("q", "a", usage={"prompt_tokens": 2**63 + 1, "completion_tokens": 1})
    f = jsonl(tmp_path / "bad.jsonl", [json.dumps(chat(f"good {i}", "ok")) for i in range(2100)] + [bad])
    with pytest.raises(ProtegeError) as info:
        import_file(store, f, ImportOptions())
    text = str(info.value)
    assert text.startswith(f"{f}:2001-2101: the store refused a trace on these lines (")
    assert text.endswith("); nothing was stored") and "\n" not in text
    assert store.count() == 0


@pytest.mark.postgres
@pytest.mark.parametrize("bad_row", [chat("a\u0000b", "x"), chat("q", "a", task="t" * 201),
                                     chat("q", "a", usage={"prompt_tokens": 2**31, "completion_tokens": 1})])
def test_postgres_data_errors_past_validation_are_one_line(pg_schema, tmp_path, monkeypatch, bad_row):
    from protege.traces import clean
    from protege.traces.store import Store

    store = Store(pg_schema.url)
    monkeypatch.setattr(clean, "problems", lambda record: [])
    f = jsonl(tmp_path / "bad.jsonl", [GOOD, bad_row, GOOD])
    with pytest.raises(ProtegeError, match=r"bad\.jsonl:1-3: the store refused a trace on these lines \(.+\); nothing"):
        import_file(store, f, ImportOptions())
    assert store.count() == 0
    store.close()


def test_overlong_task_flag_is_refused_up_front(store, tmp_path):
    f = jsonl(tmp_path / "t.jsonl", [GOOD])
    with pytest.raises(ProtegeError, match="--task is 201 characters; the store holds at most 200"):
        import_file(store, f, ImportOptions(task="t" * 201))


def record_line(record) -> str:
    import orjson

    return orjson.dumps(record.to_json(), option=orjson.OPT_NON_STR_KEYS).decode()


def quarantined():
    """Traces as the writer sets them aside: TraceRecord.to_json(), one a line."""
    from datetime import datetime, timezone

    from protege.traces.record import TraceRecord

    return [
        TraceRecord(request={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
                    response={"choices": [{"message": {"role": "assistant", "content": "hello"}}]},
                    output_text="hello", source="proxy", task="greet", provider="openai", model="gpt-4o-mini",
                    prompt_tokens=3, completion_tokens=1, latency_ms=120.5, ttft_ms=40.0, cost_usd=1e-6,
                    http_status=200, stream=True, created_at=datetime(2026, 3, 4, 5, 6, 7, tzinfo=timezone.utc),
                    metadata={"protege_quarantine": {"error": "value too long", "at": "2026-03-04T05:06:08Z"}}),
        TraceRecord(request={"messages": [{"role": "user", "content": "boom"}]}, source="sdk", status="error",
                    http_status=502, error="upstream refused", endpoint="completions", feedback={"rating": 1}),
    ]


def test_traces_format_reads_back_the_quarantine(store, tmp_path):
    records = quarantined()
    f = tmp_path / "quarantine.jsonl"
    f.write_text("".join(record_line(r) + "\n" for r in records) + "\n")
    result = import_file(store, f, ImportOptions(format="traces"))
    assert (result.read, result.added, result.already_present) == (2, 2, 0)
    rows = {r["id"]: r for r in store.iter_traces()}
    assert set(rows) == {r.id for r in records}
    for record in records:
        row = rows[record.id]
        expected = record.to_row()
        expected.pop("content_hash")
        got = {k: row[k] for k in expected}
        got["created_at"] = got["created_at"].replace(tzinfo=got["created_at"].tzinfo or expected["created_at"].tzinfo)
        assert got == expected
        assert row["content_hash"] is not None
    again = import_file(store, f, ImportOptions(format="traces"))
    assert (again.read, again.added, again.already_present) == (2, 0, 2)
    # the same traces once more, in another file with a copy of one line: their ids are stored already
    other = tmp_path / "spool.jsonl"
    other.write_text(record_line(records[0]) + "\n" + record_line(records[0]).replace("hello", "HELLO") + "\n")
    assert import_file(store, other, ImportOptions(format="traces")).added == 0
    assert store.count() == 2


def test_traces_format_same_trace_twice_in_a_file_is_stored_once(store, tmp_path):
    record = quarantined()[1]
    f = jsonl(tmp_path / "twice.jsonl", [record_line(record), record_line(record)])
    result = import_file(store, f, ImportOptions(format="traces", task="retagged"))
    assert (result.read, result.added, result.already_present) == (2, 1, 1)
    assert [r["task"] for r in store.iter_traces()] == ["retagged"]


@pytest.mark.parametrize("change, message", [
    ({"id": "not-an-id"}, "'id' must be a trace id (a lowercase UUID"),
    ({"id": 12}, "'id' must be a trace id"),
    ({"source": "robot"}, "'source' must be one of proxy, sdk, import, serve; found 'robot'"),
    ({"status": None}, "'status' must be one of ok, error; found None"),
    ({"created_at": "soon"}, "'created_at' is not an ISO-8601 time"),
    ({"created_at": 1e20}, "'created_at' is not an ISO-8601 time"),
    ({"request": "hi"}, "'request' must be an object"),
    ({"stream": "yes"}, "'stream' must be true or false, found 'yes'"),
    ({"endpoint": None}, "'endpoint' must be a string, found None"),
    ({"metadata": []}, "'metadata' must be an object, found []"),
    ({"feedback": "good"}, "'feedback' must be an object or null"),
    ({"colour": "red"}, "unknown field(s) 'colour'; a trace line holds the fields of TraceRecord.to_json(): request"),
    ({"model": 123}, "'model' must be a string, found int 123"),
    ({"prompt_tokens": "12"}, "'prompt_tokens' is '12', not an integer (str)"),
    ({"completion_tokens": 2**40}, "'completion_tokens' is 1099511627776, out of range"),
    ({"latency_ms": True}, "'latency_ms' is True, not a finite number"),
    ({"output_text": "a\u0000b"}, "'output_text' holds 1 NUL characters"),
    ({"task": "t" * 300}, "'task' is 300 characters; the store holds at most 200"),
])
def test_traces_format_bad_line(store, tmp_path, change, message):
    good = quarantined()[0]
    bad = {**good.to_json(), **change}
    f = jsonl(tmp_path / "q.jsonl", [record_line(quarantined()[1]), json.dumps(bad)])
    with pytest.raises(InputError) as info:
        import_file(store, f, ImportOptions(format="traces"))
    assert str(info.value).startswith(f"{f}:2: ") and message in str(info.value)
    assert store.count() == 0


def test_traces_format_not_json(store, tmp_path):
    f = jsonl(tmp_path / "q.jsonl", ['{"request": {"messages": []}', "[1]"])
    with pytest.raises(InputError, match=r"q\.jsonl:1: not valid JSON"):
        import_file(store, f, ImportOptions(format="traces"))
    f = jsonl(tmp_path / "q.jsonl", ["[1]"])
    with pytest.raises(InputError, match=r"q\.jsonl:1: expected a JSON object, found list"):
        import_file(store, f, ImportOptions(format="traces"))


@pytest.mark.postgres
def test_store_lost_mid_import_is_one_line(pg_schema, tmp_path):
    """The connection dies between two chunks: a clean StoreError, and the first chunk is not kept."""
    import uuid

    import sqlalchemy as sa

    from protege.errors import StoreError
    from protege.traces.store import Store

    name = f"protege_import_{uuid.uuid4().hex[:8]}"
    store = Store(f"{pg_schema.url}&application_name={name}")
    f = jsonl(tmp_path / "t.jsonl", [json.dumps(chat(f"good {i}", "ok")) for i in range(2500)])
    lines_read = 0

    def cut_the_connection_at_line_2100(_bytes):
        nonlocal lines_read
        lines_read += 1
        if lines_read == 2100:
            with pg_schema.admin.begin() as conn:
                conn.execute(sa.text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                     "WHERE application_name = :name"), {"name": name})

    with pytest.raises(StoreError) as info:
        import_file(store, f, ImportOptions(), on_bytes=cut_the_connection_at_line_2100)
    text = str(info.value)
    assert text.startswith(f"{f}: cannot write to the trace store at postgresql") and "\n" not in text
    assert text.endswith("nothing was stored: import the file again once the store answers")
    assert store.count() == 0
    store.close()
