"""`protege rebase`: a new base or frontier model came out; does the decision still hold?

    protege rebase TASK_FILE --base NEW_BASE          # train the specialist again on it
    protege rebase TASK_FILE --frontier openai:NEW@URL  # bench the new frontier in the reference's place

It re-runs what the current decision rests on with the new model in place of the old one:
`--base` trains on the same frozen dataset with the same method and recipe as the decision's
specialist, then benches the new run beside the reference and the old run on the same rows;
`--frontier` benches the new frontier model on the same rows, as the reference. Then it
decides again, and writes the side-by-side report: quality with a paired test (new vs old,
the same rows), cost per 1M requests, latency, the specialist's break-even volume, and the
verdict before and after with the reason it changed or held. The report is stored as a run of
kind `rebase`, so `protege runs list` and `protege decide` show a task's decision history.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from ..bench.run import run_bench
from ..bench.stats import paired
from ..datasets.registry import get_dataset
from ..errors import ProtegeError
from ..jsonsafe import json_safe
from ..runs.registry import create_run, get_run
from ..tasks.metrics import get_metric, map_labels
from ..tasks.spec import Task
from ..traces.store import Store
from .analysis import decide
from .formatting import count, pct, usd
from .types import Decision, Inputs


def _side(d: Decision, spec: str) -> dict | None:
    """One candidate of a decision, as the report shows it."""
    c = next((x for x in d.candidates if x.spec == spec), None)
    if c is None:
        return None
    q = c.quality[d.metric]
    econ = d.economics["specialists"].get(spec, {})
    return {"spec": spec, "role": c.role, "quality": q["value"], "ci95": q["ci95"], "cost_per_1m": c.cost_per_1m,
            "cost_basis": c.cost_basis, "latency_p50": c.latency.get("p50"), "latency_p95": c.latency.get("p95"),
            "break_even": econ.get("break_even_monthly_requests"), "bench_run": c.bench_run,
            "train": c.train}


def _verdict(d: Decision) -> dict:
    return {"verdict": d.verdict, "run": d.run, "reasons": d.reasons, "reference": d.reference}


def _specialist(d: Decision, run: str | None) -> str:
    if run is not None:
        spec = run if run.startswith("run:") else f"run:{run}"
        if not any(c.spec == spec for c in d.candidates):
            raise ProtegeError(f"{spec} is not among the decision's benched candidates on {d.dataset}")
        return spec
    if d.run and d.run.startswith("run:"):
        return d.run
    specs = [c for c in d.candidates if c.role == "specialist"]
    if not specs:
        raise ProtegeError(f"the decision on {d.dataset} has no benched specialist to rebase: train one and bench it "
                           "beside the reference first")
    return max(specs, key=lambda c: c.quality[d.metric]["value"]).spec


def _paired(store: Store, task: Task, d: Decision, new: str, old: str) -> dict:
    """New vs old on the test rows both were benched on: a paired bootstrap test."""
    from .evidence import bench_outputs

    outs = {}
    for spec in (new, old):
        c = next(x for x in d.candidates if x.spec == spec)
        outs[spec] = bench_outputs(get_run(store, c.bench_run, kind="bench"))
    rows = [i for i in outs[old] if i in outs[new]]
    refs = [outs[old][i]["reference"] for i in rows]
    a, b = (map_labels(task, [outs[s][i]["output"] for i in rows])[0] for s in (new, old))
    return {**paired(get_metric(d.metric), a, b, refs).as_dict(), "rows": len(rows)}


def rebase(store: Store, task: Task, home: Path, inputs: Inputs, *, base: str | None = None,
           frontier: str | None = None, run: str | None = None, dataset: str | None = None,
           time_budget_min: float | None = None, prices=None, console=None) -> dict:
    """Re-decide with a new base (`base`) and/or a new frontier (`frontier`); returns the report,
    also stored as a run of kind `rebase`."""
    from ..train.api import train
    from ..train.recipe import RECIPES

    if base is None and frontier is None:
        raise ProtegeError("name the new model: --base NEW_BASE (a new open model to train on) and/or --frontier SPEC "
                           "(a new frontier model to bench)")
    ds = get_dataset(store, dataset or task.name)
    before = decide(store, task, inputs, dataset=ds.id, prices=prices, home=home)
    changes = []
    if base is not None:
        old = _specialist(before, run)
        tr = get_run(store, old[4:])
        cfg = tr["config"]
        recipe = RECIPES[cfg["method"]].model_validate(cfg["recipe"])
        new_id = train(store, task, get_dataset(store, tr["dataset_id"]), home, base, cfg["method"], recipe,
                       time_budget_min=time_budget_min, console=console, prices=prices,
                       config_extra={"rebase_of": tr["id"]})
        changes.append({"kind": "base", "old": old, "old_model": cfg["base"], "new": f"run:{new_id}",
                        "new_model": base, "method": cfg["method"]})
        run_bench(store, task, ds, home, [before.reference, old, f"run:{new_id}"], reference=before.reference,
                  hardware_usd_per_hour=inputs.hardware_usd_per_hour, prices=prices)
    if frontier is not None:
        if frontier == before.reference:
            raise ProtegeError(f"--frontier {frontier} is the decision's reference already")
        changes.append({"kind": "frontier", "old": before.reference, "new": frontier})
        run_bench(store, task, ds, home, [frontier, before.reference], reference=frontier,
                  hardware_usd_per_hour=inputs.hardware_usd_per_hour, prices=prices)
    after = decide(store, task, inputs, dataset=ds.id, prices=prices, home=home)
    for ch in changes:  # old and new as the new decision compares them: on the same rows
        ch["before"], ch["after"] = _side(after, ch["old"]), _side(after, ch["new"])
        ch["paired"] = _paired(store, task, after, ch["new"], ch["old"])
    spec_before = before.run if before.run and before.run != before.reference else _specialist_or_none(before)
    report = {
        "task": task.name, "dataset": ds.id, "metric": before.metric, "created_at":
            datetime.now(timezone.utc).isoformat(), "inputs": before.as_dict()["inputs"], "changes": changes,
        "break_even": {"before": _break_even(before, spec_before), "after": _break_even(after, after.run or "")},
        "before": _verdict(before), "after": _verdict(after)}
    report["changed"] = (before.verdict, before.run) != (after.verdict, after.run)
    report["why"] = _why(report)
    report["run_id"] = create_run(store, kind="rebase", task=task.name, status="done", dataset_id=ds.id,
                                  base_model=" + ".join(c["new"] if c["kind"] == "frontier" else c["new_model"]
                                                        for c in changes),
                                  config={"base": base, "frontier": frontier, "run": run, "dataset": ds.id},
                                  metrics=json_safe(report))
    return report


def _specialist_or_none(d: Decision) -> str | None:
    try:
        return _specialist(d, None)
    except ProtegeError:
        return None


def _break_even(d: Decision, spec: str | None) -> dict | None:
    e = d.economics["specialists"].get(spec or "")
    return None if e is None else {"spec": spec, "monthly_requests": e.get("break_even_monthly_requests"),
                                   "reference_cost_per_1m": d.economics.get("reference_cost_per_1m")}


def _why(r: dict) -> str:
    b, a = r["before"], r["after"]
    first = a["reasons"][0] if a["reasons"] else ""
    if not r["changed"]:
        return f"The decision holds: still {a['verdict']}{_on(a)}. {first}"
    return f"The decision changed from {b['verdict']}{_on(b)} to {a['verdict']}{_on(a)}. {first}"


def _on(v: dict) -> str:
    if v["run"] is None:
        return ""
    return f" (keep running {v['run']})" if v["run"] == v["reference"] else f" (run {v['run']})"


def _cell(side: dict | None, key: str) -> str:
    if side is None:
        return "not benched"
    v = side.get(key)
    if key == "quality":
        lo, hi = side["ci95"]
        return f"{pct(v)} [{pct(lo)}, {pct(hi)}]"
    if key == "cost_per_1m":
        return usd(v)
    if key == "break_even":
        return count(v)
    return "unknown" if v is None else f"{v:,.1f}"


def rebase_markdown(r: dict) -> str:
    """The side-by-side report."""
    out = [f"# Rebase of `{r['task']}` on `{r['dataset']}`", ""]
    for c in r["changes"]:
        old, new = (c["old_model"], c["new_model"]) if c["kind"] == "base" else (c["old"], c["new"])
        title = f"## New {'base' if c['kind'] == 'base' else 'frontier'}: {new} in place of {old}"
        rows = [("candidate", c["old"], c["new"]),
                (f"{r['metric']} (95% CI)", _cell(c["before"], "quality"), _cell(c["after"], "quality")),
                ("cost per 1M requests", _cell(c["before"], "cost_per_1m"), _cell(c["after"], "cost_per_1m")),
                ("latency p50 ms", _cell(c["before"], "latency_p50"), _cell(c["after"], "latency_p50")),
                ("latency p95 ms", _cell(c["before"], "latency_p95"), _cell(c["after"], "latency_p95"))]
        if c["kind"] == "base":
            rows.append(("break-even requests/month", _cell(c["before"], "break_even"), _cell(c["after"], "break_even")))
        p = c["paired"]
        lo, hi = p["ci95"]
        better = "better" if lo > 0 else "worse" if hi < 0 else "no different (the CI spans zero)"
        out += [title, "", "| | old | new |", "| --- | --- | --- |", *(f"| {a} | {b} | {d} |" for a, b, d in rows), "",
                f"New vs old on the same {p['rows']:,} rows: {100 * p['difference']:+.1f} points (paired 95% CI "
                f"{100 * lo:+.1f} to {100 * hi:+.1f}, p={p['p_value']:.3g}): the new one is {better}.", ""]
    be = r["break_even"]
    if be["before"] or be["after"]:
        out += [f"Break-even of the specialist: {count((be['before'] or {}).get('monthly_requests'))} requests/month "
                f"before, {count((be['after'] or {}).get('monthly_requests'))} after.", ""]
    out += ["## Verdict", "", f"- before: **{r['before']['verdict']}**{_on(r['before'])}",
            f"- after: **{r['after']['verdict']}**{_on(r['after'])}", "", r["why"], "",
            *(f"- {x}" for x in r["after"]["reasons"][1:]), "", f"Stored as run {r['run_id']}.", ""]
    return "\n".join(out)
