"""`protege retrain` (one turn of the flywheel) and `protege rebase` (a new base or frontier model:
does the decision still hold?)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..prices import DEFAULT_HARDWARE_USD_PER_HOUR
from .common import console, err, open_store, print_json, settings


def retrain_cmd(
    ctx: typer.Context,
    task_file: Path = typer.Argument(..., help="The task's YAML file."),
    min_new: int = typer.Option(1, "--min-new", min=1, help="Train only once the served traffic taught this many "
                                "new rows since the serving run's dataset."),
    base: Optional[str] = typer.Option(None, "--base", help="Base model (default: the deployment's)."),
    method: Optional[str] = typer.Option(None, "--method", help="Method (default: the deployment's)."),
    config: Optional[Path] = typer.Option(None, "--config", help="Recipe YAML (default: the deployment's recipe)."),
    set_: list[str] = typer.Option([], "--set", help="Override a recipe key (repeatable)."),
    fallback: Optional[str] = typer.Option(None, "--fallback", help="openai:MODEL@URL for the cascade (default: the "
                                           "deployment's)."),
    threshold: Optional[float] = typer.Option(None, "--threshold", min=0, max=1,
                                              help="The cascade's threshold (default: the deployment's)."),
    target: Optional[float] = typer.Option(None, "--target", min=0, max=1, help="Pick the threshold whose cascade "
                                           "reaches this quality on the new validation split (kept for next turns)."),
    reference: Optional[str] = typer.Option(None, "--reference", help="The frontier candidate benched beside the runs "
                                            "(default: the decision's reference; none: no reference, state --bar)."),
    margin: float = typer.Option(0.01, "--margin", min=0, max=1, help="The gate's non-inferiority margin."),
    tolerance: float = typer.Option(0.02, "--tolerance", min=0, max=1, help="The bar: the reference's score less this."),
    bar: Optional[float] = typer.Option(None, "--bar", min=0, max=1, help="State the bar instead (recorded as stated)."),
    time_budget: Optional[float] = typer.Option(None, "--time-budget", min=0.1, help="Stop training after N minutes."),
    by: Optional[str] = typer.Option(None, "--by", help="Who promotes (default: protege retrain)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
):
    """One turn of the flywheel: next dataset from the served traffic, train, bench, gate, promote. Safe from cron."""
    from ..deploy.flywheel import retrain
    from ..prices import cached_prices
    from ..tasks.spec import load_task

    recipe = None
    if config or set_:
        from ..train.recipe import load_recipe

        if method is None:
            from ..deploy.registry import current
            from ..runs.registry import get_run

            d = current(open_store(ctx), load_task(task_file).name)
            method = get_run(open_store(ctx), d["run_id"])["config"]["method"] if d else None
        if method is None:
            from ..errors import ProtegeError

            raise ProtegeError("--config/--set need --method (the task has no deployment to take it from)")
        recipe = load_recipe(method, config, set_)
    task = load_task(task_file)
    s = settings(ctx)
    if not as_json:
        err.print(f"protege retrain: task [bold]{task.name}[/]")
    turn = retrain(open_store(ctx), task, s.ensure_home(), min_new=min_new, base=base, method=method, recipe=recipe,
                   fallback=fallback, threshold=threshold, target=target, reference=reference, margin=margin,
                   tolerance=tolerance, bar=bar, time_budget_min=time_budget,
                   prices=cached_prices(str(s.prices_path) if s.prices_path else None),
                   console=err, by=by)
    if as_json:
        print_json(turn.as_dict())
        return
    colour = {"promoted": "green", "held": "red"}.get(turn.action, "yellow")
    console.print(f"[bold {colour}]{turn.action}[/]" + (f": {turn.dataset}" if turn.dataset else ""))
    for r in turn.reasons:
        console.print(f" • {r}", highlight=False)


def rebase_cmd(
    ctx: typer.Context,
    task_file: Path = typer.Argument(..., help="The task's YAML file."),
    base: Optional[str] = typer.Option(None, "--base", help="The new base model: train it as the specialist was."),
    frontier: Optional[str] = typer.Option(None, "--frontier", help="The new frontier candidate (openai:MODEL@URL, "
                                           "replay?model=..., any spec): bench it in the reference's place."),
    run: Optional[str] = typer.Option(None, "--run", help="The specialist to rebase (default: the decision's)."),
    monthly_requests: Optional[float] = typer.Option(None, "--monthly-requests", min=1, help="Your volume (payback)."),
    hardware_usd_per_hour: float = typer.Option(DEFAULT_HARDWARE_USD_PER_HOUR, "--hardware-usd-per-hour", min=0,
                                                help="Price of the machine that trains and serves the specialist."),
    tolerance: float = typer.Option(0.02, "--tolerance", min=0, max=1, help="Quality below the reference accepted."),
    time_budget: Optional[float] = typer.Option(None, "--time-budget", min=0.1, help="Stop training after N minutes."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="TASK@VERSION (default: the decision's, newest)."),
    md_out: Optional[Path] = typer.Option(None, "--md", help="Also write the report as Markdown here."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
):
    """A new base or frontier model: re-run what the decision rests on with it; side by side, verdict before and after."""
    from ..decide.analysis import Inputs
    from ..decide.rebase import rebase, rebase_markdown
    from ..prices import cached_prices
    from ..tasks.spec import load_task

    task = load_task(task_file)
    s = settings(ctx)
    inputs = Inputs(monthly_requests=monthly_requests, hardware_usd_per_hour=hardware_usd_per_hour,
                    tolerance=tolerance)
    report = rebase(open_store(ctx), task, s.ensure_home(), inputs, base=base, frontier=frontier, run=run,
                    dataset=dataset, time_budget_min=time_budget,
                    prices=cached_prices(str(s.prices_path) if s.prices_path else None),
                    console=err)
    text = rebase_markdown(report)
    if md_out is not None:
        md_out.parent.mkdir(parents=True, exist_ok=True)
        md_out.write_text(text, "utf-8")
    if as_json:
        print_json(report)
        return
    from rich.markdown import Markdown

    console.print(Markdown(text))
