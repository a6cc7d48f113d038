"""Dataset builds from real stored traces: dedupe, leakage, PII, splits, frozen hashes, export."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from helpers import run

from protege.datasets.build import build_dataset
from protege.datasets.pii import redact
from protege.datasets.registry import get_dataset, list_datasets
from protege.errors import NotFoundError, ProtegeError
from protege.tasks.spec import load_task
from protege.traces.record import TraceRecord

INTENTS = ["card_lost", "refund", "balance"]
PHRASES = {
    "card_lost": ["I lost my card {i} days ago", "my card was stolen on day {i}", "cannot find my bank card since {i}"],
    "refund": ["I want a refund for order {i}", "please give my money back for item {i}", "refund purchase number {i}"],
    "balance": ["what is my balance on account {i}", "how much money is left in pot {i}", "show balance of wallet {i}"],
}


def trace(text, label, **kw):
    return TraceRecord(request={"model": "gpt-4o-mini", "messages": [
        {"role": "system", "content": "You are a very long frontier prompt listing every intent: " + ", ".join(INTENTS)},
        {"role": "user", "content": text}]}, output_text=label, task="intents", model="gpt-4o-mini", **kw)


def filler(i: int) -> str:
    """Distinct random words, so templated rows are not near-duplicates of each other."""
    import random

    rng = random.Random(i)
    return " ".join("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(7)) for _ in range(3))


def fill(store, n=20):
    records = [trace(p.format(i=f"{i} {filler(hash((label, p, i)) % 10**6)}"), label)
               for label, ps in PHRASES.items() for p in ps for i in range(n)]
    store.insert_traces(records)
    return records


def task_file(tmp_path, extra=""):
    p = tmp_path / "task.yaml"
    p.write_text(f"""# protege dataset build task.yaml
name: intents
kind: classification
labels: [{", ".join(INTENTS)}]
prompt:
  system: Classify the message.
