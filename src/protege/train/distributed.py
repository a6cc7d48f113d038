"""Where a training process stands in a torchrun launch, and how the loop reaches the weights
under each strategy: one process, DDP, or FSDP.

    protege train TASK --base smollm2-135m --method lora --nproc 2 [--set strategy=fsdp]

Under torchrun (`--nproc N` launches it) every process builds the same model, takes its share
of each global batch and DDP averages the gradients; each share's loss is weighted by its
part of the batch, so the update equals the single-process one. With the recipe key
`strategy: fsdp` the weights, gradients and optimiser state are sharded across the processes
instead (FSDP2 `fully_shard` on each transformer block, the loss module as root):
checkpoints, the best state and the export are gathered into full tensors, so a sharded run
writes the same files as any other. `loop.run_loop` picks `Weights` or `Sharded` and talks to
the weights only through them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

from ..errors import ProtegeError
from .job import Job, ShardableJob


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


def trainable_state(model) -> dict:
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k in names}


class Weights:
    """How the loop reads and writes weights and optimiser state: the model's own tensors
    (one process, or DDP where every process holds them all)."""

    collective = False
    """Whether reading the state needs every process (then no rank may skip the call)."""

    def __init__(self, job: Job):
        self.model = job.model
        self.trainer = job.loss

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

    collective = True

    def __init__(self, job: Job, dist: Dist):
        super().__init__(job)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        if not isinstance(job, ShardableJob):
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


def weights_for(job: Job, recipe, dist: Dist) -> Weights:
    """`Sharded` for a multi-process run with `strategy: fsdp`, else `Weights` (one process, DDP)."""
    if dist.world > 1 and getattr(recipe, "strategy", "ddp") == "fsdp":
        return Sharded(job, dist)
    return Weights(job)


def wrap_ddp(loss, dist: Dist, weights: Weights):
    """The module the loop calls for each share: DDP around the loss module when several
    processes each hold the whole model (FSDP already synchronises the sharded root)."""
    if dist.world == 1 or isinstance(weights, Sharded):
        return loss
    from torch.nn.parallel import DistributedDataParallel

    dev = train_device()
    return DistributedDataParallel(loss, device_ids=[dev.index] if dev.type == "cuda" else None)
