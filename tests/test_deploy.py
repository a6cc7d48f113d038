"""Deployments: the promotion gate refuses a worse run and accepts a better one, rollback
restores the previous run, and a server following the task switches without dropping or
failing a request."""

from __future__ import annotations

import json
import threading

import httpx
import pytest
from helpers import ServerThread, make_banking, run, said, wait_for

from protege.deploy.registry import activate, current, get_deployment, list_deployments, rollback
from protege.errors import ProtegeError


def train_pair(store, tmp_path, home, tiny_bert):
    """(task, dataset, a MiniLM classifier that learnt, a tiny random one that barely did)."""
    from protege.train.api import train
    from protege.train.recipe import load_recipe

    task, ds = make_banking(store, tmp_path, home)
    good = train(store, task, ds, home, "minilm", "classifier",
                 load_recipe("classifier", overrides=["epochs=3", "batch_size=16", "eval_every=5"]))
    # a random head that hardly moves: near chance (1 in 6)
    bad = train(store, task, ds, home, tiny_bert, "classifier", load_recipe(
        "classifier", overrides=["epochs=0.1", "init_head=random", "lr=1e-7", "head_lr=1e-7"]))
    return task, ds, good, bad


def test_gate_refuses_a_worse_run_accepts_a_better_one_and_rollback_restores(sqlite_store, tmp_path, home,
                                                                               tiny_bert, capsys):
    task, ds, good, bad = train_pair(sqlite_store, tmp_path, home, tiny_bert)
    db = ["--db", sqlite_store.url]
    # no frontier benched yet: the bar is unknown, and unknown never passes
    code, out, err = run(capsys, *db, "deploy", str(task.path), f"run:{good}")
    assert code == 1 and "FAIL clears the bar: the bar is unknown" in said(out) and "not deployed" in err
    assert current(sqlite_store, task.name) is None
    code, _, err = run(capsys, *db, "bench", str(task.path), "-c", "replay", "--latency-samples", "1")
    assert code == 0, err
    ref = next(r for r in json.loads(run(capsys, *db, "runs", "list", "--kind", "bench", "--json")[1])
               if r["config"]["candidate"] == "replay")["metrics"]["metrics"]["accuracy"]["value"]

    # the tiny run is far under the bar: refused, then forced (and recorded as forced)
    code, out, err = run(capsys, *db, "deploy", str(task.path), f"run:{bad}", "--tolerance", "0.3")
    assert code == 1 and "FAIL clears the bar" in said(out) and "pass not worse than the serving run" in said(out)
    code, out, err = run(capsys, *db, "deploy", str(task.path), f"run:{bad}", "--tolerance", "0.3", "--force",
                         "--by", "ci")
    assert code == 0, err
    first = current(sqlite_store, task.name)
    assert first["run_id"] == bad and first["forced"] and first["created_by"] == "ci"
    assert first["evidence"]["forced_past"] == ["clears the bar"]
    assert first["evidence"]["bar"]["bar"] == pytest.approx(ref - 0.3)

    # the MiniLM run beats the serving one: the gate passes, citing the paired CI
    code, out, err = run(capsys, *db, "deploy", str(task.path), f"run:{good}", "--tolerance", "0.3", "--json",
                         "--alarm-agreement", "0.85", "--alarm-action", "threshold")
    assert code == 0, err
    result = json.loads(out)
    second = result["deployment"]
    assert second["options"] == {"alarm": {"agreement_floor": 0.85, "action": "threshold"}}
    assert second["run_id"] == good and not second["forced"] and second["previous_id"] == first["id"]
    serving = result["gate"]["serving"]
    assert serving["run_id"] == bad and serving["difference"] > 0 and serving["difference_ci95"][0] > 0
    assert get_deployment(sqlite_store, first["id"])["status"] == "replaced"

    # the tiny run again: worse than what serves, so refused, naming the figure
    code, out, err = run(capsys, *db, "deploy", str(task.path), f"run:{bad}", "--tolerance", "0.3")
    assert code == 1 and "FAIL not worse than the serving run" in said(out) and "it may be worse" in said(out)
    assert "not worse than the serving run" in said(err) and current(sqlite_store, task.name)["id"] == second["id"]

    # rollback: what served before serves again, as a new record; the rolled-back one says why
    code, out, err = run(capsys, *db, "rollback", str(task.path), "--reason", "drift alarm", "--by", "ops")
    assert code == 0, err
    third = current(sqlite_store, task.name)
    assert third["run_id"] == bad and third["evidence"]["rollback"] == {
        "from": second["id"], "restores": first["id"], "restored_evidence": first["evidence"]}
    gone = get_deployment(sqlite_store, second["id"])
    assert (gone["status"], gone["ended_by"], gone["end_reason"]) == ("rolled_back", "ops", "drift alarm")
    # nothing before the first deployment: a second rollback refuses
    with pytest.raises(ProtegeError, match="nothing before it to roll back to"):
        rollback(sqlite_store, task.name)
    code, out, _ = run(capsys, *db, "deployments", "list", "--task", task.name, "--json")
    assert [d["status"] for d in json.loads(out)] == ["active", "rolled_back", "replaced"]
    code, out, _ = run(capsys, *db, "deployments", "show", third["id"][:15])
    assert code == 0 and f"a rollback from {second['id']}" in said(out)
    # decide never reads the gate's benches: its reference is still the frontier's replay
    from protege.decide.analysis import Inputs, decide

    assert decide(sqlite_store, task, Inputs()).reference == "replay"


