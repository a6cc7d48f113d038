"""The dashboard app: its routes, over one store."""

from __future__ import annotations

from pathlib import Path

from ..decide.report import STYLE
from ..tasks.spec import Task
from ..traces.store import Store
from .ops import Ops
from .pages import Pages
from .web import App, Templates


def create_app(store: Store, home: Path, *, prices=None, tasks: list[Task] | None = None,
               api_key: str | None = None) -> App:
    """The ASGI app of `protege ui`. `tasks`: task specs to use for the decision and the review
    (a task not given is read from the file its newest dataset was built from)."""
    templates = Templates()
    templates.env.globals.update(report_style=STYLE, signed_in=api_key is not None)
    app = App(templates, api_key)
    pages, ops = Pages(store, templates, prices), Ops(store, templates, prices, home, tasks or [])
    for method, pattern, handler in (
        ("GET", "/", pages.overview),
        ("GET", "/traces", pages.traces),
        ("GET", "/traces/{id}", pages.trace),
        ("GET", "/datasets", pages.datasets),
        ("GET", "/datasets/{id}", pages.dataset),
        ("GET", "/runs", pages.runs),
        ("GET", "/runs/{id}", pages.run),
        ("GET", "/bench/{dataset}", pages.bench),
        ("GET", "/decide", ops.decisions),
        ("GET", "/decide/{task}", ops.decision),
        ("GET", "/deployments", ops.deployments),
        ("GET", "/deployments/{task}", ops.deployment),
        ("GET", "/review", ops.review),
        ("POST", "/review", ops.answer),
    ):
        app.route(method, pattern)(handler)
    return app
