"""What serving each candidate costs and what a specialist saves: cost per 1M requests,
monthly cost at a volume, break-even volume, payback of the training cost, and Token Factor
Productivity. Every figure comes from measured throughput or token counts times a stated
price (the hardware USD/hour given, the price table and its date); unknown inputs give None.
"""

from __future__ import annotations

import math
from typing import Any

from .types import CandidateEvidence, Inputs

HOURS_PER_MONTH = 730.0


def serving_cost(m: dict, inputs: Inputs) -> tuple[float | None, str]:
    """USD per 1M requests for a candidate whose bench metrics are `m`, and where it comes from:
    local candidates at the stated hardware price over measured throughput; API and recorded
    candidates as the bench priced them (bench/pricing.py: measured, or computed and said so)."""
    if m.get("kind") == "local":
        rps = m.get("throughput_rps")
        if not rps:
            return None, "unknown (no measured throughput)"
        return (inputs.hardware_usd_per_hour / (rps * 3600) * 1e6,
                f"{inputs.hardware_usd_per_hour:g} USD/hour / measured {rps:.1f} requests/s")
    return m.get("cost_per_1m_usd"), m.get("cost_basis") or "unknown"


def token_factor_productivity(c: CandidateEvidence, metric: str, inputs: Inputs) -> dict:
    """Token Factor Productivity: value of successful outputs per token consumed."""
    success = c.quality[metric]["value"]
    t = c.tokens_per_request
    if t is None or not t:
        return {"value": None, "unit": None, "note": "unknown: " + c.tokens_basis}
    if inputs.value_per_success is not None:
        return {"value": success * inputs.value_per_success / t * 1e6, "unit": "USD of value per 1M tokens",
                "note": f"{success:.3f} successes/request x {inputs.value_per_success:g} USD / {t:.0f} tokens/request"}
    if success <= 0:
        return {"value": None, "unit": "tokens per 1,000 successes", "note": "no successes"}
    return {"value": t / success * 1000, "unit": "tokens per 1,000 successes",
            "note": f"{t:.0f} tokens/request / {success:.3f} successes/request"}


def monthly_cost(c: CandidateEvidence, requests: float, inputs: Inputs) -> float | None:
    """USD per month at `requests` a month. Self-hosted: whole machines, always on, as many as
    the measured throughput needs; API: per request."""
    if c.cost_per_1m is None:
        return None
    if c.kind == "local":
        if not c.throughput_rps:
            return None
        capacity = c.throughput_rps * 3600 * HOURS_PER_MONTH
        machines = max(1, math.ceil(requests / capacity))
        return machines * inputs.hardware_usd_per_hour * HOURS_PER_MONTH
    return requests * c.cost_per_1m / 1e6


def economics_of(candidates: list[CandidateEvidence], inputs: Inputs) -> dict:
    """Each specialist against the reference: break-even volume and, at `inputs.monthly_requests`,
    monthly costs, saving and payback months (inf when it never pays back)."""
    ref = next(c for c in candidates if c.role == "reference")
    out: dict[str, Any] = {"reference_cost_per_1m": ref.cost_per_1m, "hours_per_month": HOURS_PER_MONTH,
                           "specialists": {}}
    for c in candidates:
        if c.role != "specialist":
            continue
        e: dict[str, Any] = {"training_cost_usd": (c.train or {}).get("cost_usd")}
        if ref.cost_per_1m is None or c.throughput_rps is None:
            e["break_even_monthly_requests"] = None
            e["note"] = "unknown: " + ("the reference's cost is unknown" if ref.cost_per_1m is None
                                       else "the specialist's throughput was not measured")
            out["specialists"][c.spec] = e
            continue
        per_request = ref.cost_per_1m / 1e6
        machine_month = inputs.hardware_usd_per_hour * HOURS_PER_MONTH
        capacity = c.throughput_rps * 3600 * HOURS_PER_MONTH
        # one always-on machine costs machine_month; the API costs per request
        break_even = machine_month / per_request if per_request > 0 else math.inf
        saving_per_request_at_scale = per_request - (c.cost_per_1m or 0) / 1e6
        e.update({"break_even_monthly_requests": break_even, "machine_usd_per_month": machine_month,
                  "requests_per_machine_month": capacity,
                  "saving_per_1m_at_full_load": saving_per_request_at_scale * 1e6})
        if inputs.monthly_requests:
            api = monthly_cost(ref, inputs.monthly_requests, inputs)
            own = monthly_cost(c, inputs.monthly_requests, inputs)
            saving = api - own if api is not None and own is not None else None
            e.update({"api_usd_per_month": api, "specialist_usd_per_month": own, "saving_usd_per_month": saving})
            tc = e["training_cost_usd"]
            if saving is not None and saving > 0 and tc is not None:
                e["payback_months"] = tc / saving
            elif saving is not None:
                e["payback_months"] = math.inf
        out["specialists"][c.spec] = e
    return out