def test_one_active_deployment_per_task_whatever_races(store):
    from concurrent.futures import ThreadPoolExecutor

    def deploy(i):
        try:
            return activate(store, task="race", run_id=f"r{i}", threshold=None, fallback=None, options={},
                            evidence={}, forced=True)
        except ProtegeError as exc:  # lost the race: told so, nothing half-written
            assert "at the same moment" in str(exc)

    with ThreadPoolExecutor(8) as pool:
        made = [d for d in pool.map(deploy, range(16)) if d]
    rows = list_deployments(store, task="race", limit=None)
    assert sorted(d["id"] for d in rows) == sorted(made)
    assert [d["status"] for d in rows].count("active") == 1

    sqlite_store = store
    a = activate(sqlite_store, task="t", run_id="r1", threshold=None, fallback=None, options={}, evidence={},
                 forced=True)
    with pytest.raises(ProtegeError, match="changed to"):
        activate(sqlite_store, task="t", run_id="r2", threshold=None, fallback=None, options={}, evidence={},
                 forced=True, expect_active="someone-else")
    from datetime import datetime, timezone

    from protege.traces import schema

    with pytest.raises(Exception, match="(?i)unique"):  # the store itself refuses a second active row
        with sqlite_store.engine.begin() as conn:
            conn.execute(schema.deployments.insert().values(
                id="x", task="t", run_id="r3", status="active", options={}, evidence={}, forced=False,
                created_by="me", created_at=datetime.now(timezone.utc)))
    assert [d["id"] for d in list_deployments(sqlite_store, task="t")] == [a]
    with pytest.raises(ProtegeError, match="no active deployment"):
        rollback(sqlite_store, "other")


