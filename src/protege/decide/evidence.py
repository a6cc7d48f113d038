"""What decide reads from the store for a task: the newest bench result of every candidate
on a dataset (rescored on the test rows they all share), the training runs behind the
specialists, the newest learning curve, and the traces (the model the app called, for its
price, and live latencies). Every read of the store that decide makes is here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson
import sqlalchemy as sa

from ..bench.stats import bootstrap, paired
from ..datasets.registry import Dataset
from ..errors import ProtegeError
from ..runs.registry import RunRecord, list_runs
from ..tasks.metrics import get_metric, map_labels
from ..tasks.spec import Task
from ..traces import schema
from ..traces.store import Store
from .curve_fit import fit_power_law
from .economics import serving_cost, token_factor_productivity
from .types import CandidateEvidence, Curve, Inputs

# the order candidates are listed in, in every table of the report
ROLE_ORDER = {"reference": 0, "specialist": 1, "baseline": 2, "base": 3, "student": 4}


@dataclass
class Evidence:
    """The candidates compared for one decision, and what the comparison rests on."""

    reference: str
    metric: str
    """The primary metric: the task's first, leaving out the judge."""
    test_rows: int
    """Test rows every candidate was benched on: the rows quality is compared on."""
    candidates: list[CandidateEvidence]
    """Reference first, then specialists, baselines and bases, each best first."""
    prices_as_of: str | None
    notes: list[str]
    train_runs: list[RunRecord]
    """The task's finished training runs (newest first), read once for what follows."""


def runs_of(store: Store, task: str, kind: str) -> list[RunRecord]:
    """The task's finished runs of `kind` (bench, train, curve), newest first."""
    return list_runs(store, task=task, kind=kind, status="done", limit=None)


def decision_benches(store: Store, task: str, dataset_id: str) -> list[RunRecord]:
    """The finished benches on the dataset that a decision reads, newest first. Tagged benches
    are not candidates for it: a learning curve's score its points, the promotion gate's
    compare two runs with the serving one as their reference."""
    return [r for r in runs_of(store, task, "bench")
            if r["dataset_id"] == dataset_id and not (r["config"] or {}).get("tag")]


