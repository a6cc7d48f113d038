"""Entry points of `protege train`: start a run (any method), resume a killed one, and
launch several processes through torchrun.

    protege train TASK --base smollm2-135m --method lora [--nproc 2]
    protege train TASK --resume RUN_ID

Methods: classifier, student (classifiers taught only by the recorded frontier replies, out
of fold: student.py), lora, full, distill (relabel the train inputs with a teacher, record
that as a new dataset version, then LoRA SFT on it) and grpo (see grpo.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

from ..datasets.registry import Dataset
from ..errors import ProtegeError
from ..runs.registry import get_run, update_run
from ..tasks.spec import Task
from ..traces.store import Store
from .distributed import Dist
from .job import Job
from .loop import run_loop
from .runs import start_training_run


def build_job(store: Store, task: Task, dataset: Dataset, home: Path, base: str, method: str, recipe, folder: Path,
              run_id: str, train_fraction: float | None) -> Job:
    """The `Job` of `method`; each method's module is imported only when it runs (torch, transformers)."""
    if base.startswith("run:"):  # start from a finished run's model (e.g. GRPO on top of SFT)
        base = get_run(store, base[4:])["checkpoint_path"]
    if method == "classifier":
        from .classifier import ClassifierJob

        return ClassifierJob(task, dataset, home, base, recipe, folder, run_id, train_fraction=train_fraction)
    if method in ("lora", "full", "distill"):
        from .sft import SFTJob

        return SFTJob(task, dataset, home, base, recipe, folder, run_id, train_fraction=train_fraction,
                      method="full" if method == "full" else "lora", card_method=method)
    if method == "grpo":
        from .grpo import GRPOJob

        return GRPOJob(task, dataset, home, base, recipe, folder, run_id, train_fraction=train_fraction)
    from .recipe import RECIPES

    raise ProtegeError(f"unknown method {method!r}; choose one of: {', '.join(RECIPES)}")


def train(store: Store, task: Task, dataset: Dataset, home: Path, base: str, method: str, recipe, *,
          time_budget_min: float | None = None, console=None, train_fraction: float | None = None,
          on_step: Callable[[int], None] | None = None, prices=None, config_extra: dict | None = None) -> str:
    """Train a specialist; returns the run id (bench it as run:RUN_ID). `config_extra`: more
    keys recorded in the run's config (e.g. the flywheel turn that started it)."""
    dist = Dist.from_env()
    extra = dict(config_extra or {})
    if method == "student" and train_fraction is not None:
        raise ProtegeError("method student learns from every reply the teacher gave: it has no learning curve "
                           "(train_fraction); curve the method the student is compared with")
    if method == "distill":
        dataset = distill_dataset(store, task, dataset, home, recipe.teacher, console=console, dist=dist,
                                  prices=prices)
        extra["distilled_from"] = recipe.teacher
    run_id = None
    if dist.main:
        run_id, _ = start_training_run(store, home, task=task.name, dataset=dataset, base=base, method=method,
                                       recipe=recipe, time_budget_min=time_budget_min, train_fraction=train_fraction,
                                       extra={"processes": dist.world, "task_file": str(task.path or ""), **extra})
    run_id = dist.broadcast(run_id)
    _run(store, task, dataset, home, base, method, recipe, run_id, time_budget_min=time_budget_min,
         console=console, train_fraction=train_fraction, on_step=on_step, resume=False, dist=dist)
    return run_id


def resume(store: Store, task: Task, home: Path, run_id: str, *, console=None,
           on_step: Callable[[int], None] | None = None) -> str:
    """Go on with a killed or failed run from its last checkpoint."""
    from ..datasets.registry import get_dataset
    from .recipe import RECIPES

    run = get_run(store, run_id)
    if run["status"] == "done":
        raise ProtegeError(f"run {run['id']} already finished; nothing to resume")
    if run["task"] != task.name:
        raise ProtegeError(f"run {run['id']} trained task {run['task']!r}, not {task.name!r}")
    cfg = run["config"]
    dist = Dist.from_env()
    recipe = RECIPES[cfg["method"]].model_validate(cfg["recipe"])
    dataset = get_dataset(store, cfg["dataset"])
    if dist.main:
        update_run(store, run["id"], status="running", error=None)
    _run(store, task, dataset, home, cfg["base"], cfg["method"], recipe, run["id"],
         time_budget_min=cfg.get("time_budget_min"), console=console, train_fraction=cfg.get("train_fraction"),
         on_step=on_step, resume=True, dist=dist)
    return run["id"]


