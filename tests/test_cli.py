"""The CLI as a user runs it: exact outputs, exact rows, one-line errors with exit 1."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import free_port, run, write_jsonl

from protege.traces.store import Store

EXAMPLES = Path(__file__).parents[1] / "examples" / "banking77"


ROWS = [{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"q{i}"},
                                               {"role": "assistant", "content": f"a{i}"}],
         "usage": {"prompt_tokens": 10, "completion_tokens": 2}, "latency_ms": 100 + i} for i in range(5)]


def test_import_stats_list_show_export(capsys, tmp_path, home):
    f = write_jsonl(tmp_path / "t.jsonl", ROWS)
    code, out, _ = run(capsys, "traces", "import", str(f), "--task", "demo", "--json")
    assert code == 0 and json.loads(out) == {"path": str(f), "read": 5, "added": 5, "already_present": 0}
    code, out, _ = run(capsys, "traces", "import", str(f), "--task", "demo")
    assert "5 read, 0 added, 5 already in the store" in " ".join(out.split())

    code, out, _ = run(capsys, "traces", "stats", "--json")
    stats = json.loads(out)
    assert stats["traces"] == 5 and stats["by"]["task"] == {"demo": 5}
    assert stats["tokens"] == {"with_usage": 5, "prompt": 50, "completion": 10}
    assert stats["cost_usd"]["total"] == pytest.approx(5 * (10 * 0.15 + 2 * 0.6) / 1e6)
    assert stats["latency_ms"]["p50"] == 102 and stats["latency_ms"]["measured"] == 5
    code, out, _ = run(capsys, "traces", "stats")
    assert code == 0 and "5 traces" in out and "p50 102.0 ms" in out

    code, out, _ = run(capsys, "traces", "list", "--json", "--limit", "2")
    listed = json.loads(out)
    assert [r["output_text"] for r in listed] == ["a4", "a3"]
    code, out, _ = run(capsys, "traces", "show", listed[0]["id"][:20], "--json")
    assert json.loads(out)["request"]["messages"] == [{"role": "user", "content": "q4"}]
    code, out, _ = run(capsys, "traces", "show", listed[0]["id"])
    assert code == 0 and "q4" in out

    dest = tmp_path / "out" / "ft.jsonl"
    code, out, _ = run(capsys, "traces", "export", str(dest), "--task", "demo")
    assert code == 0 and "wrote 5 examples" in out
    lines = [json.loads(line) for line in dest.read_text().splitlines()]
    assert lines[0] == {"messages": [{"role": "user", "content": "q0"}, {"role": "assistant", "content": "a0"}]}
    assert not list(dest.parent.glob(".ft.jsonl.*"))  # no temporary left behind


def test_errors_are_one_line_with_exit_1(capsys, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(ROWS[0]) + "\n{oops\n")
    code, out, err = run(capsys, "traces", "import", str(bad))
    assert code == 1
    assert err.strip().startswith("error:") and f"{bad}:2: not valid JSON" in " ".join(err.split())
    assert "Traceback" not in err

    code, _, err = run(capsys, "traces", "show", "ffffffff-0000")
    assert code == 1 and "no trace with id" in err
    code, _, err = run(capsys, "--db", "mysql://x/y", "traces", "stats")
    assert code == 1 and "is not supported" in err
    code, _, err = run(capsys, "--prices", str(tmp_path / "none.csv"), "prices")
    assert code == 1 and "does not exist" in err
    code, _, err = run(capsys, "proxy", "--upstream", "api.openai.com")
    assert code == 1 and "--upstream must be an http(s) URL" in err
    code, _, err = run(capsys, "traces", "import", str(bad), "--format", "xml")
    assert code == 1 and "unknown import format 'xml'" in err


def test_usage_error_exit_code(capsys):
    code, _, err = run(capsys, "traces", "list", "--limit", "0")
    assert code == 2 and "--limit" in err


def test_prices_shipped_and_override(capsys, tmp_path):
    code, out, _ = run(capsys, "prices", "--json")
    table = json.loads(out)
    assert table["path"] == "protege/data/api_prices.csv"
    assert {"provider": "openai", "model": "gpt-4o-mini", "input_usd_per_1m": 0.15, "cached_input_usd_per_1m": 0.075,
            "output_usd_per_1m": 0.6, "as_of": "2026-03"}.items() <= next(
        p for p in table["prices"] if p["model"] == "gpt-4o-mini").items()
    mine = tmp_path / "mine.csv"
    mine.write_text("provider,model,input_usd_per_1m,cached_input_usd_per_1m,output_usd_per_1m,as_of,source\n"
                    "acme,acme-1,1,,2,2026-11,our contract\n")
    code, out, _ = run(capsys, "--prices", str(mine), "prices", "--json")
    assert [p["model"] for p in json.loads(out)["prices"]] == ["acme-1"]
    # the override prices imports too
    f = write_jsonl(tmp_path / "t.jsonl", [{**ROWS[0], "model": "acme-1"}])
    run(capsys, "--prices", str(mine), "traces", "import", str(f))
    code, out, _ = run(capsys, "traces", "stats", "--json")
    assert json.loads(out)["cost_usd"]["total"] == pytest.approx((10 * 1 + 2 * 2) / 1e6)


@pytest.mark.parametrize("content, message", [
    ("provider,model\nx,y\n", ":1: missing column(s) input_usd_per_1m"),
    ("provider,model,input_usd_per_1m,cached_input_usd_per_1m,output_usd_per_1m,as_of,source\n"
     "a,m,cheap,,1,2026,s\n", ":2: column 'input_usd_per_1m': expected a number"),
    ("provider,model,input_usd_per_1m,cached_input_usd_per_1m,output_usd_per_1m,as_of,source\n"
     "a,m,1,,1,2026,s\na,m,1,,1,2026,s\n", ":3: model 'm' is listed twice"),
    ("provider,model,input_usd_per_1m,cached_input_usd_per_1m,output_usd_per_1m,as_of,source\n"
     "a,m,-1,,1,2026,s\n", ":2: column 'input_usd_per_1m': price cannot be negative"),
])
def test_bad_price_table(capsys, tmp_path, content, message):
    f = tmp_path / "p.csv"
    f.write_text(content)
    code, _, err = run(capsys, "--prices", str(f), "prices")
    assert code == 1 and message in " ".join(err.split())


def test_global_db_flag_and_home(capsys, tmp_path):
    db = tmp_path / "elsewhere.db"
    f = write_jsonl(tmp_path / "t.jsonl", ROWS[:2])
    run(capsys, "--db", f"sqlite:///{db}", "traces", "import", str(f))
    s = Store(f"sqlite:///{db}")
    assert s.count() == 2
    s.close()
    run(capsys, "--home", str(tmp_path / "h2"), "traces", "import", str(f))
    assert (tmp_path / "h2" / "protege.db").exists()


def test_help_does_not_import_heavy_packages():
    code = ("import sys; from protege.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'transformers', 'sqlalchemy', 'aiohttp', 'openai') if m in sys.modules]\n"
            "print('HEAVY', heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out


def test_proxy_command_serves_and_flushes_on_stop(tmp_path, upstream):
    """`protege proxy` as a user starts it; Ctrl-C stops it and every trace is stored."""
    import signal
    import time

    import httpx


    port = free_port()
    home = tmp_path / "proxyhome"
    proc = subprocess.Popen([sys.executable, "-m", "protege.cli", "--home", str(home), "proxy",
                             "--upstream", upstream.url, "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(200):
            try:
                httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=0.5)
                break
            except httpx.TransportError:
                time.sleep(0.05)
        for i in range(10):
            r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", headers={"X-Protege-Task": "cli"},
                           json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"m{i}"}]})
            assert r.status_code == 200
    finally:
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    assert f"protege proxy on http://127.0.0.1:{port}/v1" in " ".join(stderr.split())
    s = Store(f"sqlite:///{home / 'protege.db'}")
    assert s.count(task="cli") == 10 and s.count(endpoint="models") >= 1
    s.close()


def test_import_quarantine_back_with_format_traces(capsys, tmp_path, home):
    import orjson

    from protege.traces.record import TraceRecord

    records = [TraceRecord(request={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"q{i}"}]},
                           output_text=f"a{i}", source="proxy", task="demo", model="gpt-4o-mini", latency_ms=50.0 + i,
                           metadata={"protege_quarantine": {"error": "refused", "at": "2026-01-01T00:00:00Z"}})
               for i in range(3)]
    quarantine = home / "spool" / "quarantine.jsonl"
    quarantine.parent.mkdir(parents=True)
    quarantine.write_bytes(b"".join(orjson.dumps(r.to_json()) + b"\n" for r in records))
    code, out, _ = run(capsys, "traces", "import", str(quarantine), "--format", "traces", "--json")
    assert code == 0 and json.loads(out) == {"path": str(quarantine), "read": 3, "added": 3, "already_present": 0}
    code, out, _ = run(capsys, "traces", "import", str(quarantine), "--format", "traces")
    assert code == 0 and "3 read, 0 added, 3 already in the store" in " ".join(out.split())
    code, out, _ = run(capsys, "traces", "list", "--json")
    assert sorted((r["id"], r["source"], r["output_text"]) for r in json.loads(out)) == \
        [(r.id, "proxy", r.output_text) for r in records]

    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(orjson.dumps({**records[0].to_json(), "id": "x"}) + b"\n")
    code, _, err = run(capsys, "traces", "import", str(bad), "--format", "traces")
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert f"{bad}:1: 'id' must be a trace id" in err


def test_unstorable_import_is_one_line_and_stores_nothing(capsys, tmp_path):
    nul = {**ROWS[0], "messages": [{"role": "user", "content": "\u0000"}, {"role": "assistant", "content": "x"}]}
    for bad, message in (({**ROWS[0], "model": 123}, "'model' must be a string, found int 123"),
                         (nul, "'request' holds 1 NUL characters, which the store cannot hold")):
        f = write_jsonl(tmp_path / "t.jsonl", ROWS + [bad])
        code, _, err = run(capsys, "traces", "import", str(f))
        assert code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert f"{f}:6: {message}" in " ".join(err.split())
    code, out, _ = run(capsys, "traces", "stats", "--json")
    assert json.loads(out)["traces"] == 0


@pytest.mark.parametrize("args", [
    ["traces", "list", "--limit", "99999999999999999999"],
    ["traces", "list", "--offset", "99999999999999999999"],
    ["traces", "list", "--offset", "-1"],
])
def test_huge_limits_are_usage_errors(capsys, args):
    code, _, err = run(capsys, *args)
    assert code == 2 and args[2] in err and "Traceback" not in err


def test_largest_limit_and_offset_work(capsys):
    code, out, _ = run(capsys, "traces", "list", "--limit", "1000000000000", "--offset", "1000000000000",
                        "--json")
    assert code == 0 and json.loads(out) == []


@pytest.mark.parametrize("args, message", [
    (["traces", "show", "____"], "'____' is not a trace id or id prefix: ids hold only hex digits and '-' (found '_')"),
    (["traces", "show", "01%"], "'01%' is not a trace id or id prefix"),
    (["runs", "show", "%"], "'%' is not a run id or id prefix"),
    (["serve", "run:%"], "'%' is not a train run id or id prefix"),
    (["serve", "run:"], "give a train run id or a unique prefix of one"),
])
def test_id_wildcards_are_refused(capsys, tmp_path, args, message):
    f = write_jsonl(tmp_path / "t.jsonl", ROWS[:1])
    run(capsys, "traces", "import", str(f))
    code, _, err = run(capsys, *args)
    assert code == 1 and message in " ".join(err.split())


def test_a_refusal_validation_cannot_foresee_is_one_line(capsys, tmp_path, home):
    """The importer's backstop: the store refuses a row (here a trigger), the import names the lines."""
    store = Store(f"sqlite:///{home / 'protege.db'}")
    with store.engine.begin() as conn:
        conn.exec_driver_sql("CREATE TRIGGER refuse BEFORE INSERT ON traces WHEN NEW.task = 'evil' "
                             "BEGIN SELECT RAISE(ABORT, 'refused by policy'); END")
    f = write_jsonl(tmp_path / "t.jsonl", [ROWS[0], {**ROWS[1], "task": "evil"}, ROWS[2]])
    code, _, err = run(capsys, "traces", "import", str(f))
    assert code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert (f"{f}:1-3: the store refused a trace on these lines (refused by policy); nothing was stored"
            in " ".join(err.split()))
    assert store.count() == 0
    store.close()
