"""`protege bench`: candidates head to head on a task's frozen benchmark."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ..prices import DEFAULT_HARDWARE_USD_PER_HOUR
from .common import MAX_ROWS, console, err, fmt, open_store, settings


def bench_cmd(
    ctx: typer.Context,
    task_file: Path = typer.Argument(..., help="The task's YAML file."),
    candidate: list[str] = typer.Option(..., "--candidate", "-c",
                                        help="Candidate spec; repeat: openai:MODEL@URL, replay, hf:ID, knn:minilm, run:ID"),
    reference: Optional[str] = typer.Option(None, "--reference",
                                            help="Candidate the others are tested against (default: the first)."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="TASK@VERSION (default: the task's newest dataset)."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, max=MAX_ROWS,
                                        help="A fixed random sample of N test rows (the same rows for every candidate and run)."),
    latency_samples: int = typer.Option(30, "--latency-samples", min=1, help="Requests timed one by one for local models."),
    hardware_usd_per_hour: float = typer.Option(DEFAULT_HARDWARE_USD_PER_HOUR, "--hardware-usd-per-hour", min=0,
                                                help="Price of the machine a local model runs on "
                                                "(default: an assumed 2-vCPU cloud VM)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the full report to this JSON file."),
):
    """Score every candidate on exactly the same frozen test rows: quality with CIs, latency, cost."""
    from ..bench.run import run_bench
    from ..datasets.registry import get_dataset
    from ..prices import cached_prices
    from ..tasks.spec import load_task

    task = load_task(task_file)
    s = settings(ctx)
    store = open_store(ctx)
    ds = get_dataset(store, dataset or task.name)
    prices = cached_prices(str(s.prices_path) if s.prices_path else None)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeRemainingColumn(), console=err,
                  transient=False) as bar:
        def progress(spec, total):
            tid = bar.add_task(spec, total=total)
            return lambda n: bar.advance(tid, n)

        report = run_bench(store, task, ds, s.ensure_home(), list(candidate), reference=reference,
                           hardware_usd_per_hour=hardware_usd_per_hour, latency_samples=latency_samples,
                           limit=limit, prices=prices, progress=progress)
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report.as_dict(), indent=2, default=str))
    render(report, store)


def _ci(m: dict | None) -> str:
    if not m or m.get("value") is None:
        return "unknown"
    low, high = m["ci95"]
    if low is None or high is None:
        return f"{m['value']:.3f}"
    return f"{m['value']:.3f} [{low:.3f}–{high:.3f}]"


def render(report, store=None) -> None:
    """The bench's two tables (quality; speed and cost), readable at 80 columns."""
    from .tables import abbreviate, print_table

    names = list(report.results[0].metrics) if report.results else []
    first = names[0] if names else None
    short = {r.spec: abbreviate(store, r.spec) for r in report.results}
    rows = []
    for r in report.results:
        delta = "reference" if r.spec == report.reference else (
            f"{r.paired[first]['difference']:+.3f} (p={r.paired[first]['p_value']:.3g})" if first in r.paired else "")
        rows.append([short[r.spec], *[_ci(r.metrics.get(n)) for n in names], delta])
    print_table(console, f"{report.task} on {report.dataset}: {report.rows:,} test rows, 95% CIs",
                ["candidate", *names, f"{first} vs {short.get(report.reference, report.reference)}"], rows)
    rows = [[short[r.spec], fmt(r.latency_ms["p50"]), fmt(r.latency_ms["p95"]), fmt(r.throughput_rps),
             f"{fmt(r.tokens['in'], digits=0)}/{fmt(r.tokens['out'], digits=1)}", fmt(r.cost_per_1m_usd, digits=2)]
            for r in report.results]
    print_table(console, "speed and cost", ["candidate", "p50 ms", "p95 ms", "rows/s", "tokens in/out",
                                            "USD per 1M req"], rows, right={1, 2, 3, 4, 5})
    console.print(f"[dim]{report.reference_note}.[/]")
    for r in report.results:
        extra = f"; valid labels {r.valid_output_rate:.1%}" if r.valid_output_rate is not None else ""
        console.print(f"[dim]{r.spec}: latency {r.latency_ms['note']}; cost {r.cost_basis}{extra}; run {r.run_id}[/]")
    if report.prices_as_of:
        console.print(f"[dim]API prices as of {report.prices_as_of} (`protege prices`).[/]")
