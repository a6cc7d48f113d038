"""The flywheel's next dataset: the dataset a deployed run was trained on (its root) plus
everything protege serve's traffic has taught since, frozen as a new version.

What a stored trace of the task's served traffic teaches:

- answered by the fallback (the frontier): its answer is the reference (origin `fallback`);
- a shadow trace (source `shadow`): the frontier's answer to a request the specialist
  answered (origin `shadow`);
- a human correction on any of them (`feedback.correction`, `protege traces feedback`): the
  correction, over either model's answer (origin `feedback`);
- answered by the specialist, with neither: nothing. Its own answer would teach it its own
  mistakes; such traces are counted, never used.

The root's splits are kept exactly: the benchmark (test) does not move, so a new run and the
serving one are compared on the rows the decision was made on. New rows go to train or
validation by a stable hash of their input (an input lands in the same split whatever else
arrives), and, with no root (a cold start: nothing trained yet), to test too, at the task's
fractions; with `split.test: reviewed` the reviewed rows are the test. New rows whose input
a root row already has, or that near-duplicate a test row, are dropped and counted. Built
twice from the same traces, the dataset has the same hash: no new version.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import ProtegeError
from ..tasks.metrics import LabelMap, normalize_text
from ..tasks.spec import Task
from ..traces.store import Store
from . import dedupe
from .build import (
    FLYWHEEL_SOURCES,
    BuildResult,
    Step,
    Steps,
    drop_near_duplicates,
    example_from_trace,
    freeze_splits,
    redact_rows,
    remove_leaks,
)
from .registry import SPLITS, Dataset

ORIGINS = ("feedback", "fallback", "shadow")
"""Where a learned row's reference comes from, in the order one wins over another for an input."""


@dataclass
class NextDataset:
    """The next version's rows, not yet frozen (`freeze` writes it)."""

    splits: dict[str, list[dict]]
    steps: list[Step]
    root: Dataset | None
    learned: dict[str, int]
    """Rows the served traffic added, by origin."""
    passed_over: dict[str, int]
    """Served traces that taught nothing, by reason."""
    pii: dict[str, int]
    leakage: dict[str, int]

    def new_rows(self, seen: set[str]) -> int:
        """Rows whose id is not in `seen` (the ids of the dataset a run was trained on)."""
        return sum(1 for s in SPLITS for r in self.splits[s] if r["id"] not in seen)

    def freeze(self, store: Store, task: Task, home: Path) -> BuildResult:
        if not self.splits["test"]:
            raise ProtegeError(f"task {task.name}: none of the {sum(self.learned.values()):,} rows the served traffic "
                               "taught falls in the test split yet; wait for more frontier answers (or reviews)")
        m = self.root.manifest if self.root else {}
        extra = {"flywheel": {"root": self.root.id if self.root else None, "learned": self.learned,
                              "passed_over": self.passed_over,
                              "added": {s: len(self.splits[s]) - (self.root.split_sizes.get(s, 0) if self.root else 0)
                                        for s in SPLITS}}}
        return freeze_splits(store, task, home, self.splits,
                             steps=[*(Step(**x) for x in m.get("steps", [])), *self.steps],
                             pii_counts={k: (m.get("pii") or {}).get(k, 0) + v for k, v in self.pii.items()},
                             leakage=self.leakage, test_from=m.get("test_from"), extra=extra)


