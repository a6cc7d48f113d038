"""The runs registry: every read and write of the `runs` table.

A run is one of four kinds, each written by its stage and read by the later ones:
`train` (protege train: the recipe, base, dataset and the model folder), `bench` (one
candidate on one frozen benchmark: its metrics and per-row outputs file), `curve` (a
learning curve: its points) and `rebase` (protege rebase: a decision made again with a new
base or frontier model, before and after). Records come back as `RunRecord` dicts, the row as stored,
so `protege runs show --json` prints exactly what is in the store.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, TypedDict

import sqlalchemy as sa

from ..errors import NotFoundError
from ..ids import uuid7
from ..traces import schema
from ..traces.store import Store, id_prefix

KINDS = ("train", "bench", "curve", "rebase")
FINISHED = ("done", "failed", "stopped")


class RunRecord(TypedDict):
    id: str
    kind: str
    """train | bench | curve | rebase"""
    task: str | None
    status: str
    """running | done | failed | stopped"""
    config: dict[str, Any]
    """Everything the run was made from (recipe, base, dataset, candidate spec, ...)."""
    base_model: str | None
    dataset_id: str | None
    metrics: dict[str, Any] | None
    checkpoint_path: str | None
    """train: the model folder."""
    outputs_path: str | None
    """bench: the per-row outputs file."""
    error: str | None
    created_at: datetime
    finished_at: datetime | None


def create_run(store: Store, *, kind: str, task: str | None, config: dict, status: str = "running",
               run_id: str | None = None, base_model: str | None = None, dataset_id: str | None = None,
               metrics: dict | None = None, checkpoint_path: str | None = None, outputs_path: str | None = None,
               conn=None) -> str:
    """Record a run; returns its id. A run recorded as finished gets its finish time now."""
    if kind not in KINDS:
        raise ValueError(f"unknown run kind {kind!r}")
    now = datetime.now(timezone.utc)
    run_id = run_id or uuid7()
    values = dict(id=run_id, kind=kind, task=task, status=status, config=config, base_model=base_model,
                  dataset_id=dataset_id, metrics=metrics, checkpoint_path=checkpoint_path,
                  outputs_path=outputs_path, created_at=now, finished_at=now if status in FINISHED else None)
    if conn is not None:
        conn.execute(schema.runs.insert().values(**values))
    else:
        with store.engine.begin() as c:
            c.execute(schema.runs.insert().values(**values))
    return run_id


def update_run(store: Store, run_id: str, **values) -> None:
    if values.get("status") in FINISHED:
        values.setdefault("finished_at", datetime.now(timezone.utc))
    with store.engine.begin() as conn:
        conn.execute(schema.runs.update().where(schema.runs.c.id == run_id).values(**values))


def get_run(store: Store, run_id: str, kind: str | None = "train") -> RunRecord:
    """A run by id or unique id prefix."""
    t = schema.runs
    prefix = id_prefix(run_id, f"{kind} run" if kind else "run", "protege runs list")
    with store.engine.connect() as conn:
        stmt = sa.select(t).where(t.c.id.startswith(prefix, autoescape=True))
        if kind:
            stmt = stmt.where(t.c.kind == kind)
        rows = conn.execute(stmt.limit(2)).all()
    if len(rows) != 1:
        what = "is ambiguous; give more characters" if rows else "does not exist"
        raise NotFoundError(f"{kind or ''} run {run_id!r} {what}; `protege runs list` shows them".replace("  ", " "))
    return dict(rows[0]._mapping)  # type: ignore[return-value]


def short_id(store: Store, run_id: str, kind: str | None = "train", min_len: int = 8) -> str:
    """The shortest prefix of `run_id` (at least `min_len` characters) that names no other
    run of `kind` in the store, the way git abbreviates commits: what `get_run` resolves."""
    t = schema.runs
    stmt = sa.select(t.c.id).where(t.c.id.startswith(run_id[:min_len], autoescape=True), t.c.id != run_id)
    if kind:
        stmt = stmt.where(t.c.kind == kind)
    with store.engine.connect() as conn:
        others = conn.execute(stmt).scalars().all()
    n = min_len
    while n < len(run_id) and any(o.startswith(run_id[:n]) for o in others):
        n += 1
    return run_id[:n]


def list_runs(store: Store, task: str | None = None, kind: str | None = None, limit: int | None = 50,
              status: str | None = None) -> list[RunRecord]:
    """Runs, newest first."""
    t = schema.runs
    stmt = sa.select(t).order_by(t.c.id.desc())
    for column, value in ((t.c.task, task), (t.c.kind, kind), (t.c.status, status)):
        if value is not None:
            stmt = stmt.where(column == value)
    if limit is not None:
        stmt = stmt.limit(limit)
    with store.engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(stmt)]  # type: ignore[misc]
