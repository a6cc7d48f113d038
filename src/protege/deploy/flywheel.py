"""`protege retrain TASK_FILE`: one turn of the flywheel, safe to run from cron.

    */30 * * * *  protege retrain tasks/intent.yaml --min-new 200

1. Build the next dataset version (datasets/flywheel.py): the serving run's dataset (its root)
   plus what the served traffic taught since: the frontier's answers (fallback and shadow
   traces) and human corrections. Content-addressed: the same traces give the same version.
2. Nothing new since the serving run's dataset (or fewer than `--min-new` new rows): stop,
   and say so. A run already trained on this version is reused, not trained again; one that
   was killed is resumed from its last checkpoint.
3. Train with the deployment's own recipe, base and method (the first turn of a cold start,
   with no deployment yet, names them: `--base`, `--method`).
4. With `--target` (or the deployment's), pick the cascade's threshold on the new version's
   validation split (`protege route calibrate`).
5. Bench the new run beside the serving run and the decision's reference (the frontier) on
   the version's test split, untagged: `protege decide` reads it as current evidence.
6. The promotion gate (gate.py) on that bench; if it passes, deploy: every `protege serve
   --task` follows within seconds. If not, the run is held, and the reason kept on it, so
   the next turn with nothing new does not bench it again.

One turn at a time per task and state folder (a lock file); a second one started meanwhile
does nothing and says so.
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..datasets.flywheel import next_dataset, root_of
from ..datasets.registry import SPLITS, Dataset, get_dataset, list_datasets
from ..errors import ProtegeError
from ..runs.registry import RunRecord, get_run, list_runs, update_run
from ..tasks.spec import Task
from ..traces.store import Store
from .gate import gate, reference_score
from .registry import activate, current


@dataclass
class Turn:
    """What one `protege retrain` did, and why."""

    action: str
    """promoted | held (the gate failed) | nothing new | waiting (fewer new rows than asked) | busy"""
    reasons: list[str]
    dataset: str | None = None
    new_rows: int = 0
    run_id: str | None = None
    trained: bool = False
    """False when a run already trained on this version was reused."""
    threshold: float | None = None
    deployment: str | None = None
    gate: dict | None = None
    learned: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Plan:
    """How to train, from the deployment (or, on a cold start, from what was given)."""

    base: str
    method: str
    recipe: object
    fallback: str | None
    threshold: float | None
    target: float | None
    options: dict


@contextmanager
def turn_lock(home: Path, task: str):
    """Hold the task's retrain lock (yields False when another process holds it)."""
    folder = Path(home) / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / f"retrain-{task}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def retrain(store: Store, task: Task, home: Path, *, min_new: int = 1, base: str | None = None,
            method: str | None = None, recipe=None, fallback: str | None = None, threshold: float | None = None,
            target: float | None = None, reference: str | None = None, margin: float = 0.01,
            tolerance: float = 0.02, bar: float | None = None, time_budget_min: float | None = None,
            prices=None, console=None, by: str | None = None) -> Turn:
    with turn_lock(home, task.name) as held:
        if not held:
            return Turn("busy", [f"another `protege retrain` of task {task.name} is running (lock "
                                 f"{Path(home) / 'locks'}); nothing done"])
        d = current(store, task.name)
        serving = get_run(store, d["run_id"]) if d else None
        plan = _plan(store, d, serving, base, method, recipe, fallback, threshold, target)
        if (plan.target is not None or threshold is not None) and not plan.fallback:
            raise ProtegeError("--target and --threshold set the cascade's threshold: they need a fallback "
                               "(--fallback openai:MODEL@URL, or a deployment that has one)")
        if serving is not None:
            root = root_of(store, get_dataset(store, serving["dataset_id"]))
        else:
            made = [ds for ds in list_datasets(store, task.name) if "flywheel" not in ds.manifest]
            root = made[0] if made else None  # newest first: what `protege dataset build` made last
        show = None if console is None else (lambda s: console.print(
            f"  {s.name:<26} {s.kept:>9,}{f'  -{s.removed:,}' if s.removed else ''}  [dim]{s.note}[/]", highlight=False))
        nd = next_dataset(store, task, root, on_step=show)
        seen = set() if serving is None else {
            r["id"] for s in SPLITS for r in get_dataset(store, serving["dataset_id"]).split(s)}
        new = nd.new_rows(seen)
        turn = Turn("", [], new_rows=new, learned=nd.learned)
        if serving is not None and new == 0:
            turn.action, turn.dataset = "nothing new", serving["dataset_id"]
            turn.reasons.append(f"no new rows since {serving['dataset_id']}, the dataset serving run:{serving['id']} "
                                f"was trained on ({_taught(nd)})")
            return turn
        if new < min_new:
            turn.action = "waiting"
            turn.reasons.append(f"{new:,} new rows ({_taught(nd)}), fewer than --min-new {min_new:,}; nothing "
                                "frozen, nothing trained")
            return turn
        ds = get_dataset(store, nd.freeze(store, task, home).id)
        turn.dataset = ds.id
        return _train_gate_promote(store, task, home, ds, d, serving, plan, turn, reference=reference, margin=margin,
                                   tolerance=tolerance, bar=bar, time_budget_min=time_budget_min, prices=prices,
                                   console=console, by=by, root=root)


