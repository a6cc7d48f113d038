"""The `protege` command line: one Typer app; each verb parses its flags and calls a stage.

Global options (`--home`, `--db`, `--prices`) resolve into `Settings` (config.py). User
mistakes raise `ProtegeError`, printed as one line with exit code 1.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from .config import Settings
from .errors import ProtegeError

app = typer.Typer(help="protege: turn frontier-model traces into a small specialist, and decide whether to train.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
traces_app = typer.Typer(help="Inspect, import and export captured traces.", no_args_is_help=True)
app.add_typer(traces_app, name="traces")
console = Console()
err = Console(stderr=True)


def _settings(ctx: typer.Context) -> Settings:
    return ctx.find_root().obj


def _store(ctx: typer.Context):
    from .traces.store import Store

    return Store(_settings(ctx).database_url)


def _print_json(data) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def _fmt(value, unit: str = "", digits: int = 1) -> str:
    if value is None:
        return "unknown"
    if isinstance(value, float):
        return f"{value:,.{digits}f}{unit}"
    return f"{value:,}{unit}"


@app.callback()
def main_options(
    ctx: typer.Context,
    home: Optional[Path] = typer.Option(None, "--home", envvar="PROTEGE_HOME",
                                        help="State folder (store, datasets, runs, spool). Default ./.protege"),
    db: Optional[str] = typer.Option(None, "--db", envvar="PROTEGE_DATABASE_URL",
                                     help="Store URL: sqlite:///PATH or postgresql://USER@HOST/DB. Default: SQLite in --home"),
    prices: Optional[Path] = typer.Option(None, "--prices", envvar="PROTEGE_PRICES",
                                          help="Your own API price table (CSV, same columns as `protege prices`)."),
):
    ctx.obj = Settings.resolve(home=home, db=db, prices=prices)


@app.command("prices")
def prices_cmd(ctx: typer.Context, as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")):
    """Show the API price table used for every cost figure (USD per 1M tokens, with its date)."""
    from .prices import load_prices

    table = load_prices(_settings(ctx).prices_path)
    if as_json:
        _print_json({"path": table.path, "prices": [p.__dict__ for p in table.prices]})
        return
    t = Table(title=f"API prices, USD per 1M tokens ({table.path})")
    for col in ("provider", "model", "input", "cached input", "output", "as of", "source"):
        t.add_column(col, overflow="fold")
    for p in table.prices:
        t.add_row(p.provider, p.model, f"{p.input_usd_per_1m:g}",
                  "—" if p.cached_input_usd_per_1m is None else f"{p.cached_input_usd_per_1m:g}",
                  f"{p.output_usd_per_1m:g}", p.as_of, p.source)
    console.print(t)


@app.command("proxy")
def proxy_cmd(
    ctx: typer.Context,
    upstream: str = typer.Option(..., "--upstream", help="API base URL, e.g. https://api.openai.com/v1"),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to listen on."),
    port: int = typer.Option(8787, "--port", help="Port to listen on."),
    timeout: float = typer.Option(600.0, "--timeout", help="Seconds to wait for upstream bytes before a 504."),
):
    """Run the logging proxy: point your OpenAI client's base_url at http://HOST:PORT/v1."""
    from .capture.proxy import build_proxy, run_proxy

    if not upstream.startswith(("http://", "https://")):
        raise ProtegeError(f"--upstream must be an http(s) URL such as https://api.openai.com/v1, got {upstream!r}")
    settings = _settings(ctx)
    proxy = build_proxy(settings, upstream, timeout_s=timeout)
    err.print(f"protege proxy on http://{host}:{port}/v1 → {proxy.upstream}  (traces: {settings.home})")
    run_proxy(proxy, host=host, port=port)


