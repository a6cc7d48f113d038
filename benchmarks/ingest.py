"""Ingest: traces/s through the real importer (`import_file`, the code path behind
`protege traces import`) into a fresh SQLite store and into PostgreSQL.

Generates N distinct chat traces (default 1,000,000) as OpenAI chat JSONL: BANKING77
customer messages from examples/banking77 with a ticket number that makes each one unique,
a short system prompt, the intent as the assistant's reply, and usage, so every trace is
priced as a real import is. Each store gets the whole file in one import (one transaction);
the timing covers `import_file` only, not creating the store. PostgreSQL gets a fresh
schema, dropped afterwards.

Run: .venv/bin/python benchmarks/ingest.py [--rows N] [--pg-url URL | --no-pg]
Writes benchmarks/results/ingest.json. About 2 minutes at 1,000,000 rows.
"""

from __future__ import annotations

import argparse
import gzip
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import orjson
import sqlalchemy as sa
from _common import machine_info, table, write_result
from rich.console import Console

from protege.config import normalize_db_url
from protege.prices import cached_prices
from protege.traces.importers import ImportOptions, import_file
from protege.traces.store import Store

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "banking77" / "tickets.jsonl.gz"
SYSTEM = "Classify the customer's message as one of 77 banking intents. Answer with the intent name only."
PG_URL = "postgresql://root@127.0.0.1:5432/test"
PG_SCHEMA = "bench_ingest"
TARGET_SQLITE = 20_000

console = Console()


def generate(path: Path, rows: int) -> int:
    """Write `rows` distinct traces to `path`; returns the file size in bytes."""
    with gzip.open(EXAMPLES, "rb") as fh:
        seeds = [(m[-2]["content"], m[-1]["content"]) for m in (orjson.loads(line)["messages"] for line in fh)]
    with open(path, "wb") as out:
        for i in range(rows):
            text, intent = seeds[i % len(seeds)]
            user = f"{text} [ticket {i}]"
            prompt_tokens = 40 + len(user) // 4
            out.write(orjson.dumps({
                "model": "gpt-4.1-mini",
                "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user},
                             {"role": "assistant", "content": intent}],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 3, "total_tokens": prompt_tokens + 3},
                "metadata": {"ticket": i, "channel": "chat"},
            }) + b"\n")
    return path.stat().st_size


@contextmanager
def pg_schema(url: str, machine: dict):
    """A fresh schema on the server at `url`, dropped afterwards; yields a store URL using it."""
    admin = sa.create_engine(normalize_db_url(url))
    try:
        with admin.begin() as conn:
            machine["postgresql_server"] = conn.exec_driver_sql("SHOW server_version").scalar()
            conn.exec_driver_sql(f"DROP SCHEMA IF EXISTS {PG_SCHEMA} CASCADE; CREATE SCHEMA {PG_SCHEMA}")
        yield f"{url}{'&' if '?' in url else '?'}options=-csearch_path%3D{PG_SCHEMA}"
    finally:
        with admin.begin() as conn:
            conn.exec_driver_sql(f"DROP SCHEMA IF EXISTS {PG_SCHEMA} CASCADE")
        admin.dispose()


def ingest(name: str, url: str, path: Path, rows: int) -> dict:
    store = Store(url)
    try:
        console.print(f"importing {rows:,} traces into {name}")
        t0 = time.perf_counter()
        result = import_file(store, path, ImportOptions(), prices=cached_prices(None))
        seconds = time.perf_counter() - t0
        stored = store.count()
    finally:
        store.close()
    return {"store": name, "rows": rows, "added": result.added, "stored": stored, "seconds": seconds,
            "traces_per_s": rows / seconds, "mb_per_s": path.stat().st_size / seconds / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--pg-url", default=PG_URL, help=f"PostgreSQL server (default {PG_URL})")
    parser.add_argument("--no-pg", action="store_true", help="SQLite only")
    args = parser.parse_args()
    machine = machine_info(["protege", "sqlalchemy", "psycopg", "orjson"])
    runs = []
    with tempfile.TemporaryDirectory(prefix="protege-ingest-") as tmp:
        path = Path(tmp) / "traces.jsonl"
        t0 = time.perf_counter()
        size = generate(path, args.rows)
        console.print(f"generated {args.rows:,} traces ({size / 1e6:,.0f} MB) in {time.perf_counter() - t0:.1f} s")
        runs.append(ingest("sqlite", f"sqlite:///{tmp}/protege.db", path, args.rows))
        if not args.no_pg:
            with pg_schema(args.pg_url, machine) as url:
                runs.append(ingest("postgresql", url, path, args.rows))

    sqlite = runs[0]
    checks = [("traces/s into SQLite", sqlite["traces_per_s"], f">= {TARGET_SQLITE:,}",
               sqlite["traces_per_s"] >= TARGET_SQLITE),
              ("every trace stored", sum(r["stored"] for r in runs), f"{args.rows * len(runs):,}",
               all(r["stored"] == r["rows"] for r in runs))]
    console.print(table(f"Import of {args.rows:,} chat traces ({size / 1e6:,.0f} MB of JSONL), one transaction each",
                        ["store", "stored", "seconds", "traces/s", "MB/s"],
                        [[r["store"], r["stored"], r["seconds"], r["traces_per_s"], r["mb_per_s"]] for r in runs]))
    console.print(table("Targets", ["check", "measured", "target", "result"], [list(c) for c in checks]))
    path = write_result("ingest", {
        "machine": machine,
        "config": {"rows": args.rows, "file_mb": size / 1e6, "format": "openai-jsonl", "postgres_schema": PG_SCHEMA},
        "runs": runs,
        "targets": [{"check": c[0], "measured": c[1], "target": c[2], "met": c[3]} for c in checks],
    })
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
