"""The promotion gate: a run is deployed only if, on the task's frozen benchmark, it is not
significantly worse than the run serving now and it clears the decision's quality bar.

    protege deploy TASK_FILE run:ID [--margin 0.01] [--tolerance 0.02] [--force]

Both runs are benched together on the same test rows (a bench tagged `gate`, which `decide`
leaves out of its evidence). The checks:

- **not worse than the serving run**: the paired bootstrap 95% CI of (candidate - serving) on
  the task's first metric must not reach below `-margin` (a non-inferiority margin, 1 point
  by default). The first deployment of a task has nothing to compare with and passes.
- **clears the bar**: the candidate scores at least the decision's reference (the frontier
  model, from the newest bench that named it) less `tolerance`. Without a benched reference
  the bar is unknown, and an unknown figure never passes.

`--force` deploys anyway, and the deployment records that it was forced and what failed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..bench.run import run_bench
from ..datasets.registry import Dataset
from ..decide.evidence import decision_benches
from ..decide.formatting import pct
from ..errors import ProtegeError
from ..models.trained import finished_run_model
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

    @property
    def passed(self) -> bool:
        return all(c.ok for c in self.checks)

    def evidence(self) -> dict:
        return {"dataset": self.dataset, "rows": self.rows, "metric": self.metric, "candidate": self.candidate,
                "serving": self.serving, "bar": self.bar, "margin": self.margin, "passed": self.passed,
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


def gate(store: Store, task: Task, ds: Dataset, home: Path, run_id: str, *, margin: float = 0.01,
         tolerance: float = 0.02, latency_samples: int = 5, prices=None, progress=None) -> GateResult:
    """Bench the candidate beside the serving run and check both conditions."""
    run, _, _ = finished_run_model(store, run_id)
    if run["task"] != task.name:
        raise ProtegeError(f"run {run['id']} was trained for task {run['task']!r}, not {task.name!r}")
    metric = next((m for m in task.metric_names if m != "judge"), None)
    if metric is None:
        raise ProtegeError(f"task {task.name} has no metric the gate can compare runs on (judge needs a judge model)")
    serving = current(store, task.name)
    spec = f"run:{run['id']}"
    specs = [spec] if serving is None or serving["run_id"] == run["id"] else [f"run:{serving['run_id']}", spec]
    report = run_bench(store, task, ds, home, specs, reference=specs[0], latency_samples=latency_samples,
                       prices=prices, tag="gate", progress=progress)
    by = {r.spec: r for r in report.results}
    cand = by[spec].metrics[metric]
    result = GateResult(run_id=run["id"], dataset=ds.id, rows=report.rows, metric=metric,
                        candidate={"value": cand["value"], "ci95": cand["ci95"]}, serving=None, bar=None,
                        margin=margin)
    if serving is None:
        result.checks.append(Check("not worse than the serving run", True,
                                   f"the first deployment of task {task.name}: no serving run to compare with"))
    elif serving["run_id"] == run["id"]:
        result.serving = {"deployment": serving["id"], "run_id": serving["run_id"], "value": cand["value"]}
        result.checks.append(Check("not worse than the serving run", True,
                                   f"{spec} is the serving run itself (a new threshold or fallback)"))
    else:
        old = by[specs[0]].metrics[metric]
        p = by[spec].paired[metric]
        lo, hi = p["ci95"]
        result.serving = {"deployment": serving["id"], "run_id": serving["run_id"], "value": old["value"],
                          "ci95": old["ci95"], "difference": p["difference"], "difference_ci95": [lo, hi]}
        ok = lo >= -margin
        result.checks.append(Check(
            "not worse than the serving run", ok,
            f"{spec} scores {metric} {pct(cand['value'])} against {pct(old['value'])} for the serving "
            f"run:{serving['run_id']} on the same {report.rows:,} rows: {100 * p['difference']:+.1f} points "
            f"(paired 95% CI {100 * lo:+.1f} to {100 * hi:+.1f}); the gate allows no lower bound under "
            f"{-100 * margin:.1f}" + ("" if ok else ": it may be worse")))
    ref = reference_score(store, task, ds, metric)
    if ref is None:
        result.checks.append(Check("clears the bar", False,
                                   f"the bar is unknown: no reference (frontier) bench on dataset {ds.id}; bench it "
                                   f"first (`protege bench {task.path or 'TASK_FILE'} -c replay -c {spec}`)"))
    else:
        bar = ref["value"] - tolerance
        result.bar = {**ref, "tolerance": tolerance, "bar": bar}
        ok = cand["value"] >= bar
        result.checks.append(Check(
            "clears the bar", ok,
            f"{spec} scores {pct(cand['value'])}; the bar is {pct(bar)} ({ref['reference']}'s {pct(ref['value'])} "
            f"less the {100 * tolerance:.0f}-point tolerance)" + ("" if ok else ": it falls short")))
    return result
