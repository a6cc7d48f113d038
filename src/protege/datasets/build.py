"""Build a frozen, versioned dataset for a task from the stored traces.

    protege dataset build examples/banking77/task.yaml

Steps, each reported with counts: select the task's traces, drop error traces, extract
input/output and normalise, drop outputs outside the label set (classification), remove
exact and near-duplicate inputs, redact PII, split (stratified, temporal or random; or the
`--test-from` file as test), and check that no test row has a near-duplicate in train or
validation (any that do are removed from train/validation). The rows are written to
`HOME/datasets/<hash>/` and named by the hash of their content, so building the same
dataset twice gives the same hash and no new version.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import socket
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import orjson
import sqlalchemy as sa

from ..errors import ProtegeError
from ..fsutil import folder_in_place
from ..tasks.metrics import LabelMap, normalize_text
from ..tasks.spec import Task
from ..traces import schema
from ..traces.store import Store
from . import dedupe, pii
from .registry import SPLITS

STALE_AFTER_S = 24 * 3600
"""A build folder this old whose builder cannot be checked (another machine, older naming) is stale."""
_BUILD_DIR = re.compile(r"\.build-(?P<pid>\d+)-(?P<host>.+)-[^-]+")


@dataclass
class Step:
    name: str
    kept: int
    removed: int = 0
    note: str = ""


@dataclass
class BuildResult:
    id: str
    task: str
    version: int
    path: Path
    sizes: dict[str, int]
    steps: list[Step]
    pii: dict[str, int]
    leakage: dict[str, int]
    tokens: dict[str, Any] | None
    created: bool
    """False when an identical dataset already existed (same hash): nothing was written."""

    def as_dict(self) -> dict:
        return {"id": self.id, "task": self.task, "version": self.version, "path": str(self.path),
                "sizes": self.sizes, "steps": [s.__dict__ for s in self.steps], "pii": self.pii,
                "leakage": self.leakage, "tokens": self.tokens, "created": self.created}


def _text(content: Any) -> str:
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""


def example_from_trace(row: dict, group_by: str | None = None) -> dict | None:
    """The dataset row for a stored trace (None when it has no user message): its last user
    message is the input, its reply the output, a human correction (feedback) the gold."""
    request = row.get("request") or {}
    messages = request.get("messages") if isinstance(request, dict) else None
    if isinstance(messages, list) and messages:
        user = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
        if not user:
            return None
        text = _text(user[-1].get("content"))
    elif isinstance(request, dict) and isinstance(request.get("prompt"), str):
        text, messages = request["prompt"], [{"role": "user", "content": request["prompt"]}]
    else:
        return None
    feedback = row.get("feedback") or {}
    created = row.get("created_at")
    if isinstance(created, datetime) and created.tzinfo is None:
        created = created.replace(tzinfo=timezone.utc)
    return {
        "id": row.get("id"),
        "input": text,
        "output": row.get("output_text"),
        # what the recorded call cost and took: the `replay` candidate reports these
        "recorded": {k: row.get(k) for k in ("model", "latency_ms", "prompt_tokens", "completion_tokens", "cost_usd")},
        "gold": feedback.get("correction") if isinstance(feedback, dict) else None,
        "messages": messages,
        "created_at": created.isoformat() if isinstance(created, datetime) else created,
        **({"group": str((row.get("metadata") or {}).get(group_by))} if group_by else {}),
    }


def example_from_request(body: dict) -> dict | None:
    """The dataset row a chat request would make (`input` is its last user message): what a
    served specialist answers, exactly as it was trained."""
    return example_from_trace({"request": body})


FLYWHEEL_SOURCES = ("serve", "shadow")
"""Traces protege's own server wrote: the flywheel's (datasets/flywheel.py), where only the
frontier's answers and human corrections become references, never the specialist's own."""


def _match(row: dict, task: Task) -> bool:
    f = task.traces
    if f.models and row.get("model") not in f.models:
        return False
    if f.sources and row.get("source") not in f.sources:
        return False
    if not f.sources and row.get("source") in FLYWHEEL_SOURCES:
        return False
    created = row.get("created_at")
    if isinstance(created, datetime):
        created = created if created.tzinfo else created.replace(tzinfo=timezone.utc)
        for bound, after in ((f.since, True), (f.until, False)):
            if bound is None:
                continue
            b = bound if isinstance(bound, datetime) else datetime(bound.year, bound.month, bound.day)
            b = b if b.tzinfo else b.replace(tzinfo=timezone.utc)
            if (after and created < b) or (not after and created >= b):
                return False
    meta = row.get("metadata") or {}
    return all(meta.get(k) == v for k, v in f.metadata.items())


def _split(pool: list[dict], task: Task, has_test: bool) -> dict[str, list[dict]]:
    cfg = task.split
    rng = random.Random(cfg.seed)
    test_frac = 0.0 if has_test else cfg.test_fraction
    val_frac = cfg.validation_fraction
    out: dict[str, list[dict]] = {s: [] for s in SPLITS}

    def cut(rows: list[dict]) -> None:
        n = len(rows)
        n_test = round(n * test_frac)
        n_val = round(n * val_frac)
        out["test"] += rows[n - n_test:] if n_test else []
        out["validation"] += rows[n - n_test - n_val:n - n_test] if n_val else []
        out["train"] += rows[:n - n_test - n_val]

    if cfg.group_by:
        # whole groups go to one split; groups ordered by time (temporal) or shuffled
        groups: dict[str, list[dict]] = defaultdict(list)
        for r in pool:
            groups[r["group"]].append(r)
        keys = sorted(groups, key=lambda g: min((r["created_at"] or "") for r in groups[g])) \
            if cfg.method == "temporal" else sorted(groups)
        if cfg.method != "temporal":
            rng.shuffle(keys)
        n = len(pool)
        bounds = (n * (1 - test_frac - val_frac), n * (1 - test_frac))
        seen = 0
        for g in keys:
            name = "train" if seen < bounds[0] else "validation" if seen < bounds[1] else "test"
            out[name] += groups[g]
            seen += len(groups[g])
    elif cfg.method == "temporal":
        cut(sorted(pool, key=lambda r: (r["created_at"] or "", r["id"] or "")))
    elif cfg.method == "stratified":
        by_label: dict[str, list[dict]] = defaultdict(list)
        for r in pool:
            by_label[r["reference"]].append(r)
        for label in sorted(by_label):
            rows = by_label[label]
            rng.shuffle(rows)
            cut(rows)
    else:
        rows = list(pool)
        rng.shuffle(rows)
        cut(rows)
    return out


def _token_report(task: Task, rows: list[dict], home: Path) -> dict[str, Any] | None:
    """Tokens per request of the app's original prompt vs the specialist's own prompt."""
    from ..tasks.prompting import specialist_messages
    from ..tasks.tokens import SAMPLE, mean_token_count, task_tokenizer

    tok = task_tokenizer(task, home)
    if tok is None or not rows:
        return None
    original = mean_token_count(tok, [[_text(m.get("content")) for m in r["messages"]] for r in rows[:SAMPLE]])
    specialist = mean_token_count(tok, [[_text(m.get("content")) for m in specialist_messages(task, r["input"])]
                                   for r in rows[:SAMPLE]])
    return {"tokenizer": task.tokenizer, "rows_measured": min(len(rows), SAMPLE), "original_prompt_tokens": original,
            "specialist_prompt_tokens": specialist, "saved_per_request": original - specialist,
            "saved_fraction": (original - specialist) / original if original else None}


def build_dataset(store: Store, task: Task, home: Path, test_from: str | Path | None = None,
                  on_step: Callable[[Step], None] | None = None) -> BuildResult:
    steps = step = Steps(on_step)
    if task.split.test == "reviewed" and test_from is not None:
        raise ProtegeError(f"task {task.name}: split.test is reviewed (the reviewed traces are the test split); "
                           "drop --test-from, or set split.test to sample")
    if task.references == "test_file" and test_from is None:
        raise ProtegeError(f"task {task.name} takes its references from a labelled test file: pass --test-from FILE")
    # 1. select
    selected, errors = [], 0
    for row in store.iter_traces(task=task.traces.task or task.name):
        if not _match(row, task):
            continue
        if row["status"] != "ok" and not task.traces.include_errors:
            errors += 1
            continue
        selected.append(row)
    step("select traces", len(selected) + errors, note=f"task tag {task.traces.task or task.name!r}")
    if not selected and test_from is None:
        raise ProtegeError(f"no stored traces match task {task.name!r} (tag {task.traces.task or task.name!r}); "
                           "`protege traces stats` shows the task tags in the store")
    step("drop error traces", len(selected), errors)

    # 2. extract and normalise
    labels = LabelMap(task.labels) if task.kind == "classification" else None
    norm = task.normalize

    def prepare(rows: list[dict], name: str, from_file: bool) -> list[dict]:
        out, no_input, invalid = [], 0, 0
        for row in rows:
            ex = example_from_trace(row, task.split.group_by)
            if ex is None or not ex["input"].strip() or ex["output"] is None:
                no_input += 1
                continue
            ex["output"] = normalize_text(ex["output"], norm)
            ref = ex["gold"] if task.references in ("feedback", "test_file") and ex["gold"] is not None else ex["output"]
            if task.references == "test_file" and from_file and ex["gold"] is None:
                ref = ex["output"]  # the file's reply is its label
            ex["reference"] = normalize_text(ref, norm)
            if labels is not None:
                mapped = labels(ex["reference"])
                if mapped is None:
                    invalid += 1
                    continue
                ex["reference"] = mapped
            ex["has_gold"] = ex["gold"] is not None or from_file
            del ex["gold"]
            out.append(ex)
        step(f"extract {name}", len(out), no_input, "no user message or no output" if no_input else "")
        if labels is not None:
            step(f"label set ({name})", len(out), invalid, "outputs outside the task's labels" if invalid else "")
        return out

    pool = prepare(selected, "traces", False)
    test_rows = None
    if test_from is not None:
        from ..traces.importers import read_records

        records = [r.to_row() for r in read_records(test_from)]
        test_rows = prepare(records, "test file", True)
        if not test_rows:
            raise ProtegeError(f"{test_from}: no usable rows for task {task.name}")

    if task.split.test == "reviewed":
        test_rows = [ex for ex in pool if ex["has_gold"]]
        pool = [ex for ex in pool if not ex["has_gold"]]
        step("reviewed traces to test", len(pool) + len(test_rows), note=f"{len(test_rows):,} reviewed")
        if not test_rows:
            raise ProtegeError(f"task {task.name}: split.test is reviewed but no selected trace carries a human "
                               "correction (feedback.correction)")

    # 3. dedupe (the pool only: a given test file, or the reviewed traces, is the benchmark as it is)
    if task.dedupe.exact:
        seen: dict[str, str] = {}
        kept, conflicts = [], 0
        for ex in pool:
            key = dedupe.canonical(ex["input"])
            if key in seen:
                conflicts += seen[key] != ex["reference"]
                continue
            seen[key] = ex["reference"]
            kept.append(ex)
        step("exact duplicates", len(kept), len(pool) - len(kept),
             f"{conflicts} of them with a different output" if conflicts else "")
        pool = kept
    pool = drop_near_duplicates(pool, task, step)

    # 4. PII
    pii_counts = redact_rows(pool + (test_rows or []), task)
    step("PII redaction", len(pool) + len(test_rows or []),
         note=", ".join(f"{k} {v}" for k, v in pii_counts.items()) or "off")

    # 5. split
    if task.references == "feedback" and test_rows is None:
        gold = [ex for ex in pool if ex["has_gold"]]
        rest = [ex for ex in pool if not ex["has_gold"]]
        splits = _split(gold, task, False)
        splits["train"] += [ex for ex in _split(rest, task, True)["train"]]
        splits["validation"] += [ex for ex in _split(rest, task, True)["validation"]]
    else:
        splits = _split(pool, task, test_rows is not None)
    if test_rows is not None:
        splits["test"] = test_rows
    note = f"{task.split.method}" + (f" by {task.split.group_by}" if task.split.group_by else "") + (
        f", test from {test_from}" if test_from else ", test: the reviewed traces" if task.split.test == "reviewed" else "")
    step("split", sum(len(v) for v in splits.values()), note=note)
    if not splits["test"]:
        raise ProtegeError(f"task {task.name}: the test split is empty; add traces, raise split.test_fraction, "
                           "or pass --test-from FILE")

    # 6. leakage: no test row may have a near-duplicate in train or validation
    leakage = remove_leaks(splits, task)
    step("leakage check", sum(len(v) for v in splits.values()),
         leakage["removed_from_train"] + leakage["removed_from_validation"],
         "train/validation rows near-duplicating a test row were removed; 0 remain")

    # 7. freeze
    return freeze_splits(store, task, home, splits, steps=steps, pii_counts=pii_counts, leakage=leakage,
                         test_from=test_from)


class Steps(list):
    """A build's steps, each reported (`on_step`) as it is taken: `steps(name, kept, removed, note)`."""

    def __init__(self, on_step: Callable[[Step], None] | None = None):
        super().__init__()
        self.on_step = on_step

    def __call__(self, name: str, kept: int, removed: int = 0, note: str = "") -> None:
        self.append(Step(name, kept, removed, note))
        if self.on_step:
            self.on_step(self[-1])