def gather(store: Store, task: Task, ds: Dataset, inputs: Inputs, *, prices=None,
           home: Path | None = None) -> Evidence:
    """Every candidate's newest bench on dataset `ds`, rescored on the shared test rows."""
    benches = decision_benches(store, task.name, ds.id)
    if not benches:
        raise ProtegeError(f"no bench runs for task {task.name} on dataset {ds.id}: run `protege bench "
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
    outputs = {spec: bench_outputs(run) for spec, run in newest.items()}
    ref_out = outputs[reference]
    # benches made at different times may cover different rows: compare row for row
    common = [i for i in ref_out if all(i in o for o in outputs.values())]
    if not common:
        raise ProtegeError("the candidates' bench runs share no test rows; bench them together on the same rows")
    if len(common) < len(ref_out):
        notes.append(f"quality is compared on the {len(common):,} test rows every candidate was benched on "
                     f"(the reference has {len(ref_out):,})")
    refs = [ref_out[i]["reference"] for i in common]
    metrics = {m: get_metric(m) for m in metric_names}
    mapped = {spec: map_labels(task, [o[i]["output"] for i in common])[0] for spec, o in outputs.items()}

    train_runs = runs_of(store, task.name, "train")
    trains = {r["id"]: r for r in train_runs}

    model = _trace_model(store, task.name)
    price = prices.lookup(model) if (prices is not None and model) else None
    candidates = []
    for spec, run in newest.items():
        m = run["metrics"]
        train = _train_record(spec, trains, inputs) if spec.startswith("run:") else None
        role = _role(spec, reference, train)
        quality = {name: bootstrap(metric_obj, mapped[spec], refs).as_dict() for name, metric_obj in metrics.items()}
        pair = ({} if role == "reference" else
                {name: paired(metric_obj, mapped[spec], mapped[reference], refs).as_dict()
                 for name, metric_obj in metrics.items()})
        cost, basis = serving_cost(m, inputs)
        tokens, tbasis = _tokens_per_request(m)
        candidates.append(CandidateEvidence(
            spec=spec, kind=m.get("kind") or "unknown", role=role, bench_run=run["id"], quality=quality,
            paired=pair, latency=_latency(m, store, task.name), throughput_rps=m.get("throughput_rps"),
            cost_per_1m=cost, cost_basis=basis, tokens_per_request=tokens, tokens_basis=tbasis, train=train))
    candidates.sort(key=lambda c: (ROLE_ORDER[c.role], -c.quality[metric]["value"]))
    for c in candidates:
        c.tfp = token_factor_productivity(c, metric, inputs)
    return Evidence(reference=reference, metric=metric, test_rows=len(common), candidates=candidates,
                    prices_as_of=price.as_of if price else None, notes=notes, train_runs=train_runs)


CAUSAL_METHODS = ("lora", "full", "distill", "grpo")


def not_benched(ev: Evidence, dataset_id: str) -> list[str]:
    """What the decision was not shown: trained runs never benched, and the kinds of candidate
    (an untrained small LM, a causal-LM specialist) that were not run at all."""
    candidates = ev.candidates
    benched = {c.spec[4:] for c in candidates if c.spec.startswith("run:")}
    trains = [r for r in ev.train_runs if r["dataset_id"] == dataset_id
              and not (r["config"] or {}).get("train_fraction")]
    notes = [f"trained but not benched: run:{r['id']} ({(r['config'] or {}).get('method')}); bench it to weigh it in"
             for r in trains if not any(r["id"].startswith(b) for b in benched)]
    if not any(c.spec.startswith("hf:") for c in candidates):
        notes.append("not run: an untrained small language model (`-c hf:smollm2-135m`, zero-shot)")
    if not any((r["config"] or {}).get("method") in CAUSAL_METHODS for r in trains):
        notes.append("not run: a causal-LM specialist (`protege train --method lora`, e.g. on SmolLM2-135M)")
    return notes


def latest_curve(store: Store, task: str, dataset_id: str) -> Curve | None:
    """The newest learning curve on the dataset, with its power-law fit."""
    curves = [r for r in runs_of(store, task, "curve") if r["dataset_id"] == dataset_id]
    if not curves:
        return None
    c = curves[0]
    pts = sorted(c["metrics"]["points"], key=lambda p: p["train_rows"])
    return Curve(run_id=c["id"], metric=c["metrics"]["metric"], points=pts, fit=fit_power_law(pts))


def decision_history(store: Store, task: str) -> list[dict]:
    """The task's rebases, newest first: when, what changed, the verdict before and after."""
    out = []
    for r in runs_of(store, task, "rebase"):
        m = r["metrics"] or {}
        out.append({"run_id": r["id"], "when": str(r["created_at"])[:10], "dataset": r["dataset_id"],
                    "changes": [f"{c['kind']} {c.get('old_model') or c['old']} → {c.get('new_model') or c['new']}"
                                for c in m.get("changes", [])],
                    "before": (m.get("before") or {}).get("verdict"), "after": (m.get("after") or {}).get("verdict"),
                    "reference_before": (m.get("before") or {}).get("reference"),
                    "reference_after": (m.get("after") or {}).get("reference"), "why": m.get("why")})
    return out


def bench_outputs(run: dict) -> dict[str, dict]:
    """A bench run's per-row outputs, by row id."""
    path = Path(run["outputs_path"] or "")
    if not path.exists():
        raise ProtegeError(f"bench run {run['id']} ({run['config'].get('candidate')}): its outputs file {path} is "
                           "missing; run the bench again")
    return {r["id"]: r for r in (orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip())}


def _role(spec: str, reference: str, train: dict | None) -> str:
    if spec == reference:
        return "reference"
    # taught only by the frontier's replies and scored out of fold: evidence of what
    # distillation from the logs inherits, never the recommendation
    if spec.startswith("student:") or (train or {}).get("method") == "student":
        return "student"
    if spec.startswith("run:"):
        return "specialist"
    if spec.startswith("hf:"):
        return "base"
    return "baseline"


def _latency(m: dict, store: Store, task: str) -> dict:
    latency = dict(m.get("latency_ms") or {})
    # an API's bench latency may be missing (replayed traces); live-captured traces still time it
    if latency.get("p50") is None and m.get("kind") in ("recorded", "api"):
        latency = _trace_latency(store, task) or latency
        if latency.get("p50") is None:
            latency["note"] = "unknown (imported traces carry no latency)"
    return latency


def _tokens_per_request(m: dict) -> tuple[float | None, str]:
    tin, tout = (m.get("tokens") or {}).get("in"), (m.get("tokens") or {}).get("out")
    if tin is not None and tout is not None:
        return tin + tout, m.get("tokens_basis") or "measured in the bench"
    return None, "unknown (this candidate reports no token counts)"


def _train_record(spec: str, trains: dict[str, dict], inputs: Inputs) -> dict | None:
    """The training run behind `run:ID` (an id prefix is enough), costed at the hardware price."""
    run_id = spec[4:]
    tr = trains.get(run_id) or next((r for rid, r in trains.items() if rid.startswith(run_id)), None)
    if tr is None:
        return None
    wall = tr["metrics"].get("wall_s")
    return {"run_id": tr["id"], "method": tr["config"].get("method"), "base": tr["base_model"],
            "wall_s": wall, "train_rows": tr["metrics"].get("train_rows"),
            "cost_usd": wall / 3600 * inputs.hardware_usd_per_hour if wall is not None else None}


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
