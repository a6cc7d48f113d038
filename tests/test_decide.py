"""protege decide: planted bench, training and curve runs give each recommendation; the
break-even arithmetic matches hand-computed values; the HTML report renders in Chromium."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import orjson
import pytest
from helpers import make_banking, run

from protege.decide.analysis import Inputs, decide
from protege.decide.curve_fit import fit_power_law, rows_to_reach
from protege.decide.report import markdown
from protege.ids import uuid7
from protege.tasks.spec import load_task
from protege.traces import schema


def plant_bench(store, home, task, ds, spec, *, correct: int, kind: str, reference: str = "replay",
                p50=None, p95=None, throughput=None, cost=None, latency_note="measured here, batch size 1"):
    """A bench run whose first `correct` test rows are right and the rest wrong."""
    rows = ds.split("test")
    labels = task.labels
    run_id = uuid7()
    folder = Path(home) / "runs" / run_id
    folder.mkdir(parents=True)
    lines = []
    for i, r in enumerate(rows):
        out = r["reference"] if i < correct else next(x for x in labels if x != r["reference"])
        lines.append(orjson.dumps({"id": r["id"], "input": r["input"], "reference": r["reference"], "output": out}))
    (folder / "outputs.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    now = datetime.now(timezone.utc)
    metrics = {"spec": spec, "kind": kind, "n": len(rows), "latency_ms": {"p50": p50, "p95": p95,
                                                                           "note": latency_note if p50 else
                                                                           "unknown (imported traces carry no latency)"},
               "throughput_rps": throughput, "tokens": {"in": 100.0, "out": 5.0} if kind != "recorded" else
               {"in": None, "out": None}, "cost_per_1m_usd": cost, "cost_basis": "planted"}
    with store.engine.begin() as conn:
        conn.execute(schema.runs.insert().values(
            id=run_id, kind="bench", task=task.name, status="done",
            config={"candidate": spec, "reference": reference, "rows": len(rows), "dataset": ds.id},
            base_model=spec, dataset_id=ds.id, metrics=metrics, outputs_path=str(folder / "outputs.jsonl"),
            created_at=now, finished_at=now))
    return run_id


def plant_train(store, task, ds, *, wall_s: float, rows: int = 100) -> str:
    run_id = uuid7()
    now = datetime.now(timezone.utc)
    with store.engine.begin() as conn:
        conn.execute(schema.runs.insert().values(
            id=run_id, kind="train", task=task.name, status="done", config={"method": "classifier"},
            base_model="minilm", dataset_id=ds.id, metrics={"wall_s": wall_s, "train_rows": rows},
            created_at=now, finished_at=now))
    return run_id


def plant_curve(store, task, ds, points: list[tuple[int, float]]) -> None:
    now = datetime.now(timezone.utc)
    pts = [{"fraction": n / points[-1][0], "train_rows": n, "value": v, "ci95": [v - 0.02, v + 0.02],
            "run_id": uuid7(), "metric": "accuracy"} for n, v in points]
    with store.engine.begin() as conn:
        conn.execute(schema.runs.insert().values(
            id=uuid7(), kind="curve", task=task.name, status="done", config={}, base_model="minilm",
            dataset_id=ds.id, metrics={"metric": "accuracy", "points": pts}, created_at=now, finished_at=now))


def plant_not_yet(store, tmp_path, home):
    """GPT-4 (replay) wrong on one of the n test rows, against the human labels; a specialist
    5 rows short of all right, a weak knn, and a curve whose error halves with each 4x of
    data: 16/24 at 100 rows, 8/24 at 400, 4/24 at 1,600."""
    task, ds = make_banking(store, tmp_path, home)
    n = len(ds.split("test"))
    assert n == 24
    spec_run = plant_train(store, task, ds, wall_s=600)
    plant_bench(store, home, task, ds, "knn:minilm", correct=n // 3, kind="local", p50=5, p95=8, throughput=200,
                cost=0.14)
    plant_bench(store, home, task, ds, f"run:{spec_run}", correct=n - 5, kind="local", p50=6, p95=9, throughput=10,
                cost=2.78)
    plant_bench(store, home, task, ds, "replay", correct=n - 1, kind="recorded", cost=500.0)
    plant_curve(store, task, ds, [(100, 1 - 16 / 24), (400, 1 - 8 / 24), (1600, 1 - 4 / 24)])
    return task, ds


def test_train_when_the_specialist_matches_the_reference_and_pays_back(sqlite_store, tmp_path, home, capsys):
    task, ds = make_banking(sqlite_store, tmp_path, home)
    n = len(ds.split("test"))
    spec_run = plant_train(sqlite_store, task, ds, wall_s=3600)
    plant_bench(sqlite_store, home, task, ds, "knn:minilm", correct=n // 2, kind="local", p50=5, p95=8,
                throughput=200, cost=0.14)
    plant_bench(sqlite_store, home, task, ds, f"run:{spec_run}", correct=n, kind="local", p50=6, p95=9,
                throughput=10, cost=2.78)
    plant_bench(sqlite_store, home, task, ds, "replay", correct=n - 1, kind="recorded", cost=500.0)
    d = decide(sqlite_store, task, Inputs(monthly_requests=1_000_000, hardware_usd_per_hour=0.10))
    assert (d.verdict, d.run, d.reference_status, d.warnings) == ("TRAIN", f"run:{spec_run}", "measured", []), d.reasons
    assert [c.role for c in d.candidates] == ["reference", "specialist", "baseline"]
    assert d.reasons[0].startswith(f"run:{spec_run} scores 100.0% accuracy") and "no worse than the reference" in \
        d.reasons[0]
    e = d.economics["specialists"][f"run:{spec_run}"]
    # by hand: one always-on machine is 0.10 USD/h x 730 h = 73 USD a month; the API costs
    # 500 USD / 1M = 0.0005 USD a request, so 73 / 0.0005 = 146,000 requests a month break even
    assert e["machine_usd_per_month"] == pytest.approx(73.0)
    assert e["break_even_monthly_requests"] == pytest.approx(146_000)
    # 10 requests/s x 3600 x 730 = 26.28M a month per machine: 1M needs one machine
    assert e["requests_per_machine_month"] == pytest.approx(26_280_000)
    assert e["api_usd_per_month"] == pytest.approx(500.0) and e["specialist_usd_per_month"] == pytest.approx(73.0)
    assert e["saving_usd_per_month"] == pytest.approx(427.0)
    assert e["training_cost_usd"] == pytest.approx(0.10)  # one hour of training at 0.10 USD/h
    assert e["payback_months"] == pytest.approx(0.10 / 427.0)
    assert any("146,000 requests a month" in r for r in d.reasons)
    # too little volume: one machine costs more than the API bill, it never pays back: keep GPT-4
    low = decide(sqlite_store, task, Inputs(monthly_requests=10_000))
    assert (low.verdict, low.run) == ("KEEP", "replay")
    assert math.isinf(low.economics["specialists"][f"run:{spec_run}"]["payback_months"])
    assert any("never pays back" in r for r in low.reasons)
    # the API's latency is unknown for imported traces, and said so
    ref = next(c for c in d.candidates if c.role == "reference")
    assert ref.latency["p50"] is None and "imported traces carry no latency" in ref.latency["note"]
    # TFP per 1,000 successes without a value; per 1M tokens with one
    spec = next(c for c in d.candidates if c.role == "specialist")
    assert spec.tfp["unit"] == "tokens per 1,000 successes" and spec.tfp["value"] == pytest.approx(105 * 1000)
    valued = decide(sqlite_store, task, Inputs(value_per_success=0.01))
    spec = next(c for c in valued.candidates if c.role == "specialist")
    assert spec.tfp["value"] == pytest.approx(1.0 * 0.01 / 105 * 1e6)
    assert next(c for c in valued.candidates if c.role == "reference").tfp["value"] is None  # no token counts


def test_train_on_the_evidence_when_a_specialist_beats_a_measured_frontier(sqlite_store, tmp_path, home):
    """GPT-4 right on 16 of 24 rows against the human labels, the specialist on all 24: the
    paired difference is +33.3 points and its CI excludes zero, so the reason says it beats it."""
    task, ds = make_banking(sqlite_store, tmp_path, home)
    spec_run = plant_train(sqlite_store, task, ds, wall_s=600)
    plant_bench(sqlite_store, home, task, ds, f"run:{spec_run}", correct=24, kind="local", p50=6, p95=9,
                throughput=10, cost=2.78)
    plant_bench(sqlite_store, home, task, ds, "knn:minilm", correct=20, kind="local", p50=5, p95=8, throughput=200,
                cost=0.14)
    plant_bench(sqlite_store, home, task, ds, "replay", correct=16, kind="recorded", cost=500.0)
    d = decide(sqlite_store, task, Inputs())
    assert (d.verdict, d.run) == ("TRAIN", f"run:{spec_run}"), d.reasons
    spec = next(c for c in d.candidates if c.role == "specialist")
    diff = spec.paired["accuracy"]
    assert diff["difference"] == pytest.approx(8 / 24) and diff["ci95"][0] > 0
    assert d.reasons[0] == (f"run:{spec_run} scores 100.0% accuracy (95% CI 100.0%–100.0%) against 66.7% for replay: "
                            f"it beats it by +33.3 points (paired 95% CI {100 * diff['ci95'][0]:+.1f} to "
                            f"{100 * diff['ci95'][1]:+.1f}), both measured against the same human labels.")
    # 0.10 USD/h / (10 requests/s x 3600) = 2.78 USD per 1M requests; the reference 500
    assert d.reasons[1].startswith("It costs $2.78 per 1M requests at full load against $500 for replay (planted).")
    # knn beats GPT-4 too, with no training: named as the alternative
    assert any(r.startswith("knn:minilm needs no training and also meets the bar at 83.3%") for r in d.reasons)
    assert "— run run:" in markdown(d)
    # the report names what was not run
    idle = plant_train(sqlite_store, task, ds, wall_s=60)
    notes = decide(sqlite_store, task, Inputs()).notes
    assert f"trained but not benched: run:{idle} (classifier); bench it to weigh it in" in notes
    assert any(n.startswith("not run: a causal-LM specialist") for n in notes)
    assert any(n.startswith("not run: an untrained small language model") for n in notes)


def test_not_yet_when_the_curve_says_more_traces_close_the_gap(sqlite_store, tmp_path, home):
    task, ds = plant_not_yet(sqlite_store, tmp_path, home)
    d = decide(sqlite_store, task, Inputs(tolerance=1 / 24))
    # the bar is GPT-4's 23/24 less 1/24 = 22/24: error 2/24 = (4/24) / 2 -> 4x the data, 6,400 rows
    assert (d.verdict, d.run) == ("NOT YET", "replay"), d.reasons
    assert any("about 6,4" in r and "more than the 1,600 used" in r and "collect" in r for r in d.reasons), d.reasons
    fit = d.curve.fit
    assert fit["b"] == pytest.approx(0.5, abs=0.01)
    need = rows_to_reach(fit, 0.98)  # error 0.02 = (16/24 x 10) / sqrt(n) -> n = 111,111
    assert need["rows"] == pytest.approx(111_111, rel=0.05) and need["more"] == pytest.approx(109_511, rel=0.06)
    assert fit["at_2x"]["ci95"][0] <= fit["at_2x"]["value"] <= fit["at_2x"]["ci95"][1]
    # no tolerance: error 1/24 needs 16x the data, beyond what the curve can promise (10x): keep GPT-4
    keep = decide(sqlite_store, task, Inputs(tolerance=0.0))
    assert keep.verdict == "KEEP" and any("short of" in r for r in keep.reasons), keep.reasons


def test_switch_when_a_cheap_baseline_suffices_keep_when_the_frontier_wins(sqlite_store, tmp_path, home):
    task, ds = make_banking(sqlite_store, tmp_path, home)
    n = len(ds.split("test"))
    spec_run = plant_train(sqlite_store, task, ds, wall_s=600)
    plant_bench(sqlite_store, home, task, ds, f"run:{spec_run}", correct=n, kind="local", p50=6, p95=9,
                throughput=10, cost=2.78)
    plant_bench(sqlite_store, home, task, ds, "knn:minilm", correct=n, kind="local", p50=5, p95=8, throughput=200,
                cost=0.14)
    plant_bench(sqlite_store, home, task, ds, "replay", correct=n - 1, kind="recorded", cost=500.0)
    d = decide(sqlite_store, task, Inputs())
    # as good as the specialist, no training: the tie goes to the baseline
    assert (d.verdict, d.run) == ("SWITCH", "knn:minilm"), d.reasons
    assert d.reasons[0].startswith("knn:minilm scores 100.0% accuracy (95% CI 100.0%–100.0%) against 95.8% for replay")
    assert d.reasons[1].startswith("It costs $0.14 per 1M requests at full load against $500 for replay")
    assert d.risk["level"] == "high"

    # a fresh bench where the specialist trails far behind and the curve is flat
    plant_bench(sqlite_store, home, task, ds, f"run:{spec_run}", correct=n // 2, kind="local", p50=6, p95=9,
                throughput=10, cost=2.78)
    plant_bench(sqlite_store, home, task, ds, "knn:minilm", correct=n // 4, kind="local", p50=5, p95=8,
                throughput=200, cost=0.14)
    plant_bench(sqlite_store, home, task, ds, "replay", correct=n - 1, kind="recorded", cost=500.0)
    plant_curve(sqlite_store, task, ds, [(100, 0.49), (400, 0.50), (1600, 0.50)])
    d = decide(sqlite_store, task, Inputs())
    assert (d.verdict, d.run) == ("KEEP", "replay") and any("short of" in r for r in d.reasons), d.reasons
    assert "keep running replay" in markdown(d)


def test_keep_when_the_specialist_is_not_cheaper_states_the_risk_once(sqlite_store, tmp_path, home):
    """As good as the reference but dearer per request: KEEP, and the risk sentence comes
    once, last (it used to be added a second time, issue 12)."""
    task, ds = make_banking(sqlite_store, tmp_path, home)
    n = len(ds.split("test"))
    spec_run = plant_train(sqlite_store, task, ds, wall_s=600)
    plant_bench(sqlite_store, home, task, ds, "knn:minilm", correct=n // 2, kind="local", p50=5, p95=8,
                throughput=200, cost=0.14)
    plant_bench(sqlite_store, home, task, ds, f"run:{spec_run}", correct=n, kind="local", p50=6, p95=9,
                throughput=10, cost=2.78)
    # the API at 1 USD per 1M requests; the specialist 0.10 USD/h / (10 requests/s x 3600) = 2.78 USD per 1M
    plant_bench(sqlite_store, home, task, ds, "replay", correct=n - 1, kind="recorded", cost=1.0)
    d = decide(sqlite_store, task, Inputs())
    assert d.verdict == "KEEP", d.reasons
    risk = ("Risk: training adds 50.0 points over knn:minilm (untrained); the edge is large enough to survive a "
            "better base release.")
    assert [r for r in d.reasons if r.startswith("Risk:")] == [risk]
    assert d.reasons[-2:] == ["The specialist is not cheaper than the reference per request; train only for "
                              "latency or data-control reasons.", risk]
    assert markdown(d).count("- Risk: ") == 1


def test_no_verdict_when_the_reference_is_the_benchmark_itself(sqlite_store, tmp_path, home):
    """A labelled test file whose replies are the labels: replay scores 100% by construction.
    The report says so first and gives no verdict, only the best candidate's own score."""
    task, ds = make_banking(sqlite_store, tmp_path, home)
    n = len(ds.split("test"))
    spec_run = plant_train(sqlite_store, task, ds, wall_s=600)
    plant_bench(sqlite_store, home, task, ds, f"run:{spec_run}", correct=n - 1, kind="local", p50=6, p95=9,
                throughput=10, cost=0.06)
    plant_bench(sqlite_store, home, task, ds, "replay", correct=n, kind="recorded", cost=500.0)
    d = decide(sqlite_store, task, Inputs())
    assert (d.verdict, d.run, d.reference_status) == ("NO VERDICT", None, "by construction")
    assert d.warnings[0].startswith(f"replay agrees with the benchmark's references on all {n} test rows")
    assert "`references: feedback`" in d.warnings[0] and "openai:MODEL@URL" in d.warnings[0]
    assert d.reasons[1].startswith(f"The best candidate, run:{spec_run}, scores 95.8% accuracy")
    md = markdown(d)
    assert md.index("**Read first:**") < md.index("## Recommendation: **NO VERDICT**")

    # with `references: frontier` the scores are agreement by definition: said first, verdict given
    agree = tmp_path / "agree.yaml"
    agree.write_text(task.path.read_text().replace("references: test_file", "references: frontier"))
    d = decide(sqlite_store, load_task(agree), Inputs(tolerance=0.05))
    assert d.reference_status == "agreement" and d.verdict == "TRAIN", d.reasons
    assert d.warnings[0].startswith("Scores are agreement with replay's recorded replies")


