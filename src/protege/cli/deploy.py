"""`protege deploy`, `protege rollback` and `protege deployments`: which run serves a task."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import ProtegeError
from .common import console, err, open_store, print_json, settings

deployments_app = typer.Typer(help="Which trained run serves each task, and its history.", no_args_is_help=True)


def deploy_cmd(
    ctx: typer.Context,
    task_file: Path = typer.Argument(..., help="The task's YAML file."),
    run: str = typer.Argument(..., help="The finished training run to serve: run:RUN_ID or a run id (prefix)."),
    threshold: Optional[float] = typer.Option(None, "--threshold", min=0, max=1,
                                              help="Below this confidence the fallback answers."),
    fallback: Optional[str] = typer.Option(None, "--fallback", help="openai:MODEL@BASE_URL for low-confidence requests."),
    margin: float = typer.Option(0.01, "--margin", min=0, max=1, help="How far below the serving run the paired CI's "
                                 "lower bound may reach (0.01: 1 point)."),
    tolerance: float = typer.Option(0.02, "--tolerance", min=0, max=1, help="The bar: the reference's score less this."),
    bar: Optional[float] = typer.Option(None, "--bar", min=0, max=1, help="State the bar instead (recorded as stated)."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="TASK@VERSION benchmark (default: the task's newest)."),
    force: bool = typer.Option(False, "--force", help="Deploy even if the gate fails (recorded as forced)."),
    alarm_agreement: Optional[float] = typer.Option(None, "--alarm-agreement", min=0, max=1, help="This deployment's "
                                                    "alarm: shadow agreement's CI upper bound under it."),
    alarm_action: Optional[str] = typer.Option(None, "--alarm-action", help="fallback | threshold, on an alarm."),
    alarm_threshold: Optional[float] = typer.Option(None, "--alarm-threshold", min=0, max=1,
                                                    help="The threshold --alarm-action threshold raises to."),
    by: Optional[str] = typer.Option(None, "--by", help="Who deploys (default: user@host)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
):
    """Promote a trained run to serve the task, if the gate passes: not worse than the serving run, and over the bar."""
    from ..datasets.registry import get_dataset
    from ..deploy.gate import gate
    from ..deploy.registry import activate, current, get_deployment
    from ..prices import load_prices
    from ..tasks.spec import load_task

    if (fallback is None) != (threshold is None):
        raise ProtegeError("--fallback and --threshold go together: the fallback answers below the threshold")
    if alarm_action is not None and alarm_action not in ("fallback", "threshold"):
        raise ProtegeError(f"--alarm-action {alarm_action!r}: choose fallback or threshold")
    alarm = {k: v for k, v in (("agreement_floor", alarm_agreement), ("action", alarm_action),
                               ("raise_to", alarm_threshold)) if v is not None}
    if fallback is not None:
        from ..serve.fallback import Fallback

        Fallback(fallback)  # a malformed spec is refused now, not when the server loads it
    task = load_task(task_file)
    store = open_store(ctx)
    s = settings(ctx)
    ds = get_dataset(store, dataset or task.name)
    before = current(store, task.name)
    result = gate(store, task, ds, s.ensure_home(), run[4:] if run.startswith("run:") else run, margin=margin,
                  tolerance=tolerance, prices=load_prices(s.prices_path), threshold=threshold, bar=bar)
    failed = [c for c in result.checks if not c.ok]
    deployed = None
    if not failed or force:
        evidence = result.evidence()
        if failed:
            evidence["forced_past"] = [c.name for c in failed]
        deployed = get_deployment(store, activate(
            store, task=task.name, run_id=result.run_id, threshold=threshold, fallback=fallback,
            options={"alarm": alarm} if alarm else {},
            evidence=evidence, forced=bool(failed), by=by, expect_active=before["id"] if before else None))
    if as_json:
        print_json({"gate": result.evidence(), "deployment": deployed})
    else:
        for c in result.checks:
            console.print(f"{'[green]pass[/]' if c.ok else '[red]FAIL[/]'}  {c.name}: {c.sentence}")
        if deployed:
            console.print(f"deployed [bold]{deployed['id']}[/]: run:{result.run_id} serves task {task.name}"
                          + (f" (forced past: {', '.join(c.name for c in failed)})" if failed else "")
                          + (f", replacing {before['id']} (run:{before['run_id']})" if before else ""))
            console.print(f"  serve it: protege serve --task {task_file}   undo: protege rollback {task_file}")
    if deployed is None:
        raise ProtegeError(f"not deployed: the gate failed ({'; '.join(c.name for c in failed)}); fix the run, or "
                           "pass --force (recorded on the deployment)")


def rollback_cmd(
    ctx: typer.Context,
    task_file: Path = typer.Argument(..., help="The task's YAML file."),
    reason: Optional[str] = typer.Option(None, "--reason", help="Why (recorded on the deployment rolled back)."),
    by: Optional[str] = typer.Option(None, "--by", help="Who rolls back (default: user@host)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
):
    """Serve again what served before the current deployment (servers following the task switch within seconds)."""
    from ..deploy.registry import rollback
    from ..tasks.spec import load_task

    task = load_task(task_file)
    d = rollback(open_store(ctx), task.name, by=by, reason=reason)
    if as_json:
        print_json(d)
        return
    back = d["evidence"]["rollback"]
    console.print(f"rolled back {back['from']}: run:{d['run_id']} serves task {task.name} again "
                  f"(deployment {d['id']}, restoring {back['restores']})")


@deployments_app.command("list")
def deployments_list(
    ctx: typer.Context,
    task: Optional[str] = typer.Option(None, "--task", help="Only this task's deployments."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
):
    """Deployments, newest first: the active one per task, and what it replaced."""
    from ..deploy.registry import list_deployments
    from .tables import abbreviate, print_table

    store = open_store(ctx)
    rows = list_deployments(store, task=task)
    if as_json:
        print_json(rows)
        return
    if not rows:
        err.print("no deployments yet: `protege deploy TASK_FILE run:ID` makes one")
        return
    print_table(console, None, ["deployment", "task", "run", "status", "gate", "by", "when"],
                [[d["id"][:13], d["task"], abbreviate(store, f"run:{d['run_id']}"), d["status"], _gate_word(d),
                  d["created_by"], str(d["created_at"])[:19]] for d in rows])


@deployments_app.command("show")
def deployments_show(
    ctx: typer.Context,
    deployment: str = typer.Argument(..., help="Deployment id (or a unique prefix)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
):
    """One deployment: its run, cascade, who and when, and the evidence it was promoted on."""
    from ..deploy.registry import get_deployment

    d = get_deployment(open_store(ctx), deployment)
    if as_json:
        print_json(d)
        return
    for key in ("id", "task", "run_id", "status", "threshold", "fallback", "forced", "created_by", "created_at",
                "previous_id", "ended_at", "ended_by", "end_reason", "alarm"):
        console.print(f"[bold]{key}[/]: {'—' if d[key] is None else d[key]}")
    for c in d["evidence"].get("checks", []):
        console.print(f"{'pass' if c['ok'] else 'FAIL'}  {c['name']}: {c['sentence']}")
    if "rollback" in d["evidence"]:
        console.print(f"a rollback from {d['evidence']['rollback']['from']}, restoring "
                      f"{d['evidence']['rollback']['restores']}")


@deployments_app.command("reset")
def deployments_reset(
    ctx: typer.Context,
    task_file: Path = typer.Argument(..., help="The task's YAML file."),
    by: Optional[str] = typer.Option(None, "--by", help="Who resets (default: user@host)."),
):
    """Clear the active deployment's alarm: servers following it go back to its own threshold."""
    from ..deploy.registry import reset_alarm
    from ..tasks.spec import load_task

    task = load_task(task_file)
    d = reset_alarm(open_store(ctx), task.name, by=by)
    last = d["evidence"]["alarms"][-1]
    console.print(f"alarm ({last['kind']}: {last['reason']}) reset on deployment {d['id']}; servers following task "
                  f"{task.name} return to its threshold within seconds")