def _plan(store, d, serving, base, method, recipe, fallback, threshold, target) -> Plan:
    from ..train.recipe import RECIPES, load_recipe

    if serving is None:
        if not base or not method:
            raise ProtegeError("the task has no deployment yet: the first `protege retrain` names what to train "
                               "(--base and --method; --fallback with --threshold or --target for the cascade)")
        return Plan(base, method, recipe or load_recipe(method), fallback, threshold, target, {})
    cfg = serving["config"]
    method = method or cfg["method"]
    if recipe is None:
        recipe = RECIPES[method].model_validate(cfg["recipe"]) if method == cfg["method"] else load_recipe(method)
    options = dict(d["options"] or {})
    return Plan(base or cfg["base"], method, recipe, fallback or d["fallback"],
                d["threshold"] if threshold is None else threshold,
                options.get("target") if target is None else target, options)


def _taught(nd) -> str:
    taught = ", ".join(f"{k} {v:,}" for k, v in sorted(nd.learned.items())) or "none"
    passed = "; passed over: " + ", ".join(f"{k} {v:,}" for k, v in sorted(nd.passed_over.items())) \
        if nd.passed_over else ""
    return f"taught by the served traffic: {taught}{passed}"


def _existing(store: Store, task: Task, ds: Dataset, plan: Plan) -> RunRecord | None:
    """A run of this plan already started on this version by an earlier turn."""
    for r in list_runs(store, task=task.name, kind="train", limit=None):
        cfg = r["config"] or {}
        if r["dataset_id"] == ds.id and cfg.get("retrain") and cfg.get("method") == plan.method \
                and cfg.get("base") == plan.base:
            return r
    return None


