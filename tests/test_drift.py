"""Drift: in-distribution traffic (BANKING77 tickets the model never trained on) does not
trip the alarms; out-of-domain traffic (CANARD's Wikipedia questions) trips the input alarm
within a stated number of requests."""

from __future__ import annotations

import gzip
import json
import random

from helpers import EXAMPLES, LABELS, make_banking, take, wait_for

from protege.deploy.registry import get_deployment
from protege.models.base import Context
from protege.models.knn import Encoder
from protege.models.registry import build_candidate
from protege.serve.drift import DriftWatch, Reference

CANARD = EXAMPLES.parent / "canard" / "test.jsonl.gz"


def bank_reference(store, tmp_path, home):
    """(task, dataset, MiniLM encoder, knn:minilm as the specialist, the drift reference) on the six-intent slice."""
    task, ds = make_banking(store, tmp_path, home)
    ctx = Context(task=task, dataset=ds, home=home, train=ds.split("train"))
    encoder = Encoder("minilm", ctx)
    specialist = build_candidate("knn:minilm", ctx)
    return task, ds, encoder, specialist, Reference.build(ds, encoder, specialist.predict, task.labels)


def stream_until_alarm(watch: DriftWatch, texts: list[str], predict, kind: str) -> int | None:
    """Feed `texts` one by one; the request count at which `kind` first alarms (None: never)."""
    for i, (text, pred) in enumerate(zip(texts, predict([{"input": t} for t in texts])), start=1):
        watch.observe(text, pred.output, pred.confidence)
        if i >= watch.min_n and i % 10 == 0:
            assert wait_for(watch.idle, 30)
            wait_for(lambda: len(watch.distances) == min(i, watch.distances.maxlen), 30)
            if watch.status()[kind]["alarm"]:
                return i
    return None


def test_drift_alarms_on_out_of_domain_inputs_not_on_in_distribution_ones(sqlite_store, tmp_path, home):
    task, ds, encoder, specialist, ref = bank_reference(sqlite_store, tmp_path, home)
    assert 0 < ref.q95 < 1 and set(ref.label_counts) == set(LABELS)

    seen = {r["input"] for name in ("train", "validation", "test") for r in ds.split(name)}
    fresh = [next(m["content"] for m in r["messages"] if m["role"] == "user")
             for r in take(EXAMPLES / "tickets.jsonl.gz", 80)]
    in_dist = [t for t in fresh if t not in seen]  # tickets of the same intents, never trained on
    random.Random(0).shuffle(in_dist)  # arriving mixed, as traffic does (the file is grouped by intent)
    in_dist = in_dist[:300]
    assert len(in_dist) >= 250
    calm = DriftWatch(ref, encoder, window=200, min_n=100)
    try:
        assert stream_until_alarm(calm, in_dist, specialist.predict, "input") is None
        s = calm.status()
        assert s["window"] == 200 and s["input"]["p_value"] > calm.alpha and not s["labels"]["alarm"]
        assert 0 < s["input"]["share"] < 0.15
    finally:
        calm.close()

    with gzip.open(CANARD, "rt") as fh:
        questions = [json.loads(line)["messages"][1]["content"].split("Latest question: ")[-1] for line in fh]
    drifting = DriftWatch(ref, encoder, window=200, min_n=100)
    try:
        at = stream_until_alarm(drifting, questions[:300], specialist.predict, "input")
        assert at is not None and at <= 110, at  # at the first test, once 100 inputs are in
        s = drifting.status()
        assert s["input"]["share"] > 0.5 and "metrics" not in s
        assert 'protege_serve_drift_alarm{kind="input"} 1' in drifting.metrics()
        # the guard reads it as a reason to act, in words a person can check
        from protege.serve.app import ServeApp
        from protege.serve.guard import Guard, Policy

        app = ServeApp("bank6-knn", specialist.predict, task=task.name, drift=drifting)
        kind, why = Guard(Policy()).reason(app)
        assert kind == "input drift" and "farther from the training inputs than 95% of held-out ones" in why
        assert Guard(Policy(drift=False)).reason(app) is None
        app.batcher.close()
    finally:
        drifting.close()


def test_label_mix_alarm_when_the_answers_shift(sqlite_store, tmp_path, home):
    task, ds, encoder, specialist, ref = bank_reference(sqlite_store, tmp_path, home)
    # the same inputs as training, but every answer one label: the mix has moved, the inputs have not
    watch = DriftWatch(ref, encoder, window=150, min_n=100)
    try:
        for r in (ds.split("train") * 2)[:150]:
            watch.observe(r["input"], "pin_blocked", 0.9)
        assert wait_for(lambda: watch.idle() and len(watch.distances) == 150, 30)
        s = watch.status()
        assert s["labels"]["alarm"] and s["labels"]["p_value"] < 1e-6 and not s["input"]["alarm"]
    finally:
        watch.close()


