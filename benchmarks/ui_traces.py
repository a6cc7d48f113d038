"""The dashboard's trace list on a store of 1,000,000 traces (issue 16's goal: a page of the
list in under 200 ms at p95).

Builds a SQLite store of N traces (default 1,000,000) whose inputs are the real BANKING77
messages (CC BY 4.0, ../shared/data/banking77/SOURCE.md), spread over 90 days across five
task tags, five models and five sources, 1% errors; starts `protege ui` on it (uvicorn, as
the CLI runs it) and times full page loads over HTTP, as a browser asks for them: the
newest page, pages deep in the list (by the next-page cursor), each filter, a day's time
range, a search for a common word and for a rare one, and one trace in full.

Peer, same store file, same machine, same run: Datasette (`datasette serve`), the tool a team
would point at a SQLite file to browse it, on its table page with the same filters (sorted
newest first, 50 rows a page, its `_next` cursor for depth, `__contains` for the search).

    python benchmarks/ui_traces.py [--rows 1000000] [--samples 40]

Writes benchmarks/results/ui_traces.json.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine_info, table, write_result  # noqa: E402
from serve_latency import free_port  # noqa: E402

from protege.prices import load_prices  # noqa: E402
from protege.traces.record import TraceRecord  # noqa: E402
from protege.traces.store import Store  # noqa: E402
from protege.ui.app import create_app  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / "examples" / "banking77"
TASKS = ["intent", "rewrite", "route", "extract", "triage"]
MODELS = ["gpt-4o-mini", "gpt-4o", "gpt-4.1-mini", "claude-3-5-haiku", "gemini-2.0-flash"]
SOURCES = [("proxy", 0.70), ("sdk", 0.15), ("import", 0.10), ("serve", 0.04), ("shadow", 0.01)]
RARE = "chargeback"
GOAL_MS = 200.0


def texts() -> list[str]:
    out = []
    for name in ("tickets.jsonl.gz", "gpt4_calls.jsonl.gz"):
        with gzip.open(DATA / name, "rt") as f:
            for line in f:
                msgs = json.loads(line)["messages"]
                out.append(next(m["content"] for m in msgs if m["role"] == "user"))
    return out


def build(store: Store, rows: int, console: Console) -> None:
    rng = random.Random(0)
    pool = texts()
    start = datetime(2026, 9, 1, tzinfo=timezone.utc)
    span = 90 * 86400
    weights = [w for _, w in SOURCES]
    with Progress(TextColumn("building the store"), BarColumn(), TaskProgressColumn(),
                  TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), console=console) as bar:
        tid = bar.add_task("build", total=rows, rate="")
        t0, done = time.perf_counter(), 0
        while done < rows:
            n = min(5000, rows - done)
            batch = []
            for i in range(n):
                text = rng.choice(pool)
                if rng.random() < 0.0005:
                    text += f" (a {RARE} was filed)"
                model = rng.choice(MODELS)
                source = rng.choices(SOURCES, weights)[0][0]
                ok = rng.random() > 0.01
                batch.append(TraceRecord(
                    request={"model": model, "messages": [{"role": "system", "content": "Answer the customer."},
                                                          {"role": "user", "content": text}]},
                    response=None, output_text="card_arrival" if ok else None, source=source,
                    task=TASKS[(done + i) % len(TASKS)], model=model, prompt_tokens=40 + len(text) // 4,
                    completion_tokens=4, latency_ms=rng.uniform(200, 1500), status="ok" if ok else "error",
                    error=None if ok else "upstream 500",
                    created_at=start + timedelta(seconds=(done + i) * span / rows)))
            store.insert_traces(batch)
            done += n
            bar.update(tid, advance=n, rate=f"{done / (time.perf_counter() - t0):,.0f} traces/s")


class Ui:
    def __init__(self, store: Store, home: Path):
        import asyncio

        import uvicorn

        self.port = free_port()
        app = create_app(store, home, prices=load_prices())
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error",
                                                   access_log=False, loop="asyncio", http="httptools"))
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve()), daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)

    def close(self):
        self.server.should_exit = True
        self.thread.join(10)


def timed(client: httpx.Client, urls: list[str]) -> dict:
    ms = []
    for url in urls:
        t0 = time.perf_counter()
        r = client.get(url)
        ms.append((time.perf_counter() - t0) * 1000)
        if r.status_code != 200:
            raise SystemExit(f"{url}: HTTP {r.status_code}: {r.text[:300]}")
    ms.sort()
    return {"n": len(ms), "p50_ms": statistics.median(ms), "p95_ms": ms[max(0, int(round(0.95 * len(ms))) - 1)],
            "max_ms": ms[-1]}


def deep_urls(client: httpx.Client, first: str, depth: int, find_next) -> list[str]:
    """The URLs of pages 2..depth+1, following each page's next link."""
    urls, url = [], first
    for _ in range(depth):
        nxt = find_next(client.get(url).text)
        if nxt is None:
            break
        urls.append(nxt)
        url = nxt
    return urls


def ours_next(html: str) -> str | None:
    import html as h
    import re

    m = re.search(r'<a href="(/traces\?[^"]+)" id="next">', html)
    return h.unescape(m.group(1)) if m else None


def datasette_next(html: str) -> str | None:
    import html as h
    import re

    m = re.search(r'<a href="([^"]*_next=[^"]+)">Next page</a>', html)
    return h.unescape(m.group(1)).split("://", 1)[-1].split("/", 1)[-1].join(["/", ""]) if m else None


