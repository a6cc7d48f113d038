"""Proxy overhead: the latency protege's logging proxy adds over calling the upstream directly,
beside LiteLLM's proxy on the same upstream; each proxy's maximum throughput; and whether
every request protege proxied became a stored trace.

Three servers run as subprocesses on 127.0.0.1: the scripted upstream (`python -m
protege.testing`, a fixed 20 ms per answer), `protege proxy` (SQLite store in a temporary
home) and LiteLLM's proxy (`litellm[proxy]`, installed on first use into
benchmarks/.venv-litellm). Both proxies run as a single process: protege's proxy is one,
and LiteLLM's production guide suggests one uvicorn worker per container. This process is
the load generator (aiohttp, uvloop when installed; at most 256 connections a target):

- open loop at 100, 500 and 1000 req/s, non-streaming: latency p50/p99 per target and the
  latency added over the direct call. Latency runs from each request's scheduled send time,
  so a server that falls behind is charged for the queue it builds (no coordinated omission);
- open loop at 25 and 100 req/s with `stream: true`: added full-response time and time to
  first byte (LiteLLM streams about 20 chunks a response here and tops out near 40 req/s,
  so 25 shows its overhead and 100 its queue);
- closed loop at 64, 128 and 256 requests in flight: requests/s and errors, best of the three;
- then the rows in protege's store against the requests sent to it (warm-ups included).

Other processes on the machine move these figures; the JSON records the load average at
the start.

Run: .venv/bin/python benchmarks/proxy_overhead.py [--duration 10] [--no-litellm]
Writes benchmarks/results/proxy_overhead.json. About 5 minutes, plus LiteLLM's install once.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import secrets
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

import aiohttp
import orjson
from rich.console import Console

try:
    import uvloop
except ImportError:
    uvloop = None

from _common import machine_info, table, write_result

HERE = Path(__file__).resolve().parent
LITELLM_VENV = HERE / ".venv-litellm"
MODEL = "gpt-4o-mini"
UPSTREAM_DELAY_MS = 20
RATES = (100, 500, 1000)
STREAM_RATES = (25, 100)
CONCURRENCY = (64, 128, 256)
WARMUP_S = 1.0
TIMEOUT_S = 15.0
CONNECTIONS = max(CONCURRENCY)  # per client: bounds the backlog an overloaded proxy can build
TARGETS = {"added_p50_ms": 1.0, "added_p99_ms": 5.0, "target_rate": 500, "throughput_ratio": 3.0, "traces_lost": 0}
# LiteLLM's production guide: no debug logs (LITELLM_LOG=ERROR), LITELLM_MODE=PRODUCTION, one uvicorn
# worker, a master key. The local cost map keeps it from fetching prices from GitHub at start-up.
LITELLM_ENV = {"LITELLM_LOG": "ERROR", "LITELLM_MODE": "PRODUCTION", "LITELLM_LOCAL_MODEL_COST_MAP": "True"}

console = Console()
sent: Counter[str] = Counter()  # requests sent per target URL, warm-ups included


# -- servers ---------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Servers:
    """Subprocesses with their logs in `logdir`, each in its own process group; all stopped on exit."""

    def __init__(self, logdir: Path, stack: ExitStack):
        self.logdir = logdir
        stack.callback(self.stop_all)
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, cmd: list[str], ready_url: str, env: dict | None = None, timeout: float = 120):
        with open(self.logdir / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                    env={**os.environ, **(env or {})})
        self.procs[name] = proc
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.log_tail(name)}")
            try:
                urllib.request.urlopen(ready_url, timeout=1).close()
                return
            except urllib.error.HTTPError:
                return  # it answers: up
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"{name} did not answer {ready_url} within {timeout:g} s:\n{self.log_tail(name)}")

    def log_tail(self, name: str, lines: int = 30) -> str:
        return "\n".join((self.logdir / f"{name}.log").read_text(errors="replace").splitlines()[-lines:])

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def stop_all(self) -> None:
        for name in reversed(list(self.procs)):
            self.stop(name)


def ensure_litellm() -> str:
    """The LiteLLM version in benchmarks/.venv-litellm, creating the venv on first use."""
    python = LITELLM_VENV / "bin" / "python"
    if not (LITELLM_VENV / "bin" / "litellm").exists():
        console.print(f"installing litellm[proxy] into {LITELLM_VENV} (once)")
        subprocess.run([sys.executable, "-m", "venv", str(LITELLM_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "litellm[proxy]"], check=True)
    return subprocess.run([str(python), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
                          check=True, capture_output=True, text=True).stdout.strip()


def litellm_config(path: Path, upstream: str) -> Path:
    path.write_text(f"""model_list:
  - model_name: {MODEL}
    litellm_params:
      model: openai/{MODEL}
      api_base: {upstream}
      api_key: sk-dummy
