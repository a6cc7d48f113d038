"""Find, read and export frozen datasets."""

from __future__ import annotations

from pathlib import Path

import orjson
import sqlalchemy as sa

from ..errors import NotFoundError, ProtegeError
from ..fsutil import folder_in_place
from ..traces import schema
from ..traces.store import Store

SPLITS = ("train", "validation", "test")


def list_datasets(store: Store, task: str | None = None) -> list[dict]:
    t = schema.datasets
    stmt = sa.select(t).order_by(t.c.task, t.c.version.desc())
    if task:
        stmt = stmt.where(t.c.task == task)
    with store.engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(stmt)]


def get_dataset(store: Store, ref: str) -> dict:
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
    data = dict(row._mapping)
    if not Path(data["path"]).exists():
        raise NotFoundError(f"dataset {data['id']}: its files at {data['path']} are gone; build it again "
                            "(`protege dataset build` restores the same version)")
    return data


def load_split(dataset: dict, split: str) -> list[dict]:
    if split not in SPLITS:
        raise ProtegeError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    path = Path(dataset["path"]) / f"{split}.jsonl"
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line]


def manifest(dataset: dict) -> dict:
    return orjson.loads((Path(dataset["path"]) / "manifest.json").read_bytes())


def export_dataset(dataset: dict, task, out: str | Path, fmt: str) -> dict[str, int]:
    """Write the dataset as OpenAI fine-tuning JSONL (one file per split, the specialist's
    prompt and the reference as the reply) or as a Hugging Face `datasets` folder."""
    from ..models.prompting import specialist_messages

    out = Path(out)
    if fmt not in ("openai", "hf"):
        raise ProtegeError(f"unknown export format {fmt!r}; choose openai or hf")
    sizes = {}
    with folder_in_place(out, replace=False) as tmp:
        if fmt == "openai":
            for split in SPLITS:
                rows = load_split(dataset, split)
                lines = [orjson.dumps({"messages": specialist_messages(task, r["input"])
                                       + [{"role": "assistant", "content": r["reference"]}]}) for r in rows]
                (tmp / f"{split}.jsonl").write_bytes(b"".join(line + b"\n" for line in lines))
                sizes[split] = len(rows)
        else:
            try:
                from datasets import Dataset, DatasetDict
            except ImportError:
                raise ProtegeError("exporting to a Hugging Face datasets folder needs the `datasets` package: "
                                   "pip install 'protege[hf]'") from None
            parts = {}
            for split in SPLITS:
                rows = [{"id": r["id"], "input": r["input"], "reference": r["reference"], "output": r["output"]}
                        for r in load_split(dataset, split)]
                sizes[split] = len(rows)
                if rows:
                    parts[split] = Dataset.from_list(rows)
            DatasetDict(parts).save_to_disk(str(tmp))
    return sizes
