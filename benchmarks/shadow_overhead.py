"""Shadow evaluation's cost on the client's path, and how fast drift is caught.

Run: .venv/bin/python benchmarks/shadow_overhead.py [--part latency|drift|all] [--requests 1500] [--rounds 2]

Trains a MiniLM classifier on the BANKING77 example for one minute, then serves it with
`protege serve run:ID` (a process of its own) at shadow rates 0% (off), 10% and 50%, the
shadow going to a scripted frontier in another process that answers after 300 ms (a
frontier API's typical latency). Closed-loop clients at concurrency 4 measure each request's
latency end to end; the rounds alternate the rates so a slow moment of the machine hits all
of them alike. Target (issue 14): p50 and p99 at 10% within 5% of without.

Drift (`--part drift`): the drift watch of `protege serve --drift` (MiniLM embeddings, the
reference built from the dataset's training inputs; knn:minilm answering) is fed the 3,080
reviewed GPT-4 calls, shuffled (in distribution: the same intents, never trained on), tested
every 10 requests over a 500-request window; the false alarms are the tests that alarmed.
Then, after 1,000 of those, the stream switches to CANARD's 703 Wikipedia questions: the
count of requests after the switch until the input alarm fires.

Drift's cost (`--part drift-cost`): the same classifier served on torch without and with
`--drift` (every answered input embedded by MiniLM beside the model), rounds alternating,
p50 and p99 at concurrency 1 and --concurrency. Writes benchmarks/results/shadow_overhead.json
(one section per part).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from _common import machine_info, prepare, table, write_result
from rich.console import Console
from serve_latency import drive, free_port, start, stop

ROOT = Path(__file__).resolve().parents[1]
EX = ROOT / "examples" / "banking77"
RATES = [0.0, 0.1, 0.5]
FRONTIER = """
import asyncio, sys
from protege.testing import ScriptedUpstream
up = ScriptedUpstream(model="frontier", reply=lambda req: "card_arrival", delay_ms=300, record_requests=False)
up.start(int(sys.argv[1]))
asyncio.run(asyncio.sleep(10**9))
"""


def shadow_counts(port: int) -> dict:
    import httpx

    out = {}
    for line in httpx.get(f"http://127.0.0.1:{port}/metrics").text.splitlines():
        if line.startswith("protege_serve_shadow_requests_total"):
            out[line.split('outcome="')[1].split('"')[0]] = int(float(line.rsplit(" ", 1)[1]))
    return out


def drift_cost_part(home, run_id: str, bodies: list[dict], env: dict, args, console) -> dict:
    """Latency of the served specialist without and with the drift watch beside it."""
    samples: dict[tuple, list[float]] = {}
    skipped = 0
    for round_ in range(args.rounds):
        for drift in ((False, True) if round_ % 2 == 0 else (True, False)):
            port = free_port()
            proc = start([sys.executable, "-m", "protege", "--home", str(home), "serve", f"run:{run_id}", "--port",
                          str(port), "--no-traces", *(["--drift"] if drift else [])], port, env)
            try:
                for c in (1, args.concurrency):
                    r = drive(f"http://127.0.0.1:{port}/v1/chat/completions", bodies, c, args.requests // 2)
                    samples.setdefault((drift, c), []).extend(r["latencies"])
                    console.print(f"round {round_ + 1} drift {'on ' if drift else 'off'} c={c}: "
                                  f"p50 {r['p50_ms']:6.2f} ms  {r['throughput_rps']:6.1f} req/s")
                    time.sleep(2)  # the drift queue drains between the loads
                if drift:
                    skipped += drift_skipped(port)
            finally:
                stop(proc)
    out: dict = {}
    for (drift, c), lat in sorted(samples.items()):
        p50, p99 = np.percentile(lat, [50, 99])
        out[f"{'on' if drift else 'off'}_c{c}"] = {"requests": len(lat), "p50_ms": float(p50), "p99_ms": float(p99)}
    console.print(table("protege serve (torch MiniLM) with and without --drift", ["", "requests", "p50 ms", "p99 ms"],
                        [[k, v["requests"], f"{v['p50_ms']:.2f}", f"{v['p99_ms']:.2f}"] for k, v in out.items()]))
    for c in (1, args.concurrency):
        out[f"p50_ratio_c{c}"] = out[f"on_c{c}"]["p50_ms"] / out[f"off_c{c}"]["p50_ms"]
    out["drift_inputs_skipped"] = skipped  # inputs the watch let go for want of time (its queue full)
    console.print(f"inputs the drift watch skipped: {skipped}")
    return out


def drift_skipped(port: int) -> int:
    import httpx

    line = next(x for x in httpx.get(f"http://127.0.0.1:{port}/metrics").text.splitlines()
                if x.startswith("protege_serve_drift_skipped_total"))
    return int(float(line.rsplit(" ", 1)[1]))


def drift_part(ds, task, home, console) -> dict:
    import gzip
    import json
    import random

    from protege.models.base import Context
    from protege.models.knn import Encoder
    from protege.models.registry import build_candidate
    from protege.serve.drift import DriftWatch, Reference

    ctx = Context(task=task, dataset=ds, home=home, train=ds.split("train"))
    encoder, specialist = Encoder("minilm", ctx), build_candidate("knn:minilm", ctx)
    t0 = time.monotonic()
    ref = Reference.build(ds, encoder, specialist.predict, task.labels)
    build_s = time.monotonic() - t0
    calm = [r["input"] for r in ds.split("test")]
    random.Random(0).shuffle(calm)
    with gzip.open(ROOT / "examples" / "canard" / "test.jsonl.gz", "rt") as fh:
        ood = [json.loads(line)["messages"][1]["content"].split("Latest question: ")[-1] for line in fh]

    def feed(texts, every=10, stop_on=None):
        watch = DriftWatch(ref, encoder, window=500, min_n=100)
        alarms, first = {"input": 0, "labels": 0}, None
        preds = specialist.predict([{"input": t} for t in texts])
        try:
            for i, (text, pred) in enumerate(zip(texts, preds), start=1):
                watch.observe(text, pred.output, pred.confidence)
                if i % every == 0 and i >= watch.min_n:
                    while not (watch.idle() and len(watch.distances) == min(i, 500)):
                        time.sleep(0.01)
                    st = watch.status()
                    for kind in alarms:
                        alarms[kind] += st[kind]["alarm"]
                    if stop_on is not None and i > stop_on and st["input"]["alarm"] and first is None:
                        first = i - stop_on
            return alarms, first, (len(texts) - watch.min_n) // every + 1
        finally:
            watch.close()

    false, _, tests = feed(calm)
    _, detected_after, _ = feed(calm[:1000] + ood, stop_on=1000)
    console.print(table("drift watch, BANKING77 (MiniLM, window 500, alpha 0.001)",
                        ["stream", "requests", "tests", "input alarms", "label alarms", "requests to detect"],
                        [["in distribution (3,080 reviewed calls)", len(calm), tests, false["input"], false["labels"], "—"],
                         ["1,000 calls, then CANARD questions", 1000 + len(ood), "—", "—", "—", detected_after]]))
    return {"reference": ref.basis, "reference_build_s": build_s, "q95": ref.q95, "window": 500, "alpha": 1e-3,
            "in_distribution": {"requests": len(calm), "tests": tests, "false_alarms": false},
            "injected": {"switch_after": 1000, "ood_requests": len(ood), "requests_to_detect": detected_after},
            "checks": {"no_false_input_alarms": false["input"] == 0,
                       "drift_detected": detected_after is not None}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["latency", "drift", "drift-cost", "all"], default="all")
    parser.add_argument("--run", default=None, help="a trained classifier run to serve (default: train one)")
    parser.add_argument("--requests", type=int, default=1500)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--home", default=None)
    args = parser.parse_args()
    console = Console()
    info = machine_info(["protege", "torch", "uvloop", "uvicorn"])
    from protege.train.api import train
    from protege.train.recipe import load_recipe

    store, task, ds, home = prepare(EX, "banking77", args.home, "protege-shadow-")
    from _common import RESULTS

    previous = RESULTS / "shadow_overhead.json"
    data = json.loads(previous.read_text()) if previous.exists() else {}
    if args.part in ("drift", "all"):
        data["drift"] = drift_part(ds, task, home, console)
    if args.part == "drift":
        data.update(machine_drift=info)
        console.print(f"wrote {write_result('shadow_overhead', data)}")
        return
    run_id = args.run or train(store, task, ds, home, "minilm", "classifier",
                               load_recipe("classifier", ROOT / "recipes" / "classifier.yaml"), time_budget_min=1,
                               console=console)
    bodies = [{"model": "x", "messages": [{"role": "user", "content": r["input"]}]} for r in ds.split("test")[::5]]
    env = {**os.environ, "PROTEGE_HOME": str(home), "TOKENIZERS_PARALLELISM": "false"}
    if args.part in ("drift-cost", "all"):
        data["drift_cost"] = {**drift_cost_part(home, run_id, bodies, env, args, console), "machine": info}
    if args.part == "drift-cost":
        console.print(f"wrote {write_result('shadow_overhead', data)}")
        return
    fport = free_port()
    frontier = subprocess.Popen([sys.executable, "-c", FRONTIER, str(fport)], env=env)
    time.sleep(2)
    samples: dict[float, list[float]] = {r: [] for r in RATES}
    shadows: dict[float, dict] = {r: {} for r in RATES}
    errors = {r: 0 for r in RATES}
    try:
        for round_ in range(args.rounds):
            for rate in (RATES if round_ % 2 == 0 else RATES[::-1]):
                port = free_port()
                cmd = [sys.executable, "-m", "protege", "--home", str(home), "serve", f"run:{run_id}", "--port",
                       str(port), "--no-traces"]
                if rate:
                    cmd += ["--shadow", f"openai:frontier@http://127.0.0.1:{fport}/v1", "--shadow-rate", str(rate),
                            "--shadow-floor", str(rate), "--shadow-ceiling", str(rate)]
                proc = start(cmd, port, env)
                try:
                    r = drive(f"http://127.0.0.1:{port}/v1/chat/completions", bodies, args.concurrency, args.requests)
                    time.sleep(0.5)  # the last shadow calls land
                    counts = shadow_counts(port)
                finally:
                    stop(proc)
                samples[rate] += r["latencies"]
                errors[rate] += r["errors"]
                for k, v in counts.items():
                    shadows[rate][k] = shadows[rate].get(k, 0) + v
                p50, p99 = np.percentile(r["latencies"], [50, 99])
                console.print(f"round {round_ + 1} shadow {rate:4.0%}: p50 {p50:6.2f} ms  p99 {p99:6.2f} ms  "
                              f"shadowed {counts.get('compared', 0)}")
    finally:
        frontier.kill()
    base50, base99 = np.percentile(samples[0.0], [50, 99])
    rows, results = [], {}
    for rate in RATES:
        p50, p99 = np.percentile(samples[rate], [50, 99])
        results[f"{rate:.0%}"] = {"requests": len(samples[rate]), "errors": errors[rate], "p50_ms": float(p50),
                                  "p99_ms": float(p99), "p50_ratio": float(p50 / base50),
                                  "p99_ratio": float(p99 / base99), "shadow_calls": shadows[rate]}
        rows.append([f"{rate:.0%}", len(samples[rate]), f"{p50:.2f}", f"{p99:.2f}", f"{p50 / base50:.3f}",
                     f"{p99 / base99:.3f}", shadows[rate].get("compared", 0), shadows[rate].get("skipped", 0)])
    console.print(table(f"protege serve, MiniLM classifier, concurrency {args.concurrency}; shadow frontier at 300 ms",
                        ["shadow rate", "requests", "p50 ms", "p99 ms", "p50 / off", "p99 / off", "shadowed",
                         "skipped"], rows))
    ten = results["10%"]
    checks = {"p50_at_10pct_within_5pct": ten["p50_ratio"] <= 1.05, "p99_at_10pct_within_5pct": ten["p99_ratio"] <= 1.05,
              "no_errors": all(e == 0 for e in errors.values())}
    for name, ok in checks.items():
        console.print(f"{'met ' if ok else 'MISSED'}  {name}")
    data.update({"benchmark": "shadow_overhead", "machine": info, "run_id": run_id, "concurrency": args.concurrency,
                 "frontier_delay_ms": 300, "results": results, "checks": checks})
    path = write_result("shadow_overhead", data)
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