litellm_settings:
  set_verbose: false
""")
    return path


# -- load ------------------------------------------------------------------------------

def make_bodies(stream: bool, n: int = 1000) -> list[bytes]:
    return [orjson.dumps({"model": MODEL, "stream": stream, "max_tokens": 32, "messages": [
        {"role": "system", "content": "You are the support assistant of a digital bank. Answer briefly."},
        {"role": "user", "content": f"Ticket {i}: I ordered a new card two weeks ago and it still has not arrived."},
    ]}) for i in range(n)]


BODIES = {False: make_bodies(False), True: make_bodies(True)}


def client(key: str) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=CONNECTIONS),
                                 timeout=aiohttp.ClientTimeout(total=TIMEOUT_S),
                                 headers={"content-type": "application/json", "authorization": f"Bearer {key}"})


async def call(session: aiohttp.ClientSession, url: str, body: bytes, t0: float, stream: bool):
    """(latency ms, time to first body byte ms) from `t0` (perf_counter), or None for an error."""
    sent[url] += 1
    first = None
    try:
        async with session.post(url, data=body) as resp:
            async for _ in resp.content.iter_any():
                first = first or time.perf_counter()
            if resp.status != 200:
                return None
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return None
    end = time.perf_counter()
    return (end - t0) * 1000, ((first or end) - t0) * 1000


async def scheduled(session, url: str, rate: float, duration: float, stream: bool) -> list:
    bodies = BODIES[stream]
    start = time.perf_counter()
    tasks = []
    for i in range(round(rate * duration)):
        due = start + i / rate
        if (wait := due - time.perf_counter()) > 0:
            await asyncio.sleep(wait)
        tasks.append(asyncio.create_task(call(session, url, bodies[i % len(bodies)], due, stream)))
    return await asyncio.gather(*tasks)


def pct(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile."""
    if not values:
        return None
    values = sorted(values)
    return values[max(0, math.ceil(q * len(values)) - 1)]


async def open_loop(url: str, key: str, rate: float, duration: float, stream: bool = False) -> dict:
    async with client(key) as session:
        await scheduled(session, url, rate, WARMUP_S, stream)
        samples = await scheduled(session, url, rate, duration, stream)
    ok = [s for s in samples if s is not None]
    lat, ttfb = [s[0] for s in ok], [s[1] for s in ok]
    result = {"sent": len(samples), "errors": len(samples) - len(ok), "p50_ms": pct(lat, 0.5), "p99_ms": pct(lat, 0.99)}
    if stream:
        result.update(ttfb_p50_ms=pct(ttfb, 0.5), ttfb_p99_ms=pct(ttfb, 0.99))
    return result


async def closed_loop(url: str, key: str, concurrency: int, duration: float) -> dict:
    bodies, now = BODIES[False], time.perf_counter
    async with client(key) as session:
        async def worker(until: float) -> tuple[int, int]:
            ok = errors = 0
            while now() < until:
                if await call(session, url, bodies[(ok + errors) % len(bodies)], now(), False) is None:
                    errors += 1
                else:
                    ok += 1
            return ok, errors

        await asyncio.gather(*(worker(now() + WARMUP_S) for _ in range(concurrency)))
        t0 = now()
        done = await asyncio.gather(*(worker(t0 + duration) for _ in range(concurrency)))
        elapsed = now() - t0
    return {"concurrency": concurrency, "rps": sum(d[0] for d in done) / elapsed, "errors": sum(d[1] for d in done)}


async def settle(urls: list[str], key: str, timeout: float = 60.0) -> None:
    """Wait until every target answers within twice the upstream's delay: whatever a
    previous run left queued (an overloaded proxy works through its backlog) is done."""
    deadline = time.perf_counter() + timeout
    async with client(key) as session:
        for url in urls:
            while time.perf_counter() < deadline:
                result = await call(session, url, BODIES[False][0], time.perf_counter(), False)
                if result and result[0] < 2 * UPSTREAM_DELAY_MS:
                    break
                await asyncio.sleep(0.5)


def run(coro):
    return uvloop.run(coro) if uvloop else asyncio.run(coro)


# -- report ----------------------------------------------------------------------------

