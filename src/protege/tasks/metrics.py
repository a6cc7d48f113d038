"""Metrics: per-task scores of candidate outputs against references.

Each metric scores a whole set of (prediction, reference) pairs, so the bench can bootstrap
any of them (macro-F1 is not a mean of per-example scores). Metrics that are means also
expose per-example scores for paired tests. chrF and ROUGE-L come from sacrebleu and
rouge-score; the rest are a few lines each, checked against hand-computed values in tests.
"""

from __future__ import annotations

import importlib
import re
import string
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import orjson

from ..errors import ProtegeError
from .spec import Normalize

_PUNCT = str.maketrans("", "", string.punctuation)
_WS = re.compile(r"\s+")


def normalize_text(text: str | None, cfg: Normalize) -> str:
    if text is None:
        return ""
    if cfg.strip:
        text = text.strip()
    if cfg.lowercase:
        text = text.lower()
    if cfg.strip_punctuation:
        text = text.translate(_PUNCT)
    if cfg.collapse_whitespace:
        text = _WS.sub(" ", text).strip()
    return text


class LabelMap:
    """An output text as one of the task's labels: exact, else case-insensitive, else None."""

    def __init__(self, labels: list[str]):
        self.exact = set(labels)
        self.folded = {label.casefold(): label for label in labels}

    def __call__(self, text: str) -> str | None:
        if text in self.exact:
            return text
        return self.folded.get(text.casefold())


def map_labels(task, outputs: list[str]) -> tuple[list[str], float | None]:
    """A classification task's outputs mapped onto its labels (an output that is no label
    stays as it is, and scores as wrong), with the share that were labels; other tasks'
    outputs unchanged, with None."""
    if task.kind != "classification":
        return outputs, None
    to_label = LabelMap(task.labels)
    labels = [to_label(o) for o in outputs]
    valid = sum(1 for label in labels if label is not None) / len(labels) if labels else None
    return [label if label is not None else o for label, o in zip(labels, outputs)], valid


@dataclass(frozen=True)
class Metric:
    name: str
    per_example: Callable[[Sequence[str], Sequence[str]], np.ndarray] | None
    """Scores in [0, 1] per example, when the metric is their mean."""
    aggregate: Callable[[Sequence[str], Sequence[str]], float] | None = None
    """For metrics that are not a mean (macro-F1)."""
    resampled: Callable[[Sequence[str], Sequence[str], np.ndarray], np.ndarray] | None = None
    """The metric of every bootstrap resample at once (rows of row indices), where a metric
    that is not a mean has a fast way to compute it; the bench uses it for its CIs."""

    def score(self, preds: Sequence[str], refs: Sequence[str]) -> float:
        if self.aggregate is not None:
            return self.aggregate(preds, refs)
        return float(np.mean(self.per_example(preds, refs))) if len(preds) else float("nan")


def _exact(preds, refs) -> np.ndarray:
    return np.array([p == r for p, r in zip(preds, refs)], dtype=float)


def macro_f1(preds: Sequence[str], refs: Sequence[str]) -> float:
    """Unweighted mean of per-class F1 over the classes present in the references or predictions."""
    if not len(preds):
        return float("nan")
    return float(macro_f1_resampled(preds, refs, np.arange(len(preds))[None, :])[0])


def macro_f1_resampled(preds: Sequence[str], refs: Sequence[str], idx: np.ndarray) -> np.ndarray:
    """macro-F1 of each resample (a row of `idx` holds row indices), counted for all resamples
    at once: per class, F1 = 2 TP / (predicted + true), over the classes each resample holds."""
    index: dict = {}
    p = np.array([index.setdefault(x, len(index)) for x in preds], dtype=np.int64)
    r = np.array([index.setdefault(x, len(index)) for x in refs], dtype=np.int64)
    k, resamples = len(index), idx.shape[0]
    offsets = (np.arange(resamples, dtype=np.int64) * k)[:, None]

    def counts(codes: np.ndarray, keep: np.ndarray | None = None) -> np.ndarray:
        flat = codes[idx] + offsets
        if keep is not None:
            flat = flat[keep[idx]]
        return np.bincount(flat.ravel(), minlength=resamples * k).reshape(resamples, k)

    predicted, true, tp = counts(p), counts(r), counts(r, p == r)
    denom = predicted + true
    present = denom > 0
    f1 = np.where(present, 2 * tp / np.maximum(denom, 1), 0.0)
    return f1.sum(axis=1) / np.maximum(present.sum(axis=1), 1)


