"""`protege ui`: the web dashboard over the store."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ..errors import ProtegeError
from .common import err, open_store, settings


def ui_cmd(
    ctx: typer.Context,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (127.0.0.1: this machine only)."),
    port: int = typer.Option(8700, "--port", min=0, max=65535, help="Port to listen on."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="PROTEGE_UI_API_KEY",
                                          help="Require this token (a sign-in page, or Authorization: Bearer KEY)."),
    task_files: Optional[List[Path]] = typer.Option(None, "--task", help="A task file (repeatable) for the decision "
                                                    "and the review; default: the file each task's newest dataset was "
                                                    "built from."),
):
    """A web dashboard over the store: traces, datasets, runs, the decision, deployments and a review queue."""
    from ..asgi import run_asgi
    from ..prices import cached_prices
    from ..tasks.spec import load_task
    from ..ui.app import create_app

    s = settings(ctx)
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        raise ProtegeError(f"--host {host} opens the dashboard (and the store's traces) to the network: "
                           "give --api-key TOKEN as well")
    store = open_store(ctx)
    app = create_app(store, s.ensure_home(), prices=cached_prices(str(s.prices_path) if s.prices_path else None),
                     tasks=[load_task(p) for p in task_files or []], api_key=api_key)
    err.print(f"protege ui on http://{host}:{port}/ over {store!r}" + (" (token required)" if api_key else ""))
    run_asgi(app, host, port)