def added(rows: list[dict], keys: tuple[str, ...]) -> None:
    """Add `added_<key>`: the row's figure minus the direct call's at the same rate."""
    direct = {r["rate"]: r for r in rows if r["target"] == "direct"}
    for r in rows:
        base = direct[r["rate"]]
        for k in keys:
            r[f"added_{k}"] = None if r[k] is None or base[k] is None else r[k] - base[k]


def ratio(a, b):
    return None if a is None or not b else a / b


def stored_traces(db: Path, expected: int, timeout: float = 60) -> int:
    """Rows in the store once the writer has caught up (or stopped making progress)."""
    deadline, last, still = time.monotonic() + timeout, -1, time.monotonic()
    while time.monotonic() < deadline:
        with sqlite3.connect(db) as conn:
            n = conn.execute("SELECT count(*) FROM traces").fetchone()[0]
        if n >= expected:
            return n
        if n != last:
            last, still = n, time.monotonic()
        elif time.monotonic() - still > 5:
            return n
        time.sleep(0.2)
    return last


def start_servers(servers: Servers, home: Path, key: str, litellm: bool) -> dict[str, str]:
    """Upstream, protege and (optionally) LiteLLM; returns each target's chat completions URL."""
    up_port, pp_port, ll_port = free_port(), free_port(), free_port()
    upstream = f"http://127.0.0.1:{up_port}/v1"
    servers.start("upstream", [sys.executable, "-m", "protege.testing", "--port", str(up_port),
                               "--delay-ms", str(UPSTREAM_DELAY_MS)], f"{upstream}/models")
    servers.start("protege", [str(Path(sys.executable).with_name("protege")), "--home", str(home), "proxy",
                              "--upstream", upstream, "--port", str(pp_port)],
                  f"http://127.0.0.1:{pp_port}/")  # not a logged route: no trace
    targets = {"direct": f"{upstream}/chat/completions", "protege": f"http://127.0.0.1:{pp_port}/v1/chat/completions"}
    if litellm:
        config = litellm_config(servers.logdir / "litellm.yaml", upstream)
        servers.start("litellm", [str(LITELLM_VENV / "bin" / "litellm"), "--config", str(config), "--host", "127.0.0.1",
                                  "--port", str(ll_port), "--num_workers", "1"],
                      f"http://127.0.0.1:{ll_port}/health/liveliness", env={**LITELLM_ENV, "LITELLM_MASTER_KEY": key})
        targets["litellm"] = f"http://127.0.0.1:{ll_port}/v1/chat/completions"
    return targets