tokenizer: minilm
{extra}""")
    return load_task(p)


def test_build_counts_splits_and_is_frozen(store, tmp_path, home):
    fill(store)
    store.insert_traces([trace("broken call", "refund", status="error"), trace("what?", "not_an_intent")])
    task = task_file(tmp_path, "split: {method: stratified, test_fraction: 0.2, validation_fraction: 0.1, seed: 3}\n")
    steps = []
    result = build_dataset(store, task, home, on_step=steps.append)
    named = {s.name: s for s in steps}
    assert named["select traces"].kept == 182
    assert named["drop error traces"].removed == 1
    assert named["label set (traces)"].removed == 1
    assert result.sizes == {"train": 126, "validation": 18, "test": 36}
    test = get_dataset(store, "intents@1").split("test")
    assert Counter(r["reference"] for r in test) == {label: 12 for label in INTENTS}  # stratified
    row = test[0]
    assert set(row) == {"id", "input", "output", "reference", "messages", "created_at", "recorded"}
    assert row["recorded"]["model"] == "gpt-4o-mini" and row["recorded"]["latency_ms"] is None
    assert row["messages"][0]["role"] == "system"
    assert result.tokens["specialist_prompt_tokens"] < result.tokens["original_prompt_tokens"]

    again = build_dataset(store, task, home)
    assert (again.id, again.created) == ("intents@1", False)
    assert len(list_datasets(store, "intents")) == 1
    store.insert_traces([trace("one more balance question about pot 99x", "balance")])
    newer = build_dataset(store, task, home)
    assert newer.id == "intents@2" and newer.created
    assert get_dataset(store, "intents").id == "intents@2"



def test_a_dataset_is_typed_and_names_what_is_wrong_with_its_files(store, tmp_path, home):
    fill(store)
    result = build_dataset(store, task_file(tmp_path), home)
    ds = get_dataset(store, result.id)
    assert (ds.id, ds.task, ds.version, ds.path) == (result.id, "intents", 1, result.path.resolve())
    assert ds.split_sizes == result.sizes and len(ds.content_hash) == 64
    assert {k: len(ds.split(k)) for k in result.sizes} == result.sizes
    assert ds.manifest["content_hash"] == ds.content_hash and ds.manifest["id"] == ds.id
    row = ds.as_dict()  # what `dataset list --json` prints: the table's row
    assert row["name"] == row["task"] == "intents" and row["path"] == str(ds.path)
    assert [d.id for d in list_datasets(store)] == [ds.id]
    with pytest.raises(ProtegeError, match="unknown split 'dev'; choose one of train, validation, test"):
        ds.split("dev")
    lines = (ds.path / "validation.jsonl").read_bytes().splitlines()
    (ds.path / "validation.jsonl").write_bytes(lines[0] + b"\n{broken\n")
    with pytest.raises(ProtegeError, match=r"intents@1: .*validation.jsonl:2 is not valid JSON"):
        ds.split("validation")
    (ds.path / "test.jsonl").unlink()
    with pytest.raises(NotFoundError, match=r"intents@1: .*test.jsonl is gone"):
        ds.split("test")
    (ds.path / "manifest.json").write_text("{")
    with pytest.raises(ProtegeError, match=r"intents@1: .*manifest.json is not valid JSON"):
        get_dataset(store, ds.id).manifest



def test_reviewed_traces_are_the_benchmark_and_never_train(store, tmp_path, home):
    """A team's logged frontier calls, a sample reviewed by humans (feedback corrections):
    `split.test: reviewed` benchmarks every reviewed call against its correction, keeps the
    frontier's own reply as the recorded output, and trains on the rest."""
    fill(store)
    tickets_seen = "I lost my card 3 days ago, help"
    store.insert_traces([trace(tickets_seen, "card_lost")])
    reviewed = [trace(tickets_seen, "refund", feedback={"correction": "card_lost"}),  # the frontier was wrong
                trace("refund purchase number 4242 please", "refund", feedback={"correction": "refund"}),
                trace("balance of wallet 999, now", "card_lost", feedback={"correction": "balance"})]
    store.insert_traces(reviewed)
    task = task_file(tmp_path, "references: feedback\nsplit: {method: stratified, test: reviewed}\n")
    result = build_dataset(store, task, home)
    ds = get_dataset(store, result.id)
    test = ds.split("test")
    assert sorted((r["input"], r["output"], r["reference"]) for r in test) == sorted(
        (r.request["messages"][-1]["content"], r.output_text, r.feedback["correction"]) for r in reviewed)
    trained = {r["input"] for split in ("train", "validation") for r in ds.split(split)}
    assert not trained & {r["input"] for r in test}  # the unreviewed duplicate was dropped, not the reviewed row
    assert result.leakage["removed_from_train"] + result.leakage["removed_from_validation"] >= 1
    assert result.sizes["train"] + result.sizes["validation"] == 181 - result.leakage["removed_from_train"] \
        - result.leakage["removed_from_validation"]
    assert "reviewed traces to test" in {s.name for s in result.steps}
    with pytest.raises(ProtegeError, match="drop --test-from"):
        build_dataset(store, task, home, test_from=tmp_path / "any.jsonl")
    with pytest.raises(ProtegeError, match="split.test reviewed needs `references: feedback`"):
        task_file(tmp_path, "split: {method: stratified, test: reviewed}\n")  # references default: frontier


