"""`protege decide`: the train-or-not report."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..prices import DEFAULT_HARDWARE_USD_PER_HOUR
from .common import console, err, open_store, print_json, settings


def decide_cmd(
    ctx: typer.Context,
    task_file: Path = typer.Argument(..., help="The task's YAML file."),
    monthly_requests: Optional[float] = typer.Option(None, "--monthly-requests", min=1,
                                                     help="Your volume for this step: payback time and monthly costs."),
    value_per_success: Optional[float] = typer.Option(None, "--value-per-success", min=0,
                                                      help="USD a successful output is worth (Token Factor Productivity)."),
    hardware_usd_per_hour: float = typer.Option(DEFAULT_HARDWARE_USD_PER_HOUR, "--hardware-usd-per-hour", min=0,
                                                help="Price of the machine that trains and serves the specialist."),
    tolerance: float = typer.Option(0.02, "--tolerance", min=0, max=1,
                                    help="Quality below the reference you accept, as a fraction (0.02 = 2 points)."),
    html_out: Optional[Path] = typer.Option(None, "--html", help="Write the self-contained HTML report here."),
    md_out: Optional[Path] = typer.Option(None, "--md", help="Write the Markdown report here."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="TASK@VERSION (default: the task's newest)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
):
    """Should we train? Quality, latency, cost, break-even, learning curve and a recommendation."""
    from ..decide.analysis import Inputs, decide
    from ..decide.report import html, markdown
    from ..prices import cached_prices
    from ..tasks.spec import load_task

    task = load_task(task_file)
    s = settings(ctx)
    prices = cached_prices(str(s.prices_path) if s.prices_path else None)
    inputs = Inputs(monthly_requests=monthly_requests, value_per_success=value_per_success,
                    hardware_usd_per_hour=hardware_usd_per_hour, tolerance=tolerance)
    d = decide(open_store(ctx), task, inputs, dataset=dataset, prices=prices, home=s.ensure_home())
    text = markdown(d)
    for path, content in ((html_out, html(d) if html_out else None), (md_out, text)):
        if path is None:
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(content, "utf-8")
        tmp.replace(path)
    if as_json:
        data = d.as_dict()
        if data.get("curve") and data["curve"].get("fit"):
            data["curve"]["fit"].pop("_boot", None)
        from ..jsonsafe import json_safe

        print_json(json_safe(data))
    else:
        render(d, open_store(ctx))
    for label, path in (("HTML report", html_out), ("Markdown report", md_out)):
        if path is not None:
            err.print(f"{label}: {path.resolve()}")


def render(d, store=None) -> None:
    """The decision in the terminal, readable at 80 columns: the tables first (stacked to fit),
    then, on the last screen, what to read first, the verdict, what to run and why. The full
    report, with the warnings at its top, is --md / --html."""
    from rich.markup import escape

    from ..decide.report import header_lines, history_lines, projection_lines, run_line, tables
    from .tables import abbreviate, print_table

    names = {c.spec: abbreviate(store, c.spec) for c in d.candidates}  # one lookup per candidate

    def short(text: str) -> str:
        for spec, name in names.items():
            text = text.replace(spec, name)
        return text

    console.print(f"[bold]Should we train a specialist for {escape(d.task)}?[/]")
    for line in header_lines(d):
        console.print(f"[dim]{escape(line.replace('`', ''))}[/]")
    t = tables(d)
    if "curve" in t and store is not None:  # the points' training runs, abbreviated like candidates
        t["curve"] = (t["curve"][0], [[*row[:-1], abbreviate(store, "run:" + row[-1])[4:]] for row in t["curve"][1]])
    for name, title, right in (("candidates", "Candidates", set()), ("economics", "Economics", {2, 3, 4, 5, 6, 7}),
                               ("curve", "Learning curve", {1})):
        if name in t:
            head, rows = t[name]
            print_table(console, title, head, [[short(c) for c in row] for row in rows], right=right)
    for x in projection_lines(d):
        console.print(f" • {escape(x)}")
    head, rows = t["basis"]
    console.print("[dim]Where the figures come from:[/]")
    for row in rows:
        console.print(f"[dim] • {escape(short(row[0]))}: " + "; ".join(
            f"{h} {escape(c)}" for h, c in zip(head[1:], row[1:]) if c) + "[/]")
    for n in d.notes:
        console.print(f"[dim]Note: {escape(n)}[/]")
    for h in history_lines(d.history):
        console.print(f"[dim]History: {escape(short(h))}[/]")
    console.print()
    for w in d.warnings:
        console.print(f"[bold yellow]Read first:[/] {escape(w)}")
    console.print(f"[bold]Recommendation: {escape(d.verdict)}[/]" + escape(short(run_line(d, ' — '))))
    for r in d.reasons:
        console.print(f" • {escape(short(r))}")
