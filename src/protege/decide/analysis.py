"""The train-or-not decision, computed from what the store holds for a task: the newest bench
result of every candidate on the task's dataset, the training runs behind the specialists,
and the newest learning curve.

Every figure is measured or computed from stated inputs (the price table and its date,
the hardware price per hour, the monthly volume given); what cannot be known is None and
shown as "unknown" with the reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import sqlalchemy as sa

from ..bench.run import DEFAULT_HARDWARE_USD_PER_HOUR, _map_labels
from ..bench.stats import bootstrap, paired
from ..errors import ProtegeError
from ..tasks.metrics import get_metric
from ..tasks.spec import Task
from ..traces import schema
from ..traces.store import Store

HOURS_PER_MONTH = 730.0


@dataclass
class Inputs:
    monthly_requests: float | None = None
    value_per_success: float | None = None
    hardware_usd_per_hour: float = DEFAULT_HARDWARE_USD_PER_HOUR
    tolerance: float = 0.02
    """Quality (in metric points, 0.02 = 2 points) the team accepts below the reference."""


@dataclass
class Candidate:
    spec: str
    kind: str
    """local (runs here) | api | recorded (replayed traces)"""
    role: str
    """reference | specialist | baseline | base (an untrained small model)"""
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
    candidates: list[Candidate]
    curve: Curve | None
    economics: dict
    risk: dict
    verdict: str
    """TRAIN | NOT YET | DON'T TRAIN"""
    reasons: list[str]
    prices_as_of: str | None
    notes: list[str]

    def as_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


# ---------------------------------------------------------------------------- evidence

def _runs(store: Store, task: str, kind: str) -> list[dict]:
    t = schema.runs
    with store.engine.connect() as conn:
        rows = conn.execute(sa.select(t).where(t.c.task == task, t.c.kind == kind, t.c.status == "done")
                            .order_by(t.c.id.desc())).all()
    return [dict(r._mapping) for r in rows]


def _outputs(run: dict) -> dict[str, dict]:
    path = Path(run["outputs_path"] or "")
    if not path.exists():
        raise ProtegeError(f"bench run {run['id']} ({run['config'].get('candidate')}): its outputs file {path} is "
                           "missing; run the bench again")
    return {r["id"]: r for r in (orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip())}


def _role(spec: str, reference: str) -> str:
    if spec == reference:
        return "reference"
    if spec.startswith("run:"):
        return "specialist"
    if spec.startswith("hf:"):
        return "base"
    return "baseline"


def _trace_model(store: Store, task: str) -> str | None:
    t = schema.traces
    with store.engine.connect() as conn:
        row = conn.execute(sa.select(t.c.model, sa.func.count()).where(t.c.task == task, t.c.model.is_not(None))
                           .group_by(t.c.model).order_by(sa.func.count().desc()).limit(1)).first()
    return row[0] if row else None


def _trace_latency(store: Store, task: str) -> dict | None:
    t = schema.traces
    with store.engine.connect() as conn:
        values = [r[0] for r in conn.execute(sa.select(t.c.latency_ms).where(
            t.c.task == task, t.c.latency_ms.is_not(None), t.c.status == "ok").limit(100_000))]
    if not values:
        return None
    p50, p95 = np.percentile(values, [50, 95])
    return {"p50": float(p50), "p95": float(p95), "n": len(values), "note": "from the captured traces"}


