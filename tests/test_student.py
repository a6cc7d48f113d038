"""Method student: classifiers taught only by the recorded frontier replies, out of fold,
benched and weighed by decide as evidence (never the recommendation)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from helpers import EXAMPLES, LABELS, run, run_id_in, six_intent_task, take

from protege.bench.run import run_bench
from protege.datasets.build import build_dataset
from protege.datasets.registry import get_dataset
from protege.errors import ProtegeError
from protege.models.base import Context
from protege.models.registry import build_candidate
from protege.models.student import fold_of
from protege.prices import load_prices
from protege.runs.registry import get_run, update_run
from protege.tasks.spec import load_task
from protege.traces.importers import ImportOptions, import_file
from protege.train.api import resume, train
from protege.train.recipe import load_recipe

ROOT = Path(__file__).parents[1]


def noisy_teacher_dataset(store, tmp_path, home):
    """Six intents: labelled tickets (no model) and GPT-4 calls whose recorded replies are
    replaced by random labels, the human review kept as feedback. A classifier that saw a
    row would give its random reply back; one that did not can only guess it."""
    rng = random.Random(7)
    calls = take(EXAMPLES / "gpt4_calls.jsonl.gz", 6)
    for c in calls:
        c["messages"][-1]["content"] = rng.choice(LABELS)
    (tmp_path / "calls.jsonl").write_text("".join(json.dumps(c) + "\n" for c in calls))
    (tmp_path / "tickets.jsonl").write_text("".join(json.dumps(r) + "\n" for r in
                                                    take(EXAMPLES / "tickets.jsonl.gz", 10)))
    for name in ("calls", "tickets"):
        import_file(store, tmp_path / f"{name}.jsonl", ImportOptions(task="bank6"))
    task_path = six_intent_task(tmp_path / "task.yaml", "feedback", "{test: reviewed}")
    task = load_task(task_path)
    built = build_dataset(store, task, home)
    return task, get_dataset(store, built.id), {c["messages"][1]["content"]: c["messages"][-1]["content"]
                                                for c in calls}


def test_student_answers_each_row_with_a_classifier_that_never_saw_it(sqlite_store, tmp_path, home):
    task, ds, noise = noisy_teacher_dataset(sqlite_store, tmp_path, home)
    recipe = load_recipe("student", ROOT / "recipes" / "student.yaml",
                         ["epochs=6", "batch_size=4", "label_smoothing=0", "lr=3e-4", "head_lr=1e-2"])
    run_id = train(sqlite_store, task, ds, home, "minilm", "student", recipe)
    r = get_run(sqlite_store, run_id)
    m = r["metrics"]
    test = ds.split("test")
    assert m["train_rows"] == len(noise) == len(test) == 36 and m["teacher"] == "gpt-4"
    assert m["left_out"] == {"no recorded model reply": len(ds.split("train")) + len(ds.split("validation"))}
    assert sorted(f["fold"] for f in m["folds"]) == [1, 2, 3]
    sizes = {k: sum(fold_of(x, 3) == k for x in noise) for k in range(3)}
    assert [f["answers_rows"] for f in m["folds"]] == [sizes[0], sizes[1], sizes[2]]
    assert [f["train_rows"] for f in m["folds"]] == [36 - sizes[k] for k in range(3)]
    folder = Path(r["checkpoint_path"])
    meta = json.loads((folder / "protege.json").read_text())
    assert meta["method"] == "student" and meta["folds"] == 3 and meta["labels"] == task.labels
    assert {"fold-1", "fold-2", "fold-3", "README.md"} <= {p.name for p in folder.iterdir()}
    assert "no human label" in (folder / "README.md").read_text()

    ctx = Context(task=task, dataset=ds, home=home, train=ds.split("train"), prices=load_prices(), store=sqlite_store)
    preds = build_candidate(f"run:{run_id}", ctx).predict(test)
    oof = sum(p.output == noise[row["input"]] for row, p in zip(test, preds)) / len(test)
    # the same rows answered by a fold that did learn them: memorised, so leakage would show
    seen = build_candidate(f"run:{run_id}", ctx)
    seen.folds = seen.folds[1:] + seen.folds[:1]
    leaked = sum(p.output == noise[row["input"]] for row, p in zip(test, seen.predict(test))) / len(test)
    assert leaked >= 0.9 and oof <= 0.5, (leaked, oof)


def test_student_is_weighed_as_evidence_never_recommended(sqlite_store, tmp_path, home):
    from protege.decide.analysis import Inputs, decide

    task, ds, _ = noisy_teacher_dataset(sqlite_store, tmp_path, home)
    recipe = load_recipe("student", overrides=["epochs=1"])
    student = train(sqlite_store, task, ds, home, "minilm", "student", recipe)
    run_bench(sqlite_store, task, ds, home, ["replay", f"run:{student}", "knn:minilm"], latency_samples=1,
              prices=load_prices())
    d = decide(sqlite_store, task, Inputs(), prices=load_prices())
    roles = {c.spec: c.role for c in d.candidates}
    assert roles[f"run:{student}"] == "student" and roles["knn:minilm"] == "baseline"
    assert d.run != f"run:{student}"
    [note] = [n for n in d.notes if n.startswith("distillation from the logs")]
    s = next(c for c in d.candidates if c.role == "student")
    assert f"run:{student}" in note and f"{100 * s.quality['accuracy']['value']:.1f}%" in note


def test_student_errors_name_what_is_missing(sqlite_store, tmp_path, home, capsys):
    task, ds, _ = noisy_teacher_dataset(sqlite_store, tmp_path, home)
    with pytest.raises(ProtegeError, match=r"no rows answered by gpt-3 to learn from \(.*not answered by gpt-3"):
        train(sqlite_store, task, ds, home, "minilm", "student", load_recipe("student", overrides=["teacher=gpt-3"]))
    with pytest.raises(ProtegeError, match="fill only"):
        train(sqlite_store, task, ds, home, "minilm", "student", load_recipe("student", overrides=["folds=20"]))
    with pytest.raises(ProtegeError, match="no learning curve"):
        train(sqlite_store, task, ds, home, "minilm", "student", load_recipe("student"), train_fraction=0.5)
    code, _, err = run(capsys, "--db", sqlite_store.url, "train", str(task.path), "--base", "minilm",
                       "--method", "student", "--set", "folds=1")
    assert code == 1 and "--set folds" in err


def test_student_resume_keeps_the_folds_already_trained(sqlite_store, tmp_path, home, tiny_bert, capsys):
    task, ds, _ = noisy_teacher_dataset(sqlite_store, tmp_path, home)
    code, out, err = run(capsys, "--db", sqlite_store.url, "train", str(task.path), "--base", tiny_bert,
                         "--method", "student", "--set", "epochs=1")
    assert code == 0, err
    run_id = run_id_in(out)
    folder = Path(get_run(sqlite_store, run_id)["checkpoint_path"])
    kept = (folder / "fold-1" / "model.safetensors").stat().st_mtime_ns
    # as if killed while training fold 3
    import shutil

    shutil.rmtree(folder / "fold-3")
    (folder / "protege.json").unlink()
    update_run(sqlite_store, run_id, status="failed")
    resume(sqlite_store, task, home, run_id)
    assert get_run(sqlite_store, run_id)["status"] == "done"
    assert (folder / "fold-1" / "model.safetensors").stat().st_mtime_ns == kept
    assert (folder / "fold-3" / "model.safetensors").exists() and (folder / "protege.json").exists()
