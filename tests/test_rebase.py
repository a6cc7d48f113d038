"""`protege rebase`: a new base or frontier model re-runs what the decision rests on, and the
report says, with figures, whether the decision changed and why."""

from __future__ import annotations

import json

from helpers import make_banking, run, said

from protege.datasets.registry import get_dataset


def trained(store, task, ds, home, base, epochs="2"):
    from protege.train.api import train
    from protege.train.recipe import load_recipe

    return train(store, task, ds, home, base, "classifier",
                 load_recipe("classifier", overrides=[f"epochs={epochs}", "batch_size=16", "eval_every=5"]))


def test_a_better_cheaper_frontier_flips_train_to_keep_and_the_history_shows_it(sqlite_store, tmp_path, home,
                                                                                 capsys):
    from protege.testing import ScriptedUpstream

    store, db = sqlite_store, ["--db", sqlite_store.url]
    task, ds = make_banking(store, tmp_path, home)
    run_id = trained(store, task, ds, home, "minilm")
    rows = get_dataset(store, ds.id).split("test")
    truth = {r["input"]: r["reference"] for r in rows[1:]}  # right on all rows but one
    recorded = {r["input"]: r["output"] for r in rows}  # GPT-4's own answers, some of them wrong

    def text(req):
        return req["messages"][-1]["content"]

    # decided against GPT-4 (its recorded answers, at its price for a 600-token prompt) ...
    gpt4 = ScriptedUpstream(model="gpt-4", reply=lambda req: recorded.get(text(req), "?"),
                            usage=lambda req: {"prompt_tokens": 600, "completion_tokens": 3, "total_tokens": 603})
    # ... then a new release gets all test rows but one right, at a token a request
    nano = ScriptedUpstream(model="gpt-5-nano", reply=lambda req: truth.get(text(req), "?"),
                            usage=lambda req: {"prompt_tokens": 1, "completion_tokens": 0, "total_tokens": 1})
    gpt4.start()
    nano.start()
    old, spec = f"openai:gpt-4@{gpt4.url}", f"openai:gpt-5-nano@{nano.url}"
    try:
        code, _, err = run(capsys, *db, "bench", str(task.path), "-c", old, "-c", f"run:{run_id}",
                           "--latency-samples", "3")
        assert code == 0, err
        code, out, err = run(capsys, *db, "decide", str(task.path), "--json")
        assert json.loads(out)["verdict"] == "TRAIN", json.loads(out)["reasons"]
        code, out, err = run(capsys, *db, "rebase", str(task.path), "--frontier", spec, "--json")
        assert code == 0, err
    finally:
        gpt4.stop()
        nano.stop()
    report = json.loads(out)
    assert report["before"]["verdict"] == "TRAIN" and report["before"]["run"] == f"run:{run_id}"
    assert report["after"]["verdict"] == "KEEP" and report["after"]["run"] == spec and report["changed"]
    change = report["changes"][0]
    assert change["kind"] == "frontier" and change["old"] == old and change["new"] == spec
    assert change["after"]["quality"] == (len(rows) - 1) / len(rows) > change["before"]["quality"]
    assert change["after"]["cost_per_1m"] < change["before"]["cost_per_1m"]
    assert change["paired"]["difference"] > 0 and change["paired"]["rows"] == len(rows)
    assert report["why"].startswith(f"The decision changed from TRAIN (run run:{run_id}) to KEEP (keep running {spec})")

    # stored as a run; decide now decides against the new frontier and shows the history
    code, out, _ = run(capsys, *db, "runs", "list", "--kind", "rebase", "--json")
    assert [r["id"] for r in json.loads(out)] == [report["run_id"]]
    code, out, _ = run(capsys, *db, "decide", str(task.path), "--json")
    d = json.loads(out)
    assert d["reference"] == spec and d["verdict"] == "KEEP"
    assert d["history"][0]["before"] == "TRAIN" and d["history"][0]["after"] == "KEEP"
    code, out, _ = run(capsys, *db, "decide", str(task.path))
    assert f"decided TRAIN against {old}, now KEEP against {spec}" in said(out)


def test_a_better_base_changes_the_numbers_and_the_report_says_so(sqlite_store, tmp_path, home, tiny_bert, capsys):
    store, db = sqlite_store, ["--db", sqlite_store.url]
    task, ds = make_banking(store, tmp_path, home)
    old = trained(store, task, ds, home, tiny_bert, epochs="1")
    code, _, err = run(capsys, *db, "bench", str(task.path), "-c", "replay", "-c", f"run:{old}",
                       "--latency-samples", "3")
    assert code == 0, err
    md = tmp_path / "rebase.md"
    code, out, err = run(capsys, *db, "rebase", str(task.path), "--base", "minilm", "--md", str(md))
    assert code == 0, err
    from protege.runs.registry import list_runs

    report = list_runs(store, task=task.name, kind="rebase")[0]["metrics"]
    change = report["changes"][0]
    assert change["kind"] == "base" and change["old_model"] == tiny_bert and change["new_model"] == "minilm"
    new = change["new"][4:]
    from protege.runs.registry import get_run

    cfg_old, cfg_new = get_run(store, old)["config"], get_run(store, new)["config"]
    assert cfg_new["recipe"] == cfg_old["recipe"] and cfg_new["dataset"] == cfg_old["dataset"]
    assert cfg_new["rebase_of"] == old
    assert change["after"]["quality"] > change["before"]["quality"] + 0.2
    p = change["paired"]
    assert p["ci95"][0] > 0
    text = md.read_text()
    assert "the new one is better" in text and f"New base: minilm in place of {tiny_bert}" in said(text)
    # replay's cost is unknown here (no tokenizer): nothing is cheaper for sure, so the verdict holds
    assert report["before"]["verdict"] == report["after"]["verdict"] == "KEEP" and not report["changed"]
    assert report["why"].startswith("The decision holds: still KEEP")


def test_rebase_refuses_what_it_cannot_compare(sqlite_store, tmp_path, home, capsys):
    task, _ = make_banking(sqlite_store, tmp_path, home)
    db = ["--db", sqlite_store.url]
    code, _, err = run(capsys, *db, "rebase", str(task.path))
    assert code == 1 and "name the new model: --base NEW_BASE" in said(err)
    code, _, err = run(capsys, *db, "rebase", str(task.path), "--base", "minilm")
    assert code == 1 and "no bench runs for task bank6" in said(err)
    assert run(capsys, *db, "bench", str(task.path), "-c", "replay", "--latency-samples", "1")[0] == 0
    code, _, err = run(capsys, *db, "rebase", str(task.path), "--base", "minilm")
    assert code == 1 and "has no benched specialist to rebase" in said(err)
    code, _, err = run(capsys, *db, "rebase", str(task.path), "--frontier", "replay")
    assert code == 1 and "is the decision's reference already" in said(err)
