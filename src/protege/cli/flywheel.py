"""`protege retrain` (one turn of the flywheel) and `protege rebase` (a new base or frontier model:
does the decision still hold?)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

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
                                            "(default: the decision's reference)."),
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