def test_near_duplicates_and_leakage_on_planted_rows(store, tmp_path, home):
    fill(store, n=10)
    base = "I would like to report that my card got lost yesterday evening at the station"
    store.insert_traces([trace(base, "card_lost"), trace(base + ".", "card_lost"),
                         trace(base + "!", "card_lost"),
                         trace(base.upper(), "card_lost")])
    test_file = tmp_path / "test.jsonl"
    planted_test = "Please refund purchase number 7 right now, it was charged twice to my account"
    test_file.write_text("".join(json.dumps({"messages": [{"role": "user", "content": t},
                                                          {"role": "assistant", "content": lab}]}) + "\n"
                                 for t, lab in [(planted_test, "refund"), ("balance of wallet 77 please", "balance")]))
    store.insert_traces([trace(planted_test + "!", "refund"), trace(planted_test.lower(), "refund")])
    task = task_file(tmp_path, "references: test_file\n")
    steps = []
    result = build_dataset(store, task, home, test_from=test_file, on_step=steps.append)
    named = {s.name: s for s in steps}
    assert named["exact duplicates"].removed == 1      # the upper-cased copy
    assert named["near duplicates"].removed == 3       # two punctuation variants, one copy of the planted test row
    assert result.leakage["removed_from_train"] + result.leakage["removed_from_validation"] == 1
    assert result.sizes["test"] == 2
    ds = get_dataset(store, result.id)
    inputs = [r["input"] for split in ("train", "validation") for r in ds.split(split)]
    assert not any("charged twice" in t for t in inputs)
    assert sum("station" in t for t in inputs) == 1


def test_pii_redacted_everywhere_with_counts(store, tmp_path, home):
    fill(store, n=10)
    secrets = ["write to jane.roe@example.com about card 4111 1111 1111 1111",
               "my IBAN is GB82 WEST 1234 5698 7654 32 and phone +44 20 7946 0958"]
    store.insert_traces([trace(secrets[0], "card_lost"), trace(secrets[1], "refund")])
    result = build_dataset(store, task_file(tmp_path, "split: {method: random, test_fraction: 0.2}\n"), home)
    assert result.pii == {"email": 2, "phone": 2, "card": 2, "iban": 2}  # input and the message copy
    blob = b"".join(p.read_bytes() for p in Path(result.path).glob("*.jsonl"))
    for needle in (b"jane.roe", b"4111 1111", b"GB82", b"7946 0958"):
        assert needle not in blob
    assert b"[EMAIL]" in blob and b"[IBAN]" in blob


def test_pii_patterns_leave_non_pii_alone():
    c = Counter()
    text = "order 12345678 on 2024-01-15 at 10:30, card 4111 1111 1111 1112 (bad checksum), v3.14, ref AB-1234"
    assert redact(text, ["email", "phone", "card", "iban"], c) == text
    assert sum(c.values()) == 0
    assert redact("GB00 WEST 1234 5698 7654 32", ["iban"], c) == "GB00 WEST 1234 5698 7654 32"  # fails mod-97
    assert redact("x", [], c) == "x" and redact("a@b.io", ["phone"], c) == "a@b.io"  # only the kinds asked for


def test_temporal_split(store, tmp_path, home):
    from datetime import datetime, timedelta, timezone

    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    store.insert_traces([trace(f"question number {i} about my balance", "balance", created_at=t0 + timedelta(days=i))
                         for i in range(50)])
    task = task_file(tmp_path, "split: {method: temporal, test_fraction: 0.2, validation_fraction: 0.2}\n")
    result = build_dataset(store, task, home)
    ds = get_dataset(store, result.id)
    test_days = sorted(r["created_at"] for r in ds.split("test"))
    train_days = sorted(r["created_at"] for r in ds.split("train"))
    assert result.sizes == {"train": 30, "validation": 10, "test": 10}
    assert train_days[-1] < test_days[0]


def test_errors(store, tmp_path, home):
    task = task_file(tmp_path)
    with pytest.raises(ProtegeError, match="no stored traces match task 'intents'"):
        build_dataset(store, task, home)
    with pytest.raises(ProtegeError, match="pass --test-from FILE"):
        build_dataset(store, task_file(tmp_path, "references: test_file\n"), home)


