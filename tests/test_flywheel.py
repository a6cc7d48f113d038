"""The flywheel: `protege retrain` learns from what the served traffic taught (the frontier's
answers, human corrections; never the specialist's own answers), keeps the benchmark fixed,
promotes through the gate, and does nothing when nothing is new."""

from __future__ import annotations

import json

from helpers import EXAMPLES, make_banking, run, said, six_intent_task, take

from protege.datasets.registry import get_dataset, list_datasets
from protege.deploy.flywheel import retrain, turn_lock
from protege.deploy.registry import current
from protege.traces.record import TraceRecord


def served(text: str, answer: str, *, by: str = "fallback", source: str = "serve", task: str = "bank6",
           **meta) -> TraceRecord:
    """A trace as protege serve (or its shadow) stores it."""
    return TraceRecord(request={"model": "bank6", "messages": [{"role": "user", "content": text}]},
                       output_text=answer, source=source, task=task, provider="fallback" if by == "fallback" else "protege",
                       model="gpt-4" if by == "fallback" else "bank6-specialist",
                       metadata={"answered_by": by, **meta} if source == "serve" else meta)


def fresh_tickets(per_label_from: int, per_label_to: int) -> list[tuple[str, str]]:
    """(message, human label) of tickets past the ones the root dataset was built from."""
    rows, seen = take(EXAMPLES / "tickets.jsonl.gz", per_label_to), {}
    out = []
    for r in rows:
        label = r["messages"][-1]["content"]
        seen[label] = seen.get(label, 0) + 1
        if seen[label] > per_label_from:
            out.append((r["messages"][0]["content"], label))
    return out


def deployed_minilm(store, tmp_path, home, capsys):
    from protege.train.api import train
    from protege.train.recipe import load_recipe

    task, ds = make_banking(store, tmp_path, home)
    run_id = train(store, task, ds, home, "minilm", "classifier",
                   load_recipe("classifier", overrides=["epochs=3", "batch_size=16", "eval_every=5"]))
    db = ["--db", store.url]
    assert run(capsys, *db, "bench", str(task.path), "-c", "replay", "--latency-samples", "1")[0] == 0
    code, _, err = run(capsys, *db, "deploy", str(task.path), f"run:{run_id}", "--tolerance", "0.3")
    assert code == 0, err
    return task, ds, run_id


def test_retrain_learns_only_what_the_frontier_and_reviewers_taught_and_is_idempotent(sqlite_store, tmp_path, home,
                                                                                         capsys):
    store, db = sqlite_store, ["--db", sqlite_store.url]
    task, root, first_run = deployed_minilm(store, tmp_path, home, capsys)

    # nothing served yet: nothing to do, and it says why
    code, out, err = run(capsys, *db, "retrain", str(task.path))
    assert code == 0, err
    assert "nothing new" in out and f"no new rows since {root.id}" in said(out)

    tickets = fresh_tickets(20, 26)  # 6 more per label
    frontier = tickets[:24]
    specialist_only = tickets[24:30]
    reviewed = tickets[30:33]
    shadowed = tickets[33:36]
    known_input = root.split("train")[0]["input"]
    store.insert_traces(
        [served(t, label) for t, label in frontier]
        + [served(t, label, by="specialist") for t, label in specialist_only]  # teaches nothing
        + [served(t, "card_arrival", by="specialist") for t, _ in reviewed]
        + [served(t, label, source="shadow", shadow_of="x", agrees=False) for t, label in shadowed]
        + [served("what is the weather like", "small_talk"),  # outside the labels: passed over
           served(known_input, "card_arrival")])  # the root has this input already
    reviewed_ids = [t["id"] for t in store.list_traces(limit=100, source="serve")
                    if t["metadata"]["answered_by"] == "specialist"
                    and t["request"]["messages"][0]["content"] in {x for x, _ in reviewed}]
    corrections = tmp_path / "review.jsonl"
    corrections.write_text("".join(json.dumps({"id": tid, "correction": next(label for x, label in reviewed if x == (
        store.get_trace(tid)["request"]["messages"][0]["content"]))}) + "\n" for tid in reviewed_ids))
    code, out, err = run(capsys, *db, "traces", "feedback", "--file", str(corrections))
    assert code == 0 and "feedback recorded on 3 traces" in out, err

    # too few new rows for --min-new: it waits, counting what it saw, and freezes nothing
    versions = len(list_datasets(store, task.name))
    code, out, err = run(capsys, *db, "retrain", str(task.path), "--min-new", "500")
    assert code == 0, err
    assert "waiting" in out and "fewer than --min-new 500" in said(out)
    assert len(list_datasets(store, task.name)) == versions
    assert "fallback 24" in said(out) and "feedback 3" in said(out) and "shadow 3" in said(out)

    # `dataset build` leaves protege serve's traces to the flywheel: the specialist's answers never train
    code, out, err = run(capsys, *db, "dataset", "build", str(task.path), "--test-from", str(tmp_path / "test.jsonl"))
    assert code == 0 and "select traces 120" in said(err), err

    code, out, err = run(capsys, *db, "retrain", str(task.path), "--margin", "0.5", "--tolerance", "0.3", "--json")
    assert code == 0, err
    turn = json.loads(out)
    assert turn["action"] == "promoted" and turn["trained"], turn["reasons"]
    assert turn["learned"] == {"fallback": 24, "feedback": 3, "shadow": 3}
    ds = get_dataset(store, turn["dataset"])
    # the benchmark did not move; the new rows went to train and validation with the right references
    assert [r["id"] for r in ds.split("test")] == [r["id"] for r in root.split("test")]
    rows = {r["input"]: r for s in ("train", "validation") for r in ds.split(s)}
    assert all(rows[t]["reference"] == label for t, label in frontier + reviewed + shadowed if t in rows)
    assert sum(1 for t, _ in frontier + reviewed + shadowed if t in rows) == 30
    assert not any(t in rows for t, _ in specialist_only)
    flywheel = ds.manifest["flywheel"]
    assert flywheel["root"] == root.id and flywheel["passed_over"] == {
        "answered by the specialist, no correction": 6, "answer outside the task's labels": 1}
    d = current(store, task.name)
    assert d["id"] == turn["deployment"] and d["run_id"] == turn["run_id"] != first_run
    assert d["created_by"] == "protege retrain" and d["evidence"]["retrain"]["new_rows"] == 30
    assert d["evidence"]["serving"]["run_id"] == first_run

    # run again at once: the same traces give the same version; nothing is trained twice
    code, out, err = run(capsys, *db, "retrain", str(task.path))
    assert code == 0 and "nothing new" in out, err

    # another turn is running: this one does nothing
    with turn_lock(home, task.name):
        assert retrain(store, task, home).action == "busy"

    # a turn whose run fails the gate holds it, and the next turn does not bench it again
    store.insert_traces([served(t, label) for t, label in fresh_tickets(26, 28)])
    code, out, err = run(capsys, *db, "retrain", str(task.path), "--bar", "0.999")
    assert code == 0, err
    assert "held" in out and "the bar, as stated (--bar), is 99.9%" in said(out)
    code, out, err = run(capsys, *db, "retrain", str(task.path), "--bar", "0.999")
    assert "held" in out and "failed the gate; nothing new since" in said(out)
    assert current(store, task.name)["id"] == turn["deployment"]


