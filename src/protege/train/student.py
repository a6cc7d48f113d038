"""Method `student`: a classifier taught only by the frontier's recorded replies (no human
label at all), out of fold: distillation from the logs.

    protege train examples/banking77/task.yaml --base minilm --method student --config recipes/student.yaml

The taught rows are every dataset row (any split) whose reply a recorded model gave (the
recipe's `teacher` narrows it to one model). They are cut into `folds` parts by a hash of
the input text (`models.student.fold_of`: the same parts on every run, a repeated message
never on both sides), and one classifier is fine-tuned per part on the other parts' inputs
labelled with the teacher's replies. The student answers an input with the classifier of
the input's part, so a benchmark row the teacher also answered is answered by a classifier
that never saw it, and every benchmark row is scored; a new input gets a classifier trained
on the other parts, a model like any other. No human label is used, not even to validate:
each classifier trains for `epochs` and keeps its last weights.

The model folder holds `fold-1/` ... `fold-K/` (plain transformers classifiers) and a
`protege.json` naming the teacher and the folds; `run:RUN_ID` benches and serves it.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import orjson

from ..datasets.registry import Dataset
from ..errors import ProtegeError
from ..models.student import fold_of, taught
from ..tasks.metrics import LabelMap
from ..tasks.spec import Task
from .common import write_model_card
from .distributed import Dist
from .loop import run_loop
from .recipe import StudentRecipe


def teacher_examples(task: Task, dataset: Dataset, teacher: str | None) -> tuple[list[dict], dict]:
    """The rows a recorded model answered, each with the teacher's reply as its target
    (`reference`), and what was left out and why."""
    to_label = LabelMap(task.labels)
    seen, rows, skipped = set(), [], Counter()
    for split in ("train", "validation", "test"):
        for r in dataset.split(split):
            if r["input"] in seen:
                continue
            if not taught(r, teacher):
                skipped["no recorded model reply" if teacher is None else f"not answered by {teacher}"] += 1
                continue
            label = to_label(r["output"])
            if label is None:
                skipped["reply is not one of the task's labels"] += 1
                continue
            seen.add(r["input"])
            rows.append({**r, "reference": label})
    return rows, dict(skipped)


def train_student(store, task: Task, dataset: Dataset, home: Path, base: str, recipe: StudentRecipe, folder: Path,
                  run_id: str, *, time_budget_min: float | None, console, resume: bool, dist: Dist,
                  on_step=None) -> dict:
    """Train the fold classifiers (a fold already exported is kept on --resume); returns the
    run's metrics."""
    from .classifier import ClassifierJob

    if task.kind != "classification":
        raise ProtegeError(f"method student trains classification tasks; task {task.name} is {task.kind}")
    if dist.world > 1:
        raise ProtegeError("method student trains its folds one after another in one process; drop --nproc")
    rows, skipped = teacher_examples(task, dataset, recipe.teacher)
    if not rows:
        raise ProtegeError(f"dataset {dataset.id} has no rows answered by {recipe.teacher or 'a recorded model'} to "
                           f"learn from ({', '.join(f'{n:,} {why}' for why, n in skipped.items()) or 'it is empty'})")
    who = ", ".join(sorted({r["recorded"]["model"] for r in rows}))  # the teacher(s), by name
    part = [fold_of(r["input"], recipe.folds) for r in rows]
    sizes = Counter(part)
    if len(sizes) < recipe.folds:
        raise ProtegeError(f"{len(rows):,} rows answered by {who} fill only {len(sizes)} of {recipe.folds} folds; "
                           "give it more rows or fewer folds")
    final = folder / "model"
    folds, budget = [], (time_budget_min / recipe.folds if time_budget_min else None)
    for k in range(recipe.folds):
        sub = folder / f"fold-{k + 1}"
        if (final / sub.name / "protege.json").exists():  # done before a --resume
            folds.append(orjson.loads((sub / "metrics.json").read_bytes()))
            continue
        teach = [r for r, p in zip(rows, part) if p != k]
        if console is not None:
            console.print(f"student fold {k + 1} of {recipe.folds}: learns {who}'s replies on {len(teach):,} rows, "
                          f"answers for the other {sizes[k]:,}")
        job = ClassifierJob(task, dataset, home, base, recipe, sub, run_id, examples=(teach, []))
        metrics = run_loop(store, run_id, sub, job, recipe, time_budget_min=budget, console=console,
                           resume=resume and (sub / "checkpoint").exists(), dist=dist, on_step=on_step)
        metrics = {**metrics, "fold": k + 1, "answers_rows": sizes[k]}
        (sub / "metrics.json").write_bytes(orjson.dumps(metrics))
        final.mkdir(parents=True, exist_ok=True)
        (sub / "model").rename(final / sub.name)
        folds.append(metrics)
    wall = sum(m["wall_s"] for m in folds)
    rate = sum(m["train_examples_per_s"] * m["wall_s"] for m in folds) / max(wall, 1e-9)
    metrics = {"metric": "accuracy", "train_rows": len(rows), "validation_rows": 0, "teacher": who,
               "left_out": skipped, "folds": folds, "history": [], "best_val_score": None,
               "best_step": sum(m["steps"] for m in folds), "steps": sum(m["steps"] for m in folds),
               "stop_reason": ", ".join(sorted({m["stop_reason"] for m in folds})), "wall_s": wall,
               "processes": 1, "strategy": None, "precision": folds[0]["precision"],
               "train_examples_per_s": rate, "throughput": f"{rate:,.0f} examples/s"}
    _export(final, task, dataset, base, recipe, metrics, run_id, who)
    return metrics


def _export(final: Path, task: Task, dataset: Dataset, base: str, recipe: StudentRecipe, metrics: dict,
            run_id: str, who: str) -> None:
    """The card, then protege.json (written whole, then renamed): its presence says the student is complete."""
    write_model_card(
        final, title=f"{task.name} student of {who} ({run_id})",
        intro=(f"Fine-tuned by protege from `{base}` on the replies {who} gave in dataset `{dataset.id}` "
               f"(hash `{dataset.content_hash[:16]}`), no human label: {metrics['train_rows']:,} rows in "
               f"{recipe.folds} folds by input hash; `fold-K/` answers the inputs of part K and never saw them."),
        best_label="validation (none: no human label is used)", metrics=metrics, recipe=recipe,
        usage=f"Bench or serve it as `run:{run_id}`; each input is answered by the classifier of its fold.")
    tmp = final / "protege.json.tmp"
    tmp.write_bytes(orjson.dumps({"method": "student", "folds": recipe.folds, "labels": list(task.labels),
                                  "teacher": who, "max_length": recipe.max_length, "task": task.name,
                                  "run_id": run_id}))
    tmp.replace(final / "protege.json")