def test_cli_build_show_list_export(store, db_url, tmp_path, home, capsys):

    fill(store)
    task = task_file(tmp_path)
    args = ["--db", db_url]
    code, out, _ = run(capsys, *args, "dataset", "build", str(task.path), "--json")
    built = json.loads(out)
    assert code == 0 and built["id"] == "intents@1" and built["sizes"]["test"] > 0
    for cmd in (["dataset", "list", "--json"], ["dataset", "show", "intents", "--json"]):
        code, out, _ = run(capsys, *args, *cmd)
        assert code == 0 and "intents@1" in out
    code, out, _ = run(capsys, *args, "dataset", "build", str(task.path))
    assert "unchanged: same rows as before, no new version" in " ".join(out.split())
    run(capsys, *args, "dataset", "export", "intents@1", str(tmp_path / "oa"), "--task-file", str(task.path))
    first = json.loads((tmp_path / "oa" / "train.jsonl").read_text().splitlines()[0])
    assert first["messages"][0] == {"role": "system", "content": "Classify the message."}
    assert first["messages"][-1]["role"] == "assistant" and first["messages"][-1]["content"] in INTENTS
    code, _, err = run(capsys, *args, "dataset", "export", "intents@1", str(tmp_path / "oa"), "--task-file",
                       str(task.path))
    assert code == 1 and "exists already" in err
    run(capsys, *args, "dataset", "export", "intents@1", str(tmp_path / "hf"), "--task-file", str(task.path),
        "--format", "hf")
    from datasets import load_from_disk

    hf = load_from_disk(str(tmp_path / "hf"))
    assert hf["test"].num_rows == built["sizes"]["test"] and set(hf["test"].column_names) >= {"input", "reference"}
    code, _, err = run(capsys, *args, "dataset", "show", "nope@3")
    assert code == 1 and "no dataset 'nope@3'" in err


def test_group_by_keeps_each_dialog_in_one_split(store, tmp_path, home):
    records = []
    for d in range(30):
        for turn in range(4):
            t = trace(f"dialog {d} turn {turn} {filler(d * 10 + turn)}", "balance")
            t.metadata = {"dialog_id": f"D{d}"}
            records.append(t)
    store.insert_traces(records)
    task = task_file(tmp_path, "split: {method: random, test_fraction: 0.2, validation_fraction: 0.1, "
                               "group_by: dialog_id}\n")
    ds = get_dataset(store, build_dataset(store, task, home).id)
    owners = {}
    for split in ("train", "validation", "test"):
        for r in ds.split(split):
            owners.setdefault(r["group"], set()).add(split)
    assert len(owners) == 30 and all(len(s) == 1 for s in owners.values())
    assert {s for v in owners.values() for s in v} == {"train", "validation", "test"}


def test_group_by_rejected_with_stratified(tmp_path):
    from protege.tasks.spec import TaskError

    with pytest.raises(TaskError, match="group_by works with method random or temporal"):
        task_file(tmp_path, "split: {method: stratified, group_by: dialog_id}\n")


def test_build_sweeps_folders_of_killed_builds(store, tmp_path, home):
    """A build killed mid-freeze leaves `.build-*`; the next build removes it, never a living one's."""
    import os
    import re
    import socket
    import subprocess
    import sys
    import time

    fill(store, n=5)
    root = home / "datasets"
    root.mkdir(parents=True)
    host = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname())[:40]  # as builds name their folders
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True)
    dead = root / f".build-{int(finished.stdout)}-{host}-abcd1234"
    living = root / f".build-{os.getpid()}-{host}-efgh5678"
    elsewhere = root / ".build-1-another-machine-ijkl9012"  # its pid means nothing here: kept until a day old
    no_such_pid = root / f".build-{10**30}-{host}-uvwx1234"
    old_naming, young_old_naming = root / ".build-mnop3456", root / ".build-qrst7890"
    for folder in (dead, living, elsewhere, old_naming, young_old_naming, no_such_pid):
        folder.mkdir()
        (folder / "train.jsonl").write_bytes(b"x" * 1000)
    day_ago = time.time() - 25 * 3600
    os.utime(old_naming, (day_ago, day_ago))
    result = build_dataset(store, task_file(tmp_path), home)
    assert result.created
    left = sorted(p.name for p in root.iterdir() if p.name.startswith(".build-"))
    assert left == sorted([living.name, elsewhere.name, young_old_naming.name])
    assert (living / "train.jsonl").exists()
