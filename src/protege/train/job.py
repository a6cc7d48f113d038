"""What a training method hands the loop: the `Job` protocol.

A method (classifier.py, sft.py for lora/full/distill, grpo.py) builds one object with these
members; `loop.run_loop` trains it and never looks inside. Adding a method means writing one
such class and naming it in `api.build_job`:

    job = SFTJob(task, dataset, home, base, recipe, folder, run_id, method="lora")
    metrics = run_loop(store, run_id, folder, job, recipe)

The protocol is structural (typing.Protocol): a job class implements it without inheriting
from it, as the model backends implement `Candidate`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Job(Protocol):
    """One training run of one method, as the loop sees it."""

    model: Any
    """The model being trained (PEFT-wrapped for LoRA); its trainable parameters are optimised."""
    loss: Any
    """nn.Module: loss(idx, weight) -> this share's summed loss x weight. A module, not a
    function, because DDP wraps it and FSDP makes it the root of the shards."""
    lengths: list[int]
    """Length of each training example, for bucketing."""
    unit: str
    """What the throughput counts: ex (examples), tok (tokens) or completion."""
    metrics: dict
    """Extra figures for the run record (metric, train_rows, ...)."""
    validates: bool
    """Whether there is a validation split to `evaluate` on; without one the loop records no
    score and exports the last weights."""

    def count(self, idx: list[int]) -> int:
        """Loss terms in these examples (examples, or completion tokens): the loss's denominator."""
        ...

    def work(self, idx: list[int]) -> int:
        """Examples or tokens these examples make the model process, for the throughput."""
        ...

    def param_groups(self) -> list[dict]:
        """The optimiser's parameter groups. Called after sharding, which replaces the parameters."""
        ...

    def evaluate(self) -> float:
        """Score on the validation split, higher is better."""
        ...

    def stats(self) -> dict:
        """Running training figures since the last call (GRPO's mean reward and KL), logged at
        each evaluation; {} for methods that have none."""
        ...

    def export(self, metrics: dict) -> Path:
        """Write the output model folder from `model` (the loop has loaded the kept weights into
        it) and return it."""
        ...


@runtime_checkable
class ShardableJob(Job, Protocol):
    """A job that can also run under `strategy: fsdp`: the sharded model cannot be saved as it
    is, so the loop gathers the kept weights into a fresh copy and exports that."""

    def rebuild(self) -> Any:
        """A fresh, unsharded copy of the model on the CPU."""
        ...

    def export(self, metrics: dict, model: Any = None) -> Path:
        """As `Job.export`, writing `model` (the gathered copy) instead of the job's own when given."""
        ...


def trainable(model) -> list:
    """The parameters the optimiser updates (LoRA freezes the rest)."""
    return [p for p in model.parameters() if p.requires_grad]
