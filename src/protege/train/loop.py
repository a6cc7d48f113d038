"""The one training loop every method runs: optimiser, warm-up + cosine schedule, gradient
accumulation, evaluation on the validation split, best state, early stop, time budget,
progress, TensorBoard, checkpoints for `--resume`, and DDP/FSDP when launched by torchrun.

    protege train TASK --base MODEL --method METHOD   (api.train builds the job, then calls run_loop)

A method supplies a `Job` (job.py): its model, a loss module, how long each example is, how
to score the validation split, and how to export the result. The loop owns everything else;
checkpoints.py holds what `--resume` reads back, distributed.py the process group and the
weights under each strategy.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any, Callable

from ..runs.registry import update_run
from .checkpoints import checkpoint_folder, load_checkpoint, remove_checkpoint, save_checkpoint
from .common import Stopper, autocast, bucketed_batches, progress_bar, resolve_precision, tensorboard, warmup_cosine
from .distributed import Dist, Sharded, train_device, weights_for, wrap_ddp
from .job import Job, trainable

UNITS = {"tok": "tokens", "ex": "examples", "completion": "completions"}


def run_loop(store, run_id: str, folder: Path, job: Job, recipe, *, time_budget_min: float | None = None,
             console=None, resume: bool = False, dist: Dist | None = None,
             on_step: Callable[[int], None] | None = None) -> dict:
    """Train to the end (or early stop / time budget); returns the run's metrics."""
    import torch

    dist = dist or Dist()
    model = job.model
    weights = weights_for(job, recipe, dist)  # before the optimiser: sharding replaces the parameters
    sharded = isinstance(weights, Sharded)
    params = trainable(model)
    opt = torch.optim.AdamW(job.param_groups(), weight_decay=recipe.weight_decay)
    steps_per_epoch = max(1, len(job.lengths) // recipe.batch_size + bool(len(job.lengths) % recipe.batch_size))
    accum = getattr(recipe, "grad_accum", 1)
    total = max(1, int(steps_per_epoch * recipe.epochs) // accum)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(total, recipe.warmup_fraction))
    trainer = wrap_ddp(job.loss, dist, weights)
    dev = train_device()
    precision = resolve_precision(recipe.precision, dev)
    save_every = getattr(recipe, "save_every", None) or recipe.eval_every
    ckpt = checkpoint_folder(folder)
    rng = random.Random(recipe.seed)
    state: dict[str, Any] = {"step": 0, "micro": 0, "epoch": 0, "batch": 0, "work": 0, "elapsed_s": 0.0,
                             "history": [], "best": float("-inf"), "best_step": 0, "stale": 0,
                             "epoch_rng": rng.getstate()}
    if resume:
        best_state = load_checkpoint(ckpt, weights, opt, sched, state, dist)
    else:
        best_state = weights.state()
        if job.validates:  # the starting point, so the history shows what training bought
            score = weights.evaluate(job.evaluate)
            state["history"].append({"step": 0, "loss": None, "val_score": score, "elapsed_s": 0.0})
            state["best"] = score
    budget = None if time_budget_min is None else max(0.01, time_budget_min - state["elapsed_s"] / 60)
    stop = Stopper(recipe.early_stop_patience, budget, best=state["best"])
    stop.best_step, stop.stale = state["best_step"], state["stale"]
    tb = tensorboard(folder / "tensorboard") if dist.main else None
    model.train()
    t0 = time.monotonic() - state["elapsed_s"]
    work0, t_resume = state["work"], time.monotonic()
    shown = f"{state['best']:.4f}" if state["history"] else "—"
    if not dist.main:  # progress from rank 0 only
        import io

        from rich.console import Console

        console = Console(file=io.StringIO())
    with progress_bar(console, unit=job.unit) as bar:
        tid = bar.add_task("train", total=total, completed=state["step"], run=run_id[:8], loss=float("nan"),
                           rate=0.0, val=shown)
        done = state["step"] >= total
        while not done:
            rng.setstate(state["epoch_rng"])
            batches = bucketed_batches(job.lengths, recipe.batch_size, rng)
            for b in range(state["batch"], len(batches)):
                batch = batches[b]
                share = batch[dist.rank::dist.world]
                denom = job.count(batch) * accum
                weight = dist.world / max(denom, 1)
                if not share:  # fewer examples than processes: join the all-reduce with nothing to add
                    share, weight = batch[:1], 0.0
                with autocast(precision, dev):
                    loss = trainer(share, weight)
                loss.backward()
                state["micro"] += 1
                state["work"] += job.work(batch)
                state["batch"] = b + 1
                if state["micro"] % accum:
                    continue
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                state["step"] += 1
                step = state["step"]
                # this process's share, scaled up: the batch mean when the shares are alike
                loss_value = loss.detach().item() * accum
                rate = (state["work"] - work0) / max(time.monotonic() - t_resume, 1e-6)
                if tb:
                    tb.add_scalar("train/loss", loss_value, step)
                    tb.add_scalar("train/lr", sched.get_last_lr()[0], step)
                bar.update(tid, advance=1, loss=loss_value, rate=rate)
                last = step >= total
                out_of_time = dist.any(stop.out_of_time())
                evaluated = False
                if job.validates and (step % recipe.eval_every == 0 or last or out_of_time):
                    score = weights.evaluate(job.evaluate)
                    evaluated = True
                    extra = job.stats()
                    state["history"].append({"step": step, "loss": loss_value, "val_score": score,
                                             "elapsed_s": time.monotonic() - t0, **extra})
                    if tb:
                        tb.add_scalar("val/score", score, step)
                        for k, v in extra.items():
                            if v is not None:
                                tb.add_scalar(f"train/{k}", v, step)
                    bar.update(tid, val=f"{score:.4f}")
                    if stop.record(step, score):
                        best_state = weights.state()
                    if dist.main:
                        update_run(store, run_id, metrics={**job.metrics, "history": state["history"],
                                                           "best_val_score": stop.best, "best_step": stop.best_step})
                if on_step:
                    on_step(step)
                done = stop.end_of_step(last, out_of_time)
                if (evaluated or step % save_every == 0) and not done:
                    state.update(best=stop.best, best_step=stop.best_step, stale=stop.stale,
                                 elapsed_s=time.monotonic() - t0)
                    save_checkpoint(ckpt, weights, opt, sched, state, best_state, dist)
                if done:
                    break
            else:
                state["epoch"] += 1
                state["batch"] = 0
                state["epoch_rng"] = rng.getstate()
    if tb:
        tb.close()
    wall = time.monotonic() - t0
    if not job.validates or getattr(recipe, "keep", "best") == "last":
        best_state, stop.best_step = weights.state(), state["step"]  # nothing to choose with: the last
    metrics = {**job.metrics, "history": state["history"],
               "best_val_score": stop.best if job.validates else None, "best_step": stop.best_step,
               "steps": state["step"], "stop_reason": stop.reason, "wall_s": wall,
               "processes": dist.world, "strategy": ("fsdp" if sharded else "ddp") if dist.world > 1 else None,
               "precision": precision}
    rate = (state["work"] - work0) / max(time.monotonic() - t_resume, 1e-6)
    unit = UNITS.get(job.unit, job.unit)
    metrics[f"train_{unit}_per_s"] = rate
    metrics["throughput"] = f"{rate:,.0f} {unit}/s" + (f" over {dist.world} processes" if dist.world > 1 else "")
    if resume:
        metrics["resumed"] = True
    weights.load(best_state)
    if sharded:
        plain = weights.unsharded_model()
        if dist.main:
            job.export(metrics, model=plain)
    elif dist.main:
        job.export(metrics)
    if dist.main:
        remove_checkpoint(ckpt)
    return metrics
