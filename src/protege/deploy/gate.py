"""The promotion gate: a run is deployed only if, on the task's frozen benchmark, it is not
significantly worse than the run serving now and it clears the decision's quality bar.

    protege deploy TASK_FILE run:ID [--margin 0.01] [--tolerance 0.02] [--force]

Both runs are benched together on the same test rows (a bench tagged `gate`, which `decide`
leaves out of its evidence). The checks:

- **not worse than the serving run**: the paired bootstrap 95% CI of (candidate - serving) on
  the task's first metric must not reach below `-margin` (a non-inferiority margin, 1 point
  by default). The first deployment of a task has nothing to compare with and passes.
- **clears the bar**: the candidate scores at least the decision's reference (the frontier
  model, from the newest bench that named it) less `tolerance`, or a bar the team states
  (`--bar`, recorded as stated). Without either the bar is unknown, and an unknown figure
  never passes.

With a threshold (`--threshold`, the cascade), the bar is checked on what the client gets:
the run's answer where its confidence reaches the threshold, the reference's answer on that
row where it does not (the reference stands in for the fallback). The serving run is
compared model to model, each answering every row: a cascade that sends more to the
frontier agrees with it more, which says nothing about which model is better.

`--force` deploys anyway, and the deployment records that it was forced and what failed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..bench.run import CandidateResult, run_bench
from ..bench.stats import bootstrap, paired
from ..datasets.registry import Dataset
from ..decide.evidence import bench_outputs, decision_benches
from ..decide.formatting import pct
from ..errors import ProtegeError
from ..models.trained import finished_run_model
from ..tasks.metrics import get_metric, map_labels
from ..tasks.spec import Task
from ..traces.store import Store
from .registry import current


@dataclass
class Check:
    name: str
    ok: bool
    sentence: str


@dataclass
class GateResult:
    run_id: str
    dataset: str
    rows: int
    metric: str
    candidate: dict
    """The candidate's score: value, ci95."""
    serving: dict | None
    """The serving deployment's run and score, and the paired difference; None for a first deployment."""
    bar: dict | None
    """The reference, its score, the tolerance and the bar; None when no reference was benched."""
    margin: float
    checks: list[Check] = field(default_factory=list)
    cascade: dict | None = None
    """With a threshold: the threshold and the share of rows the run answers itself."""

    @property
    def passed(self) -> bool:
        return all(c.ok for c in self.checks)

    def evidence(self) -> dict:
        return {"dataset": self.dataset, "rows": self.rows, "metric": self.metric, "candidate": self.candidate,
                "serving": self.serving, "bar": self.bar, "margin": self.margin, "passed": self.passed,
                "cascade": self.cascade,
                "checks": [c.__dict__ for c in self.checks]}


def reference_score(store: Store, task: Task, ds: Dataset, metric: str) -> dict | None:
    """The decision's reference on `ds` (named by the newest untagged bench) and its newest score."""
    benches = decision_benches(store, task.name, ds.id)
    if not benches:
        return None
    ref = benches[0]["config"]["reference"]
    run = next((r for r in benches if r["config"]["candidate"] == ref), None)
    if run is None:
        return None
    value = ((run["metrics"] or {}).get("metrics") or {}).get(metric, {}).get("value")
    return None if value is None else {"reference": ref, "value": value, "bench_run": run["id"]}


class _Scorer:
    """Scores a bench result on the test rows, alone or as a cascade over the reference's answers."""

    def __init__(self, task: Task, ds: Dataset, metric: str, fallback: list[str] | None):
        rows = ds.split("test")
        self.task, self.refs, self.metric = task, [r["reference"] for r in rows], get_metric(metric)
        self.fallback = fallback

    def answers(self, r: CandidateResult, threshold: float | None) -> tuple[list[str], float | None]:
        """The answers the client gets, and the share the run gave itself (None: no cascade)."""
        outs, _ = map_labels(self.task, [p.output for p in r.outputs])
        if threshold is None or self.fallback is None:
            return outs, None
        kept = [p.confidence is not None and p.confidence >= threshold for p in r.outputs]
        return [o if k else f for o, k, f in zip(outs, kept, self.fallback)], sum(kept) / max(1, len(kept))

    def score(self, outs: list[str]) -> dict:
        e = bootstrap(self.metric, outs, self.refs).as_dict()
        return {"value": e["value"], "ci95": e["ci95"]}

    def paired(self, outs: list[str], base: list[str]) -> dict:
        return paired(self.metric, outs, base, self.refs).as_dict()


