"""Training-run records: what was trained, from what, how, on which machine, and how it went."""

from __future__ import annotations

import os
import platform
import sys
from datetime import datetime, timezone
from importlib import metadata
from typing import Any

import sqlalchemy as sa

from ..errors import NotFoundError
from ..ids import uuid7
from ..traces import schema
from ..traces.store import Store, id_prefix

PACKAGES = ("protege", "torch", "transformers", "peft", "trl", "accelerate", "safetensors", "tokenizers")


def environment() -> dict[str, Any]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    hw: dict[str, Any] = {"cpu_cores": os.cpu_count(), "machine": platform.machine(), "platform": platform.platform()}
    try:
        import torch

        hw["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            hw["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        pass
    return {"python": sys.version.split()[0], "packages": versions, "hardware": hw}


def start_training_run(store: Store, home, *, task: str, dataset: dict, base: str, method: str, recipe,
                       time_budget_min: float | None, train_fraction: float | None, extra: dict | None = None):
    """Record a running training run with its full resolved config; returns (run id, its folder)."""
    from pathlib import Path

    config = {"method": method, "recipe": recipe.model_dump(), "base": base, "dataset": dataset["id"],
              "dataset_hash": dataset["content_hash"], "time_budget_min": time_budget_min,
              "train_fraction": train_fraction, "environment": environment(), **(extra or {})}
    run_id = uuid7()
    folder = Path(home) / "runs" / run_id
    folder.mkdir(parents=True, exist_ok=True)
    with store.engine.begin() as conn:
        conn.execute(schema.runs.insert().values(
            id=run_id, kind="train", task=task, status="running", config=config, base_model=base,
            dataset_id=dataset["id"], metrics={}, checkpoint_path=str((folder / "model").resolve()),
            created_at=datetime.now(timezone.utc)))
    return run_id, folder


def update_run(store: Store, run_id: str, **values) -> None:
    if values.get("status") in ("done", "failed", "stopped"):
        values.setdefault("finished_at", datetime.now(timezone.utc))
    with store.engine.begin() as conn:
        conn.execute(schema.runs.update().where(schema.runs.c.id == run_id).values(**values))


def get_run(store: Store, run_id: str, kind: str | None = "train") -> dict:
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
    return dict(rows[0]._mapping)


def list_runs(store: Store, task: str | None = None, kind: str | None = None, limit: int = 50) -> list[dict]:
    t = schema.runs
    stmt = sa.select(t).order_by(t.c.id.desc()).limit(limit)
    if task:
        stmt = stmt.where(t.c.task == task)
    if kind:
        stmt = stmt.where(t.c.kind == kind)
    with store.engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(stmt)]
