"""BANKING77: train the MiniLM classifier on the train split, score it on the test split.

Run: .venv/bin/python benchmarks/train_banking77.py [--time-budget MIN] [--home DIR]

Target (issue 4): >= 92% test accuracy within 15 minutes on 2 CPU cores. Uses the same
code as `protege train --method classifier` with recipes/classifier.yaml, then the same
code as `protege bench` for the test split (with knn:minilm beside it, the cheap baseline).
The SmolLM2-135M LoRA half of this benchmark arrives with the `lora` method.
Writes benchmarks/results/train_banking77.json.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from rich.console import Console

from _common import machine_info, table, write_result

ROOT = Path(__file__).resolve().parents[1]
EX = ROOT / "examples" / "banking77"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--time-budget", type=float, default=15.0, help="minutes of training at most")
    parser.add_argument("--home", default=None)
    args = parser.parse_args()
    info = machine_info(["protege", "torch", "transformers"])
    console = Console()

    from protege.bench.run import run_bench
    from protege.datasets.build import build_dataset
    from protege.datasets.registry import get_dataset
    from protege.tasks.spec import load_task
    from protege.traces.importers import ImportOptions, import_file
    from protege.traces.store import Store
    from protege.train.classifier import train_classifier
    from protege.train.recipe import load_recipe
    from protege.train.runs import get_run

    home = Path(args.home or tempfile.mkdtemp(prefix="protege-train-"))
    store = Store(f"sqlite:///{home / 'protege.db'}")
    import_file(store, EX / "traces.jsonl.gz", ImportOptions(task="banking77"))
    task = load_task(EX / "task.yaml")
    ds = get_dataset(store, build_dataset(store, task, home, test_from=EX / "test.jsonl.gz").id)
    recipe = load_recipe("classifier", ROOT / "recipes" / "classifier.yaml")
    t0 = time.monotonic()
    run_id = train_classifier(store, task, ds, home, "minilm", recipe, time_budget_min=args.time_budget,
                              console=console)
    train_s = time.monotonic() - t0
    run = get_run(store, run_id)
    report = run_bench(store, task, ds, home, [f"run:{run_id}", "knn:minilm"], latency_samples=30)
    by = {r.spec: r for r in report.results}
    clf, knn = by[f"run:{run_id}"], by["knn:minilm"]
    acc = clf.metrics["accuracy"]
    checks = {"test_accuracy_at_least_0.92": acc["value"] >= 0.92, "within_15_minutes": train_s <= 15 * 60}
    console.print(table("MiniLM classifier on BANKING77 (2 CPU cores)",
                        ["candidate", "test accuracy", "ci low", "ci high", "train minutes", "p50 ms", "rows/s"],
                        [[s, r.metrics["accuracy"]["value"], *r.metrics["accuracy"]["ci95"],
                          train_s / 60 if r is clf else None, r.latency_ms["p50"], r.throughput_rps]
                         for s, r in by.items()]))
    for name, ok in checks.items():
        console.print(f"{'met ' if ok else 'MISSED'}  {name}")
    data = {"benchmark": "train_banking77", "machine": info, "run_id": run_id, "train_seconds": train_s,
            "run_metrics": run["metrics"], "recipe": recipe.model_dump(), "checks": checks,
            "test": {"classifier": clf.as_dict(), "knn_minilm": knn.as_dict()}}
    console.print(f"wrote {write_result('train_banking77', data)}")


if __name__ == "__main__":
    main()
