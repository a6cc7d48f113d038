"""The risk that a better base model erases the specialist's edge: how many points training
adds over the best untrained candidate (a cheap baseline or a base model), graded high
(under 2 points), medium (2 to 5) or low (over 5)."""

from __future__ import annotations

from typing import Any

from .types import CandidateEvidence


def risk_of(candidates: list[CandidateEvidence], metric: str) -> dict:
    """Names the best specialist and best untrained candidate; with both, the gaps, the level
    and a one-sentence summary (no `summary` key when either is missing)."""
    ref = next(c for c in candidates if c.role == "reference")
    specs = [c for c in candidates if c.role == "specialist"]
    cheap = [c for c in candidates if c.role in ("baseline", "base")]
    best_spec = max(specs, key=lambda c: c.quality[metric]["value"], default=None)
    best_cheap = max(cheap, key=lambda c: c.quality[metric]["value"], default=None)
    out: dict[str, Any] = {"best_specialist": best_spec.spec if best_spec else None,
                           "best_cheap": best_cheap.spec if best_cheap else None}
    if best_spec and best_cheap:
        r, s, b = (ref.quality[metric]["value"], best_spec.quality[metric]["value"],
                   best_cheap.quality[metric]["value"])
        out["training_edge"] = s - b
        out["cheap_to_reference_gap"] = r - b
        out["specialist_to_reference_gap"] = r - s
        level = "high" if s - b < 0.02 else ("medium" if s - b < 0.05 else "low")
        out["level"] = level
        out["summary"] = (f"training adds {100 * (s - b):.1f} points over {best_cheap.spec} (untrained); "
                          + {"high": "a better base model would hand nearly all of that to everyone",
                             "medium": "a better base release could erase much of it",
                             "low": "the edge is large enough to survive a better base release"}[level])
    return out