def monitor_cmd(
    ctx: typer.Context,
    task_file: Path = typer.Argument(..., help="The task's YAML file."),
    server: Optional[str] = typer.Option(None, "--server", help="A server following the task (http://HOST:PORT): "
                                         "its drift statistics too."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
):
    """The health of the task's active deployment: requests, who answered, shadow agreement, cost saved, alarms."""
    from ..deploy.monitor import health
    from ..prices import load_prices
    from ..tasks.spec import load_task

    task = load_task(task_file)
    h = health(open_store(ctx), task.name, prices=load_prices(settings(ctx).prices_path))
    if server:
        h["drift"] = _server_drift(server)
    if as_json:
        print_json(h)
        return

    def pct(x):
        return "unknown" if x is None else f"{100 * x:.1f}%"

    a = h["alarm"]
    console.print(f"[bold]deployment {h['deployment']}[/] (run:{h['run_id']}) serving task {task.name} since "
                  f"{h['since'][:19]}")
    console.print("alarm: " + ("none" if a is None else f"[red]{a['kind']}[/]: {a['reason']} (since {a['since'][:19]}; "
                                                        f"action: {a['action']})"))
    who = ", ".join(f"{k} {v:,}" for k, v in sorted(h["answered_by"].items())) or "none yet"
    console.print(f"requests: {h['requests']:,} ({who}); errors {h['errors']:,}; fallback rate {pct(h['fallback_rate'])}")
    lat = h["latency_ms"]
    console.print("latency: " + ("unknown" if lat is None else f"p50 {lat['p50']:.1f} ms, p95 {lat['p95']:.1f} ms "
                                                             f"(server side, {lat['n']:,} requests)"))
    sh = h["shadow"]
    lo, hi = sh["ci95"]
    console.print(f"shadow agreement: {pct(sh['agreement'])}" + ("" if sh["agreement"] is None else
                                                                 f" (95% CI {pct(lo)} to {pct(hi)})")
                  + f" over {sh['compared']:,} comparisons" + (f"; {sh['errors']} shadow errors" if sh["errors"] else ""))
    worst = sorted(sh["per_label"].items(), key=lambda kv: kv[1]["agreement"])[:5]
    for label, v in worst:
        console.print(f"  {label}: {pct(v['agreement'])} of {v['n']:,} (95% CI {pct(v['ci95'][0])} to "
                      f"{pct(v['ci95'][1])})")
    fc = h["frontier_cost"]
    console.print("the frontier would have cost: " + ("unknown" if fc["saved_usd"] is None else
                                                      f"${fc['saved_usd']:,.2f} for the specialist's answers "
                                                      f"(${fc['per_request_usd'] * 1e6:,.0f} per 1M requests)")
                  + f"; {fc['basis']}")
    if server:
        d = h["drift"]
        console.print("drift: " + ("none reported (serve with --drift)" if not d else
                                   ", ".join(f"{k} {v}" for k, v in d.items())))


def _server_drift(url: str) -> dict:
    """The drift figures of one server's /metrics."""
    import httpx

    try:
        text = httpx.get(url.rstrip("/") + "/metrics", timeout=10).text
    except httpx.HTTPError as exc:
        raise ProtegeError(f"--server {url}: cannot read its /metrics ({exc})") from None
    out = {}
    for line in text.splitlines():
        if line.startswith("protege_serve_drift_"):
            name, value = line.rsplit(" ", 1)
            out[name.removeprefix("protege_serve_drift_")] = float(value)
    return out


def _gate_word(d: dict) -> str:
    if "rollback" in d["evidence"]:
        return "rollback"
    return "forced" if d["forced"] else "passed"