def decide(store: Store, task: Task, inputs: Inputs, *, dataset: str | None = None, prices=None,
           home: Path | None = None) -> Decision:
    from ..datasets.registry import get_dataset, manifest

    ds = get_dataset(store, dataset or task.name)
    # a learning curve's benches score its points, not candidates for this decision
    benches = [r for r in _runs(store, task.name, "bench")
               if r["dataset_id"] == ds["id"] and (r["config"] or {}).get("tag") != "curve"]
    if not benches:
        raise ProtegeError(f"no bench runs for task {task.name} on dataset {ds['id']}: run `protege bench "
                           f"{task.path or 'TASK_FILE'} -c REFERENCE -c CANDIDATE ...` first")
    reference = benches[0]["config"]["reference"]
    newest: dict[str, dict] = {}
    for r in benches:  # newest first
        newest.setdefault(r["config"]["candidate"], r)
    if reference not in newest:
        raise ProtegeError(f"the newest bench names {reference!r} as reference but has no result for it")
    notes: list[str] = []
    metric_names = [m for m in task.metric_names if m != "judge"]
    metric = metric_names[0]
    outputs = {spec: _outputs(run) for spec, run in newest.items()}
    ref_out = outputs[reference]
    common = [i for i in ref_out if all(i in o for o in outputs.values())]
    if not common:
        raise ProtegeError("the candidates' bench runs share no test rows; bench them together on the same rows")
    if len(common) < len(ref_out):
        notes.append(f"quality is compared on the {len(common):,} test rows every candidate was benched on "
                     f"(the reference has {len(ref_out):,})")
    refs = [ref_out[i]["reference"] for i in common]
    metrics = {m: get_metric(m) for m in metric_names}
    mapped = {spec: _map_labels(task, [o[i]["output"] for i in common])[0] for spec, o in outputs.items()}

    trains = {r["id"]: r for r in _runs(store, task.name, "train")}
    man = manifest(ds)
    tokens_report = man.get("tokens") or {}
    model = _trace_model(store, task.name)
    price = prices.lookup(model) if (prices is not None and model) else None
    ref_tokens_out = _mean_tokens([r for r in refs], task, home)

    candidates = []
    for spec, run in newest.items():
        m = run["metrics"]
        role = _role(spec, reference)
        quality = {name: bootstrap(metric_obj, mapped[spec], refs).as_dict() for name, metric_obj in metrics.items()}
        pair = ({} if role == "reference" else
                {name: paired(metric_obj, mapped[spec], mapped[reference], refs).as_dict()
                 for name, metric_obj in metrics.items()})
        latency = dict(m.get("latency_ms") or {})
        if latency.get("p50") is None and m.get("kind") in ("recorded", "api"):
            latency = _trace_latency(store, task.name) or latency
            if latency.get("p50") is None:
                latency["note"] = "unknown (imported traces carry no latency)"
        cost, basis = _cost(m, inputs, price, tokens_report, ref_tokens_out, model)
        tin, tout = (m.get("tokens") or {}).get("in"), (m.get("tokens") or {}).get("out")
        if tin is not None and tout is not None:
            tokens, tbasis = tin + tout, "measured in the bench"
        elif m.get("kind") in ("recorded", "api") and tokens_report.get("original_prompt_tokens") and ref_tokens_out:
            tokens = tokens_report["original_prompt_tokens"] + ref_tokens_out
            tbasis = f"estimated with the {tokens_report.get('tokenizer')} tokenizer"
        else:
            tokens, tbasis = None, "unknown (this candidate reports no token counts)"
        train = None
        if role == "specialist":
            tr = trains.get(spec[4:]) or next((r for rid, r in trains.items() if rid.startswith(spec[4:])), None)
            if tr is not None:
                wall = tr["metrics"].get("wall_s")
                train = {"run_id": tr["id"], "method": tr["config"].get("method"), "base": tr["base_model"],
                         "wall_s": wall, "train_rows": tr["metrics"].get("train_rows"),
                         "cost_usd": wall / 3600 * inputs.hardware_usd_per_hour if wall is not None else None}
        candidates.append(Candidate(spec=spec, kind=m.get("kind") or "unknown", role=role, bench_run=run["id"], quality=quality, paired=pair,
                                    latency=latency, throughput_rps=m.get("throughput_rps"), cost_per_1m=cost,
                                    cost_basis=basis, tokens_per_request=tokens, tokens_basis=tbasis, train=train))
    order = {"reference": 0, "specialist": 1, "baseline": 2, "base": 3}
    candidates.sort(key=lambda c: (order[c.role], -c.quality[metric]["value"]))
    for c in candidates:
        c.tfp = _tfp(c, metric, inputs)
    curve = _curve(store, task.name, ds["id"])
    if curve is None:
        notes.append(f"no learning curve yet: run `protege curve {task.path or 'TASK_FILE'} --base MODEL --method M` "
                     "to see whether more traces would help")
    economics = _economics(candidates, inputs)
    risk = _risk(candidates, metric)
    verdict, reasons = _recommend(candidates, metric, inputs, economics, curve, risk)
    return Decision(task=task.name, dataset=ds["id"], metric=metric, test_rows=len(common), reference=reference,
                    inputs=inputs, candidates=candidates, curve=curve, economics=economics, risk=risk,
                    verdict=verdict, reasons=reasons,
                    prices_as_of=price.as_of if price else None, notes=notes)


