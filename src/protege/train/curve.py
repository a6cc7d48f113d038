"""Learning curves: the same method trained on nested subsets of the train split, each
scored on the frozen benchmark. Stored as a `curve` run for the decision stage.

    protege curve examples/banking77/task.yaml --base minilm --method classifier --fractions 0.1,0.25,0.5,1.0
"""

from __future__ import annotations

from pathlib import Path

from ..datasets.registry import Dataset
from ..errors import ProtegeError
from ..runs.registry import create_run, get_run, list_runs
from ..tasks.spec import Task
from ..traces.store import Store


def parse_fractions(text: str) -> list[float]:
    try:
        values = sorted({float(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise ProtegeError(f"--fractions {text!r}: write comma-separated numbers, e.g. 0.1,0.25,0.5,1.0") from None
    if not values or any(not 0 < v <= 1 for v in values):
        raise ProtegeError(f"--fractions {text!r}: each fraction must be in (0, 1]")
    return values


def reusable_run(store: Store, task: str, dataset_id: str, base: str, method: str, recipe,
                 fraction: float) -> str | None:
    """A finished training run with exactly this base, method, recipe, dataset and train share
    (the full run a specialist came from is the curve's 100% point): trained once, used again."""

    want = recipe.model_dump()
    for r in list_runs(store, task=task, kind="train", limit=1000):
        cfg = r["config"] or {}
        share = cfg.get("train_fraction") or 1.0
        if (r["status"] == "done" and r["dataset_id"] == dataset_id and cfg.get("base") == base
                and cfg.get("method") == method and cfg.get("recipe") == want and abs(share - fraction) < 1e-9
                and not cfg.get("time_budget_min")):
            return r["id"]
    return None


def learning_curve(store: Store, task: Task, dataset: Dataset, home: Path, base: str, method: str, recipe,
                   fractions: list[float], *, limit: int | None = None, console=None, on_point=None) -> dict:
    from ..bench.run import run_bench
    from .api import train

    metric = task.metric_names[0]
    points = []
    for fraction in fractions:
        run_id = reusable_run(store, task.name, dataset.id, base, method, recipe, fraction) or \
            train(store, task, dataset, home, base, method, recipe, console=console, train_fraction=fraction)
        run = get_run(store, run_id)
        report = run_bench(store, task, dataset, home, [f"run:{run_id}"], limit=limit, latency_samples=1,
                           tag="curve")
        m = report.results[0].metrics[metric]
        point = {"fraction": fraction, "train_rows": run["metrics"]["train_rows"], "run_id": run_id,
                 "metric": metric, "value": m["value"], "ci95": m["ci95"], "test_rows": report.rows,
                 "train_wall_s": run["metrics"]["wall_s"]}
        points.append(point)
        if on_point:
            on_point(point)
    curve_id = create_run(store, kind="curve", task=task.name, status="done",
                          config={"method": method, "base": base, "fractions": fractions,
                                  "recipe": recipe.model_dump(), "dataset": dataset.id, "test_rows": limit},
                          base_model=base, dataset_id=dataset.id, metrics={"metric": metric, "points": points})
    return {"id": curve_id, "metric": metric, "points": points}