def test_server_follows_the_deployment_without_dropping_a_request(sqlite_store, tmp_path, home, tiny_bert):
    from protege.capture.writer import TraceWriter
    from protege.serve.app import ServeApp
    from protege.serve.follow import Follower, initial
    from protege.train.api import train
    from protege.train.recipe import load_recipe

    task, ds = make_banking(sqlite_store, tmp_path, home)
    runs = [train(sqlite_store, task, ds, home, tiny_bert, "classifier",
                  load_recipe("classifier", overrides=["epochs=0.2", f"seed={i}"])) for i in range(2)]
    deploy = [activate(sqlite_store, task=task.name, run_id=runs[0], threshold=None, fallback=None, options={},
                       evidence={}, forced=True)]
    d, served = initial(sqlite_store, task.name, home, str(task.path), {})
    writer = TraceWriter(sqlite_store, tmp_path / "spool")
    follower = Follower(sqlite_store, task.name, home, str(task.path), d, poll_s=0.05)
    app = ServeApp(served.name, served.predict, task=task.name, writer=writer, run_id=served.run_id,
                   deployment=d["id"], background=(follower,))
    answers, stop = [], threading.Event()

    def client(url):
        with httpx.Client(timeout=30) as c:
            while not stop.is_set():
                r = c.post(f"{url}/v1/chat/completions", json={"model": "m", "messages": [
                    {"role": "user", "content": "my card has not arrived yet"}]})
                answers.append((r.status_code, r.json().get("model")))

    with ServerThread(app) as server:
        threads = [threading.Thread(target=client, args=(server.url,)) for _ in range(3)]
        for t in threads:
            t.start()
        try:
            names = [f"protege-{task.name}-{r[:13]}" for r in runs]
            assert wait_for(lambda: len(answers) > 20)
            deploy.append(activate(sqlite_store, task=task.name, run_id=runs[1], threshold=None, fallback=None,
                                   options={}, evidence={}, forced=True))
            assert wait_for(lambda: answers[-1][1] == names[1], timeout=30)
            n = len(answers)
            rollback(sqlite_store, task.name)
            assert wait_for(lambda: answers[-1][1] == names[0] and len(answers) > n + 20, timeout=30)
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        health = httpx.get(f"{server.url}/healthz").json()
        metrics = httpx.get(f"{server.url}/metrics").text
    assert {status for status, _ in answers} == {200}, "a request failed during a switch"
    assert {name for _, name in answers} == set(names)
    assert health["run_id"] == runs[0] and health["deployment"] == current(sqlite_store, task.name)["id"]
    assert "protege_serve_deployment_switches_total 2" in metrics
    assert writer.flush(15)
    traces = sqlite_store.list_traces(limit=100_000, source="serve")
    assert len(traces) == len(answers) and writer.stats()["dropped"] == 0  # none lost either
    assert {deploy[0], deploy[1]} <= {t["metadata"].get("deployment") for t in traces}


def test_shadow_stores_linked_traces_at_the_set_rate_and_measures_agreement(sqlite_store, tmp_path, home, tiny_bert):
    import random
    from concurrent.futures import ThreadPoolExecutor

    from protege.capture.writer import TraceWriter
    from protege.serve.app import ServeApp
    from protege.serve.fallback import Fallback
    from protege.serve.shadow import Shadow, agreement_rule
    from protege.serve.specialist import load_specialist
    from protege.testing import ScriptedUpstream
    from protege.train.api import train
    from protege.train.recipe import load_recipe

    task, ds = make_banking(sqlite_store, tmp_path, home)
    run_id = train(sqlite_store, task, ds, home, tiny_bert, "classifier", load_recipe("classifier", overrides=["epochs=1"]))
    name, predict, _, rid = load_specialist(f"run:{run_id}", sqlite_store, home)
    # the frontier answers in lower case: still the same label as the specialist's card_arrival
    up = ScriptedUpstream(model="gpt-frontier", reply=lambda req: "CARD_ARRIVAL", delay_ms=20).start()
    writer = TraceWriter(sqlite_store, tmp_path / "spool")
    shadow = Shadow(Fallback(f"openai:gpt-frontier@{up.url}"), rate=0.3, floor=0.3, ceiling=0.3,
                    same=agreement_rule(task), submit=writer.submit, task=task.name, rng=random.Random(1))
    app = ServeApp(name, predict, task=task.name, writer=writer, run_id=rid, shadow=shadow)
    texts = [r["input"] for r in ds.split("test")] * 10
    try:
        with ServerThread(app) as server:
            def ask(text):
                return httpx.post(f"{server.url}/v1/chat/completions", timeout=30,
                                  json={"model": "m", "messages": [{"role": "user", "content": text}]}).status_code

            with ThreadPoolExecutor(4) as pool:
                assert set(pool.map(ask, texts)) == {200}
            assert wait_for(lambda: shadow.stats.compared + shadow.stats.errors == shadow.stats.sent
                            and not shadow.in_flight)
            metrics = httpx.get(f"{server.url}/metrics").text
    finally:
        up.stop()
    n = shadow.stats.sent
    assert 0.2 * len(texts) <= n <= 0.4 * len(texts) and up.count == n  # 240 requests at 30%
    assert writer.flush(15)
    served = {t["id"]: t for t in sqlite_store.list_traces(limit=1000, source="serve")}
    shadows = sqlite_store.list_traces(limit=1000, source="shadow")
    assert len(served) == len(texts) and len(shadows) == n
    agree = 0
    for t in shadows:
        twin = served[t["metadata"]["shadow_of"]]  # linked to the served trace it shadows
        assert t["request"] == twin["request"] and t["output_text"] == "CARD_ARRIVAL"
        assert t["metadata"]["agrees"] == (twin["output_text"] == "card_arrival")
        agree += t["metadata"]["agrees"]
    a = shadow.stats.agreement()
    assert a["n"] == n and a["value"] == pytest.approx(agree / n)
    assert a["ci95"][0] <= a["value"] <= a["ci95"][1]
    assert sum(v["n"] for v in a["per_label"].values()) == n
    assert f'protege_serve_shadow_requests_total{{outcome="compared"}} {n}' in metrics


