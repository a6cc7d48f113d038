"""`protege serve` and `protege route calibrate`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ..errors import ProtegeError
from .common import MAX_ROWS, console, err, exit_on_lost_traces, open_store, print_json, settings

route_app = typer.Typer(help="Cascade routing between a specialist and the frontier model.", no_args_is_help=True)


def serve_cmd(
    ctx: typer.Context,
    target: Optional[str] = typer.Argument(None, help="run:RUN_ID, a run id, or a model folder made by protege "
                                           "train; leave it out to serve --task's active deployment and follow it."),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="Port to listen on (0: any free port)."),
    fallback: Optional[str] = typer.Option(None, "--fallback", help="openai:MODEL@BASE_URL answering low-confidence "
                                           "requests (with --task alone: every request, until the first deployment)."),
    threshold: Optional[float] = typer.Option(None, "--threshold", min=0, max=1,
                                              help="Below this confidence the fallback answers "
                                              "(protege route calibrate picks it)."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="PROTEGE_SERVE_API_KEY",
                                          help="Require Authorization: Bearer KEY."),
    task_file: Optional[Path] = typer.Option(None, "--task", help="The task file (default: the one the run recorded); "
                                             "alone, serve the task's active deployment."),
    poll_s: float = typer.Option(2.0, "--poll-s", min=0.05, help="With --task alone: how often to look for a new "
                                 "deployment."),
    max_body_kb: int = typer.Option(1024, "--max-body-kb", min=1, help="Largest request accepted."),
    max_batch: int = typer.Option(32, "--max-batch", min=1, help="Most requests answered in one model call."),
    batch_wait_ms: float = typer.Option(5.0, "--batch-wait-ms", min=0, help="Under load, how long the model lets "
                                        "requests gather before each batch (0: never waits)."),
    no_traces: bool = typer.Option(False, "--no-traces", help="Do not store served requests as traces."),
    runtime: Optional[str] = typer.Option(None, "--runtime", help="torch (default) | onnx (classifiers: ONNX "
                                          "Runtime) | llama.cpp (causal specialists: a GGUF file); exported on first use."),
    quantize: Optional[str] = typer.Option(None, "--quantize", help="torch: none | int8 (dynamic int8 Linear layers); "
                                           "onnx: none | int8; llama.cpp: f32 | f16 | q8_0 (default) | q4_k_m. Bench "
                                           "its quality first: -c 'run:ID?runtime=onnx&quantize=int8'."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads the model computes with (default: "
                                          "every core). onnx: the threads of one call (default 1), with cores / N "
                                          "calls side by side."),
    shadow_rate: float = typer.Option(0.0, "--shadow-rate", min=0, max=1, help="Share of the specialist's answers "
                                      "also sent to the frontier in the background and compared (0: off)."),
    shadow: Optional[str] = typer.Option(None, "--shadow", help="openai:MODEL@BASE_URL to shadow against "
                                         "(default: the fallback)."),
    shadow_floor: float = typer.Option(0.01, "--shadow-floor", min=0, max=1, help="Lowest adaptive shadow rate."),
    shadow_ceiling: float = typer.Option(0.5, "--shadow-ceiling", min=0, max=1, help="Highest adaptive shadow rate."),
    shadow_target: float = typer.Option(0.9, "--shadow-target", min=0, max=1, help="Agreement under which the "
                                        "shadow rate goes up."),
    drift: bool = typer.Option(False, "--drift", help="Test served inputs and answers for drift against the run's "
                               "training data (statistics in /metrics)."),
    drift_encoder: str = typer.Option("minilm", "--drift-encoder", help="Encoder embedding inputs for --drift."),
    alarm_agreement: Optional[float] = typer.Option(None, "--alarm-agreement", min=0, max=1, help="Alarm when the "
                                                    "shadow agreement's CI upper bound falls under this."),
    alarm_action: str = typer.Option("fallback", "--alarm-action", help="On an alarm (agreement, or --drift's): "
                                     "fallback (every request to the frontier) | threshold (raise it)."),
    alarm_threshold: float = typer.Option(0.99, "--alarm-threshold", min=0, max=1,
                                          help="The threshold --alarm-action threshold raises to."),
    webhook: Optional[str] = typer.Option(None, "--webhook", help="POST every alarm (JSON) to this URL."),
):
    """Serve a trained specialist behind an OpenAI-compatible endpoint, with the frontier model as fallback."""
    from ..capture.writer import TraceWriter
    from ..serve.app import ServeApp, run_server
    from ..serve.fallback import Fallback
    from ..serve.specialist import load_specialist

    s = settings(ctx)
    store = open_store(ctx)
    deployment, background, own_alarm = None, (), None
    load = {"runtime": runtime, "quantize": quantize, "threads": threads}  # how the specialist is loaded; None: its default
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    if target is None:
        if task_file is None:
            raise ProtegeError("name what to serve: run:RUN_ID, or --task TASK_FILE for the task's active deployment")
        if threshold is not None:
            raise ProtegeError("--task alone serves the deployment's own --threshold and --fallback (`protege deploy "
                               "... --threshold T --fallback F`); drop --threshold (--fallback alone: the frontier "
                               "that answers everything until the task's first deployment)")
        from ..serve.follow import Follower, initial
        from ..tasks.spec import load_task

        task = load_task(task_file)
        deployment, served = initial(store, task.name, s.ensure_home(), str(task_file), load, frontier=fallback)
        name, predict, run_id, fb, threshold = served.name, served.predict, served.run_id, served.fallback, \
            served.threshold
        own_alarm = served.alarm  # the deployment's own alarm settings
        background = (Follower(store, task.name, s.ensure_home(), str(task_file), deployment, poll_s=poll_s,
                               options=load),)
    else:
        if (fallback is None) != (threshold is None):
            raise ProtegeError("--fallback and --threshold go together: the fallback answers below the threshold")
        name, predict, task, run_id = load_specialist(target, store, s.ensure_home(),
                                                      str(task_file) if task_file else None, load)
        fb = Fallback(fallback) if fallback else None
    writer = None if no_traces else TraceWriter.for_settings(s)
    shadowing = None
    if shadow_rate > 0 or shadow is not None:
        from ..serve.shadow import Shadow, agreement_rule

        spec = shadow or (fb.spec if fb else None)
        if spec is None:
            raise ProtegeError("shadowing needs a frontier to compare with: --shadow openai:MODEL@URL (or a fallback)")
        if not shadow_floor <= shadow_rate <= shadow_ceiling:
            raise ProtegeError(f"--shadow-rate {shadow_rate} must lie between --shadow-floor {shadow_floor} and "
                               f"--shadow-ceiling {shadow_ceiling}")
        shadowing = Shadow(Fallback(spec), rate=shadow_rate, floor=shadow_floor, ceiling=shadow_ceiling,
                           target=shadow_target, same=agreement_rule(task),
                           submit=writer.submit if writer else None, task=task.name)
    watch = _drift_watch(store, s.ensure_home(), task, run_id, predict, drift_encoder, threshold) if drift else None
    if alarm_agreement is not None and shadowing is None:
        raise ProtegeError("--alarm-agreement judges the shadow agreement: add --shadow-rate (and --shadow)")
    if own_alarm and own_alarm.get("agreement_floor") is not None and shadowing is None:
        err.print("protege serve: the deployment sets an agreement alarm, which needs shadowing: add --shadow-rate")
    if alarm_agreement is not None or watch is not None or own_alarm:
        from ..serve.guard import Guard, Policy

        if alarm_action not in ("fallback", "threshold"):
            raise ProtegeError(f"--alarm-action {alarm_action!r}: choose fallback or threshold")
        background = (*background, Guard(Policy(agreement_floor=alarm_agreement, drift=watch is not None,
                                                action=alarm_action, raise_to=alarm_threshold),
                                         store=store, webhook=webhook))
    app = ServeApp(name, predict, task=task.name, writer=writer, fallback=fb, threshold=threshold, api_key=api_key,
                   max_body_bytes=max_body_kb * 1024, max_batch=max_batch, run_id=run_id,
                   batch_wait_s=batch_wait_ms / 1000, deployment=deployment["id"] if deployment else None,
                   background=background, shadow=shadowing, drift=watch, alarm=own_alarm)
    follows = target is None  # the task's deployment, followed (a Follower runs beside the server)
    route = f", below {threshold} → {fb.model}" if fb and (deployment or not follows) else ""
    following = f"  (deployment {deployment['id'][:13]}, followed every {poll_s:g} s)" if deployment else (
        f"  (no deployment yet: {fb.model} answers everything; followed every {poll_s:g} s)" if follows and fb else "")
    if shadowing is not None:
        following += f"  (shadow: {shadow_rate:.0%} → {shadowing.frontier.model})"
    err.print(f"protege serve: {name} on http://{host}:{port}/v1{route}{following}"
              f"{'  (auth on)' if api_key else ''}  (traces: {'off' if no_traces else s.home})")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_server(app, host=host, port=port)
    if writer is not None:
        exit_on_lost_traces(writer)


def _drift_watch(store, home, task, run_id, predict, encoder_name: str, threshold):
    """The drift watch of the run being served, its reference built from the run's dataset."""
    from ..models.base import Context
    from ..models.knn import Encoder
    from ..serve.drift import DriftWatch, apart, reference_for_run

    if run_id is None:
        raise ProtegeError("--drift needs a trained run (run:ID or --task): a bare model folder names no training data")
    encoder = Encoder(encoder_name, Context(task=task, dataset=None, home=home))
    err.print(f"protege serve: building the drift reference from run {run_id}'s dataset ...")
    ref, ds_id = apart(reference_for_run, store, run_id, task, encoder, predict)
    return DriftWatch(ref, encoder, threshold=threshold, dataset_id=ds_id)


