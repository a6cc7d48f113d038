"""What every benchmark records beside its figures: the machine, the software, the date."""

from __future__ import annotations

import json
import os
import platform
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from rich.table import Table

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(packages: list[str], extra_versions: dict[str, str | None] | None = None) -> dict:
    """Call it before the benchmark starts: the load average then shows what else was running."""
    versions = {}
    for name in packages:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu_cores": os.cpu_count(),
        "cpu_model": cpu_model(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "packages": {**versions, **(extra_versions or {})},
    }


def write_result(name: str, data: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def table(title: str, columns: list[str], rows: list[list]) -> Table:
    t = Table(title=title, title_justify="left")
    for i, col in enumerate(columns):
        t.add_column(col, justify="left" if i == 0 else "right")
    for row in rows:
        t.add_row(*(fmt(v) for v in row))
    return t


def fmt(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "[green]met[/]" if value else "[red]missed[/]"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:,.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def prepare(example: Path, task_name: str, home: str | None, prefix: str):
    """A fresh home with the example's trace files imported and its dataset built, as its
    README does (`test.jsonl.gz`, where there is one, is the benchmark file):
    (store, task, dataset, home)."""
    import tempfile

    from protege.datasets.build import build_dataset
    from protege.datasets.registry import get_dataset
    from protege.tasks.spec import load_task
    from protege.traces.importers import ImportOptions, import_file
    from protege.traces.store import Store

    home_path = Path(home or tempfile.mkdtemp(prefix=prefix))
    store = Store(f"sqlite:///{home_path / 'protege.db'}")
    test_file = example / "test.jsonl.gz"
    for path in sorted(example.glob("*.jsonl.gz")):
        if path != test_file:
            import_file(store, path, ImportOptions(task=task_name))
    task = load_task(example / "task.yaml")
    built = build_dataset(store, task, home_path, test_from=test_file if test_file.exists() else None)
    ds = get_dataset(store, built.id)
    return store, task, ds, home_path
