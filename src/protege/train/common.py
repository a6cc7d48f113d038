"""Pieces every training method shares: length-bucketed batches, the LR schedule,
the training precision, TensorBoard, the progress bar."""

from __future__ import annotations

import math
import random
from pathlib import Path


def bucketed_batches(lengths: list[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Shuffle, then sort by length inside windows of 50 batches, then shuffle the batches:
    similar lengths share a batch (little padding), yet every epoch's order differs."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * 50
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def warmup_cosine(total: int, warmup_fraction: float):
    """Linear warm-up over `warmup_fraction` of the steps, then cosine decay to 0."""
    warm = int(total * warmup_fraction)

    def schedule(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

    return schedule


def native_bf16(device) -> bool:
    """Whether `device` computes bf16 matmuls in hardware: a GPU that supports bf16, or a CPU
    with AVX512-BF16 or AMX (elsewhere bf16 is emulated and slower than fp32)."""
    import torch

    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False


def resolve_precision(setting: str, device) -> str:
    """The recipe's `precision` on this device: fp32 or bf16 (`auto`: bf16 where it is native)."""
    if setting == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return setting


def autocast(precision: str, device):
    """The context the training forward runs in: bf16 autocast (weights, gradients and the
    optimiser stay fp32) or nothing."""
    import contextlib

    import torch

    if precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def tensorboard(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard not installed: the store still has every metric
        return None
    return SummaryWriter(str(path))


def progress_bar(console, unit: str = "ex"):
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    # fits 80 columns: steps, loss, rate (ex/s or tokens/s), validation score, time left
    return Progress(TextColumn("training {task.fields[run]}"), BarColumn(bar_width=10),
                    TextColumn("{task.completed}/{task.total}"), TextColumn("loss {task.fields[loss]:.3f}"),
                    TextColumn("{task.fields[rate]:.0f} " + unit + "/s"), TextColumn("val {task.fields[val]}"),
                    TimeRemainingColumn(), console=console, transient=False)


class Stopper:
    """When a training loop stops: best validation score so far, early stop after
    `patience` evaluations without improvement, and an optional time budget."""

    def __init__(self, patience: int, time_budget_min: float | None, best: float = float("-inf")):
        import time

        self._clock = time.monotonic
        self.patience = patience
        self.deadline = self._clock() + time_budget_min * 60 if time_budget_min else None
        self.best, self.best_step, self.stale = best, 0, 0
        self.reason, self.done = "completed", False

    def out_of_time(self) -> bool:
        return self.deadline is not None and self._clock() >= self.deadline

    def record(self, step: int, score: float) -> bool:
        """Note an evaluation; True when it is the best so far (keep this state)."""
        if score > self.best:
            self.best, self.best_step, self.stale = score, step, 0
            return True
        self.stale += 1
        if self.stale >= self.patience:
            self.reason, self.done = "early stop", True
        return False

    def end_of_step(self, last: bool, out_of_time: bool) -> bool:
        """True when the loop must stop after this step."""
        if out_of_time and not self.done:
            self.reason, self.done = "time budget", True
        if last:
            self.done = True
        return self.done


def format_score(value: float | None) -> str:
    return "unknown (no validation rows)" if value is None else f"{value:.4f}"


def write_model_card(folder: Path, *, title: str, intro: str, best_label: str, metrics: dict, recipe,
                     usage: str) -> None:
    """README.md beside a trained model: what it was trained from, the run's figures, its recipe."""
    lines = [f"# {title}", "", intro, "",
             "| figure | value |", "| --- | --- |",
             f"| {best_label} | {format_score(metrics['best_val_score'])} (step {metrics['best_step']}) |",
             f"| steps | {metrics['steps']} ({metrics['stop_reason']}) |",
             f"| training wall time | {metrics['wall_s']:.0f} s |",
             f"| training throughput | {metrics['throughput']} |", "",
             "Recipe:", "", "```yaml", *(f"{k}: {v}" for k, v in recipe.model_dump().items()), "```", "", usage]
    (folder / "README.md").write_text("\n".join(lines) + "\n")


def nested_subset(rows: list, fraction: float | None, seed: int = 0) -> list:
    """The first `fraction` of the rows in one fixed shuffled order: the subset for 0.25 is
    contained in the one for 0.5, so a learning curve measures more data, not other data."""
    if fraction is None or fraction >= 1:
        return rows
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    keep = sorted(order[:max(1, round(len(rows) * fraction))])
    return [rows[i] for i in keep]