def test_decide_cli_writes_markdown_and_html_that_chromium_renders(sqlite_store, tmp_path, home, capsys):
    task, ds = plant_not_yet(sqlite_store, tmp_path, home)
    out_html, out_md = tmp_path / "report" / "decide.html", tmp_path / "decide.md"
    # a tolerance of 4 points: the bar is 23/24 - 0.04, error 0.082 against 4/24 at 1,600 rows
    code, out, err = run(capsys, "--db", sqlite_store.url, "decide", str(task.path), "--monthly-requests", "2000000",
                         "--tolerance", "0.04",
                         "--html", str(out_html), "--md", str(out_md))
    assert code == 0, err
    assert "Recommendation: NOT YET — keep running replay" in out and "HTML report:" in err
    # readable at 80 columns: run ids abbreviated, nothing cut off, no line wider than 80
    spec_run = next(c.spec for c in decide(sqlite_store, task, Inputs()).candidates if c.role == "specialist")
    assert spec_run[:12] in out and spec_run not in out
    assert "…" not in out and max(len(line) for line in out.splitlines()) <= 80, out
    md = out_md.read_text()
    assert "## Recommendation: **NOT YET**" in md and "| knn:minilm |" in md
    code, out, err = run(capsys, "--db", sqlite_store.url, "decide", str(task.path), "--json", "--tolerance", "0.04")
    assert code == 0 and json.loads(out)["verdict"] == "NOT YET"
    assert json.loads(out)["inputs"]["hardware_usd_per_hour"] == 0.10  # bench's DEFAULT_HARDWARE_USD_PER_HOUR

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Debian's chromium is installed by `make test` (Makefile target .venv/.chromium)"
    shot = tmp_path / "shot.png"
    common = [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
              f"--user-data-dir={tmp_path / 'chrome'}", "--window-size=1200,2400"]
    dom = subprocess.run([*common, "--dump-dom", out_html.resolve().as_uri()], capture_output=True, text=True,
                         timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    page = dom.stdout
    assert "id=\"verdict\"" in page and ">NOT YET<" in page
    for plot in ("plot-quality", "plot-latency", "plot-curve", "plot-volume"):
        block = page.split(f'id="{plot}"')[1].split("</svg>")[0]
        assert "<svg" in block and ("<circle" in block or "<rect" in block or "<polyline" in block), plot
    console_errors = [line for line in dom.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not console_errors, console_errors
    subprocess.run([*common, f"--screenshot={shot}", out_html.resolve().as_uri()], capture_output=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 20_000  # a page with charts, not a blank one


def test_power_law_fit_recovers_a_known_curve():
    pts = [{"train_rows": n, "value": 1 - 2.0 * n ** -0.4, "ci95": [1 - 2.0 * n ** -0.4 - 0.01, 1 - 2.0 * n ** -0.4 + 0.01]}
           for n in (200, 800, 3200)]
    fit = fit_power_law(pts)
    assert fit["a"] == pytest.approx(2.0, rel=0.02) and fit["b"] == pytest.approx(0.4, abs=0.005)
    assert fit["at_10x"]["value"] == pytest.approx(1 - 2.0 * 32000 ** -0.4, abs=0.002)
    assert fit_power_law(pts[:1]) is None
    assert math.isinf(rows_to_reach(fit, 1.0)["rows"])
