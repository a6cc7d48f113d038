"""`protege ui`: every page in a real headless Chromium (Debian's, driven by Playwright) with
no console error and its key figures, escaping of what traces contain, the review queue's
write path by a click (checked in the store, then in the next dataset build), the token,
bad requests, keyset paging on SQLite and PostgreSQL, and reads that never block a writer."""

from __future__ import annotations

import json
import shutil
import threading
from datetime import datetime, timedelta, timezone

import httpx
import pytest
from helpers import EXAMPLES, ServerThread, run, six_intent_task, take, wait_for

from protege.bench.run import run_bench
from protege.datasets.build import build_dataset
from protege.datasets.registry import get_dataset
from protege.deploy.registry import activate
from protege.prices import load_prices
from protege.runs.registry import list_runs
from protege.tasks.spec import load_task
from protege.traces.importers import ImportOptions, import_file
from protege.traces.record import TraceRecord
from protege.train.api import train
from protege.train.recipe import load_recipe
from protege.ui.app import create_app

XSS = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2">'


def chat(text: str) -> dict:
    return {"model": "bank6", "messages": [{"role": "user", "content": text}]}


@pytest.fixture
def shop(sqlite_store, tmp_path, home, tiny_bert):
    """A store a team would have after a week: tickets and GPT-4 calls imported, a dataset, a
    trained classifier benched against GPT-4's replies, a deployment with served and shadow
    traffic, and one trace whose input is a script."""
    store = sqlite_store
    # GPT-4's calls as captured: its answers, no human label yet (the review queue gets those)
    calls = [{k: v for k, v in r.items() if k != "feedback"} for r in take(EXAMPLES / "gpt4_calls.jsonl.gz", 4)]
    rows = take(EXAMPLES / "tickets.jsonl.gz", 12) + calls
    src = tmp_path / "calls.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    import_file(store, src, ImportOptions(task="bank6"))
    task_path = six_intent_task(tmp_path / "task.yaml", "frontier", "{validation_fraction: 0.15, test_fraction: 0.3}")
    task = load_task(task_path)
    ds = get_dataset(store, build_dataset(store, task, home).id)
    # the API the CLI calls (a fixture that holds capsys would hand Playwright a captured stderr)
    run_id = train(store, task, ds, home, tiny_bert, "classifier",
                   load_recipe("classifier", overrides=["epochs=2", "eval_every=2", "batch_size=8"]))
    run_bench(store, task, ds, home, [f"run:{run_id}", "replay"], reference="replay")
    dep = activate(store, task="bank6", run_id=run_id, threshold=0.5, fallback="openai:gpt-4@http://127.0.0.1:9/v1",
                   options={}, evidence={"checks": [{"name": "forced", "ok": True, "sentence": "test"}]}, forced=True,
                   by="test")
    now = datetime.now(timezone.utc)
    served, shadows = [], []
    for i, (text, ours, theirs) in enumerate([("my card has not come yet", "card_arrival", "card_arrival"),
                                              ("someone took my card", "pin_blocked", "lost_or_stolen_card"),
                                              ("the top up did not go through", "exchange_rate", "top_up_failed")]):
        s = TraceRecord(request=chat(text), output_text=ours, source="serve", task="bank6", model="bank6",
                        latency_ms=4.0 + i, created_at=now - timedelta(minutes=30 - i),
                        metadata={"answered_by": "specialist", "confidence": 0.9 - 0.1 * i, "deployment": dep,
                                  "run_id": run_id})
        served.append(s)
        shadows.append(TraceRecord(request=chat(text), output_text=theirs, source="shadow", task="bank6",
                                   provider="shadow", model="gpt-4", created_at=now - timedelta(minutes=29 - i),
                                   metadata={"shadow_of": s.id, "specialist": f"run:{run_id}", "specialist_answer": ours,
                                             "agrees": ours == theirs}))
    fallback = TraceRecord(request=chat("what rate do you use for euros"), output_text="exchange_rate", source="serve",
                           task="bank6", model="gpt-4", latency_ms=800.0, created_at=now - timedelta(minutes=5),
                           metadata={"answered_by": "fallback", "confidence": 0.2, "deployment": dep, "run_id": run_id})
    evil = TraceRecord(request=chat(XSS), output_text=XSS, source="proxy", task="bank6", model="gpt-4o-mini",
                       prompt_tokens=1000, completion_tokens=10, created_at=now - timedelta(minutes=1))
    store.insert_traces([*served, *shadows, fallback, evil])
    return {"store": store, "task": task, "task_path": task_path, "ds": ds, "run_id": run_id, "served": served,
            "shadows": shadows, "evil": evil, "home": home}


