"""The dashboard's browsing pages: overview, traces, datasets, runs and benches. Each reads
the store through the stage that owns the data (traces/store, datasets/registry,
runs/registry, decide/evidence) and renders a template."""

from __future__ import annotations

import json
import time
from collections import defaultdict
from datetime import datetime, timedelta, timezone

from ..datasets.build import example_from_trace
from ..datasets.registry import get_dataset, list_datasets
from ..decide import svg
from ..decide.evidence import bench_outputs, decision_benches
from ..deploy.registry import current, list_deployments
from ..errors import NotFoundError
from ..runs.registry import get_run, list_runs
from ..traces.store import Store, parse_cursor
from .web import BadRequest, Request, Response, Templates, query_string

PAGE = 50
COUNT_CAP = 10_000
DAILY_TTL_S = 60.0
SEARCH_SCAN = 100_000
"""Traces a search reads for one page at most (the next link searches on)."""
FILTERS = ("task", "model", "source", "status")


class Pages:
    def __init__(self, store: Store, templates: Templates, prices):
        self.store, self.t, self.prices = store, templates, prices
        self.daily: dict[int, tuple[float, datetime, dict]] = {}
        """days -> (when read, its first day, traces and spend per day): a large store's
        per-day sums read every trace of the period, so the overview keeps them a minute."""

    def render(self, name: str, req: Request, **context) -> Response:
        return self.t.render(name, nav=req.path.split("/")[1] or "overview", **context)

    # -- overview ------------------------------------------------------------------------

    def overview(self, req: Request) -> Response:
        days = req.int_arg("days", 30, 1, 366)
        cached = self.daily.get(days)
        if cached is None or time.monotonic() - cached[0] > DAILY_TTL_S:
            cached = self.daily[days] = (time.monotonic(), *self.per_day(days))
        read_at, since, per_day = cached[0], cached[1], cached[2]
        series = [(i - days + 1, per_day[(since + timedelta(days=i)).strftime("%Y-%m-%d")]) for i in range(days)]
        traces_chart = svg.lines(f"Traces per day, last {days} days (UTC)", [
            {"label": "traces", "color": "#1f77b4", "points": [(x, d["traces"]) for x, d in series]},
            {"label": "errors", "color": "#d62728", "points": [(x, d["errors"]) for x, d in series], "dash": "4 3"}],
            "days before today", "traces")
        spend_chart = svg.lines(f"Spend per day at the price table, USD, last {days} days", [
            {"label": "priced spend", "color": "#2ca02c", "points": [(x, d["spend"]) for x, d in series]}],
            "days before today", "USD")
        tasks = []
        counts = self.store.stats_by_task()
        datasets = defaultdict(list)
        for ds in list_datasets(self.store):
            datasets[ds.task].append(ds)
        for name in sorted(set(counts) | set(datasets)):
            d = current(self.store, name)
            tasks.append({"name": name, "traces": counts.get(name, 0), "datasets": len(datasets.get(name, [])),
                          "newest": datasets[name][0].id if datasets.get(name) else None, "deployment": d})
        total = {k: sum(d[k] for _, d in series) for k in ("traces", "errors", "spend", "unpriced")}
        return self.render("overview.html", req, tasks=tasks, days=days, total=total, traces_chart=traces_chart,
                           spend_chart=spend_chart, untagged=counts.get(None, 0),
                           prices_path=getattr(self.prices, "path", None),
                           read_at=datetime.now(timezone.utc) - timedelta(seconds=time.monotonic() - read_at))

    def per_day(self, days: int) -> tuple[datetime, dict]:
        today = datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
        since = today - timedelta(days=days - 1)
        per_day: dict = defaultdict(lambda: {"traces": 0, "errors": 0, "spend": 0.0, "unpriced": 0})
        for r in self.store.daily(since):
            d = per_day[r["day"]]
            d["traces"] += r["traces"]
            d["errors"] += r["errors"] or 0
            priced = self.prices.lookup(r["model"]) if self.prices is not None else None
            usage = r["traces"] - (r["no_usage"] or 0)
            if priced is not None and usage:
                d["spend"] += priced.cost(r["prompt_tokens"] or 0, r["completion_tokens"] or 0) or 0.0
                d["unpriced"] += r["no_usage"] or 0
            else:
                d["unpriced"] += r["traces"]
        return since, per_day

    # -- traces --------------------------------------------------------------------------

    def traces(self, req: Request) -> Response:
        filters = {k: req.arg(k) for k in FILTERS}
        since, until = when(req.arg("since"), "since"), when(req.arg("until"), "until", end=True)
        search = req.arg("q")
        rows, next_cursor = self.store.page_traces(limit=PAGE, cursor=req.arg("cursor"), since=since, until=until,
                                                   search=search, scan=SEARCH_SCAN, **filters)
        short = bool(search and next_cursor and len(rows) < PAGE)  # the window searched held too few matches
        # counted off an index (all traces, or one task's) unless asked: other filters, a time
        # range or a search would scan a large store up to the cap
        cheap = not (search or since or until) and not any(filters[k] for k in FILTERS if k != "task")
        counted = self.store.count_upto(COUNT_CAP + 1, since=since, until=until, search=search, **filters) \
            if req.arg("count") == "1" or cheap else None
        keep = {**filters, "since": req.arg("since"), "until": req.arg("until"), "q": search}
        suggestions = {k: self.store.recent_values(k) for k in FILTERS}
        items = []
        for r in rows:
            ex = example_from_trace(r)
            items.append({**r, "input": ex["input"] if ex else None})
        return self.render("traces.html", req, items=items, keep=keep, suggestions=suggestions, counted=counted,
                           cap=COUNT_CAP, next=(query_string(**keep, cursor=next_cursor) if next_cursor else None),
                           first=query_string(**keep) if req.arg("cursor") else None,
                           count_link=query_string(**keep, count="1"), short=short, scan=SEARCH_SCAN,
                           reached=parse_cursor(next_cursor)[0] if short else None)

    def trace(self, req: Request) -> Response:
        row = self.store.get_trace(req.params["id"])
        ex = example_from_trace(row)
        shadow = None
        meta = row.get("metadata") or {}
        if row["source"] == "shadow" and meta.get("shadow_of"):
            shadow = meta["shadow_of"]
        return self.render("trace.html", req, r=row, input=ex["input"] if ex else None, shadow_of=shadow,
                           request_json=pretty(row["request"]), response_json=pretty(row.get("response")),
                           metadata_json=pretty(meta), feedback_json=pretty(row.get("feedback")) if row.get("feedback") else None)

    # -- datasets ------------------------------------------------------------------------

    def datasets(self, req: Request) -> Response:
        task = req.arg("task")
        rows = list_datasets(self.store, task)
        return self.render("datasets.html", req, rows=rows, task=task)

    def dataset(self, req: Request) -> Response:
        ds = get_dataset(self.store, req.params["id"])
        split = req.arg("split", "train")
        if split not in ds.split_sizes:
            raise BadRequest(f"dataset {ds.id} has no split {split!r}: it has {', '.join(ds.split_sizes)}")
        offset = req.int_arg("offset", 0, 0, 10_000_000)
        rows = ds.split(split)
        m = ds.manifest
        benches = decision_benches(self.store, ds.task, ds.id)
        return self.render("dataset.html", req, ds=ds, m=m, split=split, offset=offset, page=20,
                           sample=rows[offset:offset + 20], total=len(rows), benches=benches,
                           flywheel=pretty(m.get("flywheel")) if m.get("flywheel") else None)

    # -- runs ----------------------------------------------------------------------------

    def runs(self, req: Request) -> Response:
        kind, task = req.arg("kind"), req.arg("task")
        if kind not in (None, "train", "bench", "curve", "rebase"):
            raise BadRequest(f"?kind= is train, bench, curve or rebase, not {kind!r}")
        rows = list_runs(self.store, task=task, kind=kind, limit=500)
        return self.render("runs.html", req, rows=rows, kind=kind, task=task)

    def run(self, req: Request) -> Response:
        r = get_run(self.store, req.params["id"], kind=None)
        m = r.get("metrics") or {}
        charts = []
        history = [h for h in m.get("history") or [] if isinstance(h, dict)]
        if history:
            loss = [(h["step"], h["loss"]) for h in history if h.get("loss") is not None]
            val = [(h["step"], h["val_score"]) for h in history if h.get("val_score") is not None]
            if loss:
                charts.append(svg.lines("Training loss per step", [{"label": "loss", "color": "#1f77b4",
                                                                     "points": loss}], "step", "loss"))
            if val:
                charts.append(svg.lines("Validation score per step", [{"label": "validation", "color": "#2ca02c",
                                                                        "points": val}], "step", "score", ypct=True))
        deployments = [d for d in list_deployments(self.store, r["task"], limit=None) if d["run_id"] == r["id"]] \
            if r["task"] else []
        return self.render("run.html", req, r=r, charts=charts, history=history, deployments=deployments,
                           config_json=pretty(r["config"]),
                           metrics_json=pretty({k: v for k, v in m.items() if k not in ("history", "outputs")}))

    def bench(self, req: Request) -> Response:
        """The benches of one dataset side by side, and their per-row outputs."""
        ds = get_dataset(self.store, req.params["dataset"])
        runs = decision_benches(self.store, ds.task, ds.id)
        if not runs:
            raise NotFoundError(f"no untagged bench runs on {ds.id}: `protege bench TASK_FILE --dataset {ds.id} ...`")
        cands = []
        for r in runs:
            m = r["metrics"] or {}
            cands.append({"run": r, "spec": r["config"].get("candidate"), "metrics": m.get("metrics") or {},
                          "paired": m.get("paired") or {}, "latency": m.get("latency_ms") or {},
                          "cost": m.get("cost_per_1m_usd"), "reference": r["config"].get("candidate") ==
                          r["config"].get("reference")})
        metric = next(iter(cands[0]["metrics"]), None)
        outputs = {c["spec"]: bench_outputs(c["run"]) for c in cands}
        ids = list(next(iter(outputs.values())))
        only = req.arg("show", "all")
        if only not in ("all", "disagree"):
            raise BadRequest(f"?show= is all or disagree, not {only!r}")
        table = []
        for rid in ids:
            answers = [outputs[c["spec"]].get(rid, {}).get("output") for c in cands]
            row = outputs[cands[0]["spec"]][rid]
            differ = len({norm(a) for a in answers}) > 1
            if only == "disagree" and not differ:
                continue
            table.append({"id": rid, "input": row["input"], "reference": row["reference"], "answers": answers,
                          "differ": differ})
        offset = req.int_arg("offset", 0, 0, 10_000_000)
        return self.render("bench.html", req, ds=ds, cands=cands, metric=metric, rows=table[offset:offset + PAGE],
                           total=len(table), all_rows=len(ids), offset=offset, page=PAGE, show=only)


def norm(answer) -> str:
    return str(answer or "").strip().lower()


def pretty(value) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, default=str)


def when(text: str | None, name: str, end: bool = False) -> datetime | None:
    """A time filter: YYYY-MM-DD (a whole UTC day; `until` includes it) or YYYY-MM-DDTHH:MM."""
    if text is None:
        return None
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise BadRequest(f"?{name}= takes a date (2026-12-01) or a time (2026-12-01T14:30), got {text!r}") from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    if end and len(text) == 10:
        value += timedelta(days=1)
    return value