def test_shadow_rate_rises_with_disagreement_and_falls_when_steady():
    import asyncio

    from protege.serve.shadow import Shadow

    class Frontier:
        model = "scripted"

        def __init__(self, answer):
            self.answer = answer

        async def complete(self, body):
            return {"choices": [{"message": {"role": "assistant", "content": self.answer}}]}, 200

        async def close(self):
            pass

    async def drive(answer: str) -> list[float]:
        shadow = Shadow(Frontier(answer), rate=0.1, floor=0.02, ceiling=0.5, target=0.9, step=20, window=100)
        rates = []
        for _ in range(10_000):
            shadow.maybe({"messages": []}, "a", None, "s")
            await asyncio.sleep(0)
            rates.append(shadow.rate)
        await asyncio.gather(*shadow.in_flight)
        return rates

    rising, steady = asyncio.run(drive("b")), asyncio.run(drive("a"))
    assert rising[-1] == 0.5 and steady[-1] == 0.02  # to the ceiling, and down to the floor
    with pytest.raises(ValueError, match="floor <= rate <= ceiling"):
        Shadow(Frontier("a"), rate=0.9, ceiling=0.5)


def test_alarm_sends_everything_to_the_frontier_until_a_person_resets_it(sqlite_store, tmp_path, home, tiny_bert,
                                                                         capsys):
    from protege.serve.app import ServeApp
    from protege.serve.fallback import Fallback
    from protege.serve.follow import Follower, initial
    from protege.serve.guard import Guard, Policy
    from protege.serve.shadow import Shadow, agreement_rule
    from protege.serve.specialist import load_specialist
    from protege.testing import ScriptedUpstream
    from protege.train.api import train
    from protege.train.recipe import load_recipe

    task, ds = make_banking(sqlite_store, tmp_path, home)
    run_id = train(sqlite_store, task, ds, home, tiny_bert, "classifier", load_recipe("classifier", overrides=["epochs=1"]))
    _, predict, _, _ = load_specialist(f"run:{run_id}", sqlite_store, home)
    agree = threading.Event()

    def frontier_reply(req):  # disagrees (a label the specialist never gives), until told to agree
        text = req["messages"][-1]["content"]
        return predict([{"input": text}])[0].output if agree.is_set() else "not-a-label"

    frontier = ScriptedUpstream(model="frontier", reply=frontier_reply).start()
    posted = []

    async def hook_app(scope, receive, send):  # the webhook's receiving end
        if scope["type"] != "http":
            return
        body = b""
        while True:
            m = await receive()
            body += m.get("body", b"")
            if not m.get("more_body"):
                break
        posted.append((scope["path"], json.loads(body)))
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    hook = ServerThread(hook_app).__enter__()
    try:
        # the alarm's floor is the deployment's own (protege deploy --alarm-agreement 0.9)
        activate(sqlite_store, task=task.name, run_id=run_id, threshold=0.0, fallback=f"openai:frontier@{frontier.url}",
                 options={"alarm": {"agreement_floor": 0.9, "min_n": 20}}, evidence={}, forced=True)
        d, served = initial(sqlite_store, task.name, home, str(task.path), {})
        shadow = Shadow(Fallback(f"openai:frontier@{frontier.url}"), rate=1.0, floor=1.0, ceiling=1.0,
                        same=agreement_rule(task))
        guard = Guard(Policy(), store=sqlite_store, webhook=f"{hook.url}/alarms",
                      interval_s=0.05)
        app = ServeApp(served.name, served.predict, task=task.name, run_id=served.run_id, fallback=served.fallback,
                       threshold=served.threshold, deployment=d["id"], shadow=shadow, alarm=served.alarm,
                       background=(Follower(sqlite_store, task.name, home, str(task.path), d, poll_s=0.05), guard))
        texts = [r["input"] for r in ds.split("test")]
        with ServerThread(app) as server, httpx.Client(timeout=30) as c:
            def ask(i):
                r = c.post(f"{server.url}/v1/chat/completions",
                           json={"model": "m", "messages": [{"role": "user", "content": texts[i % len(texts)]}]})
                assert r.status_code == 200
                return r.headers["x-protege-answered-by"]

            assert {ask(i) for i in range(10)} == {"specialist"}
            i = 10
            while app.metrics.alarm is None and i < 200:
                ask(i)
                i += 1
            assert app.metrics.alarm is not None and 20 <= shadow.stats.compared <= 60, shadow.stats.compared
            assert {ask(j) for j in range(20)} == {"fallback"}  # everything to the frontier now
            stored = current(sqlite_store, task.name)["alarm"]
            assert stored["kind"] == "agreement" and "under the floor of 90%" in stored["reason"]
            assert wait_for(lambda: len(posted) == 1)
            assert posted[0][0] == "/alarms" and posted[0][1]["event"] == "protege.alarm"
            assert posted[0][1]["kind"] == "agreement" and posted[0][1]["deployment"] == d["id"]
            assert 'protege_serve_alarm{kind="agreement"} 1' in httpx.get(f"{server.url}/metrics").text
            # a second server following the same deployment reads the alarm and acts alike, without
            # telling the webhook again
            import asyncio

            other = ServeApp(served.name, served.predict, task=task.name, run_id=served.run_id,
                             fallback=served.fallback, threshold=served.threshold, deployment=d["id"])
            other_guard = Guard(Policy(), store=sqlite_store, webhook=f"{hook.url}/alarms")
            async def once():
                await other_guard.check(other, asyncio.get_running_loop())

            asyncio.run(once())
            assert other.metrics.alarm["kind"] == "agreement" and other.served.threshold > 1
            assert len(posted) == 1 and other.metrics.switches == 0
            other.batcher.close()
            # a person looks, fixes the frontier side, and resets: the specialist answers again
            agree.set()
            code, out, err = run(capsys, "--db", sqlite_store.url, "deployments", "reset", str(task.path), "--by", "ops")
            assert code == 0 and "alarm (agreement" in said(out), err
            assert wait_for(lambda: app.metrics.alarm is None)
            assert {ask(j) for j in range(60)} == {"specialist"} and app.metrics.alarm is None
            assert current(sqlite_store, task.name)["evidence"]["alarms"][0]["reset_by"] == "ops"
    finally:
        frontier.stop()
        hook.__exit__(None, None, None)


