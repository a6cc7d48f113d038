"""`protege export`: a trained specialist for the runtime a team picks (ONNX, GGUF, merged, PEFT)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import orjson
import typer
from rich.table import Table

from .common import console, err, open_store, print_json, settings


def export_cmd(
    ctx: typer.Context,
    target: str = typer.Argument(..., help="run:RUN_ID, a run id, or a model folder made by protege train."),
    out: Path = typer.Argument(..., help="The folder to write (new, empty, or an earlier export to replace)."),
    fmt: str = typer.Option(..., "--format", help="onnx (encoder classifiers) | gguf (causal specialists, for "
                            "llama.cpp) | merged (safetensors) | peft (the LoRA adapter)."),
    quantize: Optional[str] = typer.Option(None, "--quantize", help="onnx: none | int8; gguf: f32 (default) | f16 | "
                                           "q8_0 | q4_k_m."),
    task_file: Optional[Path] = typer.Option(None, "--task", help="The task file (default: the one the run recorded)."),
    check_rows: int = typer.Option(64, "--check-rows", min=0, help="Validation rows answered by the source and the "
                                   "export, to count where they differ (0: no check)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
):
    """Export a trained specialist: ONNX for ONNX Runtime, GGUF for llama.cpp, merged safetensors, a PEFT adapter."""
    from ..models.export import check, export
    from ..models.trained import specialist
    from ..serve.specialist import locate_specialist

    s = settings(ctx)
    store = open_store(ctx)
    run, folder, meta, task = locate_specialist(target, store, str(task_file) if task_file else None)
    run_id = meta.get("run_id") or (run or {}).get("id")
    if not as_json:
        err.print(f"protege export: {target} ({meta.get('method')}) as {fmt} → {out} ...")
    path = export(folder, meta, fmt, out, quantize, run_id=run_id)
    done = orjson.loads((path / "protege.json").read_bytes())
    result = {"path": str(path), "format": fmt, "quantize": done["quantize"], "run_id": run_id,
              "files": {p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.is_file()}, "check": None}
    if check_rows and fmt in ("onnx", "gguf") and run is not None and run.get("dataset_id"):
        from ..datasets.registry import get_dataset
        from ..models.base import Context

        ds = get_dataset(store, run["dataset_id"])
        rows = (ds.split("validation") or ds.split("test"))[:check_rows]
        c = Context(task=task, dataset=ds, home=s.ensure_home(), store=store)
        source, exported = specialist(folder, meta, run_id, {}, c), specialist(path, done, run_id, {}, c)
        try:
            result["check"] = check(source, exported, rows)
        finally:
            source.close()
            exported.close()
    if as_json:
        print_json(result)
        return
    t = Table(title=f"{path} ({fmt}, {result['quantize']})")
    t.add_column("file")
    t.add_column("bytes", justify="right")
    for name, size in result["files"].items():
        t.add_row(name, f"{size:,}")
    console.print(t)
    c = result["check"]
    if c is not None:
        gap = "unknown" if c["max_prob_gap"] is None else f"{c['max_prob_gap']:.2g}"
        console.print(f"answers: {c['rows'] - c['differ']}/{c['rows']} validation rows as the source model gives them; "
                      f"largest probability gap {gap}")
        for e in c["examples"]:
            console.print(f"  differs: {e['input'][:60]!r}: source {e['source']!r}, export {e['export']!r}")
