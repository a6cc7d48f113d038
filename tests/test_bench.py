"""Candidates and the head-to-head bench, with real models (SmolLM2-135M, MiniLM), a real
local OpenAI-compatible server and real stores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sqlalchemy as sa
from helpers import LABELS, make_banking, run

from protege.bench.run import run_bench
from protege.errors import ProtegeError
from protege.models.base import Context
from protege.models.registry import build_candidate
from protege.prices import load_prices
from protege.tasks.spec import load_task
from protege.testing import ScriptedUpstream
from protege.traces import schema


@pytest.fixture
def banking(sqlite_store, tmp_path, home):
    return make_banking(sqlite_store, tmp_path, home)


def ctx_for(task, ds, home):
    return Context(task=task, dataset=ds, home=home, train=ds.split("train"), prices=load_prices())


@pytest.fixture
def label_upstream(banking):
    """A local OpenAI-compatible server answering with the gold label (a stand-in frontier model)."""
    task, ds = banking
    gold = {r["input"]: r["reference"] for r in ds.split("test")}
    up = ScriptedUpstream(model="gpt-4o-mini-2024-07-18",
                          reply=lambda req: gold.get(req["messages"][-1]["content"], "card_arrival"))
    up.start()
    yield up
    up.stop()


def test_openai_candidate_retries_429_then_caches(banking, label_upstream, home):
    task, ds = banking
    rows = ds.split("test")[:5]
    label_upstream.push(("status", 429, {"error": {"message": "slow down"}}), ("status", 503, {"error": {}}))
    spec = f"openai:gpt-4o-mini@{label_upstream.url}?concurrency=1"
    cand = build_candidate(spec, ctx_for(task, ds, home))
    preds = cand.predict(rows)
    assert [p.output for p in preds] == [r["reference"] for r in rows]
    assert cand.calls == 7  # 2 scripted failures retried, then 5 answers
    assert all(p.latency_ms > 0 and p.cost_usd > 0 and not p.cached for p in preds)
    cand.close()
    before = label_upstream.count
    again = build_candidate(spec, ctx_for(task, ds, home))
    preds2 = again.predict(rows)
    assert label_upstream.count == before and again.calls == 0  # a re-run costs nothing
    assert all(p.cached for p in preds2) and [p.output for p in preds2] == [p.output for p in preds]
    again.close()
    # the request is the app's original one: the long frontier system prompt included
    sent = json.loads(label_upstream.requests[-1]["body"])
    assert sent["messages"][0]["role"] == "system" and "card_arrival" in sent["messages"][0]["content"]


def test_openai_candidate_errors(banking, label_upstream, home):
    task, ds = banking
    ctx = ctx_for(task, ds, home)
    with pytest.raises(ProtegeError, match="write openai:MODEL@BASE_URL"):
        build_candidate("openai:gpt-4o", ctx)
    with pytest.raises(ProtegeError, match="no API key; set PROTEGE_TEST_NO_SUCH_KEY"):
        build_candidate("openai:gpt-4o@https://api.openai.com/v1?key_env=PROTEGE_TEST_NO_SUCH_KEY", ctx)
    label_upstream.push(("status", 400, {"error": {"message": "bad request"}}))
    cand = build_candidate(f"openai:m@{label_upstream.url}?cache=off&retries=0", ctx)
    with pytest.raises(ProtegeError, match="HTTP 400"):
        cand.predict(ds.split("test")[:1])
    with pytest.raises(ProtegeError, match="unknown candidate 'nope:x'"):
        build_candidate("nope:x", ctx)
    with pytest.raises(ProtegeError, match="option concurrency='many'"):
        build_candidate(f"openai:m@{label_upstream.url}?concurrency=many", ctx)


def test_smollm2_constrained_and_free_generation(banking, home):
    task, ds = banking
    rows = ds.split("test")[:6]
    ctx = ctx_for(task, ds, home)
    constrained = build_candidate("hf:smollm2-135m", ctx)
    preds = constrained.predict(rows)
    assert all(p.output in LABELS for p in preds)
    assert all(0 < p.confidence <= 1 for p in preds)
    assert preds[0].prompt_tokens > len(rows[0]["input"].split())
    # batch size does not change answers (the shared-prefix cache is exact)
    one = [constrained.predict([r])[0] for r in rows[:2]]
    assert [p.output for p in one] == [p.output for p in preds[:2]]
    assert [round(p.confidence, 4) for p in one] == [round(p.confidence, 4) for p in preds[:2]]
    constrained.close()
    scored = build_candidate("hf:smollm2-135m?mode=score", ctx)
    full = scored.predict(rows[:3])
    for p in full:
        assert set(p.label_probs) == set(LABELS) and sum(p.label_probs.values()) == pytest.approx(1.0, abs=1e-4)
        assert p.output == max(p.label_probs, key=p.label_probs.get) and p.confidence == p.label_probs[p.output]
    # one row alone scores the same as inside a batch (the tree mask keeps rows apart)
    alone = scored.predict(rows[1:2])[0]
    assert alone.output == full[1].output and alone.confidence == pytest.approx(full[1].confidence, abs=1e-4)
    free = build_candidate("hf:smollm2-135m?mode=generate&max_new_tokens=8", ctx)
    out = free.predict(rows[:2])
    assert all(isinstance(p.output, str) and p.confidence is None and 1 <= p.completion_tokens <= 8 for p in out)


def test_knn_minilm_beats_chance(banking, home):
    task, ds = banking
    rows = ds.split("test")
    knn = build_candidate("knn:minilm", ctx_for(task, ds, home))
    preds = knn.predict(rows)
    acc = sum(p.output == r["reference"] for p, r in zip(preds, rows)) / len(rows)
    assert acc >= 0.7  # chance is 1/6
    assert all(0 < p.confidence <= 1 for p in preds)
    assert list((home / "cache" / "embeddings").glob("*.npy"))  # train embeddings cached for re-runs


def test_bench_cli_end_to_end(banking, label_upstream, sqlite_store, tmp_path, capsys):

    task, ds = banking
    store, db_url = sqlite_store, sqlite_store.url
    out = tmp_path / "report.json"
    code, stdout, err = run(capsys, "--db", db_url, "bench", str(task.path), "-c", "replay", "-c", "knn:minilm",
                            "-c", f"openai:gpt-4o-mini@{label_upstream.url}", "--latency-samples", "3",
                            "--json", str(out))
    assert code == 0, err
    report = json.loads(out.read_text())
    n = len(ds.split("test"))
    assert n >= 20 and report["rows"] == n and report["reference"] == "replay"
    by = {c["spec"]: c for c in report["candidates"]}
    replay, knn, api = by["replay"], by["knn:minilm"], by[f"openai:gpt-4o-mini@{label_upstream.url}"]
    # references are the human review; replay answers with GPT-4's recorded replies
    gpt4_right = sum(r["output"] == r["reference"] for r in ds.split("test")) / n
    assert 0 < gpt4_right < 1 and replay["metrics"]["accuracy"]["value"] == pytest.approx(gpt4_right)
    assert replay["latency_ms"]["p50"] is None and "unknown" in replay["latency_ms"]["note"]
    assert api["metrics"]["accuracy"]["value"] == 1.0
    assert api["paired"]["accuracy"]["difference"] == pytest.approx(1 - gpt4_right)
    assert api["cost_per_1m_usd"] > 0 and api["latency_ms"]["p50"] > 0
    low, high = knn["metrics"]["accuracy"]["ci95"]
    assert low <= knn["metrics"]["accuracy"]["value"] <= high
    assert knn["latency_ms"]["n"] == 3 and knn["throughput_rps"] > 0 and knn["cost_per_1m_usd"] > 0
    assert "knn:minilm" in stdout and "scores are against the labelled test file" in " ".join(stdout.split())
    # readable at 80 columns: nothing cut off with an ellipsis, no line wider than the terminal
    assert "…" not in stdout and max(len(line) for line in stdout.splitlines()) <= 80, stdout
    for header in ("accuracy", "macro_f1", "p50 ms", "USD per 1M req"):
        assert header in stdout
    # every candidate's per-example outputs are stored as a bench run
    with store.engine.connect() as conn:
        runs = conn.execute(sa.select(schema.runs).where(schema.runs.c.kind == "bench")).all()
    assert {r.base_model for r in runs} == set(by)
    for r in runs:
        lines = Path(r.outputs_path).read_text().splitlines()
        assert len(lines) == n and {"id", "output", "reference", "confidence"} <= set(json.loads(lines[0]))


def test_bench_same_rows_and_limit_on_both_stores(store, tmp_path, home):
    task, ds = make_banking(store, tmp_path, home)
    report = run_bench(store, task, ds, home, ["replay", "knn:minilm"], limit=10, latency_samples=2,
                       prices=load_prices())
    assert report.rows == 10 and all(r.n == 10 for r in report.results)
    with store.engine.connect() as conn:
        stored = conn.execute(sa.select(schema.runs.c.config).where(schema.runs.c.kind == "bench")).scalars().all()
    assert sorted(c["candidate"] for c in stored) == ["knn:minilm", "replay"]
    assert all(c["rows"] == 10 and c["dataset"] == ds.id for c in stored)
    with pytest.raises(ProtegeError, match="at least one --candidate"):
        run_bench(store, task, ds, home, [])


def test_llm_judge_both_orders_cancel_position_bias(banking, sqlite_store, home, tmp_path):
    task, ds = banking
    # a judge that always prefers whichever answer is shown first: asking both orders makes
    # every comparison a tie for the candidate (0.5), as it should be
    judge = ScriptedUpstream(model="judge-1", reply=lambda req: "A")
    judge.start()
    try:
        text = Path(task.path).read_text() + f"metrics: [accuracy, judge]\njudge:\n  candidate: openai:judge-1@{judge.url}\n"
        p = tmp_path / "judged.yaml"
        p.write_text(text)
        judged = load_task(p)
        report = run_bench(sqlite_store, judged, ds, home, ["replay", "knn:minilm"], limit=6, latency_samples=1,
                           prices=load_prices())
        knn = next(r for r in report.results if r.spec == "knn:minilm")
        assert knn.metrics["judge"]["value"] == 0.5
        prompts = [json.loads(r["body"])["messages"][0]["content"] for r in judge.requests]
        assert len(prompts) == 12 and all("Reply with exactly one of: A, B, TIE." in t for t in prompts)
    finally:
        judge.stop()
    nojudge = tmp_path / "nojudge.yaml"
    nojudge.write_text(Path(task.path).read_text() + "metrics: [accuracy, judge]\n")
    with pytest.raises(ProtegeError, match="needs a `judge:` section"):
        run_bench(sqlite_store, load_task(nojudge), ds, home, ["replay", "knn:minilm"], limit=2, latency_samples=1)


def test_student_learns_only_from_recorded_replies_and_never_from_the_row_it_answers(banking, home):
    """student:knn answers each row from the other folds' inputs labelled with the frontier's
    replies: with every reply unique to its row, no row can get its own reply back."""
    task, ds = banking
    rows = ds.split("test")
    taught = [{**r, "output": f"reply-{i}"} for i, r in enumerate(rows)]
    cand = build_candidate("student:knn:minilm?folds=3&k=3", ctx_for(task, ds, home))
    preds = cand.predict(taught)
    from protege.models.student import fold_of

    for i, (r, p) in enumerate(zip(taught, preds)):
        j = int(p.output.split("-")[1])
        assert j != i and fold_of(taught[j]["input"], 3) != fold_of(r["input"], 3)
    # the human references play no part: replies that are all one label give only that label
    fresh = build_candidate("student:knn:minilm?folds=3", ctx_for(task, ds, home))
    same = fresh.predict([{**r, "output": "pin_blocked"} for r in rows])
    assert {p.output for p in same} == {"pin_blocked"}
    # a single row (the bench's latency samples) is answered from the rows already seen
    assert cand.predict(taught[:1])[0].output == preds[0].output
    for bad, message in (("student:knn:minilm?folds=1", "folds must be 2 or more"),
                         ("student:hf:smollm2-135m", "a student is `student:knn:ENCODER`")):
        with pytest.raises(ProtegeError, match=message):
            build_candidate(bad, ctx_for(task, ds, home))