def _train_gate_promote(store, task, home, ds, d, serving, plan: Plan, turn: Turn, *, reference, margin, tolerance,
                        bar, time_budget_min, prices, console, by, root) -> Turn:
    from ..train.api import resume, train

    run = _existing(store, task, ds, plan)
    if run is not None and run["status"] == "done":
        held = (run["metrics"] or {}).get("retrain_gate")
        turn.run_id = run["id"]
        if held is not None and not held["passed"]:
            turn.action = "held"
            turn.gate = held
            turn.reasons.append(f"run:{run['id']} was trained on {ds.id} and failed the gate; nothing new since: "
                                + "; ".join(c["sentence"] for c in held["checks"] if not c["ok"]))
            return turn
        turn.reasons.append(f"run:{run['id']} was already trained on {ds.id}: reused")
    elif run is not None:
        turn.run_id, turn.trained = resume(store, task, home, run["id"], console=console), True
        turn.reasons.append(f"run:{run['id']} on {ds.id} had stopped ({run['status']}): resumed from its last "
                            "checkpoint")
    else:
        turn.run_id = train(store, task, ds, home, plan.base, plan.method, plan.recipe,
                            time_budget_min=time_budget_min, console=console, prices=prices,
                            config_extra={"retrain": {"deployment": d["id"] if d else None,
                                                      "new_rows": turn.new_rows}})
        turn.trained = True
        turn.reasons.append(f"trained run:{turn.run_id} ({plan.method} on {plan.base}) on {ds.id}: "
                            f"{turn.new_rows:,} new rows ({_taught_counts(turn.learned)})")
    metric = next((m for m in task.metric_names if m != "judge"), None)
    threshold = plan.threshold
    if plan.target is not None:
        threshold = _calibrated(store, task, home, ds, turn.run_id, plan.target, root, metric)
        turn.reasons.append(f"threshold {threshold:.4f}: the lowest whose cascade reaches {plan.target:g} on "
                            f"{ds.id}'s validation split")
    turn.threshold = threshold
    ref = None if reference == "none" else reference or _reference(store, task, ds, root, metric)
    result = gate(store, task, ds, home, turn.run_id, margin=margin, tolerance=tolerance, prices=prices,
                  threshold=threshold if plan.fallback else None, bar=bar, reference=ref)
    turn.gate = result.evidence()
    for c in result.checks:
        turn.reasons.append(f"gate {'pass' if c.ok else 'FAIL'}: {c.name}: {c.sentence}")
    if not result.passed:
        r = get_run(store, turn.run_id)
        update_run(store, turn.run_id, metrics={**(r["metrics"] or {}), "retrain_gate": turn.gate})
        turn.action = "held"
        return turn
    options = {**plan.options, **({"target": plan.target} if plan.target is not None else {})}
    turn.deployment = activate(store, task=task.name, run_id=turn.run_id, threshold=threshold if plan.fallback else None,
                               fallback=plan.fallback, options=options,
                               evidence={**turn.gate, "retrain": {"dataset": ds.id, "new_rows": turn.new_rows,
                                                                  "learned": turn.learned}},
                               forced=False, by=by or "protege retrain", expect_active=d["id"] if d else None)
    turn.action = "promoted"
    turn.reasons.append(f"deployed {turn.deployment}: run:{turn.run_id} serves task {task.name}"
                        + (f", replacing run:{serving['id']}" if serving else " (its first deployment)"))
    return turn


def _taught_counts(learned: dict) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in sorted(learned.items())) or "none from the served traffic"


def _reference(store: Store, task: Task, ds: Dataset, root: Dataset | None, metric: str) -> str | None:
    """The decision's reference: named by the newest bench on this version or its root; on a
    cold start with the frontier's answers as references, their replay."""
    for where in (ds, root):
        if where is not None:
            ref = reference_score(store, task, where, metric)
            if ref is not None:
                return ref["reference"]
    return "replay" if task.references == "frontier" else None


def _calibrated(store, task, home, ds, run_id, target, root, metric) -> float:
    from ..serve.calibrate import calibrate

    if task.references == "frontier":
        quality = 1.0  # the references are the frontier's own answers
    else:
        ref = next((r for r in (reference_score(store, task, w, metric) for w in (ds, root) if w is not None) if r),
                   None)
        if ref is None:
            raise ProtegeError(f"--target: the fallback's quality on task {task.name}'s references is unknown; bench "
                               "the reference first (`protege bench TASK_FILE -c replay ...`), or give --threshold")
        quality = ref["value"]
    result = calibrate(store, task, home, run_id, target=target, fallback_quality=quality, dataset=ds.id)
    if result["threshold"] is None:
        raise ProtegeError(f"--target {target:g}: no threshold reaches it on {ds.id}'s validation split (the fallback "
                           f"alone gives {quality:.4f}); lower the target")
    return result["threshold"]
