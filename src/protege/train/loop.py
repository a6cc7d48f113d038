"""The one training loop every method runs: optimiser, warm-up + cosine schedule, gradient
accumulation, evaluation on the validation split, best state, early stop, time budget,
progress, TensorBoard, checkpoints for `--resume`, and DDP when launched by torchrun.

A method supplies a `Job`: its model, a loss module, how long each example is, how to
score the validation split, and how to export the result. The loop owns everything else.

Resume: at every evaluation (and every `save_every` steps) the loop writes
`RUN/checkpoint/` atomically: trainable weights, optimiser and scheduler state, the step,
the epoch and the position inside it, the data-order RNG as it was at the start of that
epoch, every process's torch RNG, the history and the best state so far. `--resume RUN_ID`
rebuilds the epoch's batch order from that RNG, skips what was done and goes on; the
result is the same weights as a run that was never interrupted.

Distributed: under torchrun (`--nproc N` launches it) every process builds the same model,
takes its share of each global batch and DDP averages the gradients; each share's loss is
weighted by its part of the batch, so the update equals the single-process one. With the
recipe key `strategy: fsdp` the weights, gradients and optimiser state are sharded across
the processes instead (FSDP2 `fully_shard` on each transformer block, the loss module as
root): checkpoints, the best state and the export are gathered into full tensors, so a
sharded run writes the same files as any other.
"""

from __future__ import annotations

import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import ProtegeError
from .common import Stopper, autocast, bucketed_batches, progress_bar, resolve_precision, tensorboard, warmup_cosine
from .runs import update_run


@dataclass
class Dist:
    """This process's place in a torchrun launch (world 1 when launched alone)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> "Dist":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch
        import torch.distributed as td

        if not td.is_initialized():
            if torch.cuda.is_available():
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            td.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if not torch.cuda.is_available():  # share the cores instead of oversubscribing them
            local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
        return cls(rank=td.get_rank(), world=td.get_world_size())

    def broadcast(self, value):
        """Rank 0's value, on every rank."""
        if self.world == 1:
            return value
        import torch.distributed as td

        box = [value]
        td.broadcast_object_list(box, src=0)
        return box[0]

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on any (stop decisions stay in step)."""
        if self.world == 1:
            return flag
        import torch
        import torch.distributed as td

        t = torch.tensor([1.0 if flag else 0.0], device=train_device())
        td.all_reduce(t, op=td.ReduceOp.MAX)
        return bool(t.item())

    def gather(self, value) -> list:
        if self.world == 1:
            return [value]
        import torch.distributed as td

        out: list = [None] * self.world
        td.all_gather_object(out, value)
        return out


def train_device():
    """This process's GPU under torchrun (LOCAL_RANK), the GPU when there is one, else the CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


@dataclass
class Job:
    """What a method hands the loop."""

    model: Any
    """The model being trained (PEFT-wrapped for LoRA); its trainable parameters are optimised."""
    loss_module: Any
    """nn.Module: forward(idx, weight) -> this share's summed loss x weight (DDP wraps it)."""
    lengths: list[int]
    """Length of each training example, for bucketing."""
    count: Callable[[list[int]], int]
    """Loss terms in a list of examples (examples, or completion tokens)."""
    evaluate: Callable[[], float] | None
    """Score on the validation split (higher is better), or None without one."""
    export: Callable[[dict, dict], Path]
    """export(best_state, metrics) -> the output model folder."""
    unit: str = "ex"
    """What the throughput counts: ex (examples) or tok (tokens)."""
    work: Callable[[list[int]], int] | None = None
    """Tokens/examples processed for a batch (throughput); defaults to `count`."""
    param_groups: list[dict] | None = None
    """Optimiser parameter groups; default: every trainable parameter at the recipe's lr."""
    metrics: dict = field(default_factory=dict)
    """Extra figures for the run record (train_rows, ...)."""
    stats: Callable[[], dict] | None = None
    """Running training figures since the last call (GRPO's mean reward, KL), logged at each evaluation."""
    rebuild: Callable[[], Any] | None = None
    """A fresh, unsharded copy of the model on the CPU, for FSDP runs: the best weights are
    gathered into it and it is exported (`export(best_state, metrics, model=...)`)."""


UNITS = {"tok": "tokens", "ex": "examples", "completion": "completions"}


def trainable_state(model) -> dict:
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k in names}


