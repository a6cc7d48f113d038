"""The data a decision is made of: the inputs a team states, the evidence on each candidate,
the learning curve, and the decision itself. `Decision.as_dict()` is what
`protege decide --json` prints, so renaming a field here changes that output.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..prices import DEFAULT_HARDWARE_USD_PER_HOUR


@dataclass
class Inputs:
    monthly_requests: float | None = None
    value_per_success: float | None = None
    hardware_usd_per_hour: float = DEFAULT_HARDWARE_USD_PER_HOUR
    tolerance: float = 0.02
    """Quality (in metric points, 0.02 = 2 points) the team accepts below the reference."""


@dataclass
class CandidateEvidence:
    """What the store says about one candidate on the task: its newest bench result,
    rescored on the rows every candidate shares, plus the training run behind a specialist.

    Not bench's `CandidateResult` (what one bench measured, with its predictions) nor the
    models' `Candidate` protocol (something that predicts): this is read back from stored runs.
    """

    spec: str
    kind: str
    """local (runs here) | api | recorded (replayed traces)"""
    role: str
    """reference | specialist | baseline | base (an untrained small model) | student (taught
    only by the reference's recorded replies, scored out of fold: shown, never recommended)"""
    bench_run: str
    quality: dict[str, dict]
    """metric -> {value, ci95} on the rows shared with the reference"""
    paired: dict[str, dict]
    """metric -> {difference, ci95, p_value} against the reference"""
    latency: dict[str, Any]
    throughput_rps: float | None
    cost_per_1m: float | None
    cost_basis: str
    tokens_per_request: float | None
    tokens_basis: str
    train: dict | None = None
    """For specialists: method, base, wall_s, cost_usd, run id."""
    tfp: dict = field(default_factory=dict)


@dataclass
class Curve:
    run_id: str
    metric: str
    points: list[dict]
    fit: dict | None
    """error = a * n^-b fitted on the points: a, b, projections and their 95% intervals."""


@dataclass
class Decision:
    task: str
    dataset: str
    metric: str
    test_rows: int
    reference: str
    inputs: Inputs
    candidates: list[CandidateEvidence]
    curve: Curve | None
    economics: dict
    risk: dict
    verdict: str
    """TRAIN | SWITCH | NOT YET | KEEP | NO VERDICT (decide/verdict.py)"""
    run: str | None
    """The system to run in production: a candidate spec (None with NO VERDICT)."""
    reasons: list[str]
    reference_status: str
    """measured (against human labels) | agreement (the references are its own replies) |
    by construction (its outputs are the references)"""
    warnings: list[str]
    """What the reader must know before the verdict (shown at the top of every report)."""
    prices_as_of: str | None
    notes: list[str]
    history: list[dict] = field(default_factory=list)
    """The task's earlier decisions made again (`protege rebase`), newest first."""

    def as_dict(self) -> dict:
        return asdict(self)
