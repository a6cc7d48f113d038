"""Run candidates head to head on a task's frozen test split.

    protege bench examples/banking77/task.yaml --candidate replay --candidate knn:minilm \
        --candidate hf:smollm2-135m

Every candidate answers exactly the same rows. Per candidate: each metric with a 95%
bootstrap CI, a paired bootstrap test against the reference candidate (the first unless
`--reference`), latency p50/p95 at batch size 1 (timed here for local models; per request
for APIs; recorded for replay), batched throughput, tokens per request, and cost per 1M
requests (API: the price table; local: hardware $/hour over measured throughput). Each
candidate's per-example outputs are stored as a bench run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import orjson

from ..datasets.registry import Dataset
from ..errors import ProtegeError
from ..ids import uuid7
from ..jsonsafe import json_safe
from ..models.base import Context, Prediction
from ..models.registry import build_candidate
from ..prices import DEFAULT_HARDWARE_USD_PER_HOUR
from ..runs.registry import create_run
from ..tasks.metrics import Metric, get_metric, map_labels
from ..tasks.spec import Task
from ..traces.store import Store
from .pricing import RequestCost, computed_cost, mean_tokens, measured_cost
from .stats import bootstrap, paired, quantiles


@dataclass
class CandidateResult:
    spec: str
    kind: str
    run_id: str
    n: int
    metrics: dict[str, dict]
    paired: dict[str, dict]
    latency_ms: dict[str, Any]
    throughput_rps: float | None
    tokens: dict[str, float | None]
    tokens_basis: str
    cost_per_1m_usd: float | None
    cost_basis: str
    valid_output_rate: float | None
    wall_s: float
    outputs: list[Prediction] = field(repr=False, default_factory=list)

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "outputs"}


@dataclass
class BenchReport:
    task: str
    dataset: str
    rows: int
    reference: str
    reference_note: str
    hardware_usd_per_hour: float
    prices_as_of: str | None
    results: list[CandidateResult]

    def as_dict(self) -> dict:
        return {**{k: v for k, v in self.__dict__.items() if k != "results"},
                "candidates": [r.as_dict() for r in self.results]}



def _judge_scores(task: Task, ctx: Context, rows, cand_out, ref_out) -> np.ndarray:
    """Head-to-head LLM judge, both orders, ties allowed: per row 1 = candidate better,
    0.5 = tie, 0 = reference better (averaged over the two orders)."""
    if task.judge is None:
        raise ProtegeError(f"task {task.name}: metric 'judge' needs a `judge:` section naming the judge candidate")
    judge = build_candidate(task.judge.candidate + ("&" if "?" in task.judge.candidate else "?") + "prompt=original",
                            ctx)
    prompts = []
    for row, c, r in zip(rows, cand_out, ref_out):
        for a, b in ((r, c), (c, r)):
            text = (f"{task.judge.instructions}\n\nRequest:\n{row['input']}\n\nAnswer A:\n{a}\n\nAnswer B:\n{b}\n\n"
                    "Reply with exactly one of: A, B, TIE.")
            prompts.append({"input": text, "messages": [{"role": "user", "content": text}]})
    verdicts = [p.output.strip().upper() for p in judge.predict(prompts)]
    judge.close()
    scores = []
    for i in range(len(rows)):
        first, second = verdicts[2 * i], verdicts[2 * i + 1]
        s1 = {"B": 1.0, "TIE": 0.5}.get(first, 0.0)  # candidate is B in the first order
        s2 = {"A": 1.0, "TIE": 0.5}.get(second, 0.0)  # and A in the second
        scores.append((s1 + s2) / 2)
    return np.array(scores)


def sample_rows(rows: list[dict], limit: int | None, seed: int = 0) -> list[dict]:
    """`limit` rows drawn at random with a fixed seed, in their file order: the same rows for
    every candidate and every run, and not just the first labels of a file sorted by label."""
    if not limit or limit >= len(rows):
        return rows
    import random

    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)  # one fixed order: the sample of 600 lies inside the sample of 1,000
    return [rows[i] for i in sorted(order[:limit])]


def run_bench(store: Store, task: Task, dataset: Dataset, home: Path, specs: list[str], *,
              reference: str | None = None, hardware_usd_per_hour: float = DEFAULT_HARDWARE_USD_PER_HOUR,
              latency_samples: int = 30, limit: int | None = None, prices=None,
              progress: Callable[[str, int], Callable[[int], None]] | None = None,
              on_result: Callable[[CandidateResult], None] | None = None, tag: str | None = None) -> BenchReport:
    if not specs:
        raise ProtegeError("name at least one --candidate (e.g. replay, knn:minilm, hf:smollm2-135m)")
    reference = reference or specs[0]
    if reference not in specs:
        specs = [reference] + specs
    rows = sample_rows(dataset.split("test"), limit)
    if not rows:
        raise ProtegeError(f"dataset {dataset.id} has no test rows")
    train = dataset.split("train")
    refs = [r["reference"] for r in rows]
    metric_names = task.metric_names
    metrics = {m: get_metric(m) for m in metric_names if m != "judge"}
    ctx = Context(task=task, dataset=dataset, home=Path(home), train=train, prices=prices, store=store)
    results: list[CandidateResult] = []
    outputs_by_spec: dict[str, list[str]] = {}
    for spec in specs:
        cand = build_candidate(spec, ctx)
        try:
            tick = progress(spec, len(rows)) if progress else None
            t0 = time.perf_counter()
            preds = cand.predict(rows, progress=tick)
            wall = time.perf_counter() - t0
            latencies: list[float]
            if cand.kind == "local":
                sample = rows[:latency_samples]
                cand.predict(sample[:1])  # warm-up, not timed
                latencies = []
                for row in sample:
                    t = time.perf_counter()
                    cand.predict([row])
                    latencies.append((time.perf_counter() - t) * 1000)
                latency_note = f"measured here, batch size 1, {len(latencies)} requests"
                throughput = len(rows) / wall if wall > 0 else None
            else:
                latencies = [p.latency_ms for p in preds if p.latency_ms is not None]
                latency_note = ("per request as measured when answered" if cand.kind == "api"
                                else "as recorded in the traces") if latencies else \
                    "unknown (imported traces carry no latency)"
                fresh = not any(p.cached for p in preds)
                throughput = len(rows) / wall if cand.kind == "api" and fresh and wall > 0 else None
        finally:
            cand.close()
        outputs, valid = map_labels(task, [p.output for p in preds])
        outputs_by_spec[spec] = outputs
        scores = {name: bootstrap(m, outputs, refs).as_dict() for name, m in metrics.items()}
        if cand.kind == "local":
            cost = hardware_usd_per_hour / (throughput * 3600) * 1e6 if throughput else None
            priced = RequestCost(cost, f"hardware at {hardware_usd_per_hour:g} USD/hour / measured throughput",
                                 *mean_tokens(preds), "measured in the bench")
        else:
            priced = measured_cost(preds)
            if priced is None and cand.kind == "recorded":
                priced = computed_cost(rows, preds, task, dataset.manifest.get("tokens"), prices, home)
            elif priced is None:
                priced = RequestCost(None, "unknown (no token counts, or the model is not in the price table)",
                                     None, None, "unknown (this candidate reports no token counts)")
        p50, p95 = quantiles(latencies)
        result = CandidateResult(
            spec=spec, kind=cand.kind, run_id=uuid7(), n=len(rows), metrics=scores, paired={},
            latency_ms={"p50": p50, "p95": p95, "n": len(latencies), "note": latency_note},
            throughput_rps=throughput,
            tokens={"in": priced.tokens_in, "out": priced.tokens_out}, tokens_basis=priced.tokens_basis,
            cost_per_1m_usd=priced.cost_per_1m, cost_basis=priced.basis, valid_output_rate=valid, wall_s=wall, outputs=preds)
        results.append(result)
    ref_outputs = outputs_by_spec[reference]
    for result in results:
        if "judge" in metric_names and result.spec != reference:
            per = _judge_scores(task, ctx, rows, outputs_by_spec[result.spec], ref_outputs)
            # share of head-to-head wins over the reference (ties count half)
            result.metrics["judge"] = bootstrap(Metric("judge", lambda p, r, per=per: per), refs, refs).as_dict()
        if result.spec == reference:
            continue
        for name, m in metrics.items():
            result.paired[name] = paired(m, outputs_by_spec[result.spec], ref_outputs, refs).as_dict()
    _store_runs(store, task, dataset, home, results, reference, rows, hardware_usd_per_hour, tag)
    for result in results:
        if on_result:
            on_result(result)
    prices_as_of = None
    if prices is not None and prices.prices:
        prices_as_of = max(p.as_of for p in prices.prices)
    return BenchReport(task=task.name, dataset=dataset.id, rows=len(rows), reference=reference,
                       reference_note=task.reference_note(), hardware_usd_per_hour=hardware_usd_per_hour,
                       prices_as_of=prices_as_of, results=results)


def _store_runs(store, task, dataset, home, results, reference, rows, hw, tag=None) -> None:
    with store.engine.begin() as conn:
        for r in results:
            folder = Path(home) / "runs" / r.run_id
            folder.mkdir(parents=True, exist_ok=True)
            lines = [orjson.dumps({"id": row["id"], "input": row["input"], "reference": row["reference"],
                                   "output": p.output, "confidence": p.confidence, "latency_ms": p.latency_ms,
                                   "prompt_tokens": p.prompt_tokens, "completion_tokens": p.completion_tokens,
                                   "cost_usd": p.cost_usd, "cached": p.cached,
                                   **({"label_probs": p.label_probs} if p.label_probs else {})})
                     for row, p in zip(rows, r.outputs)]
            (folder / "outputs.jsonl").write_bytes(b"\n".join(lines) + b"\n")
            create_run(store, kind="bench", task=task.name, status="done", run_id=r.run_id, conn=conn,
                       config={"candidate": r.spec, "reference": reference, "rows": len(rows),
                               "hardware_usd_per_hour": hw, "dataset": dataset.id, "tag": tag},
                       base_model=r.spec, dataset_id=dataset.id,
                       metrics={k: json_safe(v) for k, v in r.as_dict().items() if k not in ("run_id",)},
                       outputs_path=str((folder / "outputs.jsonl").resolve()))