def app_for(shop, **kw):
    return create_app(shop["store"], shop["home"], prices=load_prices(), **kw)


def test_every_page_in_chromium_escapes_traces_and_the_review_click_reaches_the_next_build(shop, tmp_path):
    from playwright.sync_api import sync_playwright

    store, ds, run_id = shop["store"], shop["ds"], shop["run_id"]
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Debian's chromium is installed by `make test` (Makefile target .venv/.chromium)"
    with ServerThread(app_for(shop)) as srv, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        problems, requests = [], []
        page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning")
                else None)
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        page.on("request", lambda r: requests.append(r.url))

        def visit(path: str, *expect: str):
            resp = page.goto(srv.url + path)
            assert resp is not None and resp.status == 200, (path, resp and resp.status, page.content()[:2000])
            text = page.inner_text("main")
            for e in expect:
                assert e in text, (path, e, text[:3000])
            return text

        visit("/", "bank6", "Traces per day", "run:" + run_id[:8])
        total = int(page.inner_text("#total-traces").replace(",", ""))
        assert total == store.count()
        assert page.inner_text("#total-spend") != "unknown"  # gpt-4o-mini's 1,000 tokens are in the price table
        assert page.locator("#plot-traces svg polyline").count() >= 1
        visit("/traces", f"{store.count()} traces match")
        assert page.locator("#traces tbody tr").count() == min(50, store.count())
        # the script in a trace is text on every page that shows it, never code
        visit("/traces?q=pwned", "1 on this page")
        assert XSS[:40] in page.inner_text("#traces")
        visit(f"/traces/{shop['evil'].id}", "gpt-4o-mini")
        assert page.inner_text("#input") == XSS and page.inner_text("#output") == XSS
        assert page.evaluate("window.__pwned") is None
        visit("/traces?task=bank6&source=serve", "count the matches")
        assert page.locator("#traces tbody tr").count() == 4
        visit("/traces?task=bank6&source=serve&count=1", "4 traces match")
        visit("/datasets", ds.id)
        visit(f"/datasets/{ds.id}", "Build steps", "select traces", "train")
        assert page.locator("#rows tbody tr").count() == min(20, ds.split_sizes["train"])
        visit(f"/datasets/{ds.id}?split=test", "test")
        visit("/runs", "train", "bench")
        visit(f"/runs/{run_id}", "Training loss per step", "Validation score per step", "Recipe")
        assert page.locator("#curves svg polyline").count() == 2
        visit(f"/bench/{ds.id}", "replay", f"run:{run_id}", "(95% CI)")
        visit(f"/bench/{ds.id}?show=disagree", "where the candidates disagree")
        differ = page.locator("#outputs tbody tr").count()
        visit("/decide/bank6", "Should we train a specialist", "Recommendation", "Candidates")
        assert page.locator("#decision #verdict").count() == 1 and page.locator("#decision svg").count() == 4
        visit("/deployments", "bank6", "Serving now", "History")
        visit("/deployments/bank6", "No alarm", "requests since", "sent to the fallback", "shadow agreement")
        assert page.inner_text("#health").count("25.0%") == 1  # 1 of the 4 served requests went to the fallback
        assert page.locator("#over-time svg polyline").count() == 3

        # the review queue: the two shadow disagreements first, then the bench's
        visit("/review?task=bank6", "disagreements left", "the specialist says", "the frontier says")
        left = int(page.inner_text("#left").split()[0])
        assert left == 2 + differ
        first = page.locator("input[name=trace]").get_attribute("value")
        # newest first: the last served message, where the specialist said exchange_rate
        assert first == shop["served"][2].id and "the top up did not go through" in page.inner_text("#review-input")
        page.click("#pick-frontier")
        page.wait_for_selector("#done")
        fb = store.get_trace(first)["feedback"]
        assert fb["correction"] == "top_up_failed" and fb["reviewed_by"] == "protege ui" and fb["origin"] == "shadow"
        assert store.get_trace(shop["shadows"][2].id)["feedback"]["correction"] == "top_up_failed"
        assert int(page.inner_text("#left").split()[0]) == left - 1
        page.click("#skip")  # the second shadow pair waits; the first bench row comes up
        page.wait_for_selector("#skip")
        bench_trace = page.locator("input[name=trace]").get_attribute("value")
        assert page.locator("input[name=origin]").get_attribute("value") == f"bench:{_bench_of(store, run_id)}"
        page.fill("#correction", "Refund_NOT_showing_up")  # any case: stored as the task's label
        page.click("#submit-correction")
        page.wait_for_selector("#done")
        assert store.get_trace(bench_trace)["feedback"]["correction"] == "Refund_not_showing_up"
        assert problems == [], problems  # not one console error or warning on any page so far
        page.goto(srv.url + "/review?task=bank6")
        page.fill("#correction", "not_a_label")
        page.click("#submit-correction")
        assert "is not one of task bank6's 6 labels" in page.inner_text("#error")
        assert [u for u in requests if not u.startswith(srv.url)] == []  # nothing loaded from elsewhere
        assert len(problems) <= 1 and all("400" in p for p in problems), problems  # the refusal's own 400
        for name in ("overview", "traces", "review"):
            page.goto(srv.url + {"overview": "/", "traces": "/traces", "review": "/review?task=bank6"}[name])
            page.screenshot(path=str(tmp_path / f"ui-{name}.png"), full_page=True)
            assert (tmp_path / f"ui-{name}.png").stat().st_size > 20_000
        browser.close()

    # the reviews are the human labels: a build scored against them (references: feedback, the
    # reviewed traces as the test split) takes the typed answer as the row's ground truth
    labelled = shop["task_path"].with_name("labelled.yaml")
    labelled.write_text(shop["task_path"].read_text().replace("references: frontier", "references: feedback")
                        .replace("split: {validation_fraction: 0.15, test_fraction: 0.3}", "split: {test: reviewed}"))
    nxt = get_dataset(store, build_dataset(store, load_task(labelled), shop["home"]).id)
    assert nxt.version == shop["ds"].version + 1
    assert [(r["id"], r["reference"]) for r in nxt.split("test")] == [(bench_trace, "Refund_not_showing_up")]


