"""The deployments registry: every read and write of the `deployments` table.

A deployment says which finished training run serves a task, with its cascade (threshold and
fallback), who made it and when, and the evidence it was promoted on (the gate's figures, or
that it was forced). At most one deployment per task is `active` (the store enforces it);
the history is append-only: deploying a run marks the active one `replaced`, and a rollback
marks it `rolled_back` and records a new deployment of the run that served before it, so
"who put this run in production, and when" always has an answer.

    protege deploy TASK_FILE run:ID        (gate.py, then `activate`)
    protege rollback TASK_FILE             (`rollback`)
    protege deployments list|show
"""

from __future__ import annotations

import getpass
import socket
from datetime import datetime, timezone
from types import EllipsisType
from typing import Any, TypedDict

import sqlalchemy as sa

from ..errors import NotFoundError, ProtegeError
from ..ids import uuid7
from ..traces import schema
from ..traces.store import Store, id_prefix

STATUSES = ("active", "replaced", "rolled_back")


class DeploymentRecord(TypedDict):
    id: str
    task: str
    run_id: str
    status: str
    """active | replaced | rolled_back"""
    threshold: float | None
    fallback: str | None
    options: dict[str, Any]
    """How the run is loaded (e.g. quantize)."""
    evidence: dict[str, Any]
    """The gate's checks and figures, or what a rollback restored."""
    forced: bool
    created_by: str
    created_at: datetime
    previous_id: str | None
    """The deployment that was active when this one started."""
    ended_at: datetime | None
    ended_by: str | None
    end_reason: str | None
    alarm: dict[str, Any] | None
    """Set when a server following the deployment tripped an alarm (what, why, when, the
    action taken); None while healthy. Cleared by `reset_alarm` (protege deployments reset)."""


def whoami() -> str:
    """user@host of the person (or job) running the command."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def current(store: Store, task: str) -> DeploymentRecord | None:
    """The task's active deployment, or None."""
    t = schema.deployments
    with store.engine.connect() as conn:
        row = conn.execute(sa.select(t).where(t.c.task == task, t.c.status == "active")).first()
    return dict(row._mapping) if row else None  # type: ignore[return-value]


def get_deployment(store: Store, deployment_id: str) -> DeploymentRecord:
    """A deployment by id or unique id prefix."""
    t = schema.deployments
    prefix = id_prefix(deployment_id, "deployment", "protege deployments list")
    with store.engine.connect() as conn:
        rows = conn.execute(sa.select(t).where(t.c.id.startswith(prefix, autoescape=True)).limit(2)).all()
    if len(rows) != 1:
        what = "is ambiguous; give more characters" if rows else "does not exist"
        raise NotFoundError(f"deployment {deployment_id!r} {what}; `protege deployments list` shows them")
    return dict(rows[0]._mapping)  # type: ignore[return-value]


def list_deployments(store: Store, task: str | None = None, limit: int | None = 50) -> list[DeploymentRecord]:
    """Deployments, newest first."""
    t = schema.deployments
    stmt = sa.select(t).order_by(t.c.id.desc())
    if task is not None:
        stmt = stmt.where(t.c.task == task)
    if limit is not None:
        stmt = stmt.limit(limit)
    with store.engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(stmt)]  # type: ignore[misc]


def activate(store: Store, *, task: str, run_id: str, threshold: float | None, fallback: str | None,
             options: dict | None, evidence: dict, forced: bool, by: str | None = None,
             end_reason: str = "replaced by a new deployment", ended_status: str = "replaced",
             expect_active: str | None = None, previous_id: str | None | EllipsisType = ...) -> str:
    """Make `run_id` the task's active deployment in one transaction (the active one, if any,
    ends with `ended_status`); returns the new deployment's id. `expect_active`: refuse if
    the active deployment is no longer that one (someone else deployed meanwhile).
    `previous_id`: what a later rollback returns to (default: the deployment this replaces)."""
    t = schema.deployments
    by = by or whoami()
    now = datetime.now(timezone.utc)
    new_id = uuid7()
    try:
        with store.engine.begin() as conn:
            active = conn.execute(sa.select(t.c.id).where(t.c.task == task, t.c.status == "active")).scalar()
            if expect_active is not None and active != expect_active:
                raise ProtegeError(f"task {task}: the active deployment changed to {active or 'none'} while this "
                                   "command ran; look at `protege deployments list` and run it again")
            if active is not None:
                conn.execute(t.update().where(t.c.id == active).values(status=ended_status, ended_at=now, ended_by=by,
                                                                        end_reason=end_reason))
            conn.execute(t.insert().values(id=new_id, task=task, run_id=run_id, status="active", threshold=threshold,
                                           fallback=fallback, options=options or {}, evidence=evidence,
                                           forced=forced, created_by=by, created_at=now,
                                           previous_id=active if previous_id is ... else previous_id))
    except sa.exc.IntegrityError:
        raise ProtegeError(f"task {task}: another deployment became active at the same moment; look at "
                           "`protege deployments list` and run it again") from None
    return new_id


def rollback(store: Store, task: str, *, by: str | None = None, reason: str | None = None) -> DeploymentRecord:
    """End the active deployment and serve again what served before it, as a new deployment
    record; returns it."""
    active = current(store, task)
    if active is None:
        raise ProtegeError(f"task {task} has no active deployment to roll back; `protege deployments list --task "
                           f"{task}` shows its history")
    if active["previous_id"] is None:
        raise ProtegeError(f"deployment {active['id']} (run {active['run_id']}) has nothing before it to roll back "
                           f"to; `protege deployments list --task {task}` shows the history")
    prev = get_deployment(store, active["previous_id"])
    new_id = activate(store, task=task, run_id=prev["run_id"], threshold=prev["threshold"], fallback=prev["fallback"],
                      options=prev["options"], forced=False, by=by, ended_status="rolled_back",
                      end_reason=reason or "rolled back", expect_active=active["id"],
                      # a second rollback goes further back, never to the run just rolled back
                      previous_id=prev["previous_id"],
                      evidence={"rollback": {"from": active["id"], "restores": prev["id"],
                                             "restored_evidence": prev["evidence"]}})
    return get_deployment(store, new_id)


def raise_alarm(store: Store, deployment_id: str, alarm: dict) -> bool:
    """Record an alarm on an active deployment; False when one is recorded already (the first
    server to trip it says why; the others see it and act alike)."""
    t = schema.deployments
    with store.engine.begin() as conn:
        done = conn.execute(t.update().where(t.c.id == deployment_id, t.c.status == "active", t.c.alarm.is_(None))
                            .values(alarm=alarm))
    return bool(done.rowcount)


def reset_alarm(store: Store, task: str, *, by: str | None = None) -> DeploymentRecord:
    """A person clears the active deployment's alarm: servers go back to its own threshold."""
    active = current(store, task)
    if active is None:
        raise ProtegeError(f"task {task} has no active deployment")
    if active["alarm"] is None:
        raise ProtegeError(f"deployment {active['id']} has no alarm to reset")
    t = schema.deployments
    entry = {**active["alarm"], "reset_by": by or whoami(), "reset_at": datetime.now(timezone.utc).isoformat()}
    # the alarm's history stays with the deployment's evidence
    evidence = {**active["evidence"], "alarms": [*active["evidence"].get("alarms", []), entry]}
    with store.engine.begin() as conn:
        conn.execute(t.update().where(t.c.id == active["id"]).values(alarm=None, evidence=evidence))
    return get_deployment(store, active["id"])