def learned_rows(store: Store, task: Task) -> tuple[list[dict], Counter]:
    """Every row the task's served traffic teaches (feedback first, then oldest first), and
    the counts of the traces passed over, by reason."""
    labels = LabelMap(task.labels) if task.kind == "classification" else None
    rows, passed = [], Counter()
    for t in store.iter_traces(task=task.traces.task or task.name):
        if t["source"] not in FLYWHEEL_SOURCES:
            continue
        if t["status"] != "ok":
            passed["error traces"] += 1
            continue
        ex = example_from_trace(t)
        if ex is None or not ex["input"].strip():
            passed["no user message"] += 1
            continue
        meta = t.get("metadata") or {}
        if ex["gold"] is not None:
            origin, ref = "feedback", ex["gold"]
        elif t["source"] == "shadow":
            origin, ref = "shadow", ex["output"]
        elif meta.get("answered_by") == "fallback":
            origin, ref = "fallback", ex["output"]
        else:
            passed["answered by the specialist, no correction"] += 1
            continue
        if ref is None or not str(ref).strip():
            passed["empty answer"] += 1
            continue
        ref = normalize_text(str(ref), task.normalize)
        if labels is not None:
            ref = labels(ref)
            if ref is None:
                passed["answer outside the task's labels"] += 1
                continue
        del ex["gold"]
        ex.update(reference=ref, origin=origin, output=normalize_text(ex["output"] or "", task.normalize))
        rows.append(ex)
    rows.sort(key=lambda ex: ORIGINS.index(ex["origin"]) != 0)  # stable: feedback first, each oldest first
    return rows, passed


def _share(key: str) -> float:
    """A stable number in [0, 1) for an input: the same input, the same split."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:12], 16) / float(16 ** 12)


def next_dataset(store: Store, task: Task, root: Dataset | None,
                 on_step: Callable[[Step], None] | None = None) -> NextDataset:
    """The root (or nothing, on a cold start) plus every row the served traffic teaches, not
    yet frozen: `.freeze(store, task, home)` writes the version."""
    steps = step = Steps(on_step)
    base = {s: root.split(s) if root else [] for s in SPLITS}
    rows, passed = learned_rows(store, task)
    step("served traces", len(rows), sum(passed.values()),
         "; ".join(f"{k} {v:,}" for k, v in passed.most_common()) or "")
    known = {dedupe.canonical(ex["input"]) for s in SPLITS for ex in base[s]}
    fresh, repeated = [], 0
    for ex in rows:
        key = dedupe.canonical(ex["input"])
        if key in known:
            repeated += 1
            continue
        known.add(key)
        fresh.append(ex)
    step("already known inputs", len(fresh), repeated, "an input the root or an earlier answer already has")
    fresh = drop_near_duplicates(fresh, task, step)
    counts = redact_rows(fresh, task)
    step("PII redaction", len(fresh), note=", ".join(f"{k} {v}" for k, v in counts.items()) or "off")
    splits = {s: list(base[s]) for s in SPLITS}
    cfg = task.split
    for ex in fresh:
        u = _share(dedupe.canonical(ex["input"]))
        if root is None and cfg.test == "reviewed":
            name = "test" if ex["origin"] == "feedback" else "validation" if u < cfg.validation_fraction else "train"
        elif root is None:
            name = ("test" if u < cfg.test_fraction else
                    "validation" if u < cfg.test_fraction + cfg.validation_fraction else "train")
        else:  # the root's benchmark stays as it is
            name = "validation" if u < cfg.validation_fraction else "train"
        splits[name].append(ex)
    added = {s: len(splits[s]) - len(base[s]) for s in SPLITS}
    step("split", sum(len(v) for v in splits.values()),
         note=("stable hash of the input; " if fresh else "") + ", ".join(f"{s} +{n:,}" for s, n in added.items())
         + (f" (the test split of {root.id} kept as it is)" if root else ""))
    new = {**{s: splits[s][len(base[s]):] for s in SPLITS}, "test": splits["test"]}  # the root's rows are clean
    leakage = remove_leaks(new, task)
    for name in ("train", "validation"):
        splits[name] = base[name] + new[name]
    step("leakage check", sum(len(v) for v in splits.values()),
         leakage["removed_from_train"] + leakage["removed_from_validation"],
         "new train/validation rows near-duplicating a test row were removed")
    learned = Counter(ex["origin"] for s in SPLITS for ex in splits[s][len(base[s]):])
    return NextDataset(splits, list(steps), root, dict(learned), dict(passed), counts, leakage)


def root_of(store: Store, dataset: Dataset) -> Dataset | None:
    """What the next version grows from: a flywheel version's own root (None after a cold
    start), else the dataset itself (one that `protege dataset build` made)."""
    from .registry import get_dataset

    if "flywheel" not in dataset.manifest:
        return dataset
    root = dataset.manifest["flywheel"]["root"]
    return None if root is None else get_dataset(store, root)
