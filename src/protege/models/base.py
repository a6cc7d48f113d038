"""The Candidate protocol: what every backend implements, and what it is given.

A candidate is anything that answers a task's inputs (`predict`). It is addressed by a
spec string, `SCHEME:REST[?key=value&...]`; models/registry.py maps schemes to the
backends that build candidates. This module imports no backend.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol
from urllib.parse import parse_qsl

from ..datasets.registry import Dataset
from ..errors import ProtegeError
from ..tasks.spec import Task


@dataclass
class Prediction:
    output: str
    confidence: float | None = None
    """The model's probability of this output (classification), when it has one."""
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    latency_ms: float | None = None
    """Measured for this request alone (API calls; replayed traces), else None."""
    cost_usd: float | None = None
    cached: bool = False
    error: str | None = None
    label_probs: dict[str, float] | None = None
    """Classification candidates that score every label: the probability of each."""


def label_prediction(labels: list[str], probs: list[float], prompt_tokens: int) -> Prediction:
    """A classifier's answer: its most probable label, with the probability of every label."""
    best = max(range(len(probs)), key=probs.__getitem__)
    return Prediction(output=labels[best], confidence=probs[best], prompt_tokens=prompt_tokens, completion_tokens=0,
                      label_probs=dict(zip(labels, probs)))


@dataclass
class Context:
    """What a candidate may use: the task, the frozen dataset, the user's home folder."""

    task: Task
    dataset: Dataset | None
    """None where no dataset is at hand (a specialist loaded to serve): backends that need one
    (knn's index) say so."""
    home: Path
    train: list[dict] = field(default_factory=list)
    prices: Any = None
    store: Any = None
    """The store the bench runs on (run:RUN_ID candidates look themselves up in it)."""


class Candidate(Protocol):
    spec: str
    kind: str
    """"api" (priced per token), "local" (priced per hour of hardware) or "recorded"."""

    def predict(self, rows: list[dict], progress: Callable[[int], None] | None = None) -> list[Prediction]:
        """Answer every row (batched or concurrent as the backend likes); same order."""

    def close(self) -> None: ...


def parse_spec(spec: str) -> tuple[str, str, dict[str, str]]:
    """`scheme:rest?k=v` -> (scheme, rest, options)."""
    head, _, query = spec.partition("?")
    scheme, _, rest = head.partition(":")
    return scheme, rest, dict(parse_qsl(query, keep_blank_values=True))


def option(options: dict[str, str], key: str, default, cast=str, spec: str = ""):
    if key not in options:
        return default
    try:
        return cast(options[key])
    except ValueError:
        raise ProtegeError(f"candidate {spec}: option {key}={options[key]!r} is not a valid {cast.__name__}") from None
