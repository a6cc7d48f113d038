"""Capture under faults: does any acknowledged call lose its trace?

    python benchmarks/capture_faults.py [--seconds 4] [--concurrency 32] [--pg postgresql://root@127.0.0.1:5432/test]

A real `protege proxy` (and a real `protege serve`) process takes steady closed-loop load
from `--concurrency` clients, each request carrying a unique id. Mid-run one fault is
injected: poison rows (a NUL in the prompt, a 300-character task header and model, an
upstream usage of 2^64-1 tokens), the store going away (a TCP relay in front of
PostgreSQL is cut, then restored), the spool made unwritable while the store is away
(its file becomes a link to /dev/full: ENOSPC on every write), SIGTERM, and SIGKILL (then
the process is started again on the same home, as a supervisor would). Afterwards every
acknowledged id (a 200 whose body the client read to the end) is looked up in the store
and the quarantine file.

Per fault it prints calls answered, traces stored, quarantined, dropped (the writer's own
count, from /metrics) and acknowledged-but-lost, against the goal of zero lost. The
result goes to benchmarks/results/capture_faults.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import httpx
import orjson
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, table, write_result  # noqa: E402

from protege.testing import ScriptedUpstream, TcpRelay  # noqa: E402

COUNTED = ("written_total", "spooled_total", "cleaned_total", "quarantined_total", "recovered_total",
           "dropped_total")
ID = re.compile(r"\[id (\S+?)\]")
HUGE = 2**64 - 1
console = Console(width=150)


def usage_for(request: dict) -> dict:
    text = str((request.get("messages") or [{}])[-1].get("content", ""))
    if "HUGEUSAGE" in text:
        return {"prompt_tokens": HUGE, "completion_tokens": 2**31, "total_tokens": HUGE}
    return {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}


def poison_kind(n: int) -> tuple[str, dict, dict]:
    """(text suffix, extra body, extra headers) for request n of a poison run: one in four is poison."""
    kinds = [("", {}, {}), (" nul \x00 inside", {}, {}), (" long task", {}, {"X-Protege-Task": "t" * 300}),
             (" long model", {"model": "m" * 300}, {}), (" HUGEUSAGE", {}, {}), (" numeric model", {"model": 123}, {})]
    return kinds[1 + (n // 4) % (len(kinds) - 1)] if n % 4 == 0 else kinds[0]


class Server:
    """A `protege proxy` or `protege serve` process on a fixed port and home."""

    def __init__(self, argv: list[str], home: Path, db: str, port: int):
        self.argv, self.home, self.db, self.port = argv, home, db, port
        self.proc: subprocess.Popen | None = None
        self.log = home / "server.log"
        self.generations: list[dict[str, float]] = []
        """The writer's counters, last seen, per process started (a killed one's as last polled)."""
        self.max_held = 0.0

    def start(self) -> None:
        self.generations.append({})
        self.home.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "protege", "--home", str(self.home), "--db", self.db,
                                          *self.argv, "--port", str(self.port)], stderr=log,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                httpx.get(self.url + "/metrics", timeout=1)
                return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError(f"server did not start: {self.log.read_text()[-2000:]}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def metrics(self) -> dict[str, float]:
        out = {}
        for line in httpx.get(self.url + "/metrics", timeout=5).text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def writer(self, name: str, m: dict | None = None) -> float:
        prefix = "protege_proxy" if self.argv[0] == "proxy" else "protege_serve"
        m = self.metrics() if m is None else m
        return sum(v for k, v in m.items() if k.startswith(f"{prefix}_{name}"))

    def poll(self) -> None:
        """Record the writer's counters (called every 0.1 s while the load runs)."""
        try:
            m = self.metrics()
        except httpx.HTTPError:
            return
        counts = {name: self.writer(f"traces_{name}", m) for name in COUNTED}
        self.generations[-1] = counts
        self.max_held = max(self.max_held, self.writer("traces_held", m))

    def total(self, name: str) -> int:
        return int(sum(g.get(name, 0) for g in self.generations))

    def settle(self, timeout: float = 60) -> None:
        """Wait until the writer has nothing queued, held or spooled."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.writer("traces_queued") == 0 and self.writer("traces_held") == 0 and \
                    self.writer("traces_spool_bytes") == 0:
                return
            time.sleep(0.1)

    def stop(self, sig=signal.SIGTERM) -> int:
        self.poll()
        self.proc.send_signal(sig)
        return self.proc.wait(60)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def load(url: str, seconds: float, concurrency: int, poison: bool, body_for, tag: str) -> tuple[list[str], int]:
    """Closed-loop clients: (ids acknowledged, requests sent). A client whose server is gone retries."""
    acked: list[str] = []
    sent = 0
    deadline = time.monotonic() + seconds

    async def client(k: int, session):
        nonlocal sent
        i = 0
        while time.monotonic() < deadline:
            rid = f"{tag}-{k}-{i}"
            i += 1
            suffix, extra, headers = poison_kind(i) if poison else ("", {}, {})
            sent += 1
            try:
                async with session.post(f"{url}/v1/chat/completions", json=body_for(f"[id {rid}]{suffix}", extra),
                                        headers=headers) as r:
                    data = await r.read()
                    if r.status == 200 and orjson.loads(data)["choices"][0]["message"]["content"] is not None:
                        acked.append(rid)
            except (aiohttp.ClientError, asyncio.TimeoutError, orjson.JSONDecodeError):
                await asyncio.sleep(0.05)

    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
        await asyncio.gather(*(client(k, session) for k in range(concurrency)))
    return acked, sent


def stored_ids(db: str, source: str) -> set[str]:
    from protege.traces.store import Store

    store = Store(db)
    ids = set()
    for t in store.iter_traces(source=source):
        messages = t["request"].get("messages") if isinstance(t["request"], dict) else None
        text = str(messages[-1].get("content", "")) if messages else str(t["request"])
        m = ID.search(text)
        if m:
            ids.add(m.group(1))
    store.close()
    return ids


def quarantined_ids(home: Path) -> set[str]:
    path = home / "spool" / "quarantine.jsonl"
    if not path.exists():
        return set()
    return {m.group(1) for line in path.read_bytes().splitlines() if (m := ID.search(line.decode("utf-8", "replace")))}


def run_scenario(kind: str, fault: str, argv: list[str], db: str, seconds: float, concurrency: int, body_for,
                 relay: TcpRelay | None) -> dict:
    home = Path(tempfile.mkdtemp(prefix=f"protege-faults-{kind}-{fault}-"))
    server = Server(argv, home, db, free_port())
    server.start()
    poison = fault.startswith("poison")

    async def poll_until(task):
        while not task.done():
            await asyncio.get_running_loop().run_in_executor(None, server.poll)
            await asyncio.sleep(0.1)

    async def drive():
        task = asyncio.ensure_future(load(server.url, seconds, concurrency, poison, body_for, home.name[-8:]))
        poller = asyncio.ensure_future(poll_until(task))
        await asyncio.sleep(seconds / 3)
        if fault == "store down":
            relay.down()
            await asyncio.sleep(seconds / 3)
            relay.up()
        elif fault == "spool unwritable":
            relay.down()
            spool = home / "spool" / "traces.jsonl"
            spool.parent.mkdir(parents=True, exist_ok=True)
            spool.unlink(missing_ok=True)
            spool.symlink_to("/dev/full")
            await asyncio.sleep(seconds / 3)
            spool.unlink()
            relay.up()
        elif fault in ("SIGTERM", "SIGKILL"):
            poller.cancel()
            sig = signal.SIGTERM if fault == "SIGTERM" else signal.SIGKILL
            await asyncio.get_running_loop().run_in_executor(None, server.stop, sig)
            await asyncio.get_running_loop().run_in_executor(None, server.start)  # a supervisor restarts it
            poller = asyncio.ensure_future(poll_until(task))
        acked = await task
        await poller
        return acked

    acked, sent = asyncio.run(drive())
    server.settle()
    rc = server.stop()
    source = "proxy" if argv[0] == "proxy" else "serve"
    tag = home.name[-8:] + "-"
    stored = {i for i in stored_ids(db, source) if i.startswith(tag)}
    quarantined = {i for i in quarantined_ids(home) if i.startswith(tag)}
    lost = [a for a in acked if a not in stored and a not in quarantined]
    row = {"server": kind, "fault": fault, "store": "postgresql" if db.startswith("postgres") else "sqlite",
           "sent": sent, "answered": len(acked), "stored": len(stored & set(acked)),
           "quarantined": len(quarantined), "lost": len(lost), "exit_code": rc, "lost_examples": lost[:5],
           **{name.removesuffix("_total"): server.total(name) for name in COUNTED}, "max_held": int(server.max_held)}
    console.print({k: v for k, v in row.items() if k != "lost_examples"})
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="Load per scenario.")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--pg", default=os.environ.get("PROTEGE_TEST_DATABASE_URL"),
                        help="PostgreSQL URL for the store-down scenarios (skipped without one).")
    parser.add_argument("--no-serve", action="store_true", help="Only the proxy.")
    args = parser.parse_args()
    info = machine_info(["protege", "uvicorn", "aiohttp", "sqlalchemy", "psycopg"])
    rows = []
    upstream = ScriptedUpstream(delay_ms=5, record_requests=False, usage=usage_for).start()
    pg = PgDatabase(args.pg) if args.pg else None
    relay = None
    try:
        def chat_body(text, extra):
            return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}], **extra}

        proxy = ["proxy", "--upstream", upstream.url]
        tmp = Path(tempfile.mkdtemp(prefix="protege-faults-"))
        sqlite_db = lambda name: f"sqlite:///{tmp / name}.db"  # noqa: E731
        plan = [("baseline", sqlite_db("baseline")), ("poison rows", sqlite_db("poison")),
                ("SIGTERM", sqlite_db("sigterm")), ("SIGKILL", sqlite_db("sigkill"))]
        if pg:
            relay = TcpRelay(pg.port)
            relay.up()
            plan += [("poison rows", pg.url(None)), ("store down", pg.url(f"127.0.0.1:{relay.port}")),
                     ("spool unwritable", pg.url(f"127.0.0.1:{relay.port}")), ("SIGKILL", pg.url(None))]
        for fault, db in plan:
            rows.append(run_scenario("proxy", fault, proxy, db, args.seconds, args.concurrency, chat_body, relay))
        if not args.no_serve:
            run_id, db = train_tiny_specialist(tmp, sqlite_db("serve"))

            def serve_body(text, extra):
                return {"model": "x", "messages": [{"role": "system", "content": "Classify."},
                                                   {"role": "user", "content": f"my card has not arrived {text}"}]}

            for fault in ("baseline", "poison rows", "SIGTERM", "SIGKILL"):
                rows.append(run_scenario("serve", fault, ["serve", f"run:{run_id}"], db, args.seconds,
                                         args.concurrency, serve_body, relay))
            if pg:  # a NUL is poison only to PostgreSQL: serve from a run registered there too
                pg_run, pg_db = train_tiny_specialist(tmp, pg.url(None))
                rows.append(run_scenario("serve", "poison rows", ["serve", f"run:{pg_run}"], pg_db, args.seconds,
                                         args.concurrency, serve_body, relay))
    finally:
        upstream.stop()
        if relay:
            relay.close()
        if pg:
            pg.drop()
    goal = all(r["lost"] == 0 for r in rows)
    console.print(table(f"capture under faults ({args.concurrency} clients, {args.seconds:g} s each): goal zero lost",
                        ["server", "fault", "store", "answered", "stored", "cleaned", "spooled", "held (max)",
                         "recovered", "quarantined", "dropped", "lost", "exit"],
                        [[r["server"], r["fault"], r["store"], r["answered"], r["stored"], r["cleaned"], r["spooled"],
                          r["max_held"], r["recovered"], r["quarantined"], r["dropped"], r["lost"], r["exit_code"]]
                         for r in rows]))
    console.print(f"zero acknowledged calls lost in every scenario: {'[green]met' if goal else '[red]missed'}")
    path = write_result("capture_faults", {"machine": info, "seconds": args.seconds, "concurrency": args.concurrency,
                                           "rows": rows, "zero_lost": goal})
    console.print(f"wrote {path}")


class PgDatabase:
    """A fresh schema in the PostgreSQL at `base`, reachable directly or through a relay."""

    def __init__(self, base: str):
        import uuid

        import sqlalchemy as sa

        from protege.config import normalize_db_url

        self.base = base
        self.schema = "faults_" + uuid.uuid4().hex[:10]
        self.admin = sa.create_engine(normalize_db_url(base))
        with self.admin.begin() as conn:
            conn.exec_driver_sql(f'CREATE SCHEMA "{self.schema}"')
        self.port = sa.engine.make_url(normalize_db_url(base)).port or 5432
        self.n = 0

    def url(self, host_port: str | None) -> str:
        """A URL into a schema of its own per call (each scenario starts empty)."""
        import sqlalchemy as sa

        from protege.config import normalize_db_url

        self.n += 1
        schema = f"{self.schema}_{self.n}"
        with self.admin.begin() as conn:
            conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
        url = sa.engine.make_url(normalize_db_url(self.base))
        if host_port:
            host, port = host_port.split(":")
            url = url.set(host=host, port=int(port))
        url = url.set(drivername="postgresql", query={"options": f"-csearch_path={schema}"})
        return url.render_as_string(hide_password=False)

    def drop(self) -> None:
        with self.admin.begin() as conn:
            for (name,) in conn.exec_driver_sql("SELECT nspname FROM pg_namespace WHERE nspname LIKE %s",
                                                (self.schema.replace("_", r"\_") + "%",)):
                conn.exec_driver_sql(f'DROP SCHEMA "{name}" CASCADE')
        self.admin.dispose()


def train_tiny_specialist(tmp: Path, db: str) -> tuple[str, str]:
    """A 1-layer BERT classifier (MiniLM's tokenizer, random start) trained for a tenth of an
    epoch on BANKING77: a real specialist for `protege serve`, made in seconds (its accuracy
    does not matter here; every answer is acknowledged, right or wrong)."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from protege.bases import minilm_path
    from protege.datasets.build import build_dataset
    from protege.datasets.registry import get_dataset
    from protege.tasks.spec import load_task
    from protege.traces.importers import ImportOptions, import_file
    from protege.traces.store import Store
    from protege.train.api import train
    from protege.train.recipe import load_recipe

    examples = Path(__file__).resolve().parent.parent / "examples" / "banking77"
    home = Path(tempfile.mkdtemp(prefix="serve-home-", dir=tmp))
    store = Store(db)
    for name in ("tickets.jsonl.gz", "gpt4_calls.jsonl.gz"):
        import_file(store, examples / name, ImportOptions(task="banking77"))
    task = load_task(examples / "task.yaml")
    ds = get_dataset(store, build_dataset(store, task, home).id)
    tok = AutoTokenizer.from_pretrained(minilm_path())
    base = home / "tiny-bert"
    BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128)).save_pretrained(base)
    tok.save_pretrained(base)
    run_id = train(store, task, ds, home, str(base), "classifier",
                   load_recipe("classifier", overrides=["epochs=0.1", "batch_size=64", "eval_every=1000"]))
    store.close()
    return run_id, db


if __name__ == "__main__":
    main()