def _bench_of(store, run_id: str) -> str:
    return next(r["id"] for r in list_runs(store, "bank6", "bench") if r["config"]["candidate"] == f"run:{run_id}")


def test_token_bad_requests_and_cross_site_posts(shop, capsys):
    with ServerThread(app_for(shop, api_key="s3cret")) as srv, httpx.Client(base_url=srv.url) as c:
        r = c.get("/traces?task=bank6")
        assert r.status_code == 303 and r.headers["location"] == "/login?next=%2Ftraces%3Ftask%3Dbank6"
        assert c.get("/static/ui.css").status_code == 200  # assets need no token
        assert c.post("/login", data={"token": "wrong", "next": "/"}).status_code == 401
        r = c.post("/login", data={"token": "s3cret", "next": "//evil.example/"})
        assert r.status_code == 303 and r.headers["location"] == "/" and "HttpOnly; SameSite=Strict" in r.headers["set-cookie"]
        assert c.get("/").status_code == 200  # the cookie
        bearer = {"authorization": "Bearer s3cret"}
        assert httpx.get(srv.url + "/runs", headers=bearer).status_code == 200
        assert httpx.get(srv.url + "/runs", headers={"authorization": "Bearer nope"}).status_code == 303
        r = c.get("/")
        assert "default-src 'self'" in r.headers["content-security-policy"] and r.headers["x-frame-options"] == "DENY"
        for path, status, says in [
            ("/traces?cursor=yesterday", 400, "not a page cursor: &#39;yesterday&#39;"),
            ("/traces?since=last-week", 400, "?since= takes a date (2026-12-01) or a time"),
            ("/overview", 404, "no page at /overview"),
            ("/runs/0000ffff", 404, "run &#39;0000ffff&#39; does not exist"),
            ("/datasets/bank6@99", 404, "bank6@99"),
            ("/runs?kind=nope", 400, "?kind= is train, bench, curve or rebase"),
            (f"/datasets/{shop['ds'].id}?split=dev", 400, "has no split &#39;dev&#39;"),
            ("/decide/bank6?tolerance=2", 400, "?tolerance= takes a number from 0 to 1"),
            ("/deployments/nothing", 400, "task nothing has never been deployed"),
            ("/static/..%2Fapp.py", 404, "not found"),
        ]:
            r = c.get(path)
            assert (r.status_code, says in r.text) == (status, True), (path, r.status_code, r.text[-600:])
        assert c.post("/review", data={"task": "bank6", "trace": shop["served"][0].id}).status_code == 400
        r = c.post("/review", data={"task": "bank6", "trace": shop["served"][0].id, "answer": "card_arrival"},
                   headers={"origin": "http://evil.example"})
        assert r.status_code == 403 and shop["store"].get_trace(shop["served"][0].id)["feedback"] is None
        r = c.post("/review", data={"task": "bank6", "trace": "ffff0000", "answer": "card_arrival"})
        assert r.status_code == 404 and "no trace with id" in r.text
        assert c.put("/review").status_code == 405
    code, _, err = run(capsys, "--db", shop["store"].url, "ui", "--host", "0.0.0.0")
    assert code == 1 and "give --api-key TOKEN as well" in " ".join(err.split())