def test_monitor_reports_the_deployment_from_the_store(sqlite_store, tmp_path, home, tiny_bert, capsys):
    from protege.capture.writer import TraceWriter
    from protege.prices import load_prices
    from protege.serve.app import ServeApp
    from protege.serve.fallback import Fallback
    from protege.serve.follow import initial
    from protege.serve.shadow import Shadow, agreement_rule
    from protege.serve.specialist import load_specialist
    from protege.testing import ScriptedUpstream
    from protege.train.api import train
    from protege.train.recipe import load_recipe

    task, ds = make_banking(sqlite_store, tmp_path, home)
    run_id = train(sqlite_store, task, ds, home, tiny_bert, "classifier", load_recipe("classifier", overrides=["epochs=1"]))
    frontier = ScriptedUpstream(model="gpt-4o-mini-2024-07-18", reply=lambda req: "card_arrival",
                                usage=lambda req: {"prompt_tokens": 120, "completion_tokens": 4, "total_tokens": 124})
    frontier.start()
    try:
        url = f"openai:gpt-4o-mini@{frontier.url}"
        texts = [r["input"] for r in ds.split("test")]
        _, probe, _, _ = load_specialist(f"run:{run_id}", sqlite_store, home)
        conf = sorted(p.confidence for p in probe([{"input": t} for t in texts]))
        threshold = conf[len(conf) // 2]  # about half go to the fallback
        code, out, err = run(capsys, "--db", sqlite_store.url, "monitor", str(task.path))
        assert code == 1 and "no active deployment" in err
        activate(sqlite_store, task=task.name, run_id=run_id, threshold=threshold, fallback=url, options={},
                 evidence={}, forced=True)
        d, served = initial(sqlite_store, task.name, home, str(task.path), {})
        writer = TraceWriter(sqlite_store, tmp_path / "spool")
        shadow = Shadow(Fallback(url), rate=1.0, floor=1.0, ceiling=1.0, same=agreement_rule(task),
                        submit=writer.submit, task=task.name)
        app = ServeApp(served.name, served.predict, task=task.name, writer=writer, run_id=served.run_id,
                       fallback=served.fallback, threshold=served.threshold, deployment=d["id"], shadow=shadow)
        with ServerThread(app) as server:
            for t in texts * 2:
                assert httpx.post(f"{server.url}/v1/chat/completions", timeout=30, json={
                    "model": "m", "messages": [{"role": "user", "content": t}]}).status_code == 200
            assert wait_for(lambda: not shadow.in_flight and shadow.stats.sent == shadow.stats.compared)
        assert writer.flush(15)
    finally:
        frontier.stop()
    code, out, err = run(capsys, "--db", sqlite_store.url, "monitor", str(task.path), "--json")
    assert code == 0, err
    h = json.loads(out)
    assert h["deployment"] == d["id"] and h["requests"] == 2 * len(texts) and h["errors"] == 0
    assert h["answered_by"] == app.metrics.requests and 0 < h["fallback_rate"] < 1
    sh = shadow.stats
    assert h["shadow"]["compared"] == sh.compared == h["answered_by"]["specialist"]
    assert h["shadow"]["agreement"] == pytest.approx(sh.agreed / sh.compared)
    per = load_prices().lookup("gpt-4o-mini").cost(120, 4)
    assert h["frontier_cost"]["per_request_usd"] == pytest.approx(per)
    assert h["frontier_cost"]["saved_usd"] == pytest.approx(per * h["answered_by"]["specialist"])
    code, out, _ = run(capsys, "--db", sqlite_store.url, "monitor", str(task.path))
    assert code == 0 and "shadow agreement:" in out and "alarm: none" in out and "gpt-4o-mini at the price" in said(out)
    # the figures from traces a caller read already (the web page's charts' read, from before the
    # deployment) are the figures health reads itself: the older traces are left out
    from protege.deploy.monitor import health

    earlier = list(sqlite_store.iter_traces(task=task.name))
    assert len([t for t in earlier if t["id"] < d["id"]]) > 0
    assert health(sqlite_store, task.name, load_prices(), traces=earlier) == health(sqlite_store, task.name,
                                                                                   load_prices())
