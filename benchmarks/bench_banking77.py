"""BANKING77: GPT-4 as it answered against every cheaper option, on all 3,080 reviewed calls.

Run: .venv/bin/python benchmarks/bench_banking77.py [--part frontier|smollm2|all] [--rows N] [--home DIR]

Imports the shipped data (the app's GPT-4 calls with the human review as feedback, and the
labelled tickets), builds the dataset (every reviewed call is the benchmark) and runs
`protege bench` (the same code as the CLI).

- `frontier` (default): GPT-4's real answers (`replay`, the reference, scored against the
  human labels) beside `knn:minilm` (nearest neighbour over the tickets), the student taught
  only by GPT-4's answers (`student:knn:minilm`, out of fold: no human label at all), the
  MiniLM student fine-tuned on GPT-4's answers alone (`--method student`, recipes/student.yaml,
  3 folds) and the MiniLM classifier trained here on the tickets with `recipes/classifier.yaml`: accuracy with
  95% CIs, paired tests against GPT-4, cost per 1M requests (GPT-4's computed from the
  dated price table and the prompt's token count, labelled so). Targets (issue 13): the
  classifier at least 0.935 accuracy on the full test split within 15 minutes of training;
  the product computes GPT-4's 0.8305. Peer (published): the OCaTS paper's kNN student
  taught only by GPT-4, 82.7%.
- `smollm2`: untrained SmolLM2-135M zero-shot, output constrained to the labels vs free
  generation vs every label scored, with `knn:minilm` as the reference (issue 8's targets:
  constrained output is always a valid label with a probability, no slower per request than
  free generation, at least as accurate). `--rows N` benches the first N test rows.

Writes benchmarks/results/bench_banking77.json (one section per part; a run of one part
keeps the other's last figures).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from _common import RESULTS, machine_info, prepare, table, write_result
from rich.console import Console

ROOT = Path(__file__).resolve().parents[1]
EX = ROOT / "examples" / "banking77"
SMOLLM2 = ["knn:minilm", "hf:smollm2-135m", "hf:smollm2-135m?mode=generate&max_new_tokens=16",
           "hf:smollm2-135m?mode=score"]
STUDENT = "student:knn:minilm?folds=3"
GPT4_AGREES = 2558 / 3080  # shared/data/banking77/frontier/SOURCE.md
PEER_OCATS_KNN_STUDENT = 0.827


def bench(store, task, ds, home, specs, reference, rows, latency_samples, console):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

    from protege.bench.run import run_bench
    from protege.cli.bench import render
    from protege.prices import load_prices

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
                  TimeRemainingColumn(), console=console) as bar:
        def progress(spec, total):
            tid = bar.add_task(spec, total=total)
            return lambda n: bar.advance(tid, n)

        report = run_bench(store, task, ds, home, specs, reference=reference, limit=rows,
                           latency_samples=latency_samples, prices=load_prices(), progress=progress)
    render(report, store)
    return report


def frontier(store, task, ds, home, args, console) -> dict:
    from protege.runs.registry import get_run
    from protege.train.api import train
    from protege.train.recipe import load_recipe

    recipe = load_recipe("classifier", ROOT / "recipes" / "classifier.yaml")
    t0 = time.monotonic()
    run_id = train(store, task, ds, home, "minilm", "classifier", recipe, time_budget_min=15, console=console)
    train_s = time.monotonic() - t0
    student_recipe = load_recipe("student", ROOT / "recipes" / "student.yaml")
    t0 = time.monotonic()
    student_id = train(store, task, ds, home, "minilm", "student", student_recipe, console=console)
    student_s = time.monotonic() - t0
    specs = ["replay", "knn:minilm", STUDENT, f"run:{student_id}", f"run:{run_id}"]
    report = bench(store, task, ds, home, specs, "replay", None, args.latency_samples, console)
    by = {r.spec: r for r in report.results}
    gpt4, clf, student = by["replay"], by[f"run:{run_id}"], by[STUDENT]
    tuned = by[f"run:{student_id}"]
    acc = {spec: r.metrics["accuracy"] for spec, r in by.items()}
    checks = {
        "full_test_split": report.rows == 3080,
        "gpt4_accuracy_is_0.8305": round(acc["replay"]["value"], 4) == round(GPT4_AGREES, 4),
        "classifier_test_accuracy_at_least_0.935": acc[f"run:{run_id}"]["value"] >= 0.935,
        "classifier_within_15_minutes": train_s <= 15 * 60,
    }
    names = {"replay": "GPT-4 (replay)", "knn:minilm": "knn:minilm", STUDENT: "kNN student taught by GPT-4",
             f"run:{student_id}": "MiniLM student taught by GPT-4", f"run:{run_id}": "MiniLM classifier"}
    rows = [[names[r.spec], f"{r.metrics['accuracy']['value']:.4f}",
             "[{:.4f}, {:.4f}]".format(*r.metrics["accuracy"]["ci95"]),
             "—" if r.spec == "replay" else "{:+.4f} [{:+.4f}, {:+.4f}]".format(
                 r.paired["accuracy"]["difference"], *r.paired["accuracy"]["ci95"]),
             f"{r.cost_per_1m_usd:,.2f}"] for r in report.results]
    rows.append(["peer: OCaTS kNN student (published)", f"{PEER_OCATS_KNN_STUDENT:.3f}", "—", "—", "—"])
    console.print(table("BANKING77, 3,080 reviewed GPT-4 calls, against the human labels",
                        ["candidate", "accuracy", "95% CI", "vs GPT-4 (paired 95% CI)", "USD per 1M req"], rows))
    console.print(f"GPT-4's cost: {gpt4.cost_basis}")
    for who, r in (("kNN student", student), ("MiniLM student", tuned)):
        console.print(f"{who} vs peer: {r.metrics['accuracy']['value']:.4f} vs {PEER_OCATS_KNN_STUDENT} "
                      f"(ratio {r.metrics['accuracy']['value'] / PEER_OCATS_KNN_STUDENT:.3f})")
    run = get_run(store, run_id)
    return {"checks": checks, "classifier": {"run_id": run_id, "train_seconds": train_s, "recipe": recipe.model_dump(),
                                             "run_metrics": run["metrics"]},
            "student": {"run_id": student_id, "train_seconds": student_s, "recipe": student_recipe.model_dump(),
                        "run_metrics": get_run(store, student_id)["metrics"]},
            "accuracy": {names[s]: a for s, a in acc.items()},
            "cost_per_1m_usd": {names[r.spec]: r.cost_per_1m_usd for r in report.results},
            "cost_basis": {names[r.spec]: r.cost_basis for r in report.results},
            "paired_vs_gpt4": {names[r.spec]: r.paired.get("accuracy") for r in report.results if r.spec != "replay"},
            "student_vs_peer": {name: {"student": r.metrics["accuracy"]["value"], "peer": PEER_OCATS_KNN_STUDENT,
                                       "ratio": r.metrics["accuracy"]["value"] / PEER_OCATS_KNN_STUDENT}
                                for name, r in (("knn", student), ("minilm", tuned))},
            "classifier_accuracy": clf.metrics["accuracy"], "report": report.as_dict()}


def smollm2(store, task, ds, home, args, console) -> dict:
    report = bench(store, task, ds, home, SMOLLM2, "knn:minilm", args.rows, args.latency_samples, console)
    by = {r.spec: r for r in report.results}
    con, free = by[SMOLLM2[1]], by[SMOLLM2[2]]
    checks = {
        "constrained_always_valid_label": con.valid_output_rate == 1.0,
        "constrained_always_has_probability": all(p.confidence is not None and 0 < p.confidence <= 1
                                                  for p in con.outputs),
        "constrained_p50_not_slower_than_free": con.latency_ms["p50"] <= free.latency_ms["p50"],
        "constrained_at_least_as_accurate": con.metrics["accuracy"]["value"] >= free.metrics["accuracy"]["value"],
    }
    rows = [[r.spec, r.metrics["accuracy"]["value"], r.metrics["accuracy"]["ci95"][0], r.metrics["accuracy"]["ci95"][1],
             r.valid_output_rate, r.latency_ms["p50"], r.latency_ms["p95"], r.throughput_rps]
            for r in report.results]
    console.print(table("BANKING77 test split, untrained SmolLM2-135M", ["candidate", "accuracy", "ci low", "ci high",
                                                                         "valid labels", "p50 ms (batch 1)", "p95 ms",
                                                                         "rows/s batched"], rows))
    return {"checks": checks, "rows": report.rows, "report": report.as_dict()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["frontier", "smollm2", "all"], default="frontier")
    parser.add_argument("--rows", type=int, default=None, help="smollm2 part: bench only the first N test rows")
    parser.add_argument("--home", default=None, help="protege home (default: a temporary folder)")
    parser.add_argument("--latency-samples", type=int, default=30)
    args = parser.parse_args()
    console = Console()
    store, task, ds, home = prepare(EX, "banking77", args.home, "protege-bench-")
    console.print(f"dataset {ds.id}: {ds.split_sizes}")
    previous = RESULTS / "bench_banking77.json"
    data = json.loads(previous.read_text()) if previous.exists() else {}
    data = {k: v for k, v in data.items() if k in ("frontier", "smollm2")}  # sections from an earlier layout go
    data.update({"benchmark": "bench_banking77", "machine": machine_info(["protege", "torch", "transformers"]),
                 "dataset": ds.id, "dataset_sizes": ds.split_sizes})
    parts = ["frontier", "smollm2"] if args.part == "all" else [args.part]
    for part in parts:
        data[part] = {"frontier": frontier, "smollm2": smollm2}[part](store, task, ds, home, args, console)
    data["checks"] = {f"{part}:{k}": v for part in ("frontier", "smollm2") if part in data
                      for k, v in data[part]["checks"].items()}
    for name, ok in data["checks"].items():
        console.print(f"{'met ' if ok else 'MISSED'}  {name}")
    console.print(f"wrote {write_result('bench_banking77', data)}")


if __name__ == "__main__":
    main()
