"""Training recipes: one YAML per method under `recipes/`, overridden by CLI flags.

Every problem is reported at once, naming the YAML key (file:line) or the `--set` flag.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import ProtegeError


class RecipeError(ProtegeError):
    """A recipe file or override is invalid."""


class ClassifierRecipe(BaseModel):
    """Fine-tune an encoder with a classification head (method `classifier`)."""

    model_config = ConfigDict(extra="forbid")

    epochs: float = Field(3.0, gt=0)
    """Passes over the train split (fractions allowed)."""
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-4, gt=0)
    """Peak learning rate of the encoder."""
    head_lr: float = Field(2e-3, gt=0)
    """Peak learning rate of the classification head."""
    warmup_fraction: float = Field(0.06, ge=0, lt=1)
    """Linear warm-up over this share of the steps, then cosine decay to 0."""
    weight_decay: float = Field(0.01, ge=0)
    max_length: int = Field(64, ge=8, le=4096)
    """Tokens per input; longer inputs are truncated."""
    eval_every: int = Field(100, ge=1)
    """Evaluate on the validation split every N optimiser steps (and at the end)."""
    early_stop_patience: int = Field(5, ge=1)
    """Stop after this many evaluations without a better validation score."""
    init_head: Literal["centroids", "random"] = "centroids"
    """Start the head from class centroids of the pooled features (converges in far fewer
    steps than a random head) or randomly."""
    seed: int = 0


class SFTRecipe(BaseModel):
    """Supervised fine-tuning of a causal LM on (specialist prompt, reference) pairs, loss on
    the completion only (methods `lora` and `full`)."""

    model_config = ConfigDict(extra="forbid")

    epochs: float = Field(2.0, gt=0)
    batch_size: int = Field(16, ge=1)
    """Sequences per micro-batch."""
    grad_accum: int = Field(1, ge=1)
    """Micro-batches per optimiser step."""
    lr: float = Field(2e-4, gt=0)
    """Peak learning rate (2e-4 suits LoRA; use about 2e-5 for full fine-tuning)."""
    warmup_fraction: float = Field(0.05, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_length: int = Field(256, ge=16, le=32768)
    """Tokens per example (prompt + completion); longer prompts lose their beginning."""
    lora_r: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                               "gate_proj", "up_proj", "down_proj"])
    """Linear layers that get LoRA adapters (lora only)."""
    eval_every: int = Field(100, ge=1)
    """Score the validation split with the task's first metric every N optimiser steps."""
    eval_rows: int = Field(200, ge=1)
    """Validation rows scored at each evaluation (the first N)."""
    early_stop_patience: int = Field(5, ge=1)
    max_new_tokens: int = Field(64, ge=1)
    """Generation length when evaluating generation/extraction tasks."""
    seed: int = 0


RECIPES = {"classifier": ClassifierRecipe, "lora": SFTRecipe, "full": SFTRecipe}


def _coerce(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def load_recipe(method: str, path: str | Path | None = None, overrides: list[str] | None = None):
    if method not in RECIPES:
        raise RecipeError(f"unknown method {method!r}; choose one of: {', '.join(RECIPES)}")
    data: dict[str, Any] = {}
    lines: dict[str, int] = {}
    if path is not None:
        path = Path(path)
        try:
            text = path.read_text("utf-8")
            node = yaml.compose(text)
            data = yaml.safe_load(text) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise RecipeError(f"{path}: cannot read recipe: {exc}") from None
        if not isinstance(data, dict):
            raise RecipeError(f"{path}: a recipe is a YAML mapping of settings")
        if node is not None:
            lines = {k.value: k.start_mark.line + 1 for k, _ in node.value}
        if data.pop("method", method) != method:
            raise RecipeError(f"{path}: this recipe is for method {data.get('method')!r}, not {method!r}")
    origin = {k: f"{path}:{lines.get(k, '?')}: {k}" for k in data}
    for item in overrides or []:
        if "=" not in item:
            raise RecipeError(f"--set {item!r}: write KEY=VALUE, e.g. --set lr=5e-5")
        key, value = item.split("=", 1)
        data[key.strip()] = _coerce(value)
        origin[key.strip()] = f"--set {key.strip()}"
    try:
        return RECIPES[method].model_validate(data)
    except ValidationError as exc:
        problems = []
        for e in exc.errors():
            key = str(e["loc"][0]) if e["loc"] else "(recipe)"
            msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
            problems.append(f"{origin.get(key, key)}: {msg}")
        raise RecipeError(f"{len(problems)} problem(s) in the {method} recipe:\n  " + "\n  ".join(problems)) from None
