"""`protege serve --task TASK_FILE`: serve the task's active deployment, and follow it.

Every `poll_s` seconds the server reads the task's active deployment from the store (every
server process sharing one PostgreSQL store sees the same one). When it changes (`protege
deploy`, `protege rollback`), the new run is loaded beside the old on a worker thread, then
swapped in whole (model, threshold, fallback) between two batches: no request is dropped or
fails, requests in flight finish on the model that began them, and every trace names the
deployment that answered it. A run that cannot be loaded is logged as an error and the old
one keeps serving; with no active deployment left the server keeps the last one and says so.

Before a task's first deployment (a cold start), `--fallback` makes the frontier answer every
request, each stored as a fallback trace: the flywheel's first lesson (`protege retrain`),
until a deployment appears and is followed like any other.
"""

from __future__ import annotations

import asyncio
import logging

from ..deploy.registry import DeploymentRecord, current
from ..errors import ProtegeError
from ..models.base import Prediction
from .app import ServeApp, Served
from .drift import apart
from .fallback import Fallback
from .specialist import load_specialist

log = logging.getLogger("protege.serve")


def served_for(d: DeploymentRecord, store, home, task_file: str, options: dict) -> Served:
    """Load what deployment `d` serves (slow: a model load)."""
    load = {k: v for k, v in d["options"].items() if k != "alarm"}  # how the run is loaded
    load.update({k: v for k, v in options.items() if v is not None})  # the server's flags, where it set them
    name, predict, _, run_id = load_specialist(f"run:{d['run_id']}", store, home, task_file, load)
    return Served(name, predict, run_id, d["threshold"], Fallback(d["fallback"]) if d["fallback"] else None, d["id"],
                  d["options"].get("alarm"))


def _abstain(rows: list[dict]) -> list[Prediction]:
    return [Prediction(output="", confidence=None) for _ in rows]


def frontier_only(spec: str) -> Served:
    """What serves a task before its first deployment: the frontier, for every request."""
    fb = Fallback(spec)
    return Served(f"frontier-only:{fb.model}", _abstain, None, 1.0, fb)


def initial(store, task: str, home, task_file: str, options: dict,
            frontier: str | None = None) -> tuple[DeploymentRecord | None, Served]:
    """The deployment to serve and what it serves; with none yet, `frontier` answers everything."""
    d = current(store, task)
    if d is None:
        if frontier is not None:
            return None, frontier_only(frontier)
        raise ProtegeError(f"task {task} has no active deployment: `protege deploy {task_file} run:RUN_ID` makes one "
                           "(or serve a run directly: `protege serve run:RUN_ID`; or --fallback openai:MODEL@URL to "
                           "let the frontier answer until the first deployment)")
    return d, served_for(d, store, home, task_file, options)


class Follower:
    """The background job that keeps a ServeApp on the task's active deployment."""

    def __init__(self, store, task: str, home, task_file: str, deployment: DeploymentRecord | None, *,
                 poll_s: float = 2.0, options: dict | None = None):
        self.store, self.task, self.home, self.task_file = store, task, home, task_file
        self.deployment, self.poll_s, self.options = deployment, poll_s, dict(options or {})
        self.refused: set[str] = set()
        """Deployments that failed to load: logged once, not retried every poll."""
        self.warned_none = False

    @property
    def serving(self) -> str:
        return "the frontier alone (no deployment yet)" if self.deployment is None else \
            f"deployment {self.deployment['id']}"

    async def __call__(self, app: ServeApp) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                await self.check(app, loop)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the store unreachable, say: keep serving what we have
                log.error("protege serve: cannot read task %s's deployment (%s: %s); still serving %s",
                          self.task, type(exc).__name__, exc, self.serving)

    async def check(self, app: ServeApp, loop) -> None:
        d = await loop.run_in_executor(None, current, self.store, self.task)
        if d is None:
            if self.deployment is None:  # a cold start: the frontier answers until the first deployment
                return
            if not self.warned_none:
                log.error("protege serve: task %s has no active deployment any more; still serving deployment %s",
                          self.task, self.deployment["id"])
                self.warned_none = True
            return
        self.warned_none = False
        if (self.deployment is not None and d["id"] == self.deployment["id"]) or d["id"] in self.refused:
            return
        try:
            # apart: loading may compute (an export's trace), and no OpenMP threads may stay behind
            served = await loop.run_in_executor(None, apart, served_for, d, self.store, self.home, self.task_file,
                                                self.options)
        except Exception as exc:
            self.refused.add(d["id"])
            log.error("protege serve: deployment %s (run %s) cannot be loaded (%s: %s); still serving %s",
                      d["id"], d["run_id"], type(exc).__name__, exc, self.serving)
            return
        app.switch(served)
        log.warning("protege serve: task %s now served by deployment %s (run %s, was %s)", self.task, d["id"],
                    d["run_id"], self.serving)
        self.deployment = d
        if app.drift is not None:
            await loop.run_in_executor(None, apart, self.rebase_drift, app.drift, served)

    def rebase_drift(self, watch, served: Served) -> None:
        """The drift reference follows the serving run's training data."""
        from ..runs.registry import get_run
        from ..tasks.spec import load_task
        from .drift import reference_for_run

        if get_run(self.store, served.run_id)["dataset_id"] == watch.dataset_id:
            watch.threshold = served.threshold
            return
        ref, ds_id = reference_for_run(self.store, served.run_id, load_task(self.task_file), watch.encoder,
                                       served.predict)
        watch.rebase(ref, ds_id, served.threshold)
        log.warning("protege serve: drift now tested against dataset %s (%s)", ds_id, ref.basis)
