"""protege serve: a real trained (tiny) specialist behind a real HTTP server, the cascade
to a real local upstream, served requests stored as traces, bad requests answered with 4xx."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from helpers import ServerThread, free_port, run, said, trained_on_banking

from protege.testing import ScriptedUpstream

KEY = "sk-serve-test"



@pytest.fixture
def trained(sqlite_store, tmp_path, home, tiny_bert):  # noqa: F811
    return trained_on_banking(sqlite_store, tmp_path, home, tiny_bert, "classifier", "epochs=1", "batch_size=16")


def make_server(sqlite_store, home, tmp_path, run_id, **kw):
    from protege.capture.writer import TraceWriter
    from protege.serve.app import ServeApp
    from protege.serve.specialist import load_specialist

    name, predict, task, rid = load_specialist(f"run:{run_id}", sqlite_store, home)
    writer = TraceWriter(sqlite_store, tmp_path / "spool")
    app = ServeApp(name, predict, task=task.name, writer=writer, run_id=rid, **kw)
    return ServerThread(app), app, writer


def chat(text: str, **more) -> dict:
    return {"model": "anything", "messages": [{"role": "system", "content": "Classify."},
                                              {"role": "user", "content": text}], **more}


def test_serves_openai_clients_batches_and_stores_traces(sqlite_store, tmp_path, home, trained):
    import openai

    task, _, run_id = trained
    server, app, writer = make_server(sqlite_store, home, tmp_path, run_id, api_key=KEY)
    with server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
        r = client.chat.completions.create(model="x", messages=chat("my card has not arrived")["messages"])
        assert r.choices[0].message.content in task.labels and r.model == app.name
        assert r.model_extra["protege"]["answered_by"] == "specialist"
        assert 0 < r.model_extra["protege"]["confidence"] <= 1
        stream = client.chat.completions.create(model="x", messages=chat("exchange rate?")["messages"], stream=True,
                                                stream_options={"include_usage": True})
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text in task.labels and chunks[-1].usage is not None
        assert [m.id for m in client.models.list().data] == [app.name]
        with ThreadPoolExecutor(16) as pool:  # concurrent requests share model calls
            answers = list(pool.map(lambda i: client.chat.completions.create(
                model="x", messages=chat(f"where is my card, day {i}")["messages"]).choices[0].message.content,
                range(48)))
        assert all(a in task.labels for a in answers)
        assert app.metrics.batched_requests == 50 and app.metrics.batches < 50
        health = httpx.get(server.url + "/healthz").json()
        assert health["status"] == "ok" and health["model"] == app.name
        metrics = httpx.get(server.url + "/metrics").text
        assert f'protege_serve_requests_total{{model="{app.name}",answered_by="specialist"}} 50' in metrics
        assert 'protege_serve_latency_seconds_bucket{le="+Inf"} 50' in metrics
        assert "protege_serve_fallback_rate 0.0" in metrics
    writer.close()
    served = sqlite_store.list_traces(source="serve", limit=100)
    assert len(served) == 50 and all(t["task"] == task.name and t["status"] == "ok" for t in served)
    assert all(t["metadata"]["answered_by"] == "specialist" and t["metadata"]["run_id"] == run_id for t in served)
    assert {t["output_text"] for t in served} <= set(task.labels)


def test_fallback_answers_below_the_threshold_and_not_above(sqlite_store, tmp_path, home, trained):
    from protege.serve.fallback import Fallback
    from protege.serve.specialist import load_specialist

    task, _, run_id = trained
    _, predict, _, _ = load_specialist(f"run:{run_id}", sqlite_store, home)
    texts = ["my card has not arrived yet", "what exchange rate do you use", "top up failed again", "pin blocked"]
    conf = {t: p.confidence for t, p in zip(texts, predict([{"input": t} for t in texts]))}
    low, high = min(conf, key=conf.get), max(conf, key=conf.get)
    assert conf[low] < conf[high]
    threshold = (conf[low] + conf[high]) / 2
    up = ScriptedUpstream(model="gpt-frontier-1", reply=lambda req: "Refund_not_showing_up").start()
    try:
        server, app, writer = make_server(sqlite_store, home, tmp_path, run_id,
                                          fallback=Fallback(f"openai:gpt-frontier@{up.url}"), threshold=threshold)
        with server:
            r = httpx.post(server.url + "/v1/chat/completions", json=chat(high))
            assert r.status_code == 200 and r.headers["x-protege-answered-by"] == "specialist"
            assert up.count == 0
            r = httpx.post(server.url + "/v1/chat/completions", json=chat(low, temperature=0))
            body = r.json()
            assert r.headers["x-protege-answered-by"] == "fallback" and body["model"] == "gpt-frontier-1"
            assert body["choices"][0]["message"]["content"] == "Refund_not_showing_up"
            sent = json.loads(up.requests[0]["body"])
            assert up.count == 1 and sent["model"] == "gpt-frontier" and sent["temperature"] == 0
            assert sent["messages"] == chat(low)["messages"]  # the request as the client sent it
            assert body["protege"]["confidence"] == pytest.approx(conf[low], abs=1e-3)  # padding in a batch moves it a little
            r = httpx.post(server.url + "/v1/chat/completions", json=chat(low, stream=True))
            assert r.headers["x-protege-answered-by"] == "fallback" and "Refund_not_showing_up" in r.text
            assert r.text.rstrip().endswith("data: [DONE]")
            assert "protege_serve_fallback_rate 0.666" in httpx.get(server.url + "/metrics").text
            up.push(("status", 503, {"error": {"message": "overloaded"}}))
            r = httpx.post(server.url + "/v1/chat/completions", json=chat(low))
            assert r.status_code == 503 and r.json()["error"]["message"] == "overloaded"
        writer.close()
    finally:
        up.stop()
    served = sqlite_store.list_traces(source="serve", limit=10)
    by = sorted((t["metadata"]["answered_by"], t["status"]) for t in served)
    assert by == [("fallback", "error"), ("fallback", "ok"), ("fallback", "ok"), ("specialist", "ok")]
    assert {t["model"] for t in served if t["metadata"]["answered_by"] == "fallback" and t["status"] == "ok"} == \
        {"gpt-frontier-1"}


def test_bad_requests_get_openai_style_4xx(sqlite_store, tmp_path, home, trained):
    _, _, run_id = trained
    server, app, writer = make_server(sqlite_store, home, tmp_path, run_id, api_key=KEY, max_body_bytes=2000)
    auth = {"Authorization": f"Bearer {KEY}"}
    url = server.url + "/v1/chat/completions"
    with server:
        cases = [
            (httpx.post(url, json=chat("hi")), 401, "API key"),
            (httpx.post(url, json=chat("hi"), headers={"Authorization": "Bearer wrong"}), 401, "API key"),
            (httpx.post(url, content=b"{not json", headers=auth), 400, "not valid JSON"),
            (httpx.post(url, json=[1, 2], headers=auth), 400, "JSON object"),
            (httpx.post(url, json={"model": "x"}, headers=auth), 400, "'messages' is required"),
            (httpx.post(url, json={"messages": "hello"}, headers=auth), 400, "'messages' is required"),
            (httpx.post(url, json={"messages": [{"content": "x"}]}, headers=auth), 400, "messages[0]"),
            (httpx.post(url, json={"messages": [{"role": "system", "content": "x"}]}, headers=auth), 400,
             "no user message"),
            (httpx.post(url, json=chat("hi", stream="yes"), headers=auth), 400, "'stream'"),
            (httpx.post(url, json=chat("x" * 5000), headers=auth), 413, "limit"),
            (httpx.post(url, json=chat("  "), headers=auth), 400, "no text"),
            (httpx.get(url, headers=auth), 405, "use POST"),
            (httpx.post(server.url + "/v1/embeddings", json={}, headers=auth), 404, "unknown path"),
        ]
        for resp, status, words in cases:
            assert resp.status_code == status, (status, resp.text)
            err = resp.json()["error"]
            assert words in err["message"] and err["type"], err
        assert httpx.get(server.url + "/healthz").status_code == 200  # health and metrics need no key
        assert 'protege_serve_errors_total{status="400"} 8' in httpx.get(server.url + "/metrics").text
    writer.close()


def test_route_calibrate_picks_the_threshold_for_a_target(sqlite_store, tmp_path, home, trained, capsys):

    task, _, run_id = trained
    code, out, err = run(capsys, "--db", sqlite_store.url, "route", "calibrate", str(task.path), run_id,
                         "--target", "0.9", "--json")
    assert code == 0, err
    result = json.loads(out)
    curve = result["curve"]
    assert curve[0]["coverage"] == 1.0 and curve[-1]["coverage"] == 0.0
    assert all(a["coverage"] >= b["coverage"] for a, b in zip(curve, curve[1:]))
    assert result["cascade_quality"] >= 0.9 and result["threshold"] is not None
    # the lowest threshold that reaches the target: one step more coverage would miss it
    i = next(k for k, c in enumerate(curve) if c["threshold"] == result["threshold"])
    assert i == 0 or curve[i - 1]["cascade_quality"] < 0.9
    code, out, err = run(capsys, "--db", sqlite_store.url, "route", "calibrate", str(task.path), f"run:{run_id}",
                         "--target", "0.9")
    assert code == 0 and "protege serve" in out and "--threshold" in out
    code, out, err = run(capsys, "--db", sqlite_store.url, "route", "calibrate", str(task.path), run_id,
                         "--target", "0.99", "--fallback-quality", "0.5")
    assert code == 1 and "no threshold reaches" in out, out


def test_serve_command_runs_and_stops_cleanly(sqlite_store, tmp_path, home, trained, capsys):
    import os
    import signal
    import subprocess
    import sys
    import time


    task, _, run_id = trained
    code, _, err = run(capsys, "--db", sqlite_store.url, "serve", run_id, "--fallback", "openai:m@http://127.0.0.1:9")
    assert code == 1 and "--fallback and --threshold go together" in err
    code, _, err = run(capsys, "--db", sqlite_store.url, "serve", "run:0000abcd")
    assert code == 1 and "does not exist" in err

    def serve(*flags: str) -> tuple[str, str]:
        """Start `protege serve` as a user does, answer one request, stop it: (its report, /metrics)."""
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "protege", "--db", sqlite_store.url, "serve", f"run:{run_id}",
                                 "--port", str(port), *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env={**os.environ})
        try:
            for _ in range(1200):
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    assert proc.poll() is None, proc.communicate()[1][-2000:]
                    time.sleep(0.1)
            r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=chat("card still not here"), timeout=30)
            assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] in task.labels
            metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        finally:
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err[-2000:]
        assert f"on http://127.0.0.1:{port}/v1" in err
        return err, metrics

    serve()
    assert [t["source"] for t in sqlite_store.list_traces(source="serve")] == ["serve"]
    # with the drift watch (its guard runs beside the server) and a cascade: the report names the route
    err, metrics = serve("--drift", "--fallback", "openai:m@http://127.0.0.1:9", "--threshold", "0")
    assert "below 0.0 → m" in said(err) and "no deployment yet" not in said(err)
    assert "protege_serve_drift_window" in metrics


def test_serves_a_causal_lm_specialist(sqlite_store, tmp_path, home, tiny_llama):  # noqa: F811
    task, ds, run_id = trained_on_banking(sqlite_store, tmp_path, home, tiny_llama, "lora", "epochs=1", "eval_rows=4")
    server, app, writer = make_server(sqlite_store, home, tmp_path, run_id)
    with server:
        r = httpx.post(server.url + "/v1/chat/completions", json=chat("my card has not arrived"), timeout=60)
        body = r.json()
        assert r.status_code == 200 and body["choices"][0]["message"]["content"] in task.labels
        assert 0 < body["protege"]["confidence"] <= 1 and body["usage"]["prompt_tokens"] > 0
    writer.close()


def test_int8_quantized_specialist_is_a_bench_candidate_and_serves(sqlite_store, tmp_path, home, trained):
    from protege.bench.run import run_bench
    from protege.errors import ProtegeError
    from protege.models.base import Context
    from protege.models.registry import build_candidate

    task, ds, run_id = trained
    report = run_bench(sqlite_store, task, ds, home, [f"run:{run_id}", f"run:{run_id}?quantize=int8"],
                       latency_samples=2)
    fp32, int8 = report.results
    assert int8.spec.endswith("quantize=int8") and all(p.output in task.labels for p in int8.outputs)
    # its quality is measured against the fp32 model's, row for row (the tiny random model's
    # near-tied logits make the figure itself meaningless here; serve_latency.py measures MiniLM's)
    assert 0 <= int8.metrics["accuracy"]["value"] <= 1 and "accuracy" in int8.paired
    with pytest.raises(ProtegeError, match="quantize must be none or int8"):
        build_candidate(f"run:{run_id}?quantize=int4", Context(task=task, dataset=ds, home=home, store=sqlite_store))
    from protege.serve.specialist import load_specialist

    name, predict, _, _ = load_specialist(f"run:{run_id}", sqlite_store, home, options={"quantize": "int8"})
    assert name.endswith("-int8") and predict([{"input": "card"}])[0].output in task.labels


def test_batcher_waits_under_load_only():
    """An idle batcher answers at once; under load it lets wait_s pass (or max_batch, or as many
    as the last batch, gather) before each batch, and a batch of one stops the waiting."""
    import asyncio
    import threading
    import time

    from protege.serve.batcher import Batcher

    gate, sizes = threading.Event(), []

    def predict(rows):
        gate.wait(5)
        sizes.append(len(rows))
        return rows

    async def scenario():
        loop = asyncio.get_running_loop()
        b = Batcher(predict, max_batch=8, wait_s=0.5)
        try:
            gate.set()
            t = time.monotonic()
            await b.submit({"i": 0}, loop)  # idle: no wait at all
            assert time.monotonic() - t < 0.25 and sizes == [1]
            gate.clear()
            first = b.submit({"i": 1}, loop)  # the model takes it and blocks on the gate ...
            await asyncio.sleep(0.05)
            rest = [b.submit({"i": i}, loop) for i in range(2, 6)]  # ... while 4 queue up
            gate.set()
            await asyncio.gather(first, *rest)
            assert sizes == [1, 1, 4]
            # under load now: one request comes, three more 0.1 s later; one batch of 4
            one = b.submit({"i": 6}, loop)
            await asyncio.sleep(0.1)
            await asyncio.gather(one, *[b.submit({"i": i}, loop) for i in range(7, 10)])
            assert sizes == [1, 1, 4, 4]
            # as many as the last batch held: it goes at once, without waiting out the window
            t = time.monotonic()
            await asyncio.gather(*[b.submit({"i": i}, loop) for i in range(20, 24)])
            assert sizes == [1, 1, 4, 4, 4] and time.monotonic() - t < 0.25
            # eight at once: whatever is queued joins, no waiting for the window to pass
            t = time.monotonic()
            await asyncio.gather(*[b.submit({"i": i}, loop) for i in range(10, 18)])
            assert sum(sizes[5:]) == 8 and max(sizes[5:]) >= 4 and time.monotonic() - t < 0.25
            # a lone request waits out the window once, then the batcher is idle again
            del sizes[5:]
            await b.submit({"i": 18}, loop)
            t = time.monotonic()
            await b.submit({"i": 19}, loop)
            assert sizes == [1, 1, 4, 4, 4, 1, 1] and time.monotonic() - t < 0.25
        finally:
            b.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("answer", [{"choices": []}, {"choices": [None]}, [1, 2], {"id": "no choices"},
                                    {"choices": [{"message": {"content": 7}}]}])
def test_a_fallback_200_that_is_no_chat_completion_is_a_502_and_an_error_trace(sqlite_store, tmp_path, home,
                                                                                trained, answer):
    from protege.serve.fallback import Fallback

    _, _, run_id = trained
    up = ScriptedUpstream().start()
    try:
        server, app, writer = make_server(sqlite_store, home, tmp_path, run_id,
                                          fallback=Fallback(f"openai:gpt-frontier@{up.url}"), threshold=1.0)
        with server:
            up.push(("status", 200, answer), ("status", 503, {"error": {"message": "overloaded"}}))
            r = httpx.post(server.url + "/v1/chat/completions", json=chat("my card has not arrived"))
            assert r.status_code == 502 and r.headers["content-type"] == "application/json"
            assert r.json()["error"]["type"] == "upstream_error" and "HTTP 200" in r.json()["error"]["message"]
            r = httpx.post(server.url + "/v1/chat/completions", json=chat("my card has not arrived"))
            assert r.status_code == 503 and r.json()["error"]["message"] == "overloaded"
            metrics = httpx.get(server.url + "/metrics").text
            assert 'protege_serve_errors_total{status="502"} 1' in metrics
            assert "protege_serve_traces_written_total" in metrics  # the trace writer's counts too
        writer.close()
    finally:
        up.stop()
    bad, overloaded = sqlite_store.list_traces(source="serve", newest_first=False)
    assert bad["status"] == "error" and bad["error"].startswith("HTTP 200") and bad["response"] == answer
    assert overloaded["error"] == 'HTTP 503: {"message":"overloaded"}'  # JSON, not a Python repr