def test_served_requests_feed_the_drift_watch_and_metrics(sqlite_store, tmp_path, home):
    import httpx
    from helpers import ServerThread

    from protege.serve.app import ServeApp

    task, ds, encoder, specialist, ref = bank_reference(sqlite_store, tmp_path, home)
    watch = DriftWatch(ref, encoder, min_n=10)
    app = ServeApp("bank6-knn", specialist.predict, task=task.name, drift=watch)
    texts = [r["input"] for r in ds.split("test")]
    with ServerThread(app) as server:
        for t in texts:
            r = httpx.post(f"{server.url}/v1/chat/completions",
                           json={"model": "m", "messages": [{"role": "user", "content": t}]})
            assert r.status_code == 200
        assert wait_for(lambda: len(watch.distances) == len(texts), 30)
        metrics = httpx.get(f"{server.url}/metrics").text
    assert f"protege_serve_drift_window {len(texts)}" in metrics
    assert "protege_serve_drift_input_p_value " in metrics and list(watch.labels)[0] in task.labels
    # the watch embeds on one core, apart from the model's threads: the same distances as the
    # encoder computes on every core, and torch's thread count as it was for threads to come
    import threading

    import numpy as np
    import torch

    direct = 1 - (encoder(texts) @ ref.train_emb.T).max(1)
    assert np.allclose(sorted(watch.distances), sorted(direct), atol=1e-5)
    seen: list[int] = []
    t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    t.start(), t.join()
    assert seen == [torch.get_num_threads()]
    watch.close()


def test_drift_follows_the_serving_run_and_raises_the_shadow_rate(sqlite_store, tmp_path, home, tiny_bert):
    import asyncio

    from protege.datasets.build import build_dataset
    from protege.datasets.registry import get_dataset
    from protege.deploy.registry import activate
    from protege.serve.app import ServeApp
    from protege.serve.fallback import Fallback
    from protege.serve.follow import Follower, served_for
    from protege.serve.guard import Guard, Policy
    from protege.serve.shadow import Shadow
    from protege.traces.importers import ImportOptions, import_file
    from protege.train.api import train
    from protege.train.recipe import load_recipe

    task, ds = make_banking(sqlite_store, tmp_path, home)
    ctx = Context(task=task, dataset=ds, home=home, train=ds.split("train"))
    encoder = Encoder("minilm", ctx)
    first = train(sqlite_store, task, ds, home, tiny_bert, "classifier", load_recipe("classifier", overrides=["epochs=0.2"]))
    d1 = activate(sqlite_store, task=task.name, run_id=first, threshold=None, fallback=None, options={}, evidence={},
                  forced=True)
    s1 = served_for(get_deployment(sqlite_store, d1), sqlite_store, home, str(task.path), {})
    watch = DriftWatch(Reference.build(ds, encoder, s1.predict, task.labels), encoder, min_n=10, dataset_id=ds.id)
    # more tickets, a new dataset version, a run trained on it, deployed
    more = tmp_path / "more.jsonl"
    more.write_text("".join(json.dumps(r) + "\n" for r in take(EXAMPLES / "tickets.jsonl.gz", 40)[-60:]))
    import_file(sqlite_store, more, ImportOptions(task=task.name))
    ds2 = get_dataset(sqlite_store, build_dataset(sqlite_store, task, home, test_from=tmp_path / "test.jsonl").id)
    assert ds2.id != ds.id
    second = train(sqlite_store, task, ds2, home, tiny_bert, "classifier", load_recipe("classifier", overrides=["epochs=0.2"]))
    d2 = activate(sqlite_store, task=task.name, run_id=second, threshold=None, fallback=None, options={}, evidence={},
                  forced=True)
    follower = Follower(sqlite_store, task.name, home, str(task.path), get_deployment(sqlite_store, d1))
    follower.rebase_drift(watch, served_for(get_deployment(sqlite_store, d2), sqlite_store, home, str(task.path), {}))
    assert watch.dataset_id == ds2.id and len(watch.ref.train_emb) == len(ds2.split("train"))

    # drifting inputs raise the shadow rate at each check of the guard
    with gzip.open(CANARD, "rt") as fh:
        questions = [json.loads(line)["messages"][1]["content"].split("Latest question: ")[-1] for line in fh][:60]
    for q in questions:
        watch.observe(q, "card_arrival", 0.9)
    assert wait_for(lambda: watch.idle() and len(watch.distances) == 60, 30) and watch.status()["input"]["alarm"]
    shadow = Shadow(Fallback("openai:frontier@http://127.0.0.1:9/v1"), rate=0.1, ceiling=0.5)
    app = ServeApp("s", s1.predict, task=task.name, drift=watch, shadow=shadow)
    try:
        asyncio.run(Guard(Policy(drift=False)).check(app, None))
        assert shadow.rate == 0.1 * 1.5
    finally:
        app.batcher.close()
        watch.close()
