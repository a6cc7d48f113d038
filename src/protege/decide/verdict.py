"""The recommendation (TRAIN, NOT YET or DON'T TRAIN) and the sentences that justify it, each
citing the figures behind it. The rules, in the order they are tried, are in docs/decide.md.
"""

from __future__ import annotations

import math

from .curve_fit import rows_to_reach
from .formatting import count, months, pct, signed, usd
from .types import CandidateEvidence, Curve, Inputs


def recommend(candidates: list[CandidateEvidence], metric: str, inputs: Inputs, economics: dict,
              curve: Curve | None, risk: dict) -> tuple[str, list[str]]:
    """The verdict and its reasons; the risk sentence, when known, is always the last reason."""
    verdict, reasons = _verdict(candidates, metric, inputs, economics, curve)
    # appended here and only here: _verdict adding it too gave DON'T TRAIN two Risk lines
    if risk.get("summary"):
        reasons.append("Risk: " + risk["summary"] + ".")
    return verdict, reasons


def _verdict(candidates: list[CandidateEvidence], metric: str, inputs: Inputs, economics: dict,
             curve: Curve | None) -> tuple[str, list[str]]:
    ref = next(c for c in candidates if c.role == "reference")
    r = ref.quality[metric]["value"]
    bar = r - inputs.tolerance
    reasons: list[str] = []
    cheap = [c for c in candidates if c.role in ("baseline", "base")]
    specs = [c for c in candidates if c.role == "specialist"]
    for c in sorted(cheap, key=lambda c: -c.quality[metric]["value"]):
        q = c.quality[metric]
        if q["value"] >= bar and (c.cost_per_1m is not None and ref.cost_per_1m is not None
                                  and c.cost_per_1m < ref.cost_per_1m):
            reasons.append(f"{c.spec} already scores {pct(q['value'])} {metric} (95% CI {pct(q['ci95'][0])}–"
                           f"{pct(q['ci95'][1])}) against the reference's {pct(r)}, within the "
                           f"{100 * inputs.tolerance:.0f}-point tolerance, without any training.")
            reasons.append(f"It costs {usd(c.cost_per_1m)} per 1M requests against {usd(ref.cost_per_1m)} for "
                           f"{ref.spec}.")
            return "DON'T TRAIN", reasons
    if not specs:
        reasons.append("No trained specialist has been benched yet: train one (`protege train`) and bench it "
                       "beside the reference.")
        return "NOT YET", reasons
    best = max(specs, key=lambda c: c.quality[metric]["value"])
    q = best.quality[metric]
    diff = best.paired.get(metric, {})
    econ = economics["specialists"].get(best.spec, {})
    if q["value"] >= bar:
        reasons.append(f"{best.spec} scores {pct(q['value'])} {metric} (95% CI {pct(q['ci95'][0])}–"
                       f"{pct(q['ci95'][1])}) against {pct(r)} for {ref.spec}: "
                       f"{signed(diff.get('difference'))} points (paired 95% CI "
                       f"{signed(diff.get('ci95', [None])[0])} to {signed(diff.get('ci95', [None, None])[1])}), "
                       f"within the {100 * inputs.tolerance:.0f}-point tolerance.")
        cheaper = (best.cost_per_1m is not None and ref.cost_per_1m is not None and best.cost_per_1m < ref.cost_per_1m)
        if best.cost_per_1m is not None and ref.cost_per_1m is not None:
            reasons.append(f"Serving it costs {usd(best.cost_per_1m)} per 1M requests at full load against "
                           f"{usd(ref.cost_per_1m)} for the reference; one always-on machine pays for itself from "
                           f"{count(econ.get('break_even_monthly_requests'))} requests a month.")
        if inputs.monthly_requests and econ.get("payback_months") is not None:
            if math.isinf(econ["payback_months"]):
                reasons.append(f"At {count(inputs.monthly_requests)} requests a month the specialist costs "
                               f"{usd(econ['specialist_usd_per_month'])} a month against "
                               f"{usd(econ['api_usd_per_month'])} for the API: it never pays back at this volume.")
                return "DON'T TRAIN", reasons
            reasons.append(f"At {count(inputs.monthly_requests)} requests a month it saves "
                           f"{usd(econ['saving_usd_per_month'])} a month; training cost "
                           f"{usd(econ['training_cost_usd'])}, paid back in {months(econ['payback_months'])}.")
        if ref.cost_per_1m is not None and best.cost_per_1m is not None and not cheaper:
            reasons.append("The specialist is not cheaper than the reference per request; train only for "
                           "latency or data-control reasons.")
            return "DON'T TRAIN", reasons
        return "TRAIN", reasons
    reasons.append(f"The best specialist, {best.spec}, scores {pct(q['value'])} {metric} (95% CI "
                   f"{pct(q['ci95'][0])}–{pct(q['ci95'][1])}) against {pct(r)} for {ref.spec}: "
                   f"{signed(diff.get('difference'))} points, more than the "
                   f"{100 * inputs.tolerance:.0f}-point tolerance.")
    if curve is not None and curve.fit is not None:
        need = rows_to_reach(curve.fit, bar)
        p10 = curve.fit["at_10x"]
        if math.isfinite(need["rows"]) and need["rows"] <= 10 * curve.fit["n_max"]:
            reasons.append(f"The learning curve (error = {curve.fit['a']:.3g} x n^-{curve.fit['b']:.3f}) reaches "
                           f"{pct(bar)} at about {count(need['rows'])} train rows (95% CI "
                           f"{count(need['ci95'][0])}–{count(need['ci95'][1])}): about {count(need['more'])} "
                           f"more than the {count(curve.fit['n_max'])} used.")
            return "NOT YET", reasons
        reasons.append(f"The learning curve projects {pct(p10['value'])} (95% CI {pct(p10['ci95'][0])}–"
                       f"{pct(p10['ci95'][1])}) with 10x the data ({count(p10['n'])} rows), short of {pct(bar)}.")
        return "DON'T TRAIN", reasons
    reasons.append("Without a learning curve there is no estimate of what more traces would buy; the frontier "
                   "model wins on the evidence so far.")
    return "DON'T TRAIN", reasons
