"""Token counts with the task's named tokenizer (`tokenizer:` in the task file), for what the
app's prompts cost (datasets/build.py's token report) and what a recorded reply costs
(bench/pricing.py). One tokenizer load per process and name."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from .spec import Task

SAMPLE = 500
"""Requests measured: the first 500 are plenty for a mean."""


@lru_cache(maxsize=4)
def _load(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def task_tokenizer(task: Task, home: Path):
    """The task's tokenizer, or None for `tokenizer: none`."""
    if task.tokenizer in ("none", "", None):
        return None
    from ..bases import resolve

    return _load(str(resolve(task.tokenizer, home)))


def mean_token_count(tokenizer, requests: list[list[str]]) -> float:
    """Mean tokens per request (each request: its texts, counted without special tokens) over
    the first SAMPLE requests."""
    sample = requests[:SAMPLE]
    return sum(len(tokenizer.encode(t, add_special_tokens=False)) for texts in sample for t in texts) / len(sample)