@route_app.command("calibrate")
def calibrate_cmd(
    ctx: typer.Context,
    task_file: Path = typer.Argument(..., help="The task's YAML file."),
    run: str = typer.Argument(..., help="The specialist: run:RUN_ID or a run id."),
    target: float = typer.Option(..., "--target", min=0, max=1, help="Quality the client must get (e.g. 0.95)."),
    fallback_quality: float = typer.Option(1.0, "--fallback-quality", min=0, max=1,
                                           help="The fallback's quality on these references (1.0: they are its answers)."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, max=MAX_ROWS, help="A fixed random sample of N validation rows."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="TASK@VERSION (default: the task's newest)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
):
    """Pick the --threshold for `protege serve` that reaches a target quality on the validation split."""
    from ..serve.calibrate import calibrate, summary_points
    from ..tasks.spec import load_task

    task = load_task(task_file)
    result = calibrate(open_store(ctx), task, settings(ctx).ensure_home(), run, target=target,
                       fallback_quality=fallback_quality, dataset=dataset, limit=limit)
    if as_json:
        print_json(result)
        return
    t = Table(title=f"coverage / quality on {result['rows']:,} validation rows of {result['dataset']} ({result['metric']})")
    for col in ("threshold", "specialist keeps", "quality of kept answers", "quality the client gets"):
        t.add_column(col, justify="right")
    for c in summary_points(result["curve"]):
        t.add_row(f"{c['threshold']:.4f}", f"{c['coverage']:.0%}",
                  "—" if c["kept_quality"] is None else f"{c['kept_quality']:.4f}", f"{c['cascade_quality']:.4f}")
    console.print(t)
    if result["threshold"] is None:
        console.print(f"no threshold reaches {target}: even sending everything to the fallback gives "
                      f"{fallback_quality}")
        raise typer.Exit(1)
    console.print(f"threshold [bold]{result['threshold']:.4f}[/]: the specialist answers {result['coverage']:.0%} of "
                  f"requests; the client gets {result['metric']} {result['cascade_quality']:.4f} "
                  f"(target {target}; the specialist alone: {result['specialist_alone']:.4f})")
    console.print(f"  protege serve {run} --fallback openai:MODEL@URL --threshold {result['threshold']:.4f}")
