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


class _Recipe(BaseModel):
    """Keys every method shares: checkpoints, which weights to keep, the arithmetic, the seed."""

    model_config = ConfigDict(extra="forbid")

    save_every: int | None = Field(None, ge=1)
    """Write a checkpoint for --resume every N steps (default: at every evaluation)."""
    keep: Literal["best", "last"] = "best"
    """Export the weights of the best validation score, or the last step's."""
    precision: Literal["fp32", "bf16", "auto"] = "fp32"
    """Training arithmetic: `fp32`, or `bf16` autocast (weights, optimiser state and the saved
    model stay fp32; validation runs in fp32, as serving does). `auto`: bf16 where the hardware
    computes it natively (a bf16 GPU, a CPU with AVX512-BF16 or AMX), else fp32."""
    seed: int = 0


class ClassifierRecipe(_Recipe):
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
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    """Cross-entropy label smoothing (0.1 spreads a tenth of each target over the other labels)."""
    init_head: Literal["centroids", "random"] = "centroids"
    """Start the head from class centroids of the pooled features (converges in far fewer
    steps than a random head) or randomly."""
    pooling: Literal["auto", "mean", "cls"] = "auto"
    """What the head reads: `mean` of the token states (how sentence encoders such as
    all-MiniLM-L6-v2 were trained; BERT-family heads), `cls` (the model's own pooler, the
    first token; what `transformers.pipeline` applies), `auto`: mean where the head allows it."""


class StudentRecipe(ClassifierRecipe):
    """A classifier taught only by the frontier's recorded replies, out of fold (method `student`)."""

    model_config = ConfigDict(extra="forbid")

    folds: int = Field(3, ge=2, le=20)
    """Parts the taught rows are cut into (by a hash of the input text); one classifier per
    part learns from the other parts and answers for its own."""
    teacher: str | None = None
    """The recorded model whose replies teach (a trace's `model`, e.g. gpt-4); default: every
    row with a recorded model's reply."""


class _Run(_Recipe):
    """Keys every causal-LM method shares: the LoRA adapters and the multi-process strategy."""

    lora_r: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                               "gate_proj", "up_proj", "down_proj"])
    """Linear layers that get LoRA adapters (not used by method full)."""
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """With --nproc > 1: `ddp` (every process holds the whole model) or `fsdp` (weights,
    gradients and optimiser state sharded across the processes: models too big for one GPU)."""


class SFTRecipe(_Run):
    """Supervised fine-tuning of a causal LM on (specialist prompt, reference) pairs, loss on
    the completion only (methods `lora` and `full`)."""

    model_config = ConfigDict(extra="forbid")

    epochs: float = Field(2.0, gt=0)
    batch_size: int = Field(16, ge=1)
    """Sequences per micro-batch."""
    grad_accum: int = Field(1, ge=1)
    """Micro-batches per optimiser step."""
    lr: float = Field(2e-4, gt=0)
    """Peak learning rate (2e-4 to 5e-4 suits LoRA; use about 2e-5 for full fine-tuning)."""
    warmup_fraction: float = Field(0.05, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_length: int = Field(256, ge=16, le=32768)
    """Tokens per example (prompt + completion); longer prompts lose their beginning."""
    eval_every: int = Field(100, ge=1)
    """Score the validation split with the task's first metric every N optimiser steps."""
    eval_rows: int = Field(200, ge=1)
    """Validation rows scored at each evaluation (the first N)."""
    early_stop_patience: int = Field(5, ge=1)
    max_new_tokens: int = Field(64, ge=1)
    """Generation length when evaluating generation/extraction tasks."""


class DistillRecipe(SFTRecipe):
    """Relabel the train inputs with a teacher, then LoRA SFT on its answers (method `distill`)."""

    teacher: str | None = None
    """The teacher candidate, e.g. openai:gpt-4o-mini@https://api.openai.com/v1 (answers are cached)."""


class GRPORecipe(_Run):
    """RL from the task's own metric (method `grpo`), LoRA on top of the base or of an SFT run."""

    model_config = ConfigDict(extra="forbid")

    epochs: float = Field(1.0, gt=0)
    batch_size: int = Field(4, ge=1)
    """Prompts per optimiser step."""
    group_size: int = Field(4, ge=2)
    """Completions sampled per prompt; each one's advantage is its reward against the group's."""
    lr: float = Field(5e-5, gt=0)
    warmup_fraction: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    beta: float = Field(0.04, ge=0)
    """Weight of the KL penalty to the reference model (the starting policy)."""
    temperature: float = Field(1.0, gt=0)
    max_new_tokens: int = Field(48, ge=1)
    max_length: int = Field(256, ge=16, le=32768)
    """Prompt tokens kept (the beginning is cut)."""
    reward: str | None = None
    """Metric used as reward: a built-in name (exact_match, chrf, field_f1, ...) or module:function;
    default: the task's first metric."""
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    """No dropout by default: the policy that samples is the one that is scored."""
    eval_every: int = Field(20, ge=1)
    eval_rows: int = Field(100, ge=1)
    early_stop_patience: int = Field(5, ge=1)


RECIPES = {"classifier": ClassifierRecipe, "student": StudentRecipe, "lora": SFTRecipe, "full": SFTRecipe,
           "distill": DistillRecipe, "grpo": GRPORecipe}


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
        written = data.pop("method", method)  # not a recipe key: the method is chosen by --method
        if written != method:
            raise RecipeError(f"{path}: this recipe is for method {written!r}, not {method!r}")
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
