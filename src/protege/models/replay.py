"""`replay`: the outputs recorded in the traces, i.e. the frontier model as it answered.

Its latency and cost are the recorded ones (unknown for imported traces without them).
When references are the recorded replies, replay scores 100% by definition.
"""

from __future__ import annotations

from .base import Context, Prediction


class Replay:
    kind = "recorded"

    def __init__(self, spec: str, ctx: Context):
        self.spec = spec
        self.ctx = ctx

    def predict(self, rows, progress=None):
        out = []
        for row in rows:
            rec = row.get("recorded") or {}
            cost = rec.get("cost_usd")
            if cost is None and self.ctx.prices is not None:
                cost = self.ctx.prices.cost(rec.get("model"), rec.get("prompt_tokens"), rec.get("completion_tokens"))
            out.append(Prediction(output=row.get("output") or "", prompt_tokens=rec.get("prompt_tokens"),
                                  completion_tokens=rec.get("completion_tokens"), latency_ms=rec.get("latency_ms"),
                                  cost_usd=cost))
            if progress:
                progress(1)
        return out

    def close(self):
        pass


def factory(rest: str, options: dict, ctx: Context) -> Replay:
    return Replay("replay", ctx)
