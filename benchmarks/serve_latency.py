"""Serving latency and throughput: `protege serve` against the same model behind a plain
transformers `pipeline` in a minimal FastAPI app, in the same run.

Run: make bench-deps && .venv/bin/python benchmarks/serve_latency.py [--home H --classifier-run ID --lora-run ID]

For each specialist (the MiniLM classifier and the SmolLM2-135M LoRA model, both for
BANKING77), each server runs alone as its own process on this machine, and a closed-loop
client keeps C requests in flight (C = 1, 8, 32) for a fixed number of requests: latency
p50/p95 as the client sees it, and throughput. protege serve runs as users run it (traces
stored). The peer is what a team writes in ten minutes: FastAPI, one `pipeline(...)`
created at start-up, a sync endpoint (FastAPI runs it in its thread pool), the same
OpenAI-style request. The SmolLM2 peer generates greedily (max 12 new tokens) with the
task's prompt; protege answers it with the decoding its bench uses. `protege serve
--quantize int8` (dynamic int8 Linear layers) runs too, and the accuracy it costs is
measured on the test split beside it; the targets are checked on the fp32 server.

Without --*-run the script trains short runs first (a few minutes). The MiniLM's latency does
not depend on how well it was trained; the SmolLM2 specialist's does (constrained decoding
widens its search only for the rows where it is unsure), so pass --lora-run with a run
trained as train_banking77.py trains it for figures that stand for a real specialist.
Targets (issue 5): MiniLM p50 at concurrency 1 <= 15 ms;
throughput at concurrency 8 >= 2x the plain pipeline's. Writes
benchmarks/results/serve_latency.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from _common import machine_info, prepare, table, write_result
from rich.console import Console

ROOT = Path(__file__).resolve().parents[1]
EX = ROOT / "examples" / "banking77"

PEER = r'''
import sys, json
import torch
from fastapi import FastAPI, Request
from transformers import pipeline
import uvicorn

kind, folder, port, system = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
app = FastAPI()
if kind == "classifier":
    pipe = pipeline("text-classification", model=folder)
else:
    pipe = pipeline("text-generation", model=folder, dtype=torch.float32)

@app.post("/v1/chat/completions")
def complete(body: dict):
    text = body["messages"][-1]["content"]
    if kind == "classifier":
        out = pipe(text)[0]["label"]
    else:
        msgs = [{"role": "system", "content": system}, {"role": "user", "content": text}]
        out = pipe(msgs, max_new_tokens=12, do_sample=False)[0]["generated_text"][-1]["content"]
    return {"object": "chat.completion", "model": "peer",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": out}, "finish_reason": "stop"}]}

@app.get("/healthz")
def health():
    return {"status": "ok"}

uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
'''


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], port: int, env: dict) -> subprocess.Popen:
    import httpx

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    for _ in range(1200):
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.1)
    raise SystemExit("server did not start")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


async def load(url: str, texts: list[str], concurrency: int, n: int) -> dict:
    import aiohttp

    latencies: list[float] = []
    errors = 0
    counter = iter(range(n))

    async def worker(session):
        nonlocal errors
        for i in counter:
            body = {"model": "x", "messages": [{"role": "user", "content": texts[i % len(texts)]}]}
            t = time.perf_counter()
            async with session.post(url, json=body) as resp:
                await resp.read()
                if resp.status != 200:
                    errors += 1
            latencies.append((time.perf_counter() - t) * 1000)

    async with aiohttp.ClientSession() as session:
        # warm-up, not timed
        for text in texts[:3]:
            async with session.post(url, json={"messages": [{"role": "user", "content": text}]}) as resp:
                await resp.read()
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    p50, p95 = np.percentile(latencies, [50, 95])
    return {"concurrency": concurrency, "requests": n, "errors": errors, "p50_ms": float(p50), "p95_ms": float(p95),
            "throughput_rps": n / wall, "latencies": latencies}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", default=None)
    parser.add_argument("--classifier-run", default=None)
    parser.add_argument("--lora-run", default=None)
    parser.add_argument("--skip-lora", action="store_true")
    parser.add_argument("--quality-rows", type=int, default=300, help="test rows for the LoRA model's int8 quality")
    args = parser.parse_args()
    try:
        import fastapi  # noqa: F401
    except ImportError:
        raise SystemExit("FastAPI is not installed: run `make bench-deps` first") from None
    info = machine_info(["protege", "torch", "transformers", "fastapi", "uvicorn"])
    console = Console()

    from protege.runs.registry import get_run
    from protege.train.api import train
    from protege.train.recipe import load_recipe

    store, task, ds, home = prepare(EX, "banking77", args.home, "protege-serve-")
    texts = [r["input"] for r in ds.split("test")[::7]]
    runs = {"classifier": args.classifier_run, "lora": None if args.skip_lora else args.lora_run}
    if not runs["classifier"]:
        # pooling cls: the model the peer's pipeline applies as it is, so both servers answer alike
        runs["classifier"] = train(store, task, ds, home, "minilm", "classifier",
                                   load_recipe("classifier", ROOT / "recipes" / "classifier.yaml", ["pooling=cls"]),
                                   time_budget_min=1.5, console=console)
    if not args.skip_lora and not runs["lora"]:
        runs["lora"] = train(store, task, ds, home, "smollm2-135m", "lora",
                             load_recipe("lora", ROOT / "recipes" / "lora.yaml", ["eval_rows=10"]),
                             time_budget_min=2, console=console)
    env = {**os.environ, "PROTEGE_HOME": str(home), "TOKENIZERS_PARALLELISM": "false"}
    plan = {"classifier": {1: 300, 8: 1200, 32: 1600}, "lora": {1: 20, 8: 48, 32: 64}}
    results: dict = {}
    for kind, run_id in runs.items():
        if not run_id:
            continue
        folder = get_run(store, run_id)["checkpoint_path"]
        results[kind] = {"run_id": run_id}
        for server in ("protege serve", "protege serve --quantize int8", "FastAPI + pipeline"):
            port = free_port()
            if server.startswith("protege serve"):
                cmd = [sys.executable, "-m", "protege", "--home", str(home), "serve", f"run:{run_id}", "--port",
                       str(port), *server.split()[2:]]
            else:
                cmd = [sys.executable, "-c", PEER, kind, folder, str(port), task.prompt.system or ""]
            proc = start(cmd, port, env)
            try:
                rows = []
                for c, n in plan[kind].items():
                    r = asyncio.run(load(f"http://127.0.0.1:{port}/v1/chat/completions", texts, c, n))
                    rows.append({k: v for k, v in r.items() if k != "latencies"})  # the summary, not every sample
                    console.print(f"{kind:10s} {server:20s} c={c:<3d} p50 {r['p50_ms']:8.1f} ms  p95 "
                                  f"{r['p95_ms']:8.1f} ms  {r['throughput_rps']:7.1f} req/s  errors {r['errors']}")
            finally:
                stop(proc)
            results[kind][server] = rows
    # what int8 costs in quality, measured like any candidate on the same test rows
    from protege.bench.run import run_bench

    for kind, res in results.items():
        res["machine"] = info
        rid = res["run_id"]
        report = run_bench(store, task, ds, home, [f"run:{rid}", f"run:{rid}?quantize=int8"], latency_samples=1,
                           limit=None if kind == "classifier" else args.quality_rows)
        fp32, int8 = report.results
        res["quality"] = {"test_rows": report.rows, "fp32": fp32.metrics["accuracy"], "int8": int8.metrics["accuracy"],
                          "int8_minus_fp32": int8.paired.get("accuracy")}
        console.print(f"{kind}: accuracy fp32 {fp32.metrics['accuracy']['value']:.4f}, int8 "
                      f"{int8.metrics['accuracy']['value']:.4f} on {report.rows} test rows")
    import json

    from _common import RESULTS

    previous = RESULTS / "serve_latency.json"
    if previous.exists():  # a run of one specialist (--skip-lora) keeps the other's last figures
        for kind, res in json.loads(previous.read_text()).get("results", {}).items():
            results.setdefault(kind, res)
    checks = {}
    table_rows = []
    for kind, res in results.items():
        ours, peer, q8 = res["protege serve"], res["FastAPI + pipeline"], res["protege serve --quantize int8"]
        for a, b, c in zip(ours, peer, q8):
            table_rows.append([kind, a["concurrency"], a["p50_ms"], a["p95_ms"], a["throughput_rps"], b["p50_ms"],
                               b["p95_ms"], b["throughput_rps"], a["throughput_rps"] / b["throughput_rps"],
                               c["p50_ms"], c["throughput_rps"] / b["throughput_rps"]])
        res["throughput_ratio_c8_int8"] = next(c for c in q8 if c["concurrency"] == 8)["throughput_rps"] / \
            next(b for b in peer if b["concurrency"] == 8)["throughput_rps"]
        c8 = next(a for a in ours if a["concurrency"] == 8)["throughput_rps"] / \
            next(b for b in peer if b["concurrency"] == 8)["throughput_rps"]
        res["throughput_ratio_c8"] = c8
        res["max_throughput_rps"] = {"protege": max(a["throughput_rps"] for a in ours),
                                     "peer": max(b["throughput_rps"] for b in peer)}
        checks[f"{kind}_throughput_c8_at_least_2x_peer"] = c8 >= 2
        checks[f"{kind}_int8_throughput_c8_at_least_2x_peer"] = res["throughput_ratio_c8_int8"] >= 2
    if "classifier" in results:
        checks["classifier_p50_c1_at_most_15ms"] = results["classifier"]["protege serve"][0]["p50_ms"] <= 15
    console.print(table("protege serve vs FastAPI + transformers pipeline (2 CPU cores)",
                        ["specialist", "concurrency", "protege p50 ms", "p95 ms", "req/s", "peer p50 ms", "p95 ms",
                         "req/s", "ratio", "int8 p50 ms", "int8 ratio"], table_rows))
    for name, ok in checks.items():
        console.print(f"{'met ' if ok else 'MISSED'}  {name}")
    path = write_result("serve_latency", {"benchmark": "serve_latency", "machine": info, "results": results,
                                          "checks": checks})
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
