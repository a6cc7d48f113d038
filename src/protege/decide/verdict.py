"""The recommendation: which system to run in production, and the sentences that justify it,
each citing the figures behind it.

- TRAIN: run the named specialist (it meets the quality bar, is cheaper, and pays back).
- SWITCH: run the named baseline that needs no training (it meets the bar and is cheaper).
- NOT YET: keep the reference for now; the learning curve says N more traces close the gap.
- KEEP: keep the reference (nothing cheaper meets the bar, or nothing pays back).
- NO VERDICT: the reference was not measured (its outputs are the benchmark's references).

The quality bar is the reference's score minus the stated tolerance. When the reference is
measured against human labels, a candidate whose paired difference is above zero (its 95% CI
excludes zero) is said to beat it, on that evidence. The rules, in order, are in docs/decide.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .curve_fit import rows_to_reach
from .formatting import count, months, pct, signed, usd
from .types import CandidateEvidence, Curve, Inputs


@dataclass
class Recommendation:
    verdict: str
    run: str | None
    """The system to run in production (a candidate spec); None with NO VERDICT."""
    reasons: list[str]


def recommend(candidates: list[CandidateEvidence], metric: str, inputs: Inputs, economics: dict,
              curve: Curve | None, risk: dict, reference_status: str) -> Recommendation:
    """`reference_status`: measured (against human labels), agreement (the references are the
    reference's own replies) or by construction (its outputs are the labels). The risk
    sentence, when known, is always the last reason."""
    if reference_status == "by construction":
        rec = _unmeasured(candidates, metric)
    else:
        rec = _Rules(candidates, metric, inputs, economics, curve, reference_status == "measured").verdict()
    if risk.get("summary"):
        rec.reasons.append("Risk: " + risk["summary"] + ".")
    return rec


def _ci(q: dict) -> str:
    return f"95% CI {pct(q['ci95'][0])}–{pct(q['ci95'][1])}"


def _unmeasured(candidates: list[CandidateEvidence], metric: str) -> Recommendation:
    ref = next(c for c in candidates if c.role == "reference")
    others = [c for c in candidates if c.role not in ("reference", "student")]
    reasons = [f"{ref.spec}'s outputs are the benchmark's references on every test row: its "
               f"{pct(ref.quality[metric]['value'])} is by construction, not a measurement of the frontier model, "
               "so there is nothing to compare a candidate against."]
    if others:
        best = max(others, key=lambda c: c.quality[metric]["value"])
        q = best.quality[metric]
        reasons.append(f"The best candidate, {best.spec}, scores {pct(q['value'])} {metric} ({_ci(q)}) against "
                       f"those references at {usd(best.cost_per_1m)} per 1M requests: measure the frontier's own "
                       "answers to learn whether that beats it.")
    return Recommendation("NO VERDICT", None, reasons)


class _Rules:
    def __init__(self, candidates, metric, inputs: Inputs, economics: dict, curve: Curve | None, measured: bool):
        self.metric, self.inputs, self.economics, self.curve, self.measured = metric, inputs, economics, curve, measured
        self.ref = next(c for c in candidates if c.role == "reference")
        self.r = self.ref.quality[metric]["value"]
        self.bar = self.r - inputs.tolerance
        self.specs = [c for c in candidates if c.role == "specialist"]
        self.cheap = [c for c in candidates if c.role in ("baseline", "base")]

    def q(self, c: CandidateEvidence) -> float:
        return c.quality[self.metric]["value"]

    def cheaper(self, c: CandidateEvidence) -> bool:
        return c.cost_per_1m is not None and self.ref.cost_per_1m is not None and c.cost_per_1m < self.ref.cost_per_1m

    def pays_back(self, c: CandidateEvidence) -> bool:
        econ = self.economics["specialists"].get(c.spec, {})
        return not (self.inputs.monthly_requests and econ.get("payback_months") is not None
                    and math.isinf(econ["payback_months"]))

    def beats(self, c: CandidateEvidence) -> bool:
        low = (c.paired.get(self.metric, {}).get("ci95") or [None])[0]
        return self.measured and low is not None and low > 0

    def quality_sentence(self, c: CandidateEvidence, lead: str = "") -> str:
        q, d = c.quality[self.metric], c.paired.get(self.metric, {})
        ci = d.get("ci95") or [None, None]
        paired = f"{signed(d.get('difference'))} points (paired 95% CI {signed(ci[0])} to {signed(ci[1])})"
        head = f"{lead}{c.spec} scores {pct(q['value'])} {self.metric} ({_ci(q)}) against {pct(self.r)} for {self.ref.spec}"
        if self.beats(c):
            return f"{head}: it beats it by {paired}, both measured against the same human labels."
        if q["value"] >= self.r:
            return f"{head}: {paired}, no worse than the reference."
        if q["value"] >= self.bar:
            return f"{head}: {paired}, within the {100 * self.inputs.tolerance:.0f}-point tolerance."
        return f"{head}: {paired}, more than the {100 * self.inputs.tolerance:.0f}-point tolerance."

    def cost_sentence(self, c: CandidateEvidence) -> str:
        s = (f"It costs {usd(c.cost_per_1m)} per 1M requests at full load against {usd(self.ref.cost_per_1m)} for "
             f"{self.ref.spec} ({self.ref.cost_basis}).")
        econ = self.economics["specialists"].get(c.spec, {})
        if econ.get("break_even_monthly_requests") is not None:
            s += (f" One always-on machine pays for itself from {count(econ['break_even_monthly_requests'])} "
                  "requests a month.")
        return s

    def volume_sentence(self, c: CandidateEvidence) -> str | None:
        econ = self.economics["specialists"].get(c.spec, {})
        if not self.inputs.monthly_requests or econ.get("payback_months") is None:
            return None
        if math.isinf(econ["payback_months"]):
            return (f"At {count(self.inputs.monthly_requests)} requests a month it costs "
                    f"{usd(econ['specialist_usd_per_month'])} a month against {usd(econ['api_usd_per_month'])} for "
                    "the API: it never pays back at this volume.")
        return (f"At {count(self.inputs.monthly_requests)} requests a month it saves "
                f"{usd(econ['saving_usd_per_month'])} a month; training cost {usd(econ['training_cost_usd'])}, "
                f"paid back in {months(econ['payback_months'])}.")

    def verdict(self) -> Recommendation:
        ok = [c for c in self.specs + self.cheap if self.q(c) >= self.bar and self.cheaper(c) and self.pays_back(c)]
        if ok:
            # the best quality wins; on a tie, the candidate that needs no training
            best = max(ok, key=lambda c: (self.q(c), c.role != "specialist"))
            reasons = [self.quality_sentence(best), self.cost_sentence(best)]
            volume = self.volume_sentence(best)
            if volume:
                reasons.append(volume)
            if best.role == "specialist":
                alt = max((c for c in ok if c.role != "specialist"), key=self.q, default=None)
                if alt is not None:
                    reasons.append(f"{alt.spec} needs no training and also meets the bar at {pct(self.q(alt))} "
                                   f"({usd(alt.cost_per_1m)} per 1M requests): the choice if you would rather not "
                                   "maintain a trained model.")
                return Recommendation("TRAIN", best.spec, reasons)
            better = max(self.specs, key=self.q, default=None)
            if better is not None and self.q(better) > self.q(best):
                reasons.append(f"The best specialist, {better.spec}, scores {pct(self.q(better))} but does not "
                               "qualify: " + self.why_not(better))
            return Recommendation("SWITCH", best.spec, reasons)
        return self.keep_or_wait()

    def why_not(self, c: CandidateEvidence) -> str:
        if not self.cheaper(c):
            return "it is not cheaper than the reference per request."
        return "it never pays back at the stated volume."

    def keep_or_wait(self) -> Recommendation:
        ref = self.ref.spec
        if not self.specs:
            reasons = [f"Nothing benched beats or matches {ref} cheaply enough, and no trained specialist has been "
                       "benched yet: train one (`protege train`) and bench it beside the reference."]
            best = max(self.cheap, key=self.q, default=None)
            if best is not None:
                reasons.insert(0, self.quality_sentence(best, "The best baseline: "))
            return Recommendation("KEEP", ref, reasons)
        best = max(self.specs, key=self.q)
        reasons = [self.quality_sentence(best)]
        if self.q(best) >= self.bar:
            volume = self.volume_sentence(best)
            if best.cost_per_1m is not None and self.ref.cost_per_1m is not None:
                reasons.append(self.cost_sentence(best))
            if volume:
                reasons.append(volume)
            if not self.cheaper(best):
                reasons.append("The specialist is not cheaper than the reference per request; train only for "
                               "latency or data-control reasons.")
            return Recommendation("KEEP", ref, reasons)
        fit = self.curve.fit if self.curve is not None else None
        if fit is None:
            reasons.append(f"Without a learning curve there is no estimate of what more traces would buy; {ref} "
                           "wins on the evidence so far.")
            return Recommendation("KEEP", ref, reasons)
        need = rows_to_reach(fit, self.bar)
        if math.isfinite(need["rows"]) and need["rows"] <= 10 * fit["n_max"]:
            reasons.append(f"The learning curve (error = {fit['a']:.3g} x n^-{fit['b']:.3f}) reaches {pct(self.bar)} "
                           f"at about {count(need['rows'])} train rows (95% CI {count(need['ci95'][0])}–"
                           f"{count(need['ci95'][1])}): collect about {count(need['more'])} more than the "
                           f"{count(fit['n_max'])} used, then train again.")
            return Recommendation("NOT YET", ref, reasons)
        p10 = fit["at_10x"]
        reasons.append(f"The learning curve projects {pct(p10['value'])} (95% CI {pct(p10['ci95'][0])}–"
                       f"{pct(p10['ci95'][1])}) with 10x the data ({count(p10['n'])} rows), short of {pct(self.bar)}.")
        return Recommendation("KEEP", ref, reasons)
