"""The dashboard's operating pages: the decision (live `protege decide`), deployments with
their health over time, and the review queue, where a person settles the rows on which the
specialist and the frontier disagree; the answer is stored as the trace's feedback (what
`protege traces feedback` writes), which `dataset build` (with `references: feedback`) and
`protege retrain` take as ground truth."""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime, timezone
from itertools import islice
from pathlib import Path

from ..datasets.build import example_from_trace
from ..datasets.registry import list_datasets
from ..decide import svg
from ..decide.analysis import Inputs, decide
from ..decide.evidence import bench_outputs, decision_benches
from ..decide.report import html_body
from ..deploy.monitor import health
from ..deploy.registry import current, list_deployments
from ..errors import ProtegeError
from ..tasks.metrics import LabelMap
from ..tasks.spec import Task, load_task
from ..traces.store import Store
from .pages import norm
from .web import BadRequest, Request, Response, Templates, query_string, redirect

HEALTH_LIMIT = 200_000
SHADOWS_READ = 5_000


class Ops:
    def __init__(self, store: Store, templates: Templates, prices, home: Path, tasks: list[Task]):
        self.store, self.t, self.prices, self.home = store, templates, prices, home
        self.given = {t.name: t for t in tasks}

    def render(self, name: str, req: Request, **context) -> Response:
        return self.t.render(name, nav=req.path.split("/")[1], **context)

    def task(self, name: str) -> Task:
        """The task's spec: a --task file given to `protege ui`, else the file its newest
        dataset was built from."""
        if name in self.given:
            return self.given[name]
        made = list_datasets(self.store, name)
        if not made:
            raise ProtegeError(f"task {name!r} has no dataset in this store; `protege dataset build TASK_FILE` makes one")
        path = made[0].manifest.get("task_file")
        if not path or not Path(path).exists():
            raise ProtegeError(f"task {name}: the task file its newest dataset {made[0].id} was built from "
                               f"({path or 'not recorded'}) is not here; start `protege ui --task TASK_FILE`")
        return load_task(path)

    def task_names(self) -> list[str]:
        return sorted({ds.task for ds in list_datasets(self.store)} | set(self.given))

    # -- the decision --------------------------------------------------------------------

    def decision(self, req: Request) -> Response:
        name = req.params["task"]
        inputs = Inputs(monthly_requests=req.float_arg("monthly_requests", 1),
                        value_per_success=req.float_arg("value_per_success", 0),
                        tolerance=req.float_arg("tolerance", 0, 1) if req.arg("tolerance") else 0.02,
                        **({"hardware_usd_per_hour": req.float_arg("hardware_usd_per_hour", 0)}
                           if req.arg("hardware_usd_per_hour") else {}))
        try:
            d = decide(self.store, self.task(name), inputs, dataset=req.arg("dataset"), prices=self.prices, home=self.home)
        except ProtegeError as exc:
            return self.render("decide.html", req, task=name, body=None, why=str(exc), inputs=inputs, tasks=self.task_names())
        return self.render("decide.html", req, task=name, body=html_body(d), why=None, inputs=inputs,
                           tasks=self.task_names())

    def decisions(self, req: Request) -> Response:
        names = self.task_names()
        if len(names) == 1:
            return redirect(f"/decide/{names[0]}")
        return self.render("decide.html", req, task=None, body=None, why=None if names else
                           "no task has a dataset yet: `protege dataset build TASK_FILE`", inputs=Inputs(), tasks=names)

    # -- deployments ---------------------------------------------------------------------

    def deployments(self, req: Request) -> Response:
        rows = list_deployments(self.store, limit=500)
        tasks = sorted({d["task"] for d in rows})
        return self.render("deployments.html", req, rows=rows, active={t: current(self.store, t) for t in tasks})

    def deployment(self, req: Request) -> Response:
        name = req.params["task"]
        history = list_deployments(self.store, name, limit=None)
        if not history:
            raise BadRequest(f"task {name} has never been deployed: `protege deploy TASK_FILE run:ID`")
        active = current(self.store, name)
        # the traces since the first deployment, read once for the charts and the active one's figures
        # (read again for those only where the limit cut the first read short of the present)
        rows = list(islice(self.store.iter_traces(task=name, after=history[-1]["id"]), HEALTH_LIMIT))
        h = health(self.store, name, self.prices, limit=HEALTH_LIMIT,
                   traces=rows if len(rows) < HEALTH_LIMIT else None) if active else None
        return self.render("deployment.html", req, task=name, history=history, active=active, h=h,
                           charts=self.over_time(rows), limit=HEALTH_LIMIT)

    @staticmethod
    def over_time(traces: list[dict]) -> list[str]:
        """Fallback rate, shadow agreement and the specialist's mean confidence per hour (per
        day over a span of more than three days) over `traces` (a task's, oldest first)."""
        served, shadows = [], []
        for t in traces:
            if t["source"] == "serve":
                served.append(t)
            elif t["source"] == "shadow":
                shadows.append(t)
        if not served:
            return [svg.lines("Served traffic over time", [], "hours", "share")]
        t0 = served[0]["created_at"]
        span_s = (served[-1]["created_at"] - t0).total_seconds()
        # about 30 buckets; the axis in seconds, minutes, hours or days, as the span asks
        width = max(1.0, span_s / 30)
        unit, per = next((u, p) for u, p in (("days", 86400.0), ("hours", 3600.0), ("minutes", 60.0), ("seconds", 1.0))
                         if span_s >= 3 * p or p == 1.0)

        def bucket(row) -> float:
            return round(int((row["created_at"] - t0).total_seconds() / width) * width / per, 3)

        fb, conf, agree = defaultdict(lambda: [0, 0]), defaultdict(list), defaultdict(lambda: [0, 0])
        for t in served:
            meta = t.get("metadata") or {}
            b = bucket(t)
            fb[b][0] += meta.get("answered_by") == "fallback"
            fb[b][1] += 1
            if meta.get("confidence") is not None:
                conf[b].append(meta["confidence"])
        for t in shadows:
            meta = t.get("metadata") or {}
            if meta.get("agrees") is not None:
                agree[bucket(t)][0] += bool(meta["agrees"])
                agree[bucket(t)][1] += 1
        series = [{"label": "fallback rate", "color": "#d62728", "points": [(b, k / n) for b, (k, n) in sorted(fb.items())]},
                  {"label": "mean confidence", "color": "#1f77b4", "dash": "4 3",
                   "points": [(b, sum(v) / len(v)) for b, v in sorted(conf.items())]}]
        if agree:
            series.append({"label": "shadow agreement", "color": "#2ca02c",
                           "points": [(b, k / n) for b, (k, n) in sorted(agree.items())]})
        return [svg.lines(f"Served traffic since {t0:%Y-%m-%d %H:%M} UTC", series,
                          f"{unit} since the first deployment", "share", ypct=True, ylim=(0.0, 1.0))]

    # -- the review queue ----------------------------------------------------------------

    def queue(self, task: str) -> list[dict]:
        """The unreviewed disagreements of a task: shadow pairs first (live traffic), then the
        decision's bench rows where the specialist and the reference answered differently."""
        items: list[dict] = []
        for s in self.store.list_traces(limit=SHADOWS_READ, task=task, source="shadow"):
            meta = s.get("metadata") or {}
            if meta.get("agrees") is False and meta.get("shadow_of"):
                items.append({"trace": meta["shadow_of"], "also": [s["id"]], "origin": "shadow",
                              "specialist": meta.get("specialist_answer"), "frontier": s.get("output_text"),
                              "who": f"shadow of {meta.get('specialist') or 'the specialist'}"})
        made = list_datasets(self.store, task)
        if made:
            runs = decision_benches(self.store, task, made[0].id)
            ref = next((r for r in runs if r["config"].get("candidate") == r["config"].get("reference")), None)
            spec = next((r for r in runs if str(r["config"].get("candidate", "")).startswith("run:")), None)
            if ref is not None and spec is not None:
                theirs, ours = bench_outputs(ref), bench_outputs(spec)
                for rid, row in ours.items():
                    other = theirs.get(rid)
                    if other is not None and norm(row["output"]) != norm(other["output"]):
                        items.append({"trace": rid, "also": [], "origin": f"bench:{spec['id']}",
                                      "specialist": row["output"], "frontier": other["output"],
                                      "who": f"{spec['config']['candidate']} against {ref['config']['candidate']} "
                                             f"on {made[0].id}"})
        feedback = self.store.feedback_of(sorted({i["trace"] for i in items}))
        out, seen = [], set()
        for i in items:
            fb = feedback.get(i["trace"], "missing")
            if fb == "missing" or i["trace"] in seen or (isinstance(fb, dict) and "correction" in fb):
                continue  # a bench row that is no stored trace, twice in the queue, or reviewed already
            seen.add(i["trace"])
            out.append(i)
        return out

    def review(self, req: Request) -> Response:
        names = self.task_names()
        task = req.arg("task") or (names[0] if len(names) == 1 else None)
        if task is None:
            return self.render("review.html", req, task=None, tasks=names, item=None, left=0, skip=0, done=req.arg("done"),
                               input=None)
        skip = req.int_arg("skip", 0, 0, 1_000_000)
        items = self.queue(task)
        item = items[skip] if skip < len(items) else None
        text = None
        if item is not None:
            ex = example_from_trace(self.store.get_trace(item["trace"]))
            text = ex["input"] if ex else None
        return self.render("review.html", req, task=task, tasks=names, item=item, left=len(items), skip=skip,
                           done=req.arg("done"), input=text)

    def answer(self, req: Request) -> Response:
        task, trace = req.form.get("task", ""), req.form.get("trace", "")
        answer = (req.form.get("correction") or "").strip() or (req.form.get("answer") or "").strip()
        if not task or not trace:
            raise BadRequest("a review names its task and trace (the form's hidden fields)")
        if not answer:
            raise BadRequest("pick one of the two answers, or type the right one")
        try:
            spec = self.task(task)
        except ProtegeError:
            spec = None  # no task file at hand: the answer is stored as typed
        if spec is not None and spec.kind == "classification":
            label = LabelMap(spec.labels)(answer)
            if label is None:
                raise BadRequest(f"{answer!r} is not one of task {task}'s {len(spec.labels)} labels")
            answer = label
        feedback = {"correction": answer, "reviewed_by": "protege ui", "origin": req.form.get("origin") or None,
                    "reviewed_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        self.store.set_feedback(trace, feedback)
        for other in filter(None, (req.form.get("also") or "").split(",")):
            self.store.set_feedback(other, feedback)
        return redirect("/review" + query_string(task=task, done=trace))

