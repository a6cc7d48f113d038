"""The screenshots of docs/ui.md, taken of the demo's store (run `make demo` first).

Works on a copy of the store (yours is left as it was): deploys the run the demo's decision
recommends (forced, by this script, at the threshold that keeps 95% of validation rows
confident), serves N BANKING77 test messages through `protege serve --task` with a scripted
GPT-4 (its recorded replies, ../shared/data/banking77/frontier, from the OCaTS repository,
MIT; BANKING77 is CC BY 4.0) as fallback and shadow, then opens every page of `protege ui`
in headless Chromium and writes docs/img/ui-*.png.

    python docs/screenshots.py [--home .protege] [--messages 400]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from online_banking77 import stream, system_prompt  # noqa: E402
from serve_latency import free_port, start, stop  # noqa: E402

TASK = ROOT / "examples" / "banking77" / "task.yaml"
OUT = ROOT / "docs" / "img"


def main() -> None:
    import httpx
    from playwright.sync_api import sync_playwright
    from rich.progress import track

    from protege.decide.analysis import Inputs, decide
    from protege.deploy.registry import activate
    from protege.prices import load_prices
    from protege.runs.registry import get_run
    from protege.serve.calibrate import calibrate
    from protege.tasks.spec import load_task
    from protege.testing import ScriptedUpstream
    from protege.traces.store import Store

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--home", type=Path, default=ROOT / ".protege")
    ap.add_argument("--messages", type=int, default=400)
    ap.add_argument("--over-s", type=float, default=120, help="spread the messages over this many seconds")
    args = ap.parse_args()
    src = args.home / "protege.db"
    if not src.exists():
        raise SystemExit(f"{src}: no store; run `make demo` first")
    home = Path(tempfile.mkdtemp(prefix="protege-screens-"))
    with sqlite3.connect(src) as a, sqlite3.connect(home / "protege.db") as b:
        a.backup(b)
    store = Store(f"sqlite:///{home / 'protege.db'}")
    task = load_task(TASK)
    d = decide(store, task, Inputs(monthly_requests=1_000_000), prices=load_prices())
    if not d.run:
        raise SystemExit(f"the demo's decision recommends no run ({d.verdict}); nothing to deploy")
    run = get_run(store, d.run.removeprefix("run:"))
    messages = stream(args.messages)
    gpt4 = {m["text"]: m["gpt4"] for m in stream(None)}
    frontier = ScriptedUpstream(model="gpt-4", reply=lambda req: gpt4.get(req["messages"][-1]["content"], "card_arrival"),
                                record_requests=False).start()
    spec = f"openai:gpt-4@{frontier.url}"
    curve = calibrate(store, task, home, run["id"], target=0.0, dataset=run["dataset_id"])["curve"]
    threshold = min(curve, key=lambda c: abs(c["coverage"] - 0.95))["threshold"]
    activate(store, task=task.name, run_id=run["id"], threshold=threshold, fallback=spec, options={},
             evidence={"checks": [{"name": "screenshots", "ok": True, "sentence": "deployed by docs/screenshots.py"}]},
             forced=True, by="docs/screenshots.py")
    port = free_port()
    env = {**os.environ, "PROTEGE_HOME": str(home), "TOKENIZERS_PARALLELISM": "false"}
    server = start([sys.executable, "-m", "protege", "serve", "--task", str(TASK), "--port", str(port),
                    "--shadow-rate", "0.3", "--shadow-floor", "0.3", "--shadow-ceiling", "0.3"], port, env)
    system = system_prompt()
    try:
        with httpx.Client(timeout=120) as client:
            t0 = time.monotonic()
            for i, m in enumerate(track(messages, description="serving the test messages")):
                time.sleep(max(0.0, t0 + i * args.over_s / len(messages) - time.monotonic()))
                client.post(f"http://127.0.0.1:{port}/v1/chat/completions", json={
                    "model": "gpt-4", "messages": [{"role": "system", "content": system},
                                                   {"role": "user", "content": m["text"]}]}).raise_for_status()
    finally:
        stop(server)
        frontier.stop()
    ui_port = free_port()
    ui = subprocess.Popen([sys.executable, "-m", "protege", "ui", "--port", str(ui_port), "--task", str(TASK)], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{ui_port}"
    for _ in range(300):
        try:
            httpx.get(base + "/static/ui.css", timeout=1)
            break
        except httpx.TransportError:
            time.sleep(0.1)
    some = store.list_traces(limit=1, task=task.name, source="import")[0]["id"]
    pages = {"overview": "/", "traces": "/traces", "trace": f"/traces/{some}", "dataset": f"/datasets/{run['dataset_id']}",
             "run": f"/runs/{run['id']}", "bench": f"/bench/{run['dataset_id']}?show=disagree",
             "decision": f"/decide/{task.name}?monthly_requests=1000000", "deployment": f"/deployments/{task.name}",
             "review": f"/review?task={task.name}"}
    OUT.mkdir(parents=True, exist_ok=True)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1280, "height": 860})
            for name, path in pages.items():
                r = page.goto(base + path)
                if r is None or r.status != 200:
                    raise SystemExit(f"{path}: HTTP {r and r.status}")
                page.screenshot(path=str(OUT / f"ui-{name}.png"), full_page=name in ("overview", "deployment", "review"))
                print(f"wrote {OUT / f'ui-{name}.png'}")
            browser.close()
    finally:
        ui.terminate()
        ui.wait(10)
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
