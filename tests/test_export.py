"""protege export and the fast runtimes: each export of a real (tiny) trained specialist is
loaded back, benched and served, and answers as the model it came from (exactly in fp32,
within the stated tolerance when quantised); bad requests get clear errors and leave
nothing half-written."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from helpers import ServerThread, run, trained_on_banking

INT8_PROB_GAP = 0.1
"""Stated tolerance for int8 weights: no label's probability moves by more than this, so an
answer can change only where the fp32 model's two best labels were that close."""


@pytest.fixture
def classifier(sqlite_store, tmp_path, home, tiny_bert):  # noqa: F811
    return trained_on_banking(sqlite_store, tmp_path, home, tiny_bert, "classifier", "epochs=1", "batch_size=16",
                              "pooling=mean")


def ctx_for(store, task, ds, home):
    from protege.models.base import Context

    return Context(task=task, dataset=ds, home=home, store=store)


def test_onnx_export_answers_exactly_as_the_torch_classifier_and_int8_within_tolerance(
        sqlite_store, tmp_path, home, classifier, capsys):
    from protege.bench.run import run_bench
    from protege.errors import ProtegeError
    from protege.models.export import check
    from protege.models.registry import build_candidate

    task, ds, run_id = classifier
    rows = ds.split("test")
    ctx = ctx_for(sqlite_store, task, ds, home)
    source = build_candidate(f"run:{run_id}", ctx)
    out = tmp_path / "exported"
    code, stdout, err = run(capsys, "--db", sqlite_store.url, "export", f"run:{run_id}", str(out), "--format", "onnx",
                            "--json")
    assert code == 0, err
    result = json.loads(stdout)
    assert result["format"] == "onnx" and result["check"]["differ"] == 0
    assert {p.name for p in out.iterdir()} >= {"model.onnx", "tokenizer.json", "protege.json"}
    meta = json.loads((out / "protege.json").read_text())
    assert set(meta["labels"]) == set(task.labels) and meta["run_id"] == run_id
    # the folder alone is a specialist: loaded back, it answers every row as the source
    from protege.models.trained import specialist

    onnx = specialist(out, meta, None, {}, ctx)
    same = check(source, onnx, rows)
    assert same["differ"] == 0 and same["max_prob_gap"] < 1e-4
    # a lone row goes to the session computing on every core, a batch to single-threaded calls
    # side by side, and one session alone does both: every way gives the same answers
    ticks: list[int] = []
    batched, alone = onnx.predict(rows, progress=ticks.append), [onnx.predict([r])[0] for r in rows]
    assert sum(ticks) == len(rows) and len(ticks) > 1  # a bench's bar moves call by call
    one = specialist(out, meta, None, {"workers": "1", "lone_threads": "1"}, ctx)
    for way in (alone, one.predict(rows)):
        assert [p.output for p in way] == [p.output for p in batched]
        assert max(abs(x.label_probs[k] - y.label_probs[k]) for x, y in zip(way, batched) for k in x.label_probs) < 1e-5
    onnx.close(), one.close()
    with pytest.raises(ProtegeError, match="workers"):
        specialist(out, meta, None, {"workers": "0"}, ctx)
    with pytest.raises(ProtegeError, match="call_tokens"):
        specialist(out, meta, None, {"call_tokens": "-1"}, ctx)
    # int8: probabilities within the stated tolerance; answers differ only on near-ties
    int8 = build_candidate(f"run:{run_id}?runtime=onnx&quantize=int8", ctx)
    a, b = source.predict(rows), int8.predict(rows)
    gap = max(abs(x.label_probs[k] - y.label_probs[k]) for x, y in zip(a, b) for k in x.label_probs)
    assert gap <= INT8_PROB_GAP
    for x, y in zip(a, b):
        if x.output != y.output:
            top = sorted(x.label_probs.values(), reverse=True)
            assert top[0] - top[1] <= 2 * INT8_PROB_GAP
    # each runtime is its own bench candidate, its accuracy measured against the torch model's
    report = run_bench(sqlite_store, task, ds, home, [f"run:{run_id}", f"run:{run_id}?runtime=onnx",
                                                      f"run:{run_id}?runtime=onnx&quantize=int8"], latency_samples=2)
    specs = [c.spec for c in report.results]
    assert specs == [f"run:{run_id}", f"run:{run_id}?runtime=onnx", f"run:{run_id}?runtime=onnx&quantize=int8"]
    torch_acc, onnx_acc = (c.metrics["accuracy"]["value"] for c in report.results[:2])
    assert torch_acc == onnx_acc and report.results[1].throughput_rps > 0


