"""`protege train` and `protege runs`: post-train specialists and look at the runs."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ..errors import ProtegeError
from .common import MAX_ROWS, console, err, fmt, open_store, print_json, settings

runs_app = typer.Typer(help="Training and bench runs.", no_args_is_help=True)


def train_cmd(
    ctx: typer.Context,
    task_file: Path = typer.Argument(..., help="The task's YAML file."),
    base: Optional[str] = typer.Option(None, "--base", help="Base model: minilm, smollm2-135m, a Hugging Face id, "
                                       "a local path, or run:RUN_ID (start from a trained run)."),
    method: Optional[str] = typer.Option(None, "--method", help="classifier | student | lora | full | distill | grpo"),
    config: Optional[Path] = typer.Option(None, "--config", help="Recipe YAML (see recipes/)."),
    set_: list[str] = typer.Option([], "--set", help="Override a recipe key: --set lr=5e-5 (repeatable)."),
    time_budget: Optional[float] = typer.Option(None, "--time-budget", min=0.1, help="Stop after this many minutes."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="TASK@VERSION (default: the task's newest)."),
    nproc: int = typer.Option(1, "--nproc", min=1, help="Processes (DDP through torchrun; gloo on CPU, NCCL on GPUs)."),
    resume_id: Optional[str] = typer.Option(None, "--resume", help="Go on with a killed run from its last checkpoint."),
):
    """Post-train a specialist on the task's frozen dataset; prints the run id to bench as run:RUN_ID."""
    from ..tasks.spec import load_task

    task = load_task(task_file)
    if nproc > 1:
        from ..train.api import launch
        from . import ARGV

        code = launch(ARGV, nproc)
        if code:
            raise typer.Exit(code)
        return
    store = open_store(ctx)
    s = settings(ctx)
    if resume_id:
        from ..runs.registry import get_run
        from ..train.api import resume

        cfg = get_run(store, resume_id)["config"]
        for flag, given, recorded in (("--base", base, cfg["base"]), ("--method", method, cfg["method"])):
            if given is not None and given != recorded:
                raise ProtegeError(f"{flag} {given!r} differs from the run's {recorded!r}; --resume continues the "
                                   f"run as it was started (leave {flag} out)")
        if config or set_ or dataset or time_budget:
            raise ProtegeError("--resume continues the run with its recorded recipe, dataset and budget; "
                               "drop --config/--set/--dataset/--time-budget")
        run_id = resume(store, task, s.ensure_home(), resume_id, console=err)
    else:
        if not base or not method:
            raise ProtegeError("give --base and --method (or --resume RUN_ID)")
        from ..datasets.registry import get_dataset
        from ..prices import load_prices
        from ..train.api import train
        from ..train.recipe import load_recipe

        recipe = load_recipe(method, config, set_)
        ds = get_dataset(store, dataset or task.name)
        run_id = train(store, task, ds, s.ensure_home(), base, method, recipe, time_budget_min=time_budget,
                       console=err, prices=load_prices(s.prices_path))
    import os

    if int(os.environ.get("RANK", "0")):
        return  # a torchrun worker other than rank 0: rank 0 reports
    from ..runs.registry import get_run

    run = get_run(store, run_id)
    m = run["metrics"]
    console.print(f"run [bold]{run_id}[/] done ({m['stop_reason']}): best validation {m.get('metric', 'score')} "
                  f"{fmt(m.get('best_val_score'), digits=4)} at step {m['best_step']}, {m['wall_s']:.0f} s")
    console.print(f"  model: {run['checkpoint_path']}")
    console.print(f"  bench it: protege bench {task_file} -c run:{run_id} -c knn:minilm")


def curve_cmd(
    ctx: typer.Context,
    task_file: Path = typer.Argument(..., help="The task's YAML file."),
    base: str = typer.Option(..., "--base", help="Base model: minilm, smollm2-135m, a Hugging Face id or a local path."),
    method: str = typer.Option(..., "--method", help="classifier | lora | full"),
    fractions: str = typer.Option("0.1,0.25,0.5,1.0", "--fractions", help="Shares of the train split, nested."),
    config: Optional[Path] = typer.Option(None, "--config", help="Recipe YAML (see recipes/)."),
    set_: list[str] = typer.Option([], "--set", help="Override a recipe key (repeatable)."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, max=MAX_ROWS,
                                        help="Score on a fixed random sample of N test rows."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="TASK@VERSION (default: the task's newest)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
):
    """Learning curve: train on nested subsets of the train split and score each on the benchmark."""
    from ..datasets.registry import get_dataset
    from ..tasks.spec import load_task
    from ..train.curve import learning_curve, parse_fractions
    from ..train.recipe import load_recipe

    task = load_task(task_file)
    recipe = load_recipe(method, config, set_)
    points = parse_fractions(fractions)
    store = open_store(ctx)
    ds = get_dataset(store, dataset or task.name)

    def show(p):
        err.print(f"  {p['fraction']:.0%} of train ({p['train_rows']:,} rows): {p['metric']} {p['value']:.4f} "
                  f"[{p['ci95'][0]:.4f}, {p['ci95'][1]:.4f}]  run {p['run_id']}")

    curve = learning_curve(store, task, ds, settings(ctx).ensure_home(), base, method, recipe, points, limit=limit,
                           console=err, on_point=None if as_json else show)
    if as_json:
        print_json(curve)
        return
    t = Table(title=f"learning curve {curve['id']} ({method} on {base})")
    for col in ("train share", "train rows", f"test {curve['metric']} (95% CI)", "train s", "run"):
        t.add_column(col)
    for p in curve["points"]:
        t.add_row(f"{p['fraction']:.0%}", f"{p['train_rows']:,}", f"{p['value']:.4f} [{p['ci95'][0]:.4f}, "
                  f"{p['ci95'][1]:.4f}]", f"{p['train_wall_s']:.0f}", p["run_id"])
    console.print(t)


@runs_app.command("list")
def runs_list(
    ctx: typer.Context,
    task: Optional[str] = typer.Option(None, "--task"),
    kind: Optional[str] = typer.Option(None, "--kind", help="train | bench | curve | rebase"),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
):
    """Runs, newest first."""
    from ..runs.registry import list_runs

    rows = list_runs(open_store(ctx), task=task, kind=kind)
    if as_json:
        print_json(rows)
        return
    t = Table()
    for col in ("id", "kind", "task", "status", "model / candidate", "dataset", "created"):
        t.add_column(col, overflow="fold")
    for r in rows:
        t.add_row(r["id"], r["kind"], r["task"] or "", r["status"], r["base_model"] or "", r["dataset_id"] or "",
                  str(r["created_at"])[:19])
    console.print(t)


@runs_app.command("show")
def runs_show(
    ctx: typer.Context,
    run_id: str = typer.Argument(..., help="Run id or a unique prefix."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
):
    """One run: its full config (recipe, base, dataset hash, seed, versions, hardware) and metrics."""
    from ..runs.registry import get_run

    run = get_run(open_store(ctx), run_id, kind=None)
    if as_json:
        print_json(run)
        return
    for key in ("id", "kind", "task", "status", "base_model", "dataset_id", "checkpoint_path", "outputs_path",
                "error", "created_at", "finished_at"):
        console.print(f"[bold]{key}[/]: {fmt(run[key]) if run[key] is None else run[key]}")
    import json

    console.print("[bold]config[/]:")
    console.print_json(json.dumps(run["config"], default=str))
    console.print("[bold]metrics[/]:")
    console.print_json(json.dumps(run["metrics"], default=str))
