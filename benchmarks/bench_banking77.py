"""BANKING77: the cheap baseline and untrained SmolLM2-135M, constrained vs free output.

Run: .venv/bin/python benchmarks/bench_banking77.py [--rows N] [--home DIR]

Imports the shipped BANKING77 traces, builds the dataset with the official test split as
the benchmark, and runs `protege bench` (the same code) with: `knn:minilm` (MiniLM
nearest neighbour over the train split), `hf:smollm2-135m` zero-shot with output
constrained to the label set (beam search over the labels' tokens), the same model with
free generation (`mode=generate`, at most 16 new tokens: no BANKING77 label is longer),
and with every label scored (`mode=score`, a probability per label). Reports accuracy with
95% CIs, p50 latency at batch size 1, batched throughput,
and checks the issue's targets for constrained output: always a valid label with a
probability, no slower per request than free generation, at least as accurate.
`--rows N` benches the first N test rows (the same rows for every candidate).
Writes benchmarks/results/bench_banking77.json.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _common import machine_info, table, write_result
from rich.console import Console

ROOT = Path(__file__).resolve().parents[1]
EX = ROOT / "examples" / "banking77"
CANDIDATES = ["knn:minilm", "hf:smollm2-135m", "hf:smollm2-135m?mode=generate&max_new_tokens=16",
              "hf:smollm2-135m?mode=score"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=None, help="bench only the first N test rows")
    parser.add_argument("--home", default=None, help="protege home (default: a temporary folder)")
    parser.add_argument("--latency-samples", type=int, default=30)
    args = parser.parse_args()
    info = machine_info(["protege", "torch", "transformers"])
    console = Console()

    from protege.bench.run import run_bench
    from protege.cli.bench import render
    from protege.datasets.build import build_dataset
    from protege.datasets.registry import get_dataset
    from protege.prices import load_prices
    from protege.tasks.spec import load_task
    from protege.traces.importers import ImportOptions, import_file
    from protege.traces.store import Store

    home = Path(args.home or tempfile.mkdtemp(prefix="protege-bench-"))
    store = Store(f"sqlite:///{home / 'protege.db'}")
    for name in ("tickets.jsonl.gz", "gpt4_calls.jsonl.gz"):
        import_file(store, EX / name, ImportOptions(task="banking77"))
    task = load_task(EX / "task.yaml")
    built = build_dataset(store, task, home)
    ds = get_dataset(store, built.id)
    console.print(f"dataset {built.id}: {built.sizes}")

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console) as bar:
        def progress(spec, total):
            tid = bar.add_task(spec, total=total)
            return lambda n: bar.advance(tid, n)

        report = run_bench(store, task, ds, home, CANDIDATES, reference="knn:minilm", limit=args.rows,
                           latency_samples=args.latency_samples, prices=load_prices(), progress=progress)
    render(report)
    by = {r.spec: r for r in report.results}
    con, free = by[CANDIDATES[1]], by[CANDIDATES[2]]
    con_probs = [p.confidence for p in con.outputs]
    checks = {
        "constrained_always_valid_label": con.valid_output_rate == 1.0,
        "constrained_always_has_probability": all(p is not None and 0 < p <= 1 for p in con_probs),
        "constrained_p50_not_slower_than_free": con.latency_ms["p50"] <= free.latency_ms["p50"],
        "constrained_at_least_as_accurate": con.metrics["accuracy"]["value"] >= free.metrics["accuracy"]["value"],
    }
    rows = [[r.spec, r.metrics["accuracy"]["value"], r.metrics["accuracy"]["ci95"][0], r.metrics["accuracy"]["ci95"][1],
             r.valid_output_rate, r.latency_ms["p50"], r.latency_ms["p95"], r.throughput_rps]
            for r in report.results]
    console.print(table("BANKING77 test split", ["candidate", "accuracy", "ci low", "ci high", "valid labels",
                                                  "p50 ms (batch 1)", "p95 ms", "rows/s batched"], rows))
    for name, ok in checks.items():
        console.print(f"{'met ' if ok else 'MISSED'}  {name}")
    data = {"benchmark": "bench_banking77", "machine": info, "rows": report.rows, "dataset": built.id,
            "dataset_sizes": built.sizes, "checks": checks, "report": report.as_dict()}
    console.print(f"wrote {write_result('bench_banking77', data)}")


if __name__ == "__main__":
    main()
