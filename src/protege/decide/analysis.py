"""The train-or-not decision, computed from what the store holds for a task: the newest bench
result of every candidate on the task's dataset, the training runs behind the specialists,
and the newest learning curve. `protege decide` calls `decide()`; report.py renders its result.

Every figure is measured or computed from stated inputs (the price table and its date,
the hardware price per hour, the monthly volume given); what cannot be known is None and
shown as "unknown" with the reason. The steps live in their own modules: evidence.py (reading
the store), economics.py, curve_fit.py, risk.py and verdict.py.
"""

from __future__ import annotations

from pathlib import Path

from ..tasks.spec import Task
from ..traces.store import Store
from .economics import economics_of
from .evidence import decision_history, gather, latest_curve, not_benched
from .formatting import pct
from .risk import risk_of
from .types import Decision, Inputs
from .verdict import recommend

__all__ = ["Decision", "Inputs", "decide", "reference_status", "student_notes"]


def decide(store: Store, task: Task, inputs: Inputs, *, dataset: str | None = None, prices=None,
           home: Path | None = None) -> Decision:
    """The decision for `task` on `dataset` (TASK@VERSION; default the task's newest dataset)."""
    from ..datasets.registry import get_dataset

    ds = get_dataset(store, dataset or task.name)
    ev = gather(store, task, ds, inputs, prices=prices, home=home)
    notes = student_notes(ev.candidates, ev.metric) + list(ev.notes) + not_benched(ev, ds.id)
    curve = latest_curve(store, task.name, ds.id)
    if curve is None:
        notes.append(f"no learning curve yet: run `protege curve {task.path or 'TASK_FILE'} --base MODEL --method M` "
                     "to see whether more traces would help")
    economics = economics_of(ev.candidates, inputs)
    risk = risk_of(ev.candidates, ev.metric)
    status, warnings = reference_status(task, ev.candidates, ev.metric, ev.test_rows)
    rec = recommend(ev.candidates, ev.metric, inputs, economics, curve, risk, status)
    return Decision(task=task.name, dataset=ds.id, metric=ev.metric, test_rows=ev.test_rows,
                    reference=ev.reference, inputs=inputs, candidates=ev.candidates, curve=curve,
                    economics=economics, risk=risk, verdict=rec.verdict, run=rec.run, reasons=rec.reasons,
                    reference_status=status, warnings=warnings, prices_as_of=ev.prices_as_of, notes=notes,
                    history=decision_history(store, task.name))


HOW_TO_MEASURE = ("To measure the frontier, give protege its own answers: import its recorded replies with your "
                  "human labels attached as trace feedback (`\"feedback\": {\"correction\": LABEL}` on each line; "
                  "task `references: feedback`), or bench it live as a candidate (`-c openai:MODEL@URL`).")


def reference_status(task: Task, candidates, metric: str, rows: int) -> tuple[str, list[str]]:
    """Whether the reference was measured, and what the reader must know first."""
    ref = next(c for c in candidates if c.role == "reference")
    if task.references == "frontier":
        return "agreement", [f"Scores are agreement with {ref.spec}'s recorded replies (task `references: frontier`), "
                             f"not correctness: {ref.spec} scores 100% by definition and its own error rate is "
                             "unknown. " + HOW_TO_MEASURE]
    if ref.quality[metric]["value"] >= 1.0 - 1e-12:
        return "by construction", [f"{ref.spec} agrees with the benchmark's references on all {rows:,} test rows: its "
                                   "outputs are the references themselves (a labelled test file whose replies are "
                                   "the labels, say), so the frontier model was not measured and no verdict is "
                                   "given. " + HOW_TO_MEASURE]
    return "measured", []


def student_notes(candidates, metric: str) -> list[str]:
    """What distillation from the logs inherits: each student (taught only by recorded
    replies, scored out of fold) beside its teacher and the best specialist trained on labels."""
    ref = next(c for c in candidates if c.role == "reference")
    specs = [c for c in candidates if c.role == "specialist"]
    best = max(specs, key=lambda c: c.quality[metric]["value"], default=None)
    out = []
    for s in (c for c in candidates if c.role == "student"):
        p = s.paired.get(metric) or {}
        diff = p.get("difference")
        vs = ("" if diff is None else f", {100 * diff:+.1f} points against {ref.spec} ({pct(ref.quality[metric]['value'])}; "
              f"95% CI {100 * p['ci95'][0]:+.1f} to {100 * p['ci95'][1]:+.1f})")
        out.append(f"distillation from the logs: {s.spec}, taught only by recorded model replies (no human label, "
                   f"scored out of fold), reaches {metric} {pct(s.quality[metric]['value'])}{vs}"
                   + (f"; {best.spec}, trained on the labelled data, reaches {pct(best.quality[metric]['value'])}"
                      if best else "") + ". A student learns its teacher's mistakes along with its answers.")
    return out
