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
from .evidence import gather, latest_curve, not_benched
from .risk import risk_of
from .types import Decision, Inputs
from .verdict import recommend

__all__ = ["Decision", "Inputs", "decide", "reference_status"]


def decide(store: Store, task: Task, inputs: Inputs, *, dataset: str | None = None, prices=None,
           home: Path | None = None) -> Decision:
    """The decision for `task` on `dataset` (TASK@VERSION; default the task's newest dataset)."""
    from ..datasets.registry import get_dataset

    ds = get_dataset(store, dataset or task.name)
    ev = gather(store, task, ds, inputs, prices=prices, home=home)
    notes = list(ev.notes) + not_benched(store, task.name, ds.id, ev.candidates)
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
                    reference_status=status, warnings=warnings, prices_as_of=ev.prices_as_of, notes=notes)


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
