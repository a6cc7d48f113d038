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


def test_gzip_demo_file_imports(store):
    result = import_file(store, EXAMPLES / "test.jsonl.gz", ImportOptions(task="banking77"))
    assert result.added == 3080
    row = store.list_traces(limit=1)[0]
    assert row["task"] == "banking77" and row["request"]["messages"][0]["role"] == "system"
    labels = json.loads((EXAMPLES / "categories.json").read_text())
    assert len(labels) == 77
    assert all(t["output_text"] in labels for t in store.list_traces(limit=200))


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