def drop_near_duplicates(rows: list[dict], task: Task, step: Steps) -> list[dict]:
    """The rows less those near-duplicating an earlier one (when the task asks for it)."""
    if task.dedupe.near_threshold is None or not rows:
        return rows
    first = dedupe.near_duplicate_groups([ex["input"] for ex in rows], task.dedupe.near_threshold)
    kept = [ex for ex, f in zip(rows, first) if f == -1]
    step("near duplicates", len(kept), len(rows) - len(kept),
         f"MinHash/LSH, Jaccard >= {task.dedupe.near_threshold} on character 5-grams")
    return kept


def redact_rows(rows: list[dict], task: Task) -> dict[str, int]:
    """Redact the task's PII kinds in place, in inputs, outputs, messages (and references of
    tasks whose references are text); returns the count of each kind."""
    counts: Counter = Counter()
    kinds = list(task.pii.redact)
    for ex in rows:
        ex["input"] = pii.redact(ex["input"], kinds, counts)
        ex["output"] = pii.redact(ex["output"] or "", kinds, counts)
        if task.kind != "classification":
            ex["reference"] = pii.redact(ex["reference"], kinds, counts)
        ex["messages"] = [{**m, "content": pii.redact(_text(m.get("content")), kinds, counts)}
                          if isinstance(m, dict) else m for m in ex["messages"]]
    return {k: counts.get(k, 0) for k in kinds}


