"""`protege traces ...`: import, inspect and export captured traces."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from .common import MAX_ROWS, console, err, fmt, open_store, print_json, settings

traces_app = typer.Typer(help="Inspect, import and export captured traces.", no_args_is_help=True)


@traces_app.command("import")
def traces_import(
    ctx: typer.Context,
    file: Path = typer.Argument(..., help="File to import (.gz accepted)."),
    fmt: str = typer.Option("openai-jsonl", "--format",
                            help="openai-jsonl | openai-batch | csv | traces (one TraceRecord JSON a line, as in "
                                 "HOME/spool/quarantine.jsonl; ids are kept)."),
    task: Optional[str] = typer.Option(None, "--task", help="Task tag for every imported trace."),
    input_col: str = typer.Option("input", "--input-col", help="csv: column holding the user message."),
    output_col: str = typer.Option("output", "--output-col", help="csv: column holding the model's reply."),
    system_prompt_file: Optional[Path] = typer.Option(None, "--system-prompt-file",
                                                      help="csv: system prompt the app sent with each row."),
    model: Optional[str] = typer.Option(None, "--model", help="csv: the model that produced the replies."),
    batch_input: Optional[Path] = typer.Option(None, "--batch-input",
                                               help="openai-batch: the batch's input JSONL (the requests)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable summary."),
):
    """Import traces in one transaction; a bad line aborts it all. Re-imports add nothing.

    --format traces reads back what the trace writer set aside in HOME/spool/quarantine.jsonl."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    from ..prices import cached_prices
    from ..traces.importers import ImportOptions, import_file

    s = settings(ctx)
    opts = ImportOptions(format=fmt, task=task, input_col=input_col, output_col=output_col,
                         system_prompt_file=str(system_prompt_file) if system_prompt_file else None,
                         model=model, batch_input=str(batch_input) if batch_input else None)
    store = open_store(ctx)
    prices = cached_prices(str(s.prices_path) if s.prices_path else None)
    size = file.stat().st_size if file.is_file() and file.suffix != ".gz" else None
    with Progress(TextColumn("importing {task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TimeRemainingColumn(), console=err, transient=True, disable=as_json) as progress:
        bar = progress.add_task(file.name, total=size)
        result = import_file(store, file, opts, prices=prices, on_bytes=lambda n: progress.advance(bar, n))
    if as_json:
        print_json(result.__dict__)
    else:
        console.print(f"{result.path}: {result.read:,} read, [bold]{result.added:,} added[/], "
                      f"{result.already_present:,} already in the store")


@traces_app.command("stats")
def traces_stats(
    ctx: typer.Context,
    task: Optional[str] = typer.Option(None, "--task", help="Only this task."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
):
    """Counts per task, model, source and status; tokens, cost, latency (where measured)."""
    s = open_store(ctx).stats(task=task)
    if as_json:
        print_json(s)
        return
    console.print(f"[bold]{s['traces']:,}[/] traces" + (f" from {s['first']} to {s['last']}" if s["traces"] else ""))
    for key in ("task", "model", "source", "status"):
        if s["by"][key]:
            console.print(f"  by {key}: " + ", ".join(f"{k} {v:,}" for k, v in list(s["by"][key].items())[:10]))
    tok = s["tokens"]
    console.print(f"  tokens: {tok['prompt']:,} prompt, {tok['completion']:,} completion "
                  f"(usage known for {tok['with_usage']:,} traces)")
    cost = s["cost_usd"]
    console.print(f"  cost: {fmt(cost['total'], digits=6)} USD (priced for {cost['with_cost']:,} traces)")
    for name in ("latency_ms", "ttft_ms"):
        q = s[name]
        label = "latency" if name == "latency_ms" else "time to first token"
        if q["measured"]:
            console.print(f"  {label}: p50 {q['p50']:.1f} ms, p95 {q['p95']:.1f} ms, p99 {q['p99']:.1f} ms "
                          f"({q['measured']:,} measured)")
        else:
            console.print(f"  {label}: unknown (no trace carries a measured value)")


@traces_app.command("list")
def traces_list(
    ctx: typer.Context,
    task: Optional[str] = typer.Option(None, "--task"),
    status: Optional[str] = typer.Option(None, "--status", help="ok | error"),
    source: Optional[str] = typer.Option(None, "--source", help="proxy | sdk | import | serve"),
    model: Optional[str] = typer.Option(None, "--model"),
    limit: int = typer.Option(20, "--limit", min=1, max=MAX_ROWS, help="At most this many traces."),
    offset: int = typer.Option(0, "--offset", min=0, max=MAX_ROWS, help="Skip this many of the newest first."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
):
    """The newest traces first."""
    rows = open_store(ctx).list_traces(limit=limit, offset=offset, task=task, status=status, source=source, model=model)
    if as_json:
        print_json(rows)
        return
    t = Table()
    for col in ("id", "created", "task", "model", "status", "latency ms", "cost USD", "output"):
        t.add_column(col, overflow="ellipsis", no_wrap=col != "output")
    for r in rows:
        out = (r["output_text"] or r["error"] or "").replace("\n", " ")
        t.add_row(r["id"][:13], str(r["created_at"])[:19], r["task"] or "", r["model"] or "", r["status"],
                  fmt(r["latency_ms"]), fmt(r["cost_usd"], digits=6), out[:60])
    console.print(t)


@traces_app.command("show")
def traces_show(
    ctx: typer.Context,
    trace_id: str = typer.Argument(..., help="Trace id or a unique prefix of it."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
):
    """One trace in full: request, response and every normalised field."""
    row = open_store(ctx).get_trace(trace_id)
    if as_json:
        print_json(row)
        return
    for key, value in row.items():
        if key in ("request", "response", "metadata", "feedback"):
            console.print(f"[bold]{key}[/]:")
            console.print_json(json.dumps(value, default=str))
        else:
            console.print(f"[bold]{key}[/]: {fmt(value) if value is None else value}")


@traces_app.command("feedback")
def traces_feedback(
    ctx: typer.Context,
    trace_id: Optional[str] = typer.Argument(None, help="Trace id or a unique prefix of it."),
    correction: Optional[str] = typer.Option(None, "--correction", help="The right answer (a human's review)."),
    note: Optional[str] = typer.Option(None, "--note", help="Free text kept with the review."),
    file: Optional[Path] = typer.Option(None, "--file", help="Many at once: JSONL of {\"id\": TRACE_ID, "
                                        "\"correction\": ..., \"note\": ...} lines."),
):
    """Record a human review on stored traces: `protege retrain` and `dataset build` take the correction as the truth."""
    from ..errors import ProtegeError

    store = open_store(ctx)
    if (file is None) == (trace_id is None):
        raise ProtegeError("give a TRACE_ID with --correction/--note, or --file FILE")
    items = []
    if file is not None:
        for n, line in enumerate(file.read_text("utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ProtegeError(f"{file}:{n}: not valid JSON ({exc.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("id"), str):
                raise ProtegeError(f"{file}:{n}: each line needs a trace \"id\" (a string)")
            fb = {k: obj[k] for k in ("correction", "note") if obj.get(k) is not None}
            if not fb:
                raise ProtegeError(f"{file}:{n}: give a \"correction\" or a \"note\"")
            items.append((obj["id"], fb))
    else:
        fb = {k: v for k, v in (("correction", correction), ("note", note)) if v is not None}
        if not fb:
            raise ProtegeError("give --correction and/or --note")
        items.append((trace_id, fb))
    for tid, _ in items:  # every id resolves before anything is written
        store.get_trace(tid)
    for tid, fb in items:
        store.set_feedback(tid, fb)
    console.print(f"feedback recorded on {len(items):,} trace{'s' if len(items) != 1 else ''}")


@traces_app.command("export")
def traces_export(
    ctx: typer.Context,
    out: Path = typer.Argument(..., help="Output JSONL file (OpenAI fine-tuning format)."),
    task: Optional[str] = typer.Option(None, "--task"),
    model: Optional[str] = typer.Option(None, "--model"),
    source: Optional[str] = typer.Option(None, "--source"),
):
    """Export successful chat traces as OpenAI fine-tuning JSONL."""
    from ..traces.export import export_finetune_jsonl

    n = export_finetune_jsonl(open_store(ctx), out, task=task, model=model, source=source)
    console.print(f"wrote {n:,} examples to {out}")


