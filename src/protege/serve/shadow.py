"""Shadow evaluation: a sampled share of the requests the specialist answers also goes to the
frontier model, in the background, and the two answers are compared.

    protege serve --task TASK_FILE --shadow openai:MODEL@URL --shadow-rate 0.1

- Never on the client's path: the client has its answer before the shadow call starts (a
  task on the event loop, at most `max_in_flight` at once; past that a sample is skipped
  and counted, never queued without bound).
- Each shadow answer is stored as a trace of its own (source `shadow`), linked to the served
  trace (`metadata.shadow_of`), with whether it agreed.
- Agreement over a sliding window of the last `window` comparisons, with a Wilson 95% CI,
  overall and per label the specialist gave (classification tasks compare labels, other
  tasks the normalised texts).
- The rate adapts between `floor` and `ceiling`: after every `step` comparisons it goes up
  (x1.5) when the window's agreement CI reaches under `target`, and down (x0.8) when it
  stays above it; while a drift alarm is on, it goes up (x1.5) at every check of the guard.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Callable

from ..traces.record import TraceRecord
from .fallback import Fallback, fallback_answer

log = logging.getLogger("protege.serve")


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float | None, float | None]:
    """The Wilson score 95% interval of k successes in n trials ((None, None) for n = 0)."""
    if n == 0:
        return None, None
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def agreement_of(pairs: list[tuple[str, bool]]) -> dict:
    """Agreement of (the specialist's answer, agreed) pairs, with Wilson 95% CIs, overall and
    per answer."""
    n = len(pairs)
    k = sum(1 for _, ok in pairs if ok)
    per = Counter(label for label, _ in pairs)
    ok = Counter(label for label, agreed in pairs if agreed)
    return {"n": n, "value": k / n if n else None, "ci95": list(wilson(k, n)),
            "per_label": {label: {"n": m, "value": ok[label] / m, "ci95": list(wilson(ok[label], m))}
                          for label, m in sorted(per.items())}}


@dataclass
class ShadowStats:
    sent: int = 0
    compared: int = 0
    agreed: int = 0
    errors: int = 0
    skipped: int = 0
    """Samples not sent because `max_in_flight` shadow calls were already running."""
    window: deque = field(default_factory=lambda: deque(maxlen=500))
    """(the specialist's answer, agreed) of the latest comparisons."""

    def agreement(self) -> dict:
        return agreement_of(list(self.window))


def agreement_rule(task) -> Callable[[str, str], bool]:
    """When two answers agree for `task`: the same label (classification, case-folded onto the
    task's labels), else the same text after the task's normalisation."""
    from ..tasks.metrics import LabelMap, normalize_text

    if task.kind == "classification":
        to_label = LabelMap(task.labels)
        return lambda a, b: (to_label(a.strip()) or a.strip()) == (to_label(b.strip()) or b.strip())
    return lambda a, b: normalize_text(a, task.normalize) == normalize_text(b, task.normalize)


class Shadow:
    """Sends sampled served requests to the frontier in the background and compares."""

    def __init__(self, frontier: Fallback, *, rate: float = 0.1, floor: float = 0.01, ceiling: float = 0.5,
                 target: float = 0.9, window: int = 500, step: int = 50, max_in_flight: int = 64,
                 same: Callable[[str, str], bool] | None = None, submit: Callable[[TraceRecord], None] | None = None,
                 task: str | None = None, rng: random.Random | None = None):
        if not 0 <= floor <= rate <= ceiling <= 1:
            raise ValueError(f"shadow rates must satisfy 0 <= floor <= rate <= ceiling <= 1 (got {floor}, {rate}, "
                             f"{ceiling})")
        self.frontier, self.rate, self.floor, self.ceiling = frontier, rate, floor, ceiling
        self.target, self.step, self.max_in_flight = target, step, max_in_flight
        self.same = same or (lambda a, b: a.strip() == b.strip())
        self.submit, self.task = submit, task
        self.rng = rng or random.Random()
        self.stats = ShadowStats(window=deque(maxlen=window))
        self.in_flight: set[asyncio.Task] = set()

    def maybe(self, body: dict, answer: str, served_trace: str | None, specialist: str) -> bool:
        """Called after the client has its answer: start a shadow call for this request with
        probability `rate`. Returns whether it did."""
        if self.rng.random() >= self.rate:
            return False
        if len(self.in_flight) >= self.max_in_flight:
            self.stats.skipped += 1
            return False
        task = asyncio.get_running_loop().create_task(self._run(body, answer, served_trace, specialist))
        self.in_flight.add(task)
        task.add_done_callback(self.in_flight.discard)
        return True

    async def _run(self, body: dict, answer: str, served_trace: str | None, specialist: str) -> None:
        import time

        self.stats.sent += 1
        t0 = time.perf_counter()
        data, status = await self.frontier.complete(body)
        text, problem = fallback_answer(data, status)
        seconds = time.perf_counter() - t0
        agreed = None
        if problem is None:
            agreed = self.same(answer, text or "")
            self.stats.compared += 1
            self.stats.agreed += agreed
            self.stats.window.append((answer, agreed))
            if self.stats.compared % self.step == 0:
                self._adapt()
        else:
            self.stats.errors += 1
            log.error("protege serve: shadow call to %s failed: %s", self.frontier.model, problem)
        if self.submit is not None:
            usage = (data.get("usage") if isinstance(data, dict) else None) or {}
            usage = usage if isinstance(usage, dict) else {}
            self.submit(TraceRecord(
                request=body, response=data, output_text=text, source="shadow", task=self.task, provider="shadow",
                model=self.frontier.model, latency_ms=seconds * 1000, stream=False,
                prompt_tokens=usage.get("prompt_tokens"), completion_tokens=usage.get("completion_tokens"),
                status="ok" if problem is None else "error", http_status=status, error=problem,
                metadata={"shadow_of": served_trace, "specialist": specialist, "specialist_answer": answer,
                          "agrees": agreed}))

    def raise_rate(self) -> None:
        """Check more while something else looks wrong (a drift alarm): the rate goes up 1.5x."""
        self.rate = min(self.ceiling, self.rate * 1.5)

    def _adapt(self) -> None:
        lo, _ = wilson(sum(1 for _, ok in self.stats.window if ok), len(self.stats.window))
        if lo is None:
            return
        factor = 1.5 if lo < self.target else 0.8
        self.rate = min(self.ceiling, max(self.floor, self.rate * factor))

    async def close(self) -> None:
        for t in list(self.in_flight):
            t.cancel()
        await self.frontier.close()

    def metrics(self) -> list[str]:
        a = self.stats.agreement()
        lo, hi = a["ci95"]
        s = self.stats
        return ["# HELP protege_serve_shadow_requests_total Served requests also sent to the frontier, by outcome.",
                "# TYPE protege_serve_shadow_requests_total counter",
                f'protege_serve_shadow_requests_total{{outcome="compared"}} {s.compared}',
                f'protege_serve_shadow_requests_total{{outcome="error"}} {s.errors}',
                f'protege_serve_shadow_requests_total{{outcome="skipped"}} {s.skipped}',
                "# HELP protege_serve_shadow_rate Share of specialist answers shadowed now.",
                "# TYPE protege_serve_shadow_rate gauge", f"protege_serve_shadow_rate {self.rate}",
                "# HELP protege_serve_shadow_agreement Agreement with the frontier over the window (NaN: none yet).",
                "# TYPE protege_serve_shadow_agreement gauge",
                f"protege_serve_shadow_agreement {_num(a['value'])}",
                f"protege_serve_shadow_agreement_ci_low {_num(lo)}",
                f"protege_serve_shadow_agreement_ci_high {_num(hi)}",
                f"protege_serve_shadow_window {a['n']}"]


def _num(x) -> str:
    return "NaN" if x is None else f"{x:.6f}"