def remove_leaks(splits: dict[str, list[dict]], task: Task) -> dict[str, int]:
    """Remove, in place, the train and validation rows whose input is (near-)identical to a
    test row's; returns how many left each split."""
    leakage = {"removed_from_train": 0, "removed_from_validation": 0, "remaining": 0}
    index = dedupe.NearIndex(task.dedupe.near_threshold or 0.9)
    test_keys = {dedupe.canonical(ex["input"]) for ex in splits["test"]}
    for i, mh in enumerate(dedupe.minhashes([ex["input"] for ex in splits["test"]])):
        index.add(i, mh)
    for name in ("train", "validation"):
        rows = splits[name]
        hashes = dedupe.minhashes([ex["input"] for ex in rows]) if rows else []
        keep = [ex for ex, mh in zip(rows, hashes)
                if dedupe.canonical(ex["input"]) not in test_keys and not index.query(mh)]
        leakage[f"removed_from_{name}"] = len(rows) - len(keep)
        splits[name] = keep
    return leakage


def freeze_splits(store: Store, task: Task, home: Path, splits: dict[str, list[dict]], *, steps: list[Step],
                  pii_counts: dict, leakage: dict, test_from=None, extra: dict | None = None) -> BuildResult:
    """Write the splits as a new content-addressed dataset version (or find the identical one).
    `extra`: more fields for the manifest (the flywheel's: what the served traffic added)."""
    for name in SPLITS:
        for ex in splits[name]:
            ex.pop("has_gold", None)
    blobs = {name: b"".join(orjson.dumps(ex, option=orjson.OPT_SORT_KEYS) + b"\n" for ex in splits[name])
             for name in SPLITS}
    digest = hashlib.sha256()
    digest.update(orjson.dumps({"task": task.name, "kind": task.kind, "labels": task.labels}, option=orjson.OPT_SORT_KEYS))
    for name in SPLITS:
        digest.update(name.encode() + b"\0" + blobs[name] + b"\0")
    content_hash = digest.hexdigest()
    sizes = {name: len(splits[name]) for name in SPLITS}
    # the app's own requests (rows with a recorded model) show what its prompt costs; rows
    # without one (labelled tickets, a test file) only when there are no others
    called = [ex for name in ("train", "test") for ex in splits[name] if (ex.get("recorded") or {}).get("model")]
    tokens = _token_report(task, called or splits["train"] or splits["test"], home)
    return _freeze(store, task, home, content_hash, blobs, sizes, steps, pii_counts, leakage, tokens, test_from,
                   extra or {})


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname())[:40] or "host"