def test_keyset_pages_filters_and_search(store):
    """Paging by cursor visits every matching trace once, newest first, on SQLite and PostgreSQL."""
    t0 = datetime(2026, 11, 1, tzinfo=timezone.utc)
    recs = [TraceRecord(request=chat(f"message {i} {'refund 100%_off' if i % 7 == 0 else 'card'}"), output_text="x",
                        task="a" if i % 2 else "b", model="m1" if i % 3 else "m2", status="ok" if i % 5 else "error",
                        created_at=t0 + timedelta(minutes=i // 2)) for i in range(230)]  # pairs share a timestamp
    store.insert_traces(recs)
    seen, cursor, pages = [], None, 0
    while True:
        rows, cursor = store.page_traces(limit=40, cursor=cursor, task="a")
        seen += rows
        pages += 1
        if cursor is None:
            break
    want = sorted((r for r in recs if r.task == "a"), key=lambda r: (r.created_at, r.id), reverse=True)
    assert [r["id"] for r in seen] == [r.id for r in want] and pages == 3
    since, until = t0 + timedelta(minutes=10), t0 + timedelta(minutes=20)
    rows, _ = store.page_traces(limit=500, since=since, until=until, status="error", model="m2")
    assert {r["id"] for r in rows} == {r.id for r in recs if since <= r.created_at < until and r.status == "error"
                                       and r.model == "m2"}
    rows, _ = store.page_traces(limit=500, search="100%_OFF")  # % and _ are literal, case folded
    assert len(rows) == len([i for i in range(230) if i % 7 == 0])
    assert store.page_traces(limit=5, search="100x_off")[0] == []
    # a search that reads at most 50 traces a page: short pages, each match still found once
    found, cursor, pages = [], None, 0
    while True:
        rows, cursor = store.page_traces(limit=20, cursor=cursor, search="refund", scan=50)
        found += [r["id"] for r in rows]
        pages += 1
        if cursor is None:
            break
    want = [r.id for r in sorted(recs, key=lambda r: (r.created_at, r.id), reverse=True) if "refund" in
            r.request["messages"][0]["content"]]
    assert found == want and pages == 5  # 230 traces, 50 a page
    rows, cursor = store.page_traces(limit=5, search="nowhere", scan=100)
    assert rows == [] and cursor.split("|")[1] == sorted(recs, key=lambda r: (r.created_at, r.id), reverse=True)[99].id
    assert store.count_upto(50, task="b") == 50 and store.count_upto(500, task="b") == 115
    days = store.daily(t0 - timedelta(days=1))
    assert sum(d["traces"] for d in days) == 230 and {d["day"] for d in days} == {"2026-11-01"}
    assert store.stats_by_task() == {"a": 115, "b": 115}


def test_reading_pages_never_blocks_a_writer(shop):
    """The proxy's writer inserts while the dashboard's pages are read over and over."""
    store, stop, failures, served = shop["store"], threading.Event(), [], [0]
    before = store.count()

    def read(url):
        with httpx.Client(base_url=url, timeout=30) as c:
            while not stop.is_set():
                for path in ("/", "/traces", "/traces?q=card", "/deployments/bank6", "/review?task=bank6"):
                    r = c.get(path)
                    if r.status_code != 200:
                        failures.append((path, r.status_code))
                    served[0] += 1

    with ServerThread(app_for(shop)) as srv:
        readers = [threading.Thread(target=read, args=(srv.url,)) for _ in range(2)]
        for th in readers:
            th.start()
        assert wait_for(lambda: served[0] >= 5, timeout=60)  # the readers are reading
        started, batches = served[0], 0
        while batches < 40 or served[0] < started + 10:  # writes go on while at least 10 pages are read
            store.insert_traces([TraceRecord(request=chat(f"written {batches}-{i}"), output_text="card_arrival",
                                             source="proxy", task="bank6") for i in range(25)])
            batches += 1
        stop.set()
        for th in readers:
            th.join(60)
    assert failures == [] and served[0] >= started + 10
    assert store.count() == before + 25 * batches


def test_protege_ui_command_serves_the_store(sqlite_store, tmp_path):
    """The verb a user types: `protege ui --port P` on a store, answering until stopped."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from helpers import free_port

    sqlite_store.insert_traces([TraceRecord(request=chat("where is my card"), output_text="card_arrival", task="t")])
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "protege", "--db", sqlite_store.url, "ui", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ})
    try:
        for _ in range(300):
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/traces?task=t", timeout=2)
                break
            except httpx.TransportError:
                assert proc.poll() is None, proc.stderr.read()
                time.sleep(0.1)
        assert r.status_code == 200 and "where is my card" in r.text and "1 trace matches" in r.text
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0 and f"protege ui on http://127.0.0.1:{port}/" in err


def test_pages_over_postgresql_and_sqlite(store, home, monkeypatch):
    """The same pages over either store (the PostgreSQL run needs PROTEGE_TEST_DATABASE_URL)."""
    now = datetime.now(timezone.utc)
    recs = [TraceRecord(request=chat(f"message {i} about my card"), output_text="card_arrival", task="t", model="gpt-4o",
                        prompt_tokens=100, completion_tokens=2, created_at=now - timedelta(hours=i)) for i in range(60)]
    store.insert_traces(recs)
    with ServerThread(create_app(store, home, prices=load_prices())) as srv, httpx.Client(base_url=srv.url) as c:
        r = c.get("/")
        assert r.status_code == 200 and 'id="total-traces">60<' in r.text and 'id="total-spend">$0.02<' in r.text
        r = c.get("/traces?task=t&model=gpt-4o&q=CARD")
        assert r.status_code == 200 and r.text.count('<a href="/traces/') == 50 and 'id="next"' in r.text
        nxt = r.text.split('href="/traces?')[-1].split('" id="next"')[0].replace("&amp;", "&")
        r = c.get("/traces?" + nxt)
        assert r.status_code == 200 and r.text.count('<a href="/traces/') == 10 and 'id="next"' not in r.text
        assert recs[-1].id in r.text  # the oldest, on the last page
        r = c.get(f"/traces/{recs[0].id}")
        assert r.status_code == 200 and "message 0 about my card" in r.text
        assert c.get(f"/traces?since={(now - timedelta(hours=5)):%Y-%m-%dT%H:%M}&count=1").text.count("traces match") == 1
        monkeypatch.setattr("protege.ui.pages.SEARCH_SCAN", 25)  # a search reads 25 traces a page
        r = c.get("/traces?q=nowhere")
        assert r.status_code == 200 and "0 found in the next 25 traces" in r.text and "search older traces" in r.text