def _mean_tokens(texts: list[str], task: Task, home) -> float | None:
    if task.tokenizer in ("none", "", None) or not texts:
        return None
    from transformers import AutoTokenizer

    from ..models.local import resolve

    tok = AutoTokenizer.from_pretrained(resolve(task.tokenizer, home))
    sample = texts[:500]
    return sum(len(tok.encode(t, add_special_tokens=False)) for t in sample) / len(sample)


def _cost(m: dict, inputs: Inputs, price, tokens_report: dict, out_tokens: float | None,
          model: str | None) -> tuple[float | None, str]:
    kind = m.get("kind")
    if kind == "local":
        rps = m.get("throughput_rps")
        if not rps:
            return None, "unknown (no measured throughput)"
        return (inputs.hardware_usd_per_hour / (rps * 3600) * 1e6,
                f"{inputs.hardware_usd_per_hour:g} USD/hour / measured {rps:.1f} requests/s")
    if m.get("cost_per_1m_usd") is not None:
        return m["cost_per_1m_usd"], m.get("cost_basis", "price table x token counts")
    if price is not None and tokens_report.get("original_prompt_tokens") and out_tokens:
        cost = price.cost(round(tokens_report["original_prompt_tokens"]), round(out_tokens)) * 1e6
        return cost, (f"{model} at the price table's {price.as_of} prices x the task's token counts "
                      f"({tokens_report['original_prompt_tokens']:.0f} in, {out_tokens:.0f} out, counted with the "
                      f"{tokens_report.get('tokenizer')} tokenizer)")
    return None, m.get("cost_basis") or "unknown"


def _tfp(c: Candidate, metric: str, inputs: Inputs) -> dict:
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


# ---------------------------------------------------------------------------- learning curve

def fit_power_law(points: list[dict], draws: int = 2000, seed: int = 0) -> dict | None:
    """error(n) = a * n^-b through the curve's points (weighted least squares in log-log),
    with a parametric bootstrap over each point's CI for the uncertainty."""
    pts = [p for p in points if p["train_rows"] > 0 and p["value"] is not None]
    if len(pts) < 2 or len({p["train_rows"] for p in pts}) < 2:
        return None
    n = np.array([p["train_rows"] for p in pts], dtype=float)
    v = np.array([p["value"] for p in pts], dtype=float)
    sd = np.array([max((p["ci95"][1] - p["ci95"][0]) / 3.92, 1e-4) for p in pts])

    def fit(values):
        err = np.clip(1 - values, 1e-4, 1)
        x, y = np.log(n), np.log(err)
        w = 1 / np.maximum(sd / err, 1e-3) ** 2  # the sd of log(err) is about sd / err
        A = np.vstack([np.ones_like(x), x]).T * np.sqrt(w)[:, None]
        coef, *_ = np.linalg.lstsq(A, y * np.sqrt(w), rcond=None)
        return math.exp(coef[0]), -coef[1]

    a, b = fit(v)
    rng = np.random.default_rng(seed)
    boot = [fit(np.clip(v + rng.normal(0, sd), 0, 1)) for _ in range(draws)]
    top = float(n.max())

    def project(mult):
        vals = np.array([1 - aa * (top * mult) ** -bb for aa, bb in boot])
        return {"n": top * mult, "value": 1 - a * (top * mult) ** -b,
                "ci95": [float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))]}

    return {"a": a, "b": b, "b_ci95": [float(np.percentile([x[1] for x in boot], 2.5)),
                                       float(np.percentile([x[1] for x in boot], 97.5))],
            "n_max": top, "at_2x": project(2), "at_10x": project(10), "_boot": boot}