def _run(store, task, dataset, home, base, method, recipe, run_id, *, time_budget_min, console, train_fraction,
         on_step, resume: bool, dist: Dist) -> None:
    folder = Path(home) / "runs" / run_id
    try:
        if method == "student":  # one classifier per fold, each through the loop
            from .student import train_student

            metrics = train_student(store, task, dataset, home, base, recipe, folder, run_id,
                                    time_budget_min=time_budget_min, console=console, resume=resume, dist=dist,
                                    on_step=on_step)
        else:
            job = build_job(store, task, dataset, home, base, method, recipe, folder, run_id, train_fraction)
            metrics = run_loop(store, run_id, folder, job, recipe, time_budget_min=time_budget_min,
                               console=console, resume=resume, dist=dist, on_step=on_step)
        if dist.main:
            update_run(store, run_id, status="done", metrics=metrics)
    except BaseException as exc:
        if dist.main:
            update_run(store, run_id, status="failed", error=f"{type(exc).__name__}: {exc}"[:2000])
        raise


def distill_dataset(store: Store, task: Task, dataset: Dataset, home: Path, teacher: str | None, *, console=None,
                    dist: Dist | None = None, prices=None) -> Dataset:
    """A new dataset version whose train references are the teacher's answers (validation
    and test keep theirs: the benchmark still measures against the reference). The teacher
    is any candidate spec, usually `openai:MODEL@URL`; its answers go through the bench's
    response cache, so a second run pays nothing."""
    from ..datasets.build import Step, freeze_splits
    from ..datasets.registry import get_dataset
    from ..models.base import Context
    from ..models.registry import build_candidate

    if not teacher:
        raise ProtegeError("method distill needs a teacher: set recipe key teacher (e.g. --set "
                           "teacher=openai:gpt-4o-mini@https://api.openai.com/v1)")
    dist = dist or Dist()
    if dist.main:
        train = dataset.split("train")
        ctx = Context(task=task, dataset=dataset, home=home, train=train, prices=prices, store=store)
        cand = build_candidate(teacher, ctx)
        try:
            from rich.progress import Progress

            with Progress(console=console, transient=False) as bar:
                tid = bar.add_task(f"relabelling with {teacher}", total=len(train))
                preds = cand.predict(train, progress=lambda n: bar.advance(tid, n))
        finally:
            getattr(cand, "close", lambda: None)()
        failed = sum(1 for p in preds if p.error or not (p.output or "").strip())
        if failed == len(train):
            first = next((p.error for p in preds if p.error), "empty answers")
            raise ProtegeError(f"teacher {teacher} answered none of the {len(train)} train inputs: {first}")
        relabelled = [{**row, "reference": p.output.strip(), "output": p.output.strip(), "teacher": teacher}
                      for row, p in zip(train, preds) if not p.error and (p.output or "").strip()]
        m = dataset.manifest
        steps = [Step(**s) for s in m["steps"]] + [Step("distill", len(relabelled), failed,
                                                        f"train references relabelled by {teacher} "
                                                        f"(from {dataset.id})")]
        result = freeze_splits(store, task, home, {"train": relabelled, "validation": dataset.split("validation"),
                                                   "test": dataset.split("test")},
                               steps=steps, pii_counts=m.get("pii", {}), leakage=m.get("leakage", {}),
                               test_from=m.get("test_from"))
        ref = result.id
    else:
        ref = None
    return get_dataset(store, dist.broadcast(ref))


def launch(argv: list[str], nproc: int) -> int:
    """Run this same `protege train` command in `nproc` processes through torchrun."""
    if os.environ.get("WORLD_SIZE"):
        raise ProtegeError("--nproc inside a torchrun launch: drop --nproc (torchrun already started the processes)")
    args, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        args.append(a)
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(port), "-m", "protege", *args]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc))}
    return subprocess.call(cmd, env=env)