def serve_once(sqlite_store, tmp_path, home, target, options, task):
    """(served model name, its answer) of one request to a real server over `target`."""
    from protege.capture.writer import TraceWriter
    from protege.serve.app import ServeApp
    from protege.serve.specialist import load_specialist

    name, predict, _, rid = load_specialist(target, sqlite_store, home, options=options)
    writer = TraceWriter(sqlite_store, tmp_path / "spool")
    app = ServeApp(name, predict, task=task.name, writer=writer, run_id=rid)
    with ServerThread(app) as server:
        body = {"messages": [{"role": "user", "content": "my card has not arrived"}]}
        r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200 and r.json()["model"] == name
    writer.close()
    assert sqlite_store.list_traces(source="serve")[-1]["metadata"]["run_id"] == rid
    return name, r.json()["choices"][0]["message"]["content"]


def test_onnx_runtime_serves_over_http(sqlite_store, tmp_path, home, classifier):
    task, _, run_id = classifier
    name, answer = serve_once(sqlite_store, tmp_path, home, f"run:{run_id}", {"runtime": "onnx", "quantize": "int8"},
                              task)
    assert name.endswith("-onnx-int8") and answer in task.labels


def test_export_refuses_what_does_not_fit_and_leaves_nothing_behind(sqlite_store, tmp_path, home, classifier,
                                                                     capsys):
    task, ds, run_id = classifier
    out = tmp_path / "out"
    for args, words in [(["--format", "gguf"], "GGUF export is for causal specialists"),
                        (["--format", "peft"], "peft export is for causal specialists"),
                        (["--format", "onnx", "--quantize", "q4_k_m"], "does not apply to onnx"),
                        (["--format", "tflite"], "choose one of onnx, gguf, merged, peft")]:
        code, _, err = run(capsys, "--db", sqlite_store.url, "export", f"run:{run_id}", str(out), *args)
        assert code == 1 and words in " ".join(err.split()), err
        assert not out.exists() and not list(tmp_path.glob(".out-*"))
    code, _, err = run(capsys, "--db", sqlite_store.url, "export", "run:nope", str(out), "--format", "onnx")
    assert code == 1 and "nope" in err
    (out / "mine.txt").parent.mkdir()
    (out / "mine.txt").write_text("a user's file")
    code, _, err = run(capsys, "--db", sqlite_store.url, "export", f"run:{run_id}", str(out), "--format", "onnx")
    assert code == 1 and "is not an export of protege's" in " ".join(err.split())
    assert (out / "mine.txt").read_text() == "a user's file"
    from protege.errors import ProtegeError
    from protege.models.registry import build_candidate

    ctx = ctx_for(sqlite_store, task, ds, home)
    with pytest.raises(ProtegeError, match="runtime 'llama.cpp' does not run a classifier"):
        build_candidate(f"run:{run_id}?runtime=llama.cpp", ctx)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.onnx").write_bytes(b"not a graph")
    (broken / "protege.json").write_text(json.dumps({"method": "classifier", "format": "onnx", "labels": task.labels}))
    from protege.models.trained import specialist

    with pytest.raises(ProtegeError, match="ONNX Runtime cannot load"):
        specialist(broken, json.loads((broken / "protege.json").read_text()), None, {}, ctx)


@pytest.fixture
def causal(sqlite_store, tmp_path, home, tiny_llama):  # noqa: F811
    return trained_on_banking(sqlite_store, tmp_path, home, tiny_llama, "lora", "epochs=1", "eval_rows=4")


def near_ties(scores: dict, a: str, b: str, within: float) -> bool:
    import math

    return abs(math.log(scores[a]) - math.log(scores[b])) <= within


def test_gguf_export_answers_as_the_torch_model_on_llama_cpp(sqlite_store, tmp_path, home, causal, capsys):
    from protege.models.registry import build_candidate
    from protege.models.trained import specialist

    task, ds, run_id = causal
    rows = ds.split("test")
    ctx = ctx_for(sqlite_store, task, ds, home)
    out = tmp_path / "gguf"
    code, stdout, err = run(capsys, "--db", sqlite_store.url, "export", f"run:{run_id}", str(out), "--format", "gguf",
                            "--json")
    assert code == 0, err
    result = json.loads(stdout)
    assert result["quantize"] == "f32" and result["files"]["model.gguf"] > 0 and result["check"]["rows"] > 0
    meta = json.loads((out / "protege.json").read_text())
    greedy = build_candidate(f"run:{run_id}?beam=1", ctx)  # llama.cpp decodes greedily over the label grammar
    scores = build_candidate(f"run:{run_id}?mode=score", ctx).predict(rows)
    gguf = specialist(out, meta, None, {}, ctx)
    a, b = greedy.predict(rows), gguf.predict(rows)
    assert all(p.output in task.labels for p in b)
    for x, y, s in zip(a, b, scores):
        if x.output == y.output:
            assert abs(x.confidence - y.confidence) < 1e-3
        else:  # float sums in another order can only swap labels the model holds all but equal
            assert near_ties(s.label_probs, x.output, y.output, 1e-3), (x, y)
    # asked from another thread (protege serve's model thread), llama.cpp computes on the model's
    # own thread all the same: the same answers
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as other:
        again = other.submit(gguf.predict, rows).result()
    assert [(p.output, p.confidence) for p in again] == [(p.output, p.confidence) for p in b]
    from protege.errors import ProtegeError

    with pytest.raises(ProtegeError, match="repack=2: choose 1"):
        specialist(out, meta, None, {"repack": "2"}, ctx)
    # quantised files are their own candidates; q8_0 moves no label probability by much
    q8 = build_candidate(f"run:{run_id}?runtime=llama.cpp", ctx)
    assert q8.spec.endswith("runtime=llama.cpp&quantize=q8_0")
    from protege.runs.registry import get_run

    cached = Path(get_run(sqlite_store, run_id)["checkpoint_path"]).parent / "exports" / "gguf-q8_0" / "model.gguf"
    assert cached.exists() and cached.stat().st_size < result["files"]["model.gguf"]
    c = q8.predict(rows)
    assert all(p.output in task.labels and 0 < p.confidence <= 1 for p in c)
    gguf.close()
    q8.close()
    # and it serves: the export folder itself, as a user would point protege serve at it
    name, answer = serve_once(sqlite_store, tmp_path, home, str(out), {}, task)
    assert name.endswith("-llama.cpp-f32") and answer in task.labels