def rows_to_reach(fit: dict, target: float) -> dict:
    """Train rows at which the fitted curve reaches `target` quality (with a 95% interval)."""
    def need(a, b):
        if target >= 1 or b <= 0:
            return math.inf
        log_rows = math.log(a / (1 - target)) / b
        return math.exp(log_rows) if log_rows < 700 else math.inf

    est = need(fit["a"], fit["b"])
    draws = np.array([need(a, b) for a, b in fit["_boot"]])
    finite = draws[np.isfinite(draws)]
    lo = float(np.percentile(draws, 2.5)) if len(finite) else math.inf
    hi = float(np.percentile(draws, 97.5)) if len(finite) > 0.975 * len(draws) else math.inf
    return {"target": target, "rows": est, "ci95": [lo, hi], "more": max(0.0, est - fit["n_max"])}


def _curve(store: Store, task: str, dataset_id: str) -> Curve | None:
    curves = [r for r in _runs(store, task, "curve") if r["dataset_id"] == dataset_id]
    if not curves:
        return None
    c = curves[0]
    pts = sorted(c["metrics"]["points"], key=lambda p: p["train_rows"])
    return Curve(run_id=c["id"], metric=c["metrics"]["metric"], points=pts, fit=fit_power_law(pts))


# ---------------------------------------------------------------------------- economics and risk

def monthly_cost(c: Candidate, requests: float, inputs: Inputs) -> float | None:
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


def _economics(candidates: list[Candidate], inputs: Inputs) -> dict:
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


def _risk(candidates: list[Candidate], metric: str) -> dict:
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


def _recommend(candidates, metric, inputs: Inputs, economics, curve: Curve | None, risk) -> tuple[str, list[str]]:
    verdict, reasons = _verdict(candidates, metric, inputs, economics, curve, risk)
    if verdict != "TRAIN" and risk.get("summary"):
        reasons.append("Risk: " + risk["summary"] + ".")
    return verdict, reasons


