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
from .evidence import gather, latest_curve
from .risk import risk_of
from .types import Decision, Inputs
from .verdict import recommend

__all__ = ["Decision", "Inputs", "decide"]


def decide(store: Store, task: Task, inputs: Inputs, *, dataset: str | None = None, prices=None,
           home: Path | None = None) -> Decision:
    """The decision for `task` on `dataset` (TASK@VERSION; default the task's newest dataset)."""
    from ..datasets.registry import get_dataset

    ds = get_dataset(store, dataset or task.name)
    ev = gather(store, task, ds, inputs, prices=prices, home=home)
    notes = list(ev.notes)
    curve = latest_curve(store, task.name, ds.id)
    if curve is None:
        notes.append(f"no learning curve yet: run `protege curve {task.path or 'TASK_FILE'} --base MODEL --method M` "
                     "to see whether more traces would help")
    economics = economics_of(ev.candidates, inputs)
    risk = risk_of(ev.candidates, ev.metric)
    verdict, reasons = recommend(ev.candidates, ev.metric, inputs, economics, curve, risk)
    return Decision(task=task.name, dataset=ds.id, metric=ev.metric, test_rows=ev.test_rows,
                    reference=ev.reference, inputs=inputs, candidates=ev.candidates, curve=curve,
                    economics=economics, risk=risk, verdict=verdict, reasons=reasons,
                    prices_as_of=ev.prices_as_of, notes=notes)
