"""`protege route calibrate`: the cascade threshold that reaches a target quality.

On the validation split, the specialist answers every row with a confidence. Sending the
rows below a threshold to the fallback gives, for each threshold, a coverage (the share the
specialist keeps), the quality of the answers it keeps, and the quality the client gets:

    cascade = coverage x kept quality + (1 - coverage) x fallback quality

The fallback's quality defaults to 1.0: a dataset's references are the frontier model's
own outputs, so on them the fallback is right by definition; pass the fallback's measured
bench score instead when the references are human labels. The threshold picked is the
lowest (the most traffic on the specialist) whose cascade quality reaches the target.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import ProtegeError
from ..tasks.metrics import get_metric
from ..tasks.spec import Task


def calibrate(store, task: Task, home: Path, run: str, *, target: float, fallback_quality: float = 1.0,
              dataset: str | None = None, limit: int | None = None) -> dict:
    from ..bench.run import sample_rows
    from ..datasets.registry import get_dataset
    from ..models.base import Context
    from ..models.registry import build_candidate
    from ..tasks.metrics import map_labels

    ds = get_dataset(store, dataset or task.name)
    rows = sample_rows(ds.split("validation"), limit)
    if not rows:
        raise ProtegeError(f"dataset {ds.id} has no validation rows to calibrate on")
    spec = run if run.startswith("run:") else f"run:{run}"
    cand = build_candidate(spec, Context(task=task, dataset=ds, home=Path(home), store=store))
    try:
        preds = cand.predict(rows)
    finally:
        cand.close()
    if any(p.confidence is None for p in preds):
        raise ProtegeError(f"{spec} gives no confidence with its answers (generation tasks have none); "
                           "the cascade needs one")
    metric = get_metric(task.metric_names[0])
    if metric.per_example is None:
        metric = get_metric("exact_match")
    outputs, _ = map_labels(task, [p.output for p in preds])
    scores = metric.per_example(outputs, [r["reference"] for r in rows])
    conf = np.array([p.confidence for p in preds])
    order = np.argsort(-conf)
    conf_sorted, scores_sorted = conf[order], scores[order]
    n = len(rows)
    curve = []
    for k in range(n, 0, -1):  # keep the k most confident rows
        kept = scores_sorted[:k].mean()
        coverage = k / n
        curve.append({"threshold": float(conf_sorted[k - 1]), "coverage": coverage, "kept_quality": float(kept),
                      "cascade_quality": float(coverage * kept + (1 - coverage) * fallback_quality)})
    curve.append({"threshold": float(conf_sorted[0]) + 1e-9, "coverage": 0.0, "kept_quality": None,
                  "cascade_quality": fallback_quality})
    reaching = [c for c in curve if c["cascade_quality"] >= target]
    pick = reaching[0] if reaching else None  # curve runs from full coverage down: the first is the lowest threshold
    return {"run": spec, "dataset": ds.id, "rows": n, "metric": metric.name, "target": target,
            "fallback_quality": fallback_quality, "specialist_alone": float(scores.mean()),
            "threshold": pick["threshold"] if pick else None, "coverage": pick["coverage"] if pick else None,
            "cascade_quality": pick["cascade_quality"] if pick else None, "curve": curve}


def summary_points(curve: list[dict], steps=(1.0, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)) -> list[dict]:
    """The curve at round coverage levels, for a table."""
    out = []
    for s in steps:
        best = min(curve, key=lambda c: abs(c["coverage"] - s))
        if best not in out:
            out.append(best)
    return out
