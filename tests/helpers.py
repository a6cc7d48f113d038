"""What several test modules share: the CLI runner, waiting, a BANKING77 slice, servers on 127.0.0.1.

Fixtures live in conftest.py; plain helpers live here, so no test module imports another.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import socket
import threading
import time
from collections import defaultdict
from pathlib import Path

from protege.cli import main
from protege.datasets.build import build_dataset
from protege.datasets.registry import get_dataset
from protege.tasks.spec import load_task
from protege.traces.importers import ImportOptions, import_file

# -- the command line ---------------------------------------------------------------------

def run(capsys, *args) -> tuple[int, str, str]:
    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


def run_id_in(out: str) -> str:
    """The run id `protege train` prints ("run ID done ...")."""
    return out.split("run ")[1].split()[0]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# -- waiting for the trace writer -----------------------------------------------------------

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "where is my card"}]}


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def stored(app, store, n, **filters):
    """The stored traces, once the proxy has handed over `n` captures and they are written."""
    assert wait_for(lambda: app.writer.submitted >= n)
    assert app.writer.flush(15)
    return store.list_traces(limit=n + 10, newest_first=False, **filters)


# -- a six-intent slice of BANKING77 --------------------------------------------------------

EXAMPLES = Path(__file__).parents[1] / "examples" / "banking77"
LABELS = ["card_arrival", "lost_or_stolen_card", "exchange_rate", "top_up_failed", "pin_blocked", "Refund_not_showing_up"]


def take(path: Path, per_label: int) -> list[dict]:
    out, counts = [], defaultdict(int)
    with gzip.open(path, "rt") as fh:
        for line in fh:
            row = json.loads(line)
            label = (row.get("feedback") or {}).get("correction") or row["messages"][-1]["content"]
            if label in LABELS and counts[label] < per_label:
                counts[label] += 1
                out.append(row)
    return out


def six_intent_task(path: Path, references: str, split: str | None = None, name: str = "bank6",
                    comment: str = "") -> Path:
    """Write the task file of a six-intent slice of BANKING77 (LABELS) and return its path."""
    path.write_text(comment + f"""name: {name}
kind: classification
labels: [{", ".join(LABELS)}]
prompt:
  system: Classify the bank customer's message into one support intent.
references: {references}
""" + (f"split: {split}\n" if split else "") + "tokenizer: none\n")
    return path


def make_banking(store, tmp_path, home):
    """A six-intent slice of BANKING77, imported and built into a dataset like a user would."""
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in take(EXAMPLES / "tickets.jsonl.gz", 20)))
    test = tmp_path / "test.jsonl"
    test.write_text("".join(json.dumps(r) + "\n" for r in take(EXAMPLES / "gpt4_calls.jsonl.gz", 4)))
    import_file(store, train, ImportOptions(task="bank6"))
    task_path = six_intent_task(tmp_path / "task.yaml", "test_file", comment="# protege bench task.yaml -c replay\n")
    task = load_task(task_path)
    result = build_dataset(store, task, home, test_from=test)
    return task, get_dataset(store, result.id)


def trained_on_banking(store, tmp_path, home, base: str, method: str, *overrides: str):
    """(task, dataset, run id): `make_banking`'s slice, and a run of `method` on `base` trained
    on it with the recipe's defaults under `overrides`."""
    from protege.train.api import train
    from protege.train.recipe import load_recipe

    task, ds = make_banking(store, tmp_path, home)
    return task, ds, train(store, task, ds, home, base, method, load_recipe(method, overrides=list(overrides)))


# -- servers on 127.0.0.1 -------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """Runs an ASGI app under uvicorn on its own thread and event loop."""

    def __init__(self, app, port: int | None = None):
        import uvicorn

        self.port = port or free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, lifespan="on", log_level="error",
                                access_log=False, loop="asyncio", http="httptools")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve()), daemon=True)

    def __enter__(self):
        self.thread.start()
        for _ in range(500):
            if self.server.started:
                return self
            threading.Event().wait(0.01)
        raise RuntimeError("server did not start")

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(15)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def said(text: str) -> str:
    """What a report says, its lines as the console wrapped them joined again."""
    return " ".join(text.split())
