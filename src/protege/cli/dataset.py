"""`protege dataset ...`: build frozen datasets from traces, list, show and export them."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from .common import console, err, fmt, open_store, print_json, settings

dataset_app = typer.Typer(help="Build, inspect and export frozen datasets.", no_args_is_help=True)


@dataset_app.command("build")
def dataset_build(
    ctx: typer.Context,
    task_file: Path = typer.Argument(..., help="The task's YAML file."),
    test_from: Optional[Path] = typer.Option(None, "--test-from",
                                             help="A labelled test file (OpenAI chat JSONL, .gz ok) used as the test split."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable report."),
):
    """Select, clean, dedupe, redact and split the task's traces into a frozen dataset."""
    from ..datasets.build import build_dataset
    from ..tasks.spec import load_task

    task = load_task(task_file)
    s = settings(ctx)

    def show(step):
        if not as_json:
            removed = f"  -{step.removed:,}" if step.removed else ""
            note = f"  [dim]{step.note}[/]" if step.note else ""
            err.print(f"  {step.name:<26} {step.kept:>9,}{removed}{note}")

    if not as_json:
        err.print(f"building dataset for task [bold]{task.name}[/] ({task.kind})")
    result = build_dataset(open_store(ctx), task, s.ensure_home(), test_from=test_from, on_step=show)
    if as_json:
        print_json(result.as_dict())
        return
    sizes = ", ".join(f"{k} {v:,}" for k, v in result.sizes.items())
    state = "new version" if result.created else "unchanged: same rows as before, no new version"
    console.print(f"dataset [bold]{result.id}[/] ({state}): {sizes}")
    if result.tokens:
        t = result.tokens
        console.print(f"  prompt tokens per request ({t['tokenizer']} tokenizer): {t['original_prompt_tokens']:.0f} "
                      f"sent to the frontier model, {t['specialist_prompt_tokens']:.0f} for the specialist "
                      f"(saves {t['saved_per_request']:.0f}, {t['saved_fraction']:.0%})")
    console.print(f"  files: {result.path}")


@dataset_app.command("list")
def dataset_list(
    ctx: typer.Context,
    task: Optional[str] = typer.Option(None, "--task"),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
):
    """Every dataset version, newest first per task."""
    from ..datasets.registry import list_datasets

    rows = list_datasets(open_store(ctx), task)
    if as_json:
        print_json([r.as_dict() for r in rows])
        return
    t = Table()
    for col in ("id", "created", "train", "validation", "test", "hash"):
        t.add_column(col)
    for r in rows:
        sz = r.split_sizes
        t.add_row(r.id, str(r.created_at)[:19], fmt(sz.get("train")), fmt(sz.get("validation")),
                  fmt(sz.get("test")), r.content_hash[:12])
    console.print(t)


@dataset_app.command("show")
def dataset_show(
    ctx: typer.Context,
    ref: str = typer.Argument(..., help="TASK@VERSION, or a task name for its newest version."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
):
    """How a dataset was built: each step's counts, PII redactions, leakage check, sizes."""
    from ..datasets.registry import get_dataset

    ds = get_dataset(open_store(ctx), ref)
    m = ds.manifest
    if as_json:
        print_json(m)
        return
    console.print(f"[bold]{m['id']}[/]  task {m['task']} ({m['kind']})  hash {m['content_hash'][:16]}  "
                  f"created {m['created_at'][:19]}")
    console.print("  " + ", ".join(f"{k} {v:,}" for k, v in m["sizes"].items()))
    for step in m["steps"]:
        removed = f"  -{step['removed']:,}" if step["removed"] else ""
        console.print(f"  {step['name']:<26} {step['kept']:>9,}{removed}  {step['note']}")
    console.print(f"  files: {ds.path}")


@dataset_app.command("export")
def dataset_export(
    ctx: typer.Context,
    ref: str = typer.Argument(..., help="TASK@VERSION, or a task name for its newest version."),
    out: Path = typer.Argument(..., help="Output folder."),
    task_file: Path = typer.Option(..., "--task-file", help="The task's YAML (for the specialist prompt)."),
    fmt_: str = typer.Option("openai", "--format", help="openai (fine-tuning JSONL per split) | hf (datasets folder)"),
):
    """Export a dataset for other tools: OpenAI fine-tuning JSONL or a Hugging Face datasets folder."""
    from ..datasets.registry import export_dataset, get_dataset
    from ..tasks.spec import load_task

    ds = get_dataset(open_store(ctx), ref)
    sizes = export_dataset(ds, load_task(task_file), out, fmt_)
    console.print(f"exported {ds.id} to {out} ({', '.join(f'{k} {v:,}' for k, v in sizes.items())})")
