"""The learning curve's power law: fit error(n) = a * n^-b through a curve's points and read
off what more training rows would buy, each with a 95% interval from a parametric bootstrap.
Pure arithmetic on the points; reading the curve run from the store is evidence.py's job.
"""

from __future__ import annotations

import math

import numpy as np


def fit_power_law(points: list[dict], draws: int = 2000, seed: int = 0) -> dict | None:
    """error(n) = a * n^-b through the curve's points (weighted least squares in log-log),
    with a parametric bootstrap over each point's CI for the uncertainty."""
    pts = [p for p in points if p["train_rows"] > 0 and p["value"] is not None]
    if len(pts) < 2 or len({p["train_rows"] for p in pts}) < 2:
        return None
    n = np.array([p["train_rows"] for p in pts], dtype=float)
    v = np.array([p["value"] for p in pts], dtype=float)
    sd = np.array([max((p["ci95"][1] - p["ci95"][0]) / 3.92, 1e-4) for p in pts])

    def fit(values):
        err = np.clip(1 - values, 1e-4, 1)
        x, y = np.log(n), np.log(err)
        w = 1 / np.maximum(sd / err, 1e-3) ** 2  # the sd of log(err) is about sd / err
        A = np.vstack([np.ones_like(x), x]).T * np.sqrt(w)[:, None]
        coef, *_ = np.linalg.lstsq(A, y * np.sqrt(w), rcond=None)
        return math.exp(coef[0]), -coef[1]

    a, b = fit(v)
    rng = np.random.default_rng(seed)
    boot = [fit(np.clip(v + rng.normal(0, sd), 0, 1)) for _ in range(draws)]
    top = float(n.max())

    def project(mult):
        vals = np.array([1 - aa * (top * mult) ** -bb for aa, bb in boot])
        return {"n": top * mult, "value": 1 - a * (top * mult) ** -b,
                "ci95": [float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))]}

    return {"a": a, "b": b, "b_ci95": [float(np.percentile([x[1] for x in boot], 2.5)),
                                       float(np.percentile([x[1] for x in boot], 97.5))],
            "n_max": top, "at_2x": project(2), "at_10x": project(10), "_boot": boot}


def rows_to_reach(fit: dict, target: float) -> dict:
    """Train rows at which the fitted curve reaches `target` quality (with a 95% interval)."""
    def need(a, b):
        if target >= 1 or b <= 0:
            return math.inf
        log_rows = math.log(a / (1 - target)) / b
        return math.exp(log_rows) if log_rows < 700 else math.inf

    est = need(fit["a"], fit["b"])
    draws = np.array([need(a, b) for a, b in fit["_boot"]])
    finite = draws[np.isfinite(draws)]
    lo = float(np.percentile(draws, 2.5)) if len(finite) else math.inf
    hi = float(np.percentile(draws, 97.5)) if len(finite) > 0.975 * len(draws) else math.inf
    return {"target": target, "rows": est, "ci95": [lo, hi], "more": max(0.0, est - fit["n_max"])}