def measure(targets: dict[str, str], key: str, duration: float) -> tuple[list, list, list]:
    """Every run, targets interleaved, each after the servers have settled."""
    def one(label: str, coro) -> dict:
        run(settle(list(targets.values()), key))
        console.print(label)
        return run(coro)

    latency = [{"rate": rate, "target": name,
                **one(f"open loop {rate} req/s → {name}", open_loop(url, key, rate, duration))}
               for rate in RATES for name, url in targets.items()]
    streaming = [{"rate": rate, "target": name, **one(f"streaming {rate} req/s → {name}",
                                                      open_loop(url, key, rate, duration, stream=True))}
                 for rate in STREAM_RATES for name, url in targets.items()]
    throughput = [{"target": name, **one(f"closed loop, {n} in flight → {name}", closed_loop(url, key, n, duration))}
                  for n in CONCURRENCY for name, url in targets.items()]
    return latency, streaming, throughput


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measured run")
    parser.add_argument("--no-litellm", action="store_true", help="skip LiteLLM (no comparison figures)")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the servers on `kill` too
    litellm_version = None if args.no_litellm else ensure_litellm()
    machine = machine_info(["protege", "aiohttp", "uvicorn", "uvloop", "httptools", "orjson", "sqlalchemy"],
                           {"litellm": litellm_version})
    console.print(f"load average at start: {machine['load_average_at_start']} on {machine['cpu_cores']} cores")
    key = "sk-bench-" + secrets.token_hex(16)
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="protege-bench-")))
        targets = start_servers(Servers(tmp, stack), tmp / "home", key, litellm=litellm_version is not None)
        latency, streaming, throughput = measure(targets, key, args.duration)
        received = sent[targets["protege"]]
        stored = stored_traces(tmp / "home" / "protege.db", received)

    added(latency, ("p50_ms", "p99_ms"))
    added(streaming, ("p50_ms", "p99_ms", "ttfb_p50_ms", "ttfb_p99_ms"))
    best = {name: max((r for r in throughput if r["target"] == name), key=lambda r: r["rps"]) for name in targets}
    by_rate = {rate: {r["target"]: r for r in latency if r["rate"] == rate} for rate in RATES}
    at, lite = by_rate[TARGETS["target_rate"]], best.get("litellm")
    checks = [
        (f"added p50 at {TARGETS['target_rate']} req/s (ms)", at["protege"]["added_p50_ms"],
         at.get("litellm", {}).get("added_p50_ms"), f"<= {TARGETS['added_p50_ms']:g}",
         at["protege"]["added_p50_ms"] <= TARGETS["added_p50_ms"]),
        (f"added p99 at {TARGETS['target_rate']} req/s (ms)", at["protege"]["added_p99_ms"],
         at.get("litellm", {}).get("added_p99_ms"), f"<= {TARGETS['added_p99_ms']:g}",
         at["protege"]["added_p99_ms"] <= TARGETS["added_p99_ms"]),
        ("max throughput, protege / LiteLLM", ratio(best["protege"]["rps"], lite and lite["rps"]), None,
         f">= {TARGETS['throughput_ratio']:g}",
         None if lite is None else best["protege"]["rps"] >= TARGETS["throughput_ratio"] * lite["rps"]),
        ("traces lost (sent − stored)", received - stored, None, "0", received - stored <= TARGETS["traces_lost"]),
    ]
    ratios = [{"rate": rate, "added_p50_ratio": ratio(r["protege"]["added_p50_ms"], r["litellm"]["added_p50_ms"]),
               "added_p99_ratio": ratio(r["protege"]["added_p99_ms"], r["litellm"]["added_p99_ms"])}
              for rate, r in by_rate.items() if "litellm" in r]

    console.print(table(f"Non-streaming, open loop, upstream answers in {UPSTREAM_DELAY_MS} ms (latency in ms)",
                        ["req/s", "target", "sent", "errors", "p50", "p99", "added p50", "added p99"],
                        [[r["rate"], r["target"], r["sent"], r["errors"], r["p50_ms"], r["p99_ms"],
                          r["added_p50_ms"], r["added_p99_ms"]] for r in latency]))
    console.print(table("Streaming, open loop (ms; TTFB: time to first body byte)",
                        ["req/s", "target", "measure", "errors", "p50", "p99", "added p50", "added p99"],
                        [[r["rate"], r["target"], label, r["errors"], r[f"{k}p50_ms"], r[f"{k}p99_ms"],
                          r[f"added_{k}p50_ms"], r[f"added_{k}p99_ms"]]
                         for r in streaming for label, k in (("full", ""), ("TTFB", "ttfb_"))]))
    console.print(table("Throughput, closed loop", ["target", "in flight", "req/s", "errors", "best"],
                        [[r["target"], r["concurrency"], r["rps"], r["errors"], "*" if best[r["target"]] is r else ""]
                         for r in throughput]))
    if ratios:
        console.print(table("protege / LiteLLM, added latency (lower is better)", ["req/s", "p50 ratio", "p99 ratio"],
                            [[r["rate"], r["added_p50_ratio"], r["added_p99_ratio"]] for r in ratios]))
    console.print(table(f"Targets (traces: {stored:,} stored of {received:,} requests sent to protege)",
                        ["check", "protege", "LiteLLM", "target", "result"], [list(c) for c in checks]))

    path = write_result("proxy_overhead", {
        "machine": machine,
        "config": {"upstream_delay_ms": UPSTREAM_DELAY_MS, "duration_s": args.duration, "warmup_s": WARMUP_S,
                   "rates": RATES, "stream_rates": STREAM_RATES, "concurrency": CONCURRENCY,
                   "client_connections": CONNECTIONS, "client_timeout_s": TIMEOUT_S,
                   "latency_from": "scheduled send time (open loop)",
                   "protege": "one process (uvicorn, uvloop, httptools), SQLite store in a temporary home",
                   "litellm": {"num_workers": 1, "env": LITELLM_ENV, "auth": "master key",
                               "note": "one uvicorn worker, as protege's proxy is one process"}},
        "latency": latency, "streaming": streaming, "throughput": throughput,
        "max_throughput": {name: r["rps"] for name, r in best.items()},
        "added_latency_ratio_protege_over_litellm": ratios,
        "traces": {"sent_to_protege": received, "stored": stored, "lost": received - stored},
        "targets": [{"check": c[0], "protege": c[1], "litellm": c[2], "target": c[3], "met": c[4]} for c in checks],
    })
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
