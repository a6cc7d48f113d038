"""Frozen datasets: the `Dataset` type every later stage is given, and finding, reading
and exporting them."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import orjson
import sqlalchemy as sa

from ..errors import NotFoundError, ProtegeError
from ..fsutil import folder_in_place
from ..traces import schema
from ..traces.store import Store

SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class Dataset:
    """One frozen version of a task's dataset: its row in the `datasets` table and its files
    (`train.jsonl`, `validation.jsonl`, `test.jsonl`, `manifest.json`) under `path`."""

    id: str
    """`task@version`."""
    task: str
    version: int
    content_hash: str
    """sha256 of the three splits' contents: equal hashes, equal data."""
    path: Path
    split_sizes: dict[str, int]
    created_at: datetime | None = None
    filters: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] | None = None

    @classmethod
    def from_row(cls, row: dict) -> Dataset:
        return cls(id=row["id"], task=row["task"], version=row["version"], content_hash=row["content_hash"],
                   path=Path(row["path"]), split_sizes=dict(row["split_sizes"] or {}), created_at=row["created_at"],
                   filters=dict(row["filters"] or {}), report=row["report"])

    def as_dict(self) -> dict:
        """The `datasets` row, as `protege dataset list --json` prints it."""
        return {"id": self.id, "name": self.task, "task": self.task, "version": self.version,
                "content_hash": self.content_hash, "filters": self.filters, "split_sizes": self.split_sizes,
                "report": self.report, "path": str(self.path), "created_at": self.created_at}

    def split(self, name: str) -> list[dict]:
        """The rows of one split, read from its file (each call reads it again)."""
        if name not in SPLITS:
            raise ProtegeError(f"unknown split {name!r}; choose one of {', '.join(SPLITS)}")
        path = self.path / f"{name}.jsonl"
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise NotFoundError(f"dataset {self.id}: {path} is gone; build it again "
                                "(`protege dataset build` restores the same version)") from None
        rows = []
        for n, line in enumerate(data.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(orjson.loads(line))
            except orjson.JSONDecodeError as e:
                raise ProtegeError(f"dataset {self.id}: {path}:{n} is not valid JSON ({e}); "
                                   "the frozen files were changed: build the dataset again") from None
        return rows

    @cached_property
    def manifest(self) -> dict:
        """What the build did: its steps, PII counts, leakage check, token report, task file."""
        path = self.path / "manifest.json"
        try:
            return orjson.loads(path.read_bytes())
        except FileNotFoundError:
            raise NotFoundError(f"dataset {self.id}: {path} is gone; build it again") from None
        except orjson.JSONDecodeError as e:
            raise ProtegeError(f"dataset {self.id}: {path} is not valid JSON ({e}); build it again") from None


def list_datasets(store: Store, task: str | None = None) -> list[Dataset]:
    t = schema.datasets
    stmt = sa.select(t).order_by(t.c.task, t.c.version.desc())
    if task:
        stmt = stmt.where(t.c.task == task)
    with store.engine.connect() as conn:
        return [Dataset.from_row(dict(r._mapping)) for r in conn.execute(stmt)]


def get_dataset(store: Store, ref: str) -> Dataset:
    """`task@version`, or a task name for its newest version."""
    t = schema.datasets
    with store.engine.connect() as conn:
        if "@" in ref:
            row = conn.execute(sa.select(t).where(t.c.id == ref)).first()
        else:
            row = conn.execute(sa.select(t).where(t.c.task == ref).order_by(t.c.version.desc()).limit(1)).first()
    if row is None:
        raise NotFoundError(f"no dataset {ref!r}; `protege dataset list` shows them, "
                            "`protege dataset build TASK_FILE` makes one")
    data = Dataset.from_row(dict(row._mapping))
    if not data.path.exists():
        raise NotFoundError(f"dataset {data.id}: its files at {data.path} are gone; build it again "
                            "(`protege dataset build` restores the same version)")
    return data


def export_dataset(dataset: Dataset, task, out: str | Path, fmt: str) -> dict[str, int]:
    """Write the dataset as OpenAI fine-tuning JSONL (one file per split, the specialist's
    prompt and the reference as the reply) or as a Hugging Face `datasets` folder."""
    from ..tasks.prompting import specialist_messages

    out = Path(out)
    if fmt not in ("openai", "hf"):
        raise ProtegeError(f"unknown export format {fmt!r}; choose openai or hf")
    sizes = {}
    with folder_in_place(out, replace=False) as tmp:
        if fmt == "openai":
            for split in SPLITS:
                rows = dataset.split(split)
                lines = [orjson.dumps({"messages": specialist_messages(task, r["input"])
                                       + [{"role": "assistant", "content": r["reference"]}]}) for r in rows]
                (tmp / f"{split}.jsonl").write_bytes(b"".join(line + b"\n" for line in lines))
                sizes[split] = len(rows)
        else:
            try:
                import datasets as hf_datasets
            except ImportError:
                raise ProtegeError("exporting to a Hugging Face datasets folder needs the `datasets` package: "
                                   "pip install 'protege[hf]'") from None
            parts = {}
            for split in SPLITS:
                rows = [{"id": r["id"], "input": r["input"], "reference": r["reference"], "output": r["output"]}
                        for r in dataset.split(split)]
                sizes[split] = len(rows)
                if rows:
                    parts[split] = hf_datasets.Dataset.from_list(rows)
            hf_datasets.DatasetDict(parts).save_to_disk(str(tmp))
    return sizes