class Weights:
    """How the loop reads and writes weights and optimiser state: the model's own tensors
    (one process, or DDP where every process holds them all)."""

    def __init__(self, job: Job):
        self.model = job.model
        self.trainer = job.loss_module

    def state(self) -> dict:
        return trainable_state(self.model)

    def load(self, state: dict) -> None:
        self.model.load_state_dict(state, strict=False)

    def optim_state(self, opt) -> dict:
        return opt.state_dict()

    def load_optim(self, opt, state: dict) -> None:
        opt.load_state_dict(state)

    def evaluate(self, fn: Callable[[], float]) -> float:
        return fn()


class Sharded(Weights):
    """FSDP2: each transformer block (the model's `_no_split_modules`) is its own shard unit
    and the loss module is the root, so one forward of the loss module gathers what the
    blocks do not hold (embeddings, final norm, a tied LM head). Every method here is a
    collective: all processes call it, in the same order."""

    def __init__(self, job: Job, dist: Dist):
        super().__init__(job)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        if job.rebuild is None:
            raise ProtegeError("strategy fsdp is for the causal-LM methods (lora, full, distill); use ddp here")
        inner = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        blocks = set(getattr(inner, "_no_split_modules", None) or [])
        units = [m for m in self.model.modules() if type(m).__name__ in blocks]
        if not units:
            raise ProtegeError(f"strategy fsdp: {type(inner).__name__} names no transformer block class "
                               "(_no_split_modules) to shard by; use strategy ddp")
        if getattr(self.trainer, "shared", 0):
            # FSDP2 frees a block's gathered weights after its forward and gathers them again
            # once for its backward; a block run twice in a step (a shared prompt prefix, then
            # the rows) finds them gone, so sharded runs compute the prefix in every row
            self.trainer.shared = 0
        mesh = init_device_mesh(train_device().type, (dist.world,))
        for m in units:
            fully_shard(m, mesh=mesh)
        fully_shard(self.trainer, mesh=mesh)
        self.prefix = next(name for name, m in self.trainer.named_modules() if m is self.model) + "."
        self.dist, self.rebuild = dist, job.rebuild

    def state(self) -> dict:
        from torch.distributed.tensor import DTensor

        return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
                for n, p in self.model.named_parameters() if p.requires_grad}

    def _options(self, **kw):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(full_state_dict=True, **kw)

    def load(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(self.trainer, {self.prefix + k: v for k, v in state.items()},
                             options=self._options(strict=False))

    def optim_state(self, opt) -> dict:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(self.trainer, opt, options=self._options())

    def load_optim(self, opt, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(self.trainer, opt, optim_state_dict=state, options=self._options())

    def evaluate(self, fn: Callable[[], float]) -> float:
        """Every process scores the same rows in step (each forward gathers each block), with
        the root's own weights gathered for the whole evaluation."""
        # FSDP makes the first module to run forward its root; the first evaluation comes
        # before any training forward, so name the root explicitly (torch has no public call)
        self.trainer._get_fsdp_state()._lazy_init()
        self.trainer.unshard()
        try:
            return fn()
        finally:
            self.trainer.reshard()

    def unsharded_model(self):
        """Rank 0: a plain copy of the whole model with the current weights; other ranks: None."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        full = get_model_state_dict(self.trainer, options=self._options(cpu_offload=True))
        if not self.dist.main:
            return None
        plain = self.rebuild()
        missing, unexpected = plain.load_state_dict(
            {k[len(self.prefix):]: v for k, v in full.items() if k.startswith(self.prefix)}, strict=False)
        tied = {n for n in missing if n.endswith("lm_head.weight")}
        if unexpected or set(missing) - tied:
            raise ProtegeError(f"FSDP export: the gathered weights do not fit the model (missing "
                               f"{sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]})")
        return plain


def run_loop(store, run_id: str, folder: Path, job: Job, recipe, *, time_budget_min: float | None = None,
             console=None, resume: bool = False, dist: Dist | None = None,
             on_step: Callable[[int], None] | None = None) -> dict:
    """Train to the end (or early stop / time budget); returns the run's metrics."""
    import torch

    dist = dist or Dist()
    model = job.model
    sharded = dist.world > 1 and getattr(recipe, "strategy", "ddp") == "fsdp"
    weights = Sharded(job, dist) if sharded else Weights(job)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = job.param_groups or [{"params": params, "lr": recipe.lr}]
    opt = torch.optim.AdamW(groups, weight_decay=recipe.weight_decay)
    steps_per_epoch = max(1, len(job.lengths) // recipe.batch_size + bool(len(job.lengths) % recipe.batch_size))
    accum = getattr(recipe, "grad_accum", 1)
    total = max(1, int(steps_per_epoch * recipe.epochs) // accum)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(total, recipe.warmup_fraction))
    trainer = job.loss_module
    dev = train_device()
    if dist.world > 1 and not sharded:
        from torch.nn.parallel import DistributedDataParallel

        trainer = DistributedDataParallel(trainer, device_ids=[dev.index] if dev.type == "cuda" else None)
    precision = resolve_precision(recipe.precision, dev)
    save_every = getattr(recipe, "save_every", None) or recipe.eval_every
    ckpt = folder / "checkpoint"
    rng = random.Random(recipe.seed)
    state: dict[str, Any] = {"step": 0, "micro": 0, "epoch": 0, "batch": 0, "work": 0, "elapsed_s": 0.0,
                             "history": [], "best": float("-inf"), "best_step": 0, "stale": 0,
                             "epoch_rng": rng.getstate()}
    if resume:
        best_state = _load_checkpoint(ckpt, weights, opt, sched, state, dist)
    else:
        best_state = weights.state()
        if job.evaluate is not None:  # the starting point, so the history shows what training bought
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
    work_of = job.work or job.count
    shown = f"{state['best']:.4f}" if state["history"] else "—"
    if not dist.main:  # progress from rank 0 only
        import io

        from rich.console import Console

        console = Console(file=io.StringIO())
    with progress_bar(console, unit=job.unit) as bar:
        tid = bar.add_task("train", total=total, completed=state["step"], run=run_id[:13], loss=float("nan"),
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
                state["work"] += work_of(batch)
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
                if job.evaluate is not None and (step % recipe.eval_every == 0 or last or out_of_time):
                    score = weights.evaluate(job.evaluate)
                    evaluated = True
                    extra = job.stats() if job.stats else {}
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
                    _save_checkpoint(ckpt, weights, opt, sched, state, best_state, dist)
                if done:
                    break
            else:
                state["epoch"] += 1
                state["batch"] = 0
                state["epoch_rng"] = rng.getstate()
    if tb:
        tb.close()
    wall = time.monotonic() - t0
    if job.evaluate is None or getattr(recipe, "keep", "best") == "last":
        best_state, stop.best_step = weights.state(), state["step"]  # nothing to choose with: the last
    metrics = {**job.metrics, "history": state["history"],
               "best_val_score": stop.best if job.evaluate is not None else None, "best_step": stop.best_step,
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
            job.export(best_state, metrics, model=plain)
    elif dist.main:
        job.export(best_state, metrics)
    if dist.main:
        shutil.rmtree(ckpt, ignore_errors=True)
    return metrics


def _rng_state() -> dict:
    import torch

    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def _save_checkpoint(ckpt: Path, weights: Weights, opt, sched, state: dict, best_state: dict, dist: Dist) -> None:
    import torch

    rngs = dist.gather(_rng_state())
    if not (dist.main or isinstance(weights, Sharded)):
        return
    current, optim = weights.state(), weights.optim_state(opt)  # collectives under FSDP: every rank
    if not dist.main:
        return
    tmp = ckpt.with_name(ckpt.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save({"model": current, "optimizer": optim, "scheduler": sched.state_dict(),
                "state": state, "rng": rngs, "world": dist.world}, tmp / "state.pt")
    torch.save(best_state, tmp / "best.pt")
    old = ckpt.with_name(ckpt.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if ckpt.exists():
        ckpt.rename(old)
    tmp.rename(ckpt)
    shutil.rmtree(old, ignore_errors=True)


def _load_checkpoint(ckpt: Path, weights: Weights, opt, sched, state: dict, dist: Dist) -> dict:
    import torch

    if not (ckpt / "state.pt").exists():
        old = ckpt.with_name(ckpt.name + ".old")  # killed between the two renames
        if (old / "state.pt").exists():
            ckpt = old
        else:
            raise ProtegeError(f"no checkpoint to resume from in {ckpt.parent}: the run stopped before its first "
                               "evaluation/save, or it finished (start it again instead)")
    saved = torch.load(ckpt / "state.pt", weights_only=False)
    if saved["world"] != dist.world:
        raise ProtegeError(f"the checkpoint was written by {saved['world']} process(es); resume it with "
                           f"--nproc {saved['world']}")
    missing = {n for n, p in weights.model.named_parameters() if p.requires_grad} - set(saved["model"])
    if missing:
        raise ProtegeError(f"checkpoint {ckpt} does not match the model: {len(missing)} weights missing "
                           f"(e.g. {sorted(missing)[0]})")
    weights.load(saved["model"])
    weights.load_optim(opt, saved["optimizer"])
    sched.load_state_dict(saved["scheduler"])
    state.update(saved["state"])
    rng = saved["rng"][dist.rank]
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return torch.load(ckpt / "best.pt", weights_only=False)
