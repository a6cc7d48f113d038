"""Bootstrap confidence intervals and paired tests for benchmark metrics.

Percentile bootstrap over test rows (Efron & Tibshirani 1993): resample rows with
replacement, recompute the metric on each resample, take the 2.5th and 97.5th percentiles.
Paired comparisons resample the same rows for both candidates (Koehn 2004, "Statistical
significance tests for machine translation evaluation"), so the difference's interval
accounts for the rows being shared.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from ..tasks.metrics import Metric


@dataclass
class Estimate:
    value: float
    low: float
    high: float
    n: int

    def as_dict(self) -> dict:
        return {"value": self.value, "ci95": [self.low, self.high], "n": self.n}


@dataclass
class PairedTest:
    difference: float
    """candidate minus reference"""
    low: float
    high: float
    p_value: float
    """two-sided: how often the resampled difference falls on the other side of zero, doubled"""

    def as_dict(self) -> dict:
        return {"difference": self.difference, "ci95": [self.low, self.high], "p_value": self.p_value}


def _resample_scores(metric: Metric, preds: Sequence[str], refs: Sequence[str],
                     idx: np.ndarray) -> np.ndarray:
    if metric.per_example is not None:
        per = metric.per_example(preds, refs)
        return per[idx].mean(axis=1)
    if metric.resampled is not None:
        return metric.resampled(preds, refs, idx)
    p, r = np.asarray(preds, dtype=object), np.asarray(refs, dtype=object)
    return np.array([metric.aggregate(list(p[i]), list(r[i])) for i in idx])


def _indices(n: int, resamples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def bootstrap(metric: Metric, preds: Sequence[str], refs: Sequence[str], resamples: int = 1000,
              seed: int = 0) -> Estimate:
    n = len(preds)
    value = metric.score(preds, refs)
    if n < 2:
        return Estimate(value, float("nan"), float("nan"), n)
    scores = _resample_scores(metric, preds, refs, _indices(n, resamples, seed))
    low, high = np.percentile(scores, [2.5, 97.5])
    return Estimate(value, float(low), float(high), n)


def paired(metric: Metric, preds: Sequence[str], ref_preds: Sequence[str], refs: Sequence[str],
           resamples: int = 1000, seed: int = 0) -> PairedTest:
    n = len(preds)
    diff = metric.score(preds, refs) - metric.score(ref_preds, refs)
    if n < 2:
        return PairedTest(diff, float("nan"), float("nan"), float("nan"))
    idx = _indices(n, resamples, seed)
    d = _resample_scores(metric, preds, refs, idx) - _resample_scores(metric, ref_preds, refs, idx)
    low, high = np.percentile(d, [2.5, 97.5])
    if np.all(d == 0):
        p = 1.0
    else:
        p = float(min(1.0, 2 * min(np.mean(d <= 0), np.mean(d >= 0))))
    return PairedTest(diff, float(low), float(high), p)


def quantiles(values: Sequence[float], qs: Sequence[float] = (50, 95)) -> list[float | None]:
    if not len(values):
        return [None for _ in qs]
    return [float(x) for x in np.percentile(np.asarray(values, dtype=float), qs)]


Scorer = Callable[[Sequence[str], Sequence[str]], float]