def _verdict(candidates, metric, inputs: Inputs, economics, curve: Curve | None, risk) -> tuple[str, list[str]]:
    ref = next(c for c in candidates if c.role == "reference")
    r = ref.quality[metric]["value"]
    bar = r - inputs.tolerance
    reasons: list[str] = []
    cheap = [c for c in candidates if c.role in ("baseline", "base")]
    specs = [c for c in candidates if c.role == "specialist"]
    pct = lambda x: f"{100 * x:.1f}%"  # noqa: E731
    for c in sorted(cheap, key=lambda c: -c.quality[metric]["value"]):
        q = c.quality[metric]
        if q["value"] >= bar and (c.cost_per_1m is not None and ref.cost_per_1m is not None
                                  and c.cost_per_1m < ref.cost_per_1m):
            reasons.append(f"{c.spec} already scores {pct(q['value'])} {metric} (95% CI {pct(q['ci95'][0])}–"
                           f"{pct(q['ci95'][1])}) against the reference's {pct(r)}, within the "
                           f"{100 * inputs.tolerance:.0f}-point tolerance, without any training.")
            reasons.append(f"It costs {_usd(c.cost_per_1m)} per 1M requests against {_usd(ref.cost_per_1m)} for "
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
                       f"{_signed(diff.get('difference'))} points (paired 95% CI {_signed(diff.get('ci95', [None])[0])} "
                       f"to {_signed(diff.get('ci95', [None, None])[1])}), within the {100 * inputs.tolerance:.0f}-point tolerance.")
        cheaper = (best.cost_per_1m is not None and ref.cost_per_1m is not None and best.cost_per_1m < ref.cost_per_1m)
        if best.cost_per_1m is not None and ref.cost_per_1m is not None:
            reasons.append(f"Serving it costs {_usd(best.cost_per_1m)} per 1M requests at full load against "
                           f"{_usd(ref.cost_per_1m)} for the reference; one always-on machine pays for itself from "
                           f"{_count(econ.get('break_even_monthly_requests'))} requests a month.")
        if inputs.monthly_requests and econ.get("payback_months") is not None:
            if math.isinf(econ["payback_months"]):
                reasons.append(f"At {_count(inputs.monthly_requests)} requests a month the specialist costs "
                               f"{_usd(econ['specialist_usd_per_month'])} a month against "
                               f"{_usd(econ['api_usd_per_month'])} for the API: it never pays back at this volume.")
                return "DON'T TRAIN", reasons
            reasons.append(f"At {_count(inputs.monthly_requests)} requests a month it saves "
                           f"{_usd(econ['saving_usd_per_month'])} a month; training cost "
                           f"{_usd(econ['training_cost_usd'])}, paid back in {_months(econ['payback_months'])}.")
        if risk.get("summary"):
            reasons.append("Risk: " + risk["summary"] + ".")
        if ref.cost_per_1m is not None and best.cost_per_1m is not None and not cheaper:
            reasons.append("The specialist is not cheaper than the reference per request; train only for "
                           "latency or data-control reasons.")
            return "DON'T TRAIN", reasons
        return "TRAIN", reasons
    reasons.append(f"The best specialist, {best.spec}, scores {pct(q['value'])} {metric} (95% CI "
                   f"{pct(q['ci95'][0])}–{pct(q['ci95'][1])}) against {pct(r)} for {ref.spec}: "
                   f"{_signed(diff.get('difference'))} points, more than the {100 * inputs.tolerance:.0f}-point tolerance.")
    if curve is not None and curve.fit is not None:
        need = rows_to_reach(curve.fit, bar)
        p10 = curve.fit["at_10x"]
        if math.isfinite(need["rows"]) and need["rows"] <= 10 * curve.fit["n_max"]:
            reasons.append(f"The learning curve (error = {curve.fit['a']:.3g} x n^-{curve.fit['b']:.3f}) reaches "
                           f"{pct(bar)} at about {_count(need['rows'])} train rows (95% CI "
                           f"{_count(need['ci95'][0])}–{_count(need['ci95'][1])}): about {_count(need['more'])} "
                           f"more than the {_count(curve.fit['n_max'])} used.")
            return "NOT YET", reasons
        reasons.append(f"The learning curve projects {pct(p10['value'])} (95% CI {pct(p10['ci95'][0])}–"
                       f"{pct(p10['ci95'][1])}) with 10x the data ({_count(p10['n'])} rows), short of {pct(bar)}.")
        return "DON'T TRAIN", reasons
    reasons.append("Without a learning curve there is no estimate of what more traces would buy; the frontier "
                   "model wins on the evidence so far.")
    return "DON'T TRAIN", reasons


def _usd(x) -> str:
    if x is None:
        return "unknown"
    if x >= 100:
        return f"${x:,.0f}"
    return f"${x:,.2f}" if x >= 0.01 else f"${x:.4f}"


def _count(x) -> str:
    if x is None:
        return "unknown"
    if isinstance(x, float) and math.isinf(x):
        return "never"
    return f"{x:,.0f}"


def _signed(x) -> str:
    return "unknown" if x is None else f"{100 * x:+.1f}"


def _months(x) -> str:
    if x is None:
        return "unknown"
    if math.isinf(x):
        return "never"
    hours = x * 30.4 * 24
    if hours < 1:
        return "under an hour"
    if hours < 48:
        return f"{hours:.0f} hours"
    return f"{x * 30.4:.1f} days" if x < 1 else f"{x:.1f} months"