def _chrf(preds, refs) -> np.ndarray:
    from sacrebleu.metrics import CHRF

    chrf = CHRF()
    return np.array([chrf.sentence_score(p, [r]).score / 100 for p, r in zip(preds, refs)])


def _rouge_l(preds, refs) -> np.ndarray:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return np.array([scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(preds, refs)])


def parse_json(text: str) -> Any:
    """The JSON object in a model's output (a ```json fence around it is allowed), or raise ValueError."""
    t = text.strip()
    if t.startswith("```"):
        t = t.strip("`")
        t = t[4:] if t.startswith("json") else t
    return orjson.loads(t)


def _json_valid(preds, refs) -> np.ndarray:
    out = []
    for p in preds:
        try:
            out.append(isinstance(parse_json(p), dict))
        except ValueError:
            out.append(False)
    return np.array(out, dtype=float)


def _flatten(obj: Any, prefix: str = "") -> set[tuple[str, str]]:
    if isinstance(obj, dict):
        items: set[tuple[str, str]] = set()
        for k, v in obj.items():
            items |= _flatten(v, f"{prefix}.{k}" if prefix else str(k))
        return items
    if isinstance(obj, list):
        return {(prefix + "[]", orjson.dumps(v, option=orjson.OPT_SORT_KEYS).decode()) for v in obj}
    return {(prefix, orjson.dumps(obj).decode())}


def _field_f1(preds, refs) -> np.ndarray:
    """Per example: F1 over (field path, value) pairs of the predicted vs reference JSON;
    an unparseable prediction scores 0."""
    out = []
    for p, r in zip(preds, refs):
        try:
            ref = _flatten(parse_json(r))
        except ValueError:
            raise ProtegeError(f"a reference output is not JSON: {r[:80]!r}") from None
        try:
            pred = _flatten(parse_json(p))
        except ValueError:
            out.append(0.0)
            continue
        if not ref and not pred:
            out.append(1.0)
            continue
        tp = len(ref & pred)
        out.append(2 * tp / (len(ref) + len(pred)) if (ref or pred) else 0.0)
    return np.array(out)


BUILTIN: dict[str, Metric] = {
    "accuracy": Metric("accuracy", _exact),
    "exact_match": Metric("exact_match", _exact),
    "macro_f1": Metric("macro_f1", None, macro_f1, macro_f1_resampled),
    "chrf": Metric("chrf", _chrf),
    "rouge_l": Metric("rouge_l", _rouge_l),
    "json_valid": Metric("json_valid", _json_valid),
    "field_f1": Metric("field_f1", _field_f1),
}


def get_metric(name: str) -> Metric:
    """A built-in metric by name, or a user function `package.module:function` that takes
    (prediction, reference) strings and returns a score in [0, 1]."""
    if name in BUILTIN:
        return BUILTIN[name]
    if ":" not in name:
        raise ProtegeError(f"unknown metric {name!r}: use one of {', '.join(BUILTIN)}, 'judge', "
                           "or your own function as package.module:function")
    module_name, func_name = name.split(":", 1)
    try:
        func = getattr(importlib.import_module(module_name), func_name)
    except (ImportError, AttributeError) as exc:
        raise ProtegeError(f"metric {name!r}: cannot import {func_name} from {module_name}: {exc}") from None

    def per_example(preds, refs):
        return np.array([float(func(p, r)) for p, r in zip(preds, refs)])

    return Metric(name, per_example)