def _alive(pid: int) -> bool:
    if pid <= 0:  # not a process (kill would signal a whole process group)
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # OverflowError: past any pid
        return False
    except OSError:  # EPERM: a living process of another user
        return True
    return True


def _sweep_stale_builds(root: Path) -> None:
    """Remove the `.build-*` folders of builds killed mid-freeze (their files can be large).

    A folder is named `.build-<pid>-<host>-<random>` by its builder: on this host it is stale
    once that pid is gone; from another host sharing the folder, or named before pids were
    (`.build-<random>`), once it is a day old. A living build's folder is never touched."""
    try:
        entries = [e for e in root.iterdir() if e.name.startswith(".build-") and e.is_dir()]
    except OSError:
        return
    host = _host()
    for entry in entries:
        named = _BUILD_DIR.fullmatch(entry.name)
        if named and named["host"] == host:
            stale = not _alive(int(named["pid"]))
        else:
            try:
                stale = time.time() - entry.stat().st_mtime > STALE_AFTER_S
            except OSError:
                continue
        if stale:
            shutil.rmtree(entry, ignore_errors=True)


def _freeze(store, task, home, content_hash, blobs, sizes, steps, pii_counts, leakage, tokens, test_from,
            extra) -> BuildResult:
    t = schema.datasets
    root = Path(home) / "datasets"
    path = root / content_hash[:16]
    _sweep_stale_builds(root)
    with store.engine.begin() as conn:
        existing = conn.execute(sa.select(t).where(t.c.task == task.name, t.c.content_hash == content_hash)).first()
        if existing is not None and Path(existing.path).exists():
            r = existing._mapping
            return BuildResult(r["id"], task.name, r["version"], Path(r["path"]), r["split_sizes"], steps, pii_counts,
                               leakage, tokens, created=False)
        with folder_in_place(path, prefix=f".build-{os.getpid()}-{_host()}-") as tmp:
            for name, blob in blobs.items():
                (tmp / f"{name}.jsonl").write_bytes(blob)
            version = (conn.execute(sa.select(sa.func.max(t.c.version)).where(t.c.task == task.name)).scalar() or 0) + 1
            dataset_id = f"{task.name}@{version}"
            manifest = {"id": dataset_id, "task": task.name, "kind": task.kind, "version": version,
                        "content_hash": content_hash, "sizes": sizes, "labels": task.labels,
                        "task_file": str(task.path) if task.path else None,
                        "test_from": str(test_from) if test_from else None,
                        "steps": [s.__dict__ for s in steps], "pii": pii_counts, "leakage": leakage, "tokens": tokens,
                        "created_at": datetime.now(timezone.utc).isoformat(), **extra}
            (tmp / "manifest.json").write_bytes(orjson.dumps(manifest, option=orjson.OPT_INDENT_2))
        if existing is not None:  # the row survived but its files were deleted: rewrite them, keep the version
            version, dataset_id = existing.version, existing.id
        else:
            conn.execute(t.insert().values(
                id=dataset_id, name=task.name, task=task.name, version=version, content_hash=content_hash,
                filters=task.traces.model_dump(mode="json"), split_sizes=sizes,
                report={"steps": [s.__dict__ for s in steps], "pii": pii_counts, "leakage": leakage, "tokens": tokens},
                path=str(path.resolve()), created_at=datetime.now(timezone.utc)))
    return BuildResult(dataset_id, task.name, version, path, sizes, steps, pii_counts, leakage, tokens, created=True)
