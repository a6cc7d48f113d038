"""What `protege serve` serves: a trained specialist, found by run id or model folder."""

from __future__ import annotations

import orjson

from ..errors import ProtegeError


def locate_specialist(target: str, store, task_file: str | None = None):
    """(run record or None, model folder, its protege.json, the task) for `run:ID`, a run id,
    or a model folder made by protege train (or exported by protege export)."""
    from pathlib import Path

    from ..models.trained import finished_run_model
    from ..tasks.spec import load_task

    run = None
    folder = Path(target)
    if (folder / "protege.json").exists():
        meta = orjson.loads((folder / "protege.json").read_bytes())
    else:
        run, folder, meta = finished_run_model(store, target[4:] if target.startswith("run:") else target)
    if task_file is None and run is None and meta.get("run_id"):
        try:  # an export names the run it came from: the run's task file is the default
            run = finished_run_model(store, meta["run_id"])[0]
        except ProtegeError:
            run = None
    if task_file is None and run is not None:
        task_file = run["config"].get("task_file") or None
        if not task_file and run.get("dataset_id"):
            from ..datasets.registry import get_dataset

            task_file = get_dataset(store, run["dataset_id"]).manifest.get("task_file")
    if not task_file or not Path(task_file).exists():
        raise ProtegeError(f"{target}: cannot find the task file it was trained for ({task_file or 'not recorded'}); "
                           "pass --task TASK_FILE")
    task = load_task(task_file)
    if meta.get("task") and meta["task"] != task.name:
        raise ProtegeError(f"{target} was trained for task {meta['task']!r}, not {task.name!r}")
    return run, folder, meta, task


def load_specialist(target: str, store, home, task_file: str | None = None, options: dict | None = None):
    """(name, predict function, task, run id) for `run:ID`, a run id, or a model folder made by
    protege train or protege export. `options`: the candidate's (runtime, quantize, ...)."""
    from pathlib import Path

    from ..models.base import Context, parse_spec
    from ..models.trained import specialist

    run, folder, meta, task = locate_specialist(target, store, task_file)
    ctx = Context(task=task, dataset=None, home=Path(home), store=store)
    run_id = meta.get("run_id") or (run or {}).get("id")
    cand = specialist(folder, meta, run_id, {k: v for k, v in (options or {}).items() if v is not None}, ctx)
    tags = [v for k, v in parse_spec(cand.spec)[2].items() if k in ("runtime", "quantize") and v != "none"]
    name = f"protege-{task.name}-{(run_id or folder.name)[:13]}" + "".join(f"-{t}" for t in tags)
    return name, cand.predict, task, run_id