def gate(store: Store, task: Task, ds: Dataset, home: Path, run_id: str, *, margin: float = 0.01,
         tolerance: float = 0.02, latency_samples: int = 5, prices=None, progress=None,
         threshold: float | None = None, bar: float | None = None, reference: str | None = None) -> GateResult:
    """Bench the candidate beside the serving run and check both conditions. `reference`: a
    candidate spec benched with them, untagged (what `protege retrain` does: the bench is the
    decision's evidence too); without one, a bench tagged `gate`. `bar`: a stated bar."""
    run, _, _ = finished_run_model(store, run_id)
    if run["task"] != task.name:
        raise ProtegeError(f"run {run['id']} was trained for task {run['task']!r}, not {task.name!r}")
    metric = next((m for m in task.metric_names if m != "judge"), None)
    if metric is None:
        raise ProtegeError(f"task {task.name} has no metric the gate can compare runs on (judge needs a judge model)")
    serving = current(store, task.name)
    spec = f"run:{run['id']}"
    specs = [spec] if serving is None or serving["run_id"] == run["id"] else [f"run:{serving['run_id']}", spec]
    if reference is not None:
        specs = [reference, *specs]
    report = run_bench(store, task, ds, home, specs, reference=specs[0], latency_samples=latency_samples,
                       prices=prices, tag=None if reference else "gate", progress=progress)
    by = {r.spec: r for r in report.results}
    ref = reference_score(store, task, ds, metric)
    fallback = None
    if threshold is not None and ref is not None:
        fallback = _reference_answers(store, task, ds, by.get(ref["reference"]), ref["bench_run"])
    scorer = _Scorer(task, ds, metric, fallback)
    alone, _ = scorer.answers(by[spec], None)
    cand_out, kept = scorer.answers(by[spec], threshold)
    cand = scorer.score(cand_out)
    what = spec
    result = GateResult(run_id=run["id"], dataset=ds.id, rows=report.rows, metric=metric, candidate=cand,
                        serving=None, bar=None, margin=margin)
    if kept is not None:
        result.cascade = {"threshold": threshold, "answered_by_run": kept, "fallback_stand_in": ref["reference"],
                          "run_alone": scorer.score(alone)}
        what = (f"the cascade ({spec} at threshold {threshold:g}, answering {kept:.0%} of the rows; "
                f"{ref['reference']}'s answers on the rest)")
    elif threshold is not None:
        what = f"{spec} (scored alone: no reference answers on these rows to stand in for the fallback)"
    if serving is None:
        result.checks.append(Check("not worse than the serving run", True,
                                   f"the first deployment of task {task.name}: no serving run to compare with"))
    elif serving["run_id"] == run["id"]:
        result.serving = {"deployment": serving["id"], "run_id": serving["run_id"], "value": cand["value"]}
        result.checks.append(Check("not worse than the serving run", True,
                                   f"{spec} is the serving run itself (a new threshold or fallback)"))
    else:
        old_out, _ = scorer.answers(by[specs[-2]], None)
        new, old, p = scorer.score(alone), scorer.score(old_out), scorer.paired(alone, old_out)
        lo, hi = p["ci95"]
        result.serving = {"deployment": serving["id"], "run_id": serving["run_id"], "value": old["value"],
                          "ci95": old["ci95"], "difference": p["difference"], "difference_ci95": [lo, hi]}
        ok = lo >= -margin
        result.checks.append(Check(
            "not worse than the serving run", ok,
            f"{spec} scores {metric} {pct(new['value'])} against {pct(old['value'])} for the serving "
            f"run:{serving['run_id']}, each answering all {report.rows:,} rows: "
            f"{100 * p['difference']:+.1f} points (paired 95% CI {100 * lo:+.1f} to {100 * hi:+.1f}); the gate "
            f"allows no lower bound under {-100 * margin:.1f}" + ("" if ok else ": it may be worse")))
    if bar is not None:
        result.bar = {"stated": True, "bar": bar, **({"reference": ref["reference"], "value": ref["value"]} if ref
                                                     else {})}
        ok = cand["value"] >= bar
        result.checks.append(Check("clears the bar", ok, f"{what} scores {pct(cand['value'])}; the bar, as stated "
                                   f"(--bar), is {pct(bar)}" + ("" if ok else ": it falls short")))
    elif ref is None:
        result.checks.append(Check("clears the bar", False,
                                   f"the bar is unknown: no reference (frontier) bench on dataset {ds.id}; bench it "
                                   f"first (`protege bench {task.path or 'TASK_FILE'} -c replay -c {spec}`), or "
                                   "state one (--bar)"))
    else:
        value = ref["value"]
        result.bar = {**ref, "tolerance": tolerance, "bar": value - tolerance}
        ok = cand["value"] >= value - tolerance
        result.checks.append(Check(
            "clears the bar", ok,
            f"{what} scores {pct(cand['value'])}; the bar is {pct(value - tolerance)} ({ref['reference']}'s "
            f"{pct(value)} less the {100 * tolerance:.0f}-point tolerance)" + ("" if ok else ": it falls short")))
    return result


def _reference_answers(store: Store, task: Task, ds: Dataset, now: CandidateResult | None,
                       bench_run: str) -> list[str] | None:
    """The reference's answers on every test row, mapped: benched just now, or from its stored
    bench (None when that bench did not cover every row)."""
    if now is not None:
        return map_labels(task, [p.output for p in now.outputs])[0]
    from ..runs.registry import get_run

    stored = bench_outputs(get_run(store, bench_run, kind="bench"))
    rows = ds.split("test")
    if not all(r["id"] in stored for r in rows):
        return None
    return map_labels(task, [stored[r["id"]]["output"] for r in rows])[0]