@traces_app.command("import")
def traces_import(
    ctx: typer.Context,
    file: Path = typer.Argument(..., help="File to import (.gz accepted)."),
    fmt: str = typer.Option("openai-jsonl", "--format", help="openai-jsonl | openai-batch | csv"),
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
    """Import traces in one transaction; a bad line aborts it all. Re-imports add nothing."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    from .prices import cached_prices
    from .traces.importers import ImportOptions, import_file

    settings = _settings(ctx)
    opts = ImportOptions(format=fmt, task=task, input_col=input_col, output_col=output_col,
                         system_prompt_file=str(system_prompt_file) if system_prompt_file else None,
                         model=model, batch_input=str(batch_input) if batch_input else None)
    store = _store(ctx)
    prices = cached_prices(str(settings.prices_path) if settings.prices_path else None)
    size = file.stat().st_size if file.is_file() and file.suffix != ".gz" else None
    with Progress(TextColumn("importing {task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TimeRemainingColumn(), console=err, transient=True, disable=as_json) as progress:
        bar = progress.add_task(file.name, total=size)
        result = import_file(store, file, opts, prices=prices, on_bytes=lambda n: progress.advance(bar, n))
    if as_json:
        _print_json(result.__dict__)
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
    s = _store(ctx).stats(task=task)
    if as_json:
        _print_json(s)
        return
    console.print(f"[bold]{s['traces']:,}[/] traces" + (f" from {s['first']} to {s['last']}" if s["traces"] else ""))
    for key in ("task", "model", "source", "status"):
        if s["by"][key]:
            console.print(f"  by {key}: " + ", ".join(f"{k} {v:,}" for k, v in list(s["by"][key].items())[:10]))
    tok = s["tokens"]
    console.print(f"  tokens: {tok['prompt']:,} prompt, {tok['completion']:,} completion "
                  f"(usage known for {tok['with_usage']:,} traces)")
    cost = s["cost_usd"]
    console.print(f"  cost: {_fmt(cost['total'], digits=6)} USD (priced for {cost['with_cost']:,} traces)")
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
    limit: int = typer.Option(20, "--limit", min=1),
    offset: int = typer.Option(0, "--offset", min=0),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
):
    """The newest traces first."""
    rows = _store(ctx).list_traces(limit=limit, offset=offset, task=task, status=status, source=source, model=model)
    if as_json:
        _print_json(rows)
        return
    t = Table()
    for col in ("id", "created", "task", "model", "status", "latency ms", "cost USD", "output"):
        t.add_column(col, overflow="ellipsis", no_wrap=col != "output")
    for r in rows:
        out = (r["output_text"] or r["error"] or "").replace("\n", " ")
        t.add_row(r["id"][:13], str(r["created_at"])[:19], r["task"] or "", r["model"] or "", r["status"],
                  _fmt(r["latency_ms"]), _fmt(r["cost_usd"], digits=6), out[:60])
    console.print(t)


@traces_app.command("show")
def traces_show(
    ctx: typer.Context,
    trace_id: str = typer.Argument(..., help="Trace id or a unique prefix of it."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
):
    """One trace in full: request, response and every normalised field."""
    row = _store(ctx).get_trace(trace_id)
    if as_json:
        _print_json(row)
        return
    for key, value in row.items():
        if key in ("request", "response", "metadata", "feedback"):
            console.print(f"[bold]{key}[/]:")
            console.print_json(json.dumps(value, default=str))
        else:
            console.print(f"[bold]{key}[/]: {_fmt(value) if value is None else value}")


@traces_app.command("export")
def traces_export(
    ctx: typer.Context,
    out: Path = typer.Argument(..., help="Output JSONL file (OpenAI fine-tuning format)."),
    task: Optional[str] = typer.Option(None, "--task"),
    model: Optional[str] = typer.Option(None, "--model"),
    source: Optional[str] = typer.Option(None, "--source"),
):
    """Export successful chat traces as OpenAI fine-tuning JSONL."""
    from .traces.export import export_finetune_jsonl

    n = export_finetune_jsonl(_store(ctx), out, task=task, model=model, source=source)
    console.print(f"wrote {n:,} examples to {out}")


def main(argv: list[str] | None = None) -> None:
    try:
        app(args=argv, prog_name="protege", standalone_mode=False)
    except ProtegeError as exc:
        err.print(f"[red]error:[/] {exc}", highlight=False, soft_wrap=True, markup=True)
        sys.exit(1)
    except typer.Abort:
        err.print("aborted")
        sys.exit(130)
    except (typer.Exit, SystemExit) as exc:
        code = getattr(exc, "exit_code", None)
        sys.exit(code if code is not None else getattr(exc, "code", 0))
    except Exception as exc:
        # usage errors (bad flag values) from click, or from the click that typer vendors
        if callable(getattr(exc, "show", None)) and isinstance(getattr(exc, "exit_code", None), int):
            exc.show()
            sys.exit(exc.exit_code)
        raise


if __name__ == "__main__":
    main()