def test_retrain_without_a_deployment_names_what_to_train(sqlite_store, tmp_path, home, capsys):
    task, _ = make_banking(sqlite_store, tmp_path, home)
    code, _, err = run(capsys, "--db", sqlite_store.url, "retrain", str(task.path))
    assert code == 1 and "the first `protege retrain` names what to train (--base and --method" in said(err)
    code, _, err = run(capsys, "--db", sqlite_store.url, "retrain", str(task.path), "--base", "minilm", "--method",
                       "classifier", "--target", "0.9")
    assert code == 1 and "--target and --threshold set the cascade's threshold: they need a fallback" in said(err)
    code, _, err = run(capsys, "--db", sqlite_store.url, "retrain", str(task.path), "--config", "nope.yaml")
    assert code == 1 and "--config/--set need --method" in said(err)


def test_cold_start_frontier_answers_until_the_flywheel_deploys_its_student(sqlite_store, tmp_path, home, capsys):
    """No labels, no dataset, no deployment: protege serve lets the frontier answer everything,
    the first `protege retrain` learns from those answers alone, and the server follows it."""
    import httpx
    from helpers import ServerThread, wait_for

    from protege.capture.writer import TraceWriter
    from protege.serve.app import ServeApp
    from protege.serve.follow import Follower, initial
    from protege.tasks.spec import load_task
    from protege.testing import ScriptedUpstream
    from protege.train.recipe import load_recipe

    task_path = six_intent_task(tmp_path / "cold.yaml", "frontier",
                                "{method: random, test_fraction: 0.2, validation_fraction: 0.15}", name="cold6")
    task = load_task(task_path)
    truth = dict(fresh_tickets(0, 30))
    frontier = ScriptedUpstream(model="gpt-4", reply=lambda req: truth[req["messages"][-1]["content"]]).start()
    spec = f"openai:gpt-4@{frontier.url}"
    code, _, err = run(capsys, "--db", sqlite_store.url, "serve", "--task", str(task_path))
    assert code == 1 and "or --fallback openai:MODEL@URL to let the frontier answer" in said(err)
    d, served = initial(sqlite_store, task.name, home, str(task_path), {}, frontier=spec)
    assert d is None and served.name == "frontier-only:gpt-4"
    writer = TraceWriter(sqlite_store, tmp_path / "spool")
    app = ServeApp(served.name, served.predict, task=task.name, writer=writer, fallback=served.fallback,
                   threshold=served.threshold, background=(Follower(sqlite_store, task.name, home, str(task_path), None,
                                                                    poll_s=0.05),))
    texts = list(truth)
    with ServerThread(app) as server, httpx.Client(timeout=60) as c:
        def ask(text):
            r = c.post(f"{server.url}/v1/chat/completions",
                       json={"model": "m", "messages": [{"role": "user", "content": text}]})
            assert r.status_code == 200, r.text
            return r.headers["x-protege-answered-by"], r.json()["choices"][0]["message"]["content"]

        assert {ask(t) == ("fallback", truth[t]) for t in texts[:150]} == {True}
        assert writer.flush()
        turn = retrain(sqlite_store, task, home, min_new=100, base="minilm", method="classifier",
                       recipe=load_recipe("classifier", overrides=["epochs=3", "batch_size=16", "eval_every=5"]),
                       fallback=spec, target=0.9, tolerance=0.1)
        assert turn.action == "promoted", turn.reasons
        ds = get_dataset(sqlite_store, turn.dataset)
        assert ds.manifest["flywheel"]["root"] is None and ds.split_sizes["test"] > 10
        assert turn.gate["cascade"]["threshold"] == turn.threshold and turn.gate["bar"]["reference"] == "replay"
        assert wait_for(lambda: app.served.deployment == turn.deployment, timeout=60)
        answers = [ask(t) for t in texts[150:]]
        assert sum(who == "specialist" for who, _ in answers) > 0
        assert sum(who == "fallback" for who, _ in answers) > 0  # the low-confidence ones
    frontier.stop()