def test_spread_splits_the_largest_groups_until_every_worker_has_one():
    from protege.models.ort import spread

    assert spread([[0, 1, 2, 3, 4, 5, 6, 7]], 2) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert spread([[0, 1, 2], [3]], 4) == [[0], [1], [2], [3]]
    assert spread([[0], [1, 2]], 4) == [[0], [1], [2]]  # no more rows to split: three calls
    assert spread([[0, 1], [2, 3, 4, 5]], 2) == [[0, 1], [2, 3, 4, 5]]  # enough groups already
    assert spread([[7]], 2) == [[7]] and spread([], 2) == []


def test_plan_calls_covers_every_row_once_and_keeps_the_busiest_core_short():
    import itertools
    import random

    from protege.models.ort import plan_calls

    def span(plan, lengths, fixed=10.0):  # the busiest worker's estimated work
        return max(sum(fixed + len(g) * max(lengths[i] for i in g) for g in w) for w in plan)

    def check(lengths, workers, most):
        plan = plan_calls(lengths, workers, most)
        assert sorted(i for w in plan for g in w for i in g) == list(range(len(lengths)))
        assert len(plan) <= workers and all(w and all(0 < len(g) <= most for g in w) for w in plan)
        return plan

    # a batch of a few rows: one call a core, cut in length order where the costlier call is cheapest
    lengths = [13, 8, 22, 7, 12, 9, 15, 10]
    plan = check(lengths, 2, 64)
    ranked = sorted(range(8), key=lengths.__getitem__)
    best = min(span([[ranked[:k]], [ranked[k:]]], lengths) for k in range(1, 8))
    assert [len(w) for w in plan] == [1, 1] and span(plan, lengths) == best
    # a long row among short ones goes alone rather than pad the others to its length
    lengths = [10] * 7 + [120]
    assert sorted(check(lengths, 2, 64)) == [[[0, 1, 2, 3, 4, 5, 6]], [[7]]]
    # a large batch: groups of similar length (no group pads more than a call costs), dealt so
    # that the busiest worker has at most one group more than the least busy one
    random.seed(7)
    lengths = [random.randint(5, 60) for _ in range(500)]
    plan = check(lengths, 2, 64)
    loads = sorted(sum(10 + len(g) * max(lengths[i] for i in g) for g in w) for w in plan)
    biggest = max(10 + len(g) * max(lengths[i] for i in g) for w in plan for g in w)
    assert loads[-1] - loads[0] <= biggest
    for w in plan:
        for g in w:
            pad = sum(max(lengths[i] for i in g) - lengths[i] for i in g)
            assert pad <= 10 * len(g)
    # the plan is never worse than any split of a small batch into contiguous runs, one call a run
    for _ in range(50):
        lengths = [random.randint(3, 40) for _ in range(random.randint(2, 7))]
        plan = check(lengths, 2, 4)
        ranked = sorted(range(len(lengths)), key=lengths.__getitem__)
        for cuts in itertools.combinations(range(1, len(lengths)), 1):
            runs = [ranked[a:b] for a, b in zip((0, *cuts), (*cuts, len(lengths)))]
            if all(len(r) <= 4 for r in runs):
                assert span(plan, lengths) <= span([[r] for r in runs], lengths) + 1e-9
    assert plan_calls([], 2, 4) == [] and plan_calls([9], 2, 4) == [[[0]]]
    assert plan_calls([3, 4, 5], 1, 64) == [[[0, 1, 2]]]
