"""`protege monitor TASK_FILE`: the health of the task's active deployment, from the store.

Every server following the deployment stores its traces in the same store, so the figures
cover all of them: requests served since the deployment began, who answered (specialist or
fallback), the fallback rate, latency, the shadow agreement with its Wilson 95% CI (overall
and per label), what the requests the specialist answered would have cost at the frontier
(priced from the frontier's own recorded usage and the dated price table), and the alarm in
force with its reason. Drift statistics live in each server; `--server URL` reads them from
one server's `/metrics`.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from ..errors import ProtegeError
from ..models.base import parse_spec
from ..serve.shadow import agreement_of
from ..traces.store import Store
from .registry import current


def health(store: Store, task: str, prices=None, limit: int = 1_000_000, traces: list[dict] | None = None) -> dict:
    """The figures of the active deployment of `task` (at most `limit` traces read).

    `traces`: the task's traces the caller has read already, oldest first, every one since
    some moment before the deployment began; those since it began are used, none read again."""
    d = current(store, task)
    if d is None:
        raise ProtegeError(f"task {task} has no active deployment: `protege deploy TASK_FILE run:ID` makes one")
    served, shadows = [], []
    since = store.iter_traces(task=task, after=d["id"]) if traces is None else (t for t in traces if t["id"] > d["id"])
    for i, t in enumerate(since):
        if i >= limit:
            break
        meta = t.get("metadata") or {}
        if t["source"] == "serve" and meta.get("deployment") == d["id"]:
            served.append(t)
        elif t["source"] == "shadow":
            shadows.append(t)
    ids = {t["id"] for t in served}
    shadows = [t for t in shadows if (t.get("metadata") or {}).get("shadow_of") in ids]
    who = Counter((t.get("metadata") or {}).get("answered_by") or "unknown" for t in served)
    ok = [t for t in served if t["status"] == "ok"]
    lat = [t["latency_ms"] for t in ok if t.get("latency_ms") is not None]
    compared = [t for t in shadows if (t.get("metadata") or {}).get("agrees") is not None]
    a = agreement_of([(t["metadata"].get("specialist_answer") or "?", t["metadata"]["agrees"]) for t in compared])
    n = len(served)
    return {
        "task": task, "deployment": d["id"], "run_id": d["run_id"], "since": str(d["created_at"]),
        "threshold": d["threshold"], "fallback": d["fallback"], "alarm": d["alarm"],
        "requests": n, "errors": n - len(ok), "answered_by": dict(who),
        "fallback_rate": who.get("fallback", 0) / n if n else None,
        "latency_ms": ({"p50": float(np.percentile(lat, 50)), "p95": float(np.percentile(lat, 95)), "n": len(lat)}
                       if lat else None),
        "shadow": {"compared": a["n"], "errors": len(shadows) - len(compared), "agreement": a["value"],
                   "ci95": a["ci95"], "per_label": {k: {"n": v["n"], "agreement": v["value"], "ci95": v["ci95"]}
                                                    for k, v in a["per_label"].items()}},
        "frontier_cost": _frontier_cost(d, served, shadows, who.get("specialist", 0), prices),
    }


def _frontier_cost(d: dict, served: list[dict], shadows: list[dict], specialist_answers: int, prices) -> dict:
    """What the specialist's answers would have cost at the frontier: the frontier's mean
    usage per request, measured on its own answers (fallback and shadow), at the price table."""
    model = None
    if d["fallback"]:
        _, rest, _ = parse_spec(d["fallback"])
        model = rest.split("@", 1)[0] or None
    frontier = [t for t in served if (t.get("metadata") or {}).get("answered_by") == "fallback"] + shadows
    usage = [(t["prompt_tokens"], t["completion_tokens"]) for t in frontier
             if t.get("prompt_tokens") is not None and t.get("completion_tokens") is not None]
    model = model or next((t["model"] for t in frontier if t.get("model")), None)
    price = prices.lookup(model) if (prices is not None and model) else None
    if price is None or not usage:
        why = ("no frontier answer with token usage recorded yet" if not usage else
               f"{model or 'the frontier model'} is not in the price table")
        return {"per_request_usd": None, "saved_usd": None, "basis": f"unknown ({why})"}
    per = float(np.mean([price.cost(a, b) for a, b in usage]))
    return {"per_request_usd": per, "saved_usd": per * specialist_answers,
            "basis": (f"{model} at the price table's {price.as_of} prices x its measured usage on {len(usage):,} "
                      f"of its own answers; the specialist's own (hardware) cost not subtracted")}