def scenarios(day: str, samples: int) -> list[tuple[str, dict, dict]]:
    """(name, our query, Datasette's query) for the same question."""
    nextday = (datetime.fromisoformat(day) + timedelta(days=1)).strftime("%Y-%m-%d")
    return [
        ("newest page", {}, {}),
        ("task", {"task": "route"}, {"task__exact": "route"}),
        ("model", {"model": "gpt-4.1-mini"}, {"model__exact": "gpt-4.1-mini"}),
        ("source (1% of traces)", {"source": "shadow"}, {"source__exact": "shadow"}),
        ("status=error (1%)", {"status": "error"}, {"status__exact": "error"}),
        ("task + model", {"task": "intent", "model": "gpt-4o"}, {"task__exact": "intent", "model__exact": "gpt-4o"}),
        ("one day", {"since": day, "until": day}, {"created_at__gte": day, "created_at__lt": nextday}),
        ("search: common word", {"q": "card"}, {"request__contains": "card"}),
        (f"search: rare word ({RARE!r}, 0.05%)", {"q": RARE}, {"request__contains": RARE}),
        ("search: a word no trace holds", {"q": "zyzzyva"}, {"request__contains": "zyzzyva"}),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--samples", type=int, default=40, help="requests per scenario")
    ap.add_argument("--peer-samples", type=int, default=10, help="requests per scenario to Datasette (seconds each)")
    ap.add_argument("--depth", type=int, default=40, help="pages followed by the next link")
    ap.add_argument("--keep", type=Path, default=None, help="build (or reuse) the store here")
    args = ap.parse_args()
    console = Console(stderr=True)
    info = machine_info(["protege", "sqlalchemy", "jinja2", "datasette"])
    home = args.keep or Path(tempfile.mkdtemp(prefix="protege-ui-bench-"))
    home.mkdir(parents=True, exist_ok=True)
    db = home / "protege.db"
    store = Store(f"sqlite:///{db}")
    if store.count() != args.rows:
        store.close()
        for p in home.glob("protege.db*"):
            p.unlink()
        store = Store(f"sqlite:///{db}")
        build(store, args.rows, console)
    day = "2026-10-15"
    results: dict[str, dict] = {}
    ui = Ui(store, home)
    peer = shutil.which("datasette", path=str(Path(sys.executable).parent))
    dport = free_port()
    proc = subprocess.Popen([peer, "serve", "-i", str(db), "--port", str(dport), "--setting", "sql_time_limit_ms", "10000",
                             "--setting", "default_page_size", "50"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) if peer else None
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{ui.port}", timeout=120) as ours, \
                httpx.Client(base_url=f"http://127.0.0.1:{dport}", timeout=120) as theirs:
            if proc is not None:
                for _ in range(200):
                    try:
                        theirs.get("/")
                        break
                    except httpx.TransportError:
                        time.sleep(0.1)
            ours.get("/traces")  # first connection, templates compiled
            for name, q, dq in scenarios(day, args.samples):
                url = "/traces" + ("?" + httpx.QueryParams(q).__str__() if q else "")
                row = {"ours": timed(ours, [url] * args.samples)}
                if proc is not None:
                    durl = "/protege/traces?" + str(httpx.QueryParams({**dq, "_sort_desc": "created_at", "_size": 50}))
                    row["datasette"] = timed(theirs, [durl] * args.peer_samples)
                results[name] = row
                console.print(f"{name}: ours p95 {row['ours']['p95_ms']:.0f} ms"
                              + (f", datasette p95 {row['datasette']['p95_ms']:.0f} ms" if "datasette" in row else ""))
            # a search for a word no trace holds, followed page by page (each page reads SEARCH_SCAN traces)
            urls = deep_urls(ours, "/traces?q=zyzzyva", 9, ours_next)
            results["search: a word no trace holds, pages 2-10"] = {"ours": timed(ours, urls)}
            urls = deep_urls(ours, "/traces", args.depth, ours_next)
            row = {"ours": timed(ours, urls)}
            if proc is not None:
                durls = deep_urls(theirs, "/protege/traces?_sort_desc=created_at&_size=50", args.peer_samples,
                                  datasette_next)
                row["datasette"] = timed(theirs, durls)
            results[f"pages 2-{args.depth + 1} (next link)"] = row
            some = store.page_traces(limit=1, since=datetime.fromisoformat(day).replace(tzinfo=timezone.utc))[0][0]["id"]
            results["one trace in full"] = {"ours": timed(ours, [f"/traces/{some}"] * args.samples)}
            if proc is not None:
                results["one trace in full"]["datasette"] = timed(theirs, [f"/protege/traces/{some}"] * args.peer_samples)
            results["overview, 90 days (per-day sums read)"] = {"ours": timed(ours, ["/?days=90"])}
            results["overview, 90 days (per-day sums kept, 1 min)"] = {"ours": timed(ours, ["/?days=90"] * args.samples)}
    finally:
        ui.close()
        if proc is not None:
            proc.terminate()
            proc.wait(10)
    rows = []
    for name, r in results.items():
        o, d = r["ours"], r.get("datasette")
        rows.append([name, f"{o['p50_ms']:.0f}", f"{o['p95_ms']:.0f}", "yes" if o["p95_ms"] < GOAL_MS else "NO",
                     f"{d['p50_ms']:.0f}" if d else "—", f"{d['p95_ms']:.0f}" if d else "—",
                     f"{d['p95_ms'] / o['p95_ms']:.1f}x" if d else "—"])
    Console().print(table(f"protege ui on {args.rows:,} traces (SQLite), ms per page over HTTP",
                          ["page", "p50", "p95", f"p95 < {GOAL_MS:.0f}", "Datasette p50", "Datasette p95",
                           "Datasette p95 / ours"], rows))
    path = write_result("ui_traces", {"machine": info, "config": vars(args) | {"keep": str(args.keep) if args.keep else None,
                                                                              "goal_p95_ms": GOAL_MS},
                                      "peer": "datasette serve on the same file, table page, same filters, 50 rows",
                                      "results": results})
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
