"""Methods `lora`, `full` and `distill` (after relabelling, see api.py): supervised
fine-tuning of a causal LM on the task's own prompt.

    protege train examples/banking77/task.yaml --base smollm2-135m --method lora

Each training row becomes the specialist's chat (the task's short system prompt, the
input, the reference as the assistant's reply); the loss covers the reply tokens only.
Batches are bucketed by length, so padding wastes little compute. Every `eval_every` steps
the model answers the first `eval_rows` validation rows exactly as the bench will
(constrained to the labels for classification, greedy generation otherwise) and is scored
with the task's first metric; the best state is kept and training stops early when it
stops improving. The output folder `HOME/runs/RUN_ID/model/` is a merged safetensors
model with its tokenizer (plain transformers and vLLM load it); `adapter/` holds the PEFT
adapter of a LoRA run. `load_causal`, `validation_score` and `export_causal` are what every
causal-LM method shares (grpo.py uses them too).
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import orjson
import torch

from ..datasets.registry import Dataset
from ..errors import ProtegeError
from ..fsutil import folder_in_place
from ..models.hf import cache_keyword, causal_parts, run_decoder
from ..tasks.metrics import get_metric
from ..tasks.prompting import specialist_messages
from ..tasks.spec import Task
from .common import nested_subset, write_model_card
from .distributed import train_device
from .job import trainable
from .recipe import SFTRecipe

IGNORE = -100


def encode(tokenizer, task: Task, text: str, reference: str, max_length: int) -> tuple[list[int], list[int]]:
    """(input ids, labels) of one example; labels are IGNORE on the prompt."""
    messages = specialist_messages(task, text)
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": reference}], tokenize=False)
    if not full.startswith(prompt):
        raise ProtegeError("the tokenizer's chat template does not extend the prompt with the reply; "
                           "protege cannot find the completion tokens")
    p_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    c_ids = tokenizer(full[len(prompt):], add_special_tokens=False).input_ids
    # keep the whole reply; cut the prompt's beginning if the example is too long
    p_ids = p_ids[max(0, len(p_ids) + len(c_ids) - max_length):]
    return p_ids + c_ids, [IGNORE] * len(p_ids) + c_ids


def validation_score(model, tokenizer, task: Task, rows: list[dict], home: Path, max_new_tokens: int) -> float:
    """The task's first metric on `rows`, answered exactly as the bench answers (constrained to
    the labels for classification, greedy generation otherwise). Every causal-LM method scores
    its validation split this way."""
    from ..models.base import Context
    from ..models.causal import CausalLM

    model.eval()
    mode = "constrained" if task.kind == "classification" else "generate"
    lm = CausalLM("(training)", {"mode": mode, "instructed": "0", "max_new_tokens": str(max_new_tokens)},
                  Context(task=task, dataset=None, home=home), model=model, tokenizer=tokenizer)
    preds = [p.output for p in lm.predict(rows)]
    model.train()
    return get_metric(task.metric_names[0]).score(preds, [r["reference"] for r in rows])


class SFTJob:
    """Methods lora, full and distill as the loop runs them (the `ShardableJob` protocol).
    `method` is the weights trained (lora or full); `card_method` the method the run is
    recorded as, when it differs (distill trains LoRA)."""

    unit = "tok"

    def __init__(self, task: Task, dataset: Dataset, home: Path, base: str, recipe: SFTRecipe, folder: Path,
                 run_id: str, *, method: str, train_fraction: float | None = None, card_method: str | None = None):

        train = nested_subset(dataset.split("train"), train_fraction)
        self.val = dataset.split("validation")[:recipe.eval_rows]
        if not train:
            raise ProtegeError(f"dataset {dataset.id} has no train rows")
        self.task, self.dataset, self.home, self.base, self.recipe = task, dataset, home, base, recipe
        self.folder, self.run_id, self.method = folder, run_id, method
        self.card_method = card_method or method
        torch.manual_seed(recipe.seed)
        self.model, self.tokenizer = load_causal(base, home, method, recipe)
        tokenizer = self.tokenizer
        self.examples = [encode(tokenizer, task, r["input"], r["reference"], recipe.max_length) for r in train]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.completion = [sum(1 for t in y if t != IGNORE) for _, y in self.examples]
        self.loss = CompletionLoss(self.model, self.examples, pad)
        self.lengths = [len(x) for x, _ in self.examples]
        self.validates = bool(self.val)
        self.metrics = {"metric": task.metric_names[0], "train_rows": len(train),
                        "validation_rows_scored": len(self.val)}

    def count(self, idx: list[int]) -> int:
        return sum(self.completion[i] for i in idx)

    def work(self, idx: list[int]) -> int:
        return sum(len(self.examples[i][0]) for i in idx)

    def param_groups(self) -> list[dict]:
        return [{"params": trainable(self.model), "lr": self.recipe.lr}]

    def evaluate(self) -> float:
        return validation_score(self.model, self.tokenizer, self.task, self.val, self.home, self.recipe.max_new_tokens)

    def stats(self) -> dict:
        return {}

    def export(self, metrics: dict, model=None) -> Path:
        return export_causal(self.model if model is None else model, self.tokenizer, self.folder,
                             weights=self.method, method=self.card_method, task=self.task, dataset=self.dataset,
                             base=self.base, recipe=self.recipe, metrics=metrics, run_id=self.run_id)

    def rebuild(self):
        return load_causal(self.base, self.home, self.method, self.recipe, device="cpu")[0]


def sft_job(task: Task, dataset: Dataset, home: Path, base: str, recipe: SFTRecipe, folder: Path, run_id: str, *,
            method: str, train_fraction: float | None = None, card_method: str | None = None) -> SFTJob:
    """The SFT job, for scripts that build one by hand (benchmarks/train_vs_trl.py)."""
    return SFTJob(task, dataset, home, base, recipe, folder, run_id, method=method, train_fraction=train_fraction,
                  card_method=card_method)


def load_causal(base: str, home: Path, method: str, recipe: SFTRecipe, device=None):
    """The base causal LM (with fresh LoRA adapters for `lora`) and its tokenizer, on `device`
    (default: this process's training device)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..bases import resolve

    path = resolve(base, home)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except OSError as exc:
        raise ProtegeError(f"base model {base!r}: cannot load it ({exc})") from None
    if not tokenizer.chat_template:
        raise ProtegeError(f"base model {base!r} has no chat template; use an instruct/chat model")
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        present = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        missing = [m for m in recipe.target_modules if m not in present]
        if missing:
            raise ProtegeError(f"recipe key target_modules: {missing} are not layers of {base!r}")
        lora = LoraConfig(r=recipe.lora_r, lora_alpha=recipe.lora_alpha, lora_dropout=recipe.lora_dropout,
                          target_modules=recipe.target_modules, task_type="CAUSAL_LM")
        with warnings.catch_warnings():
            # peft 0.21 calls a transformers attribute transformers 5 deprecates; nothing for users to do
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            model = get_peft_model(model, lora)
    return model.to(device or train_device()), tokenizer


def shared_prefix(examples: list[tuple[list[int], list[int]]], minimum: int = 4) -> int:
    """How many tokens every example starts with, stopping before the token ahead of the first
    completion token (whose hidden state the loss needs in its own row); 0 when fewer than
    `minimum`, where sharing would not pay."""
    first = examples[0][0]
    n = min(next(j for j, t in enumerate(y) if t != IGNORE) for _, y in examples) - 1
    for x, _ in examples:
        n = min(n, len(x))
        for j in range(n):
            if x[j] != first[j]:
                n = j
                break
        if n < minimum:
            return 0
    return n


class CompletionLoss(torch.nn.Module):
    """Summed cross-entropy on the completion tokens of a set of examples.

    Two savings, neither of which changes the loss: the LM head runs only on the positions
    whose next token is a completion token (for short replies that skips most of its
    compute); and when every example starts with the same tokens (the task's system prompt as
    the chat template renders it) the decoder runs that prefix once per batch and every row
    continues from its key/value cache, so the prefix's gradient is the sum over the rows, as
    it would be had each row computed it."""

    def __init__(self, model, examples: list[tuple[list[int], list[int]]], pad: int, share_prefix: bool = True):
        super().__init__()
        self.model = model
        self.examples, self.pad = examples, pad
        self.parts = causal_parts(model)
        self.shared = shared_prefix(examples) if share_prefix and self.parts is not None else 0
        self.kw = cache_keyword(self.parts[0]) if self.parts is not None else None

    def forward(self, idx, weight):
        L = self.shared
        width = max(len(self.examples[i][0]) for i in idx) - L
        ids = torch.full((len(idx), width), self.pad, dtype=torch.long)
        labels = torch.full((len(idx), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            x, y = self.examples[i]
            ids[r, :len(x) - L], labels[r, :len(y) - L], mask[r, :len(x) - L] = \
                torch.tensor(x[L:]), torch.tensor(y[L:]), 1
        dev = next(self.model.parameters()).device
        ids, mask, labels = ids.to(dev), mask.to(dev), labels.to(dev)
        target = labels[:, 1:]
        keep = target != IGNORE
        if self.parts is None:
            logits = self.model(input_ids=ids, attention_mask=mask).logits[:, :-1][keep]
        else:
            decoder, head = self.parts
            if L:
                prefix = torch.tensor([self.examples[idx[0]][0][:L]], device=dev)
                _, cache = run_decoder(decoder, self.kw, prefix, torch.ones_like(prefix),
                                       torch.arange(L, device=dev)[None], None)
                cache.batch_repeat_interleave(len(idx))
                mask = torch.cat([torch.ones((len(idx), L), dtype=mask.dtype, device=dev), mask], dim=1)
                pos = torch.arange(L, L + width, device=dev)[None].expand(len(idx), -1)
                hidden, _ = run_decoder(decoder, self.kw, ids, mask, pos, cache)
            else:
                hidden = decoder(input_ids=ids, attention_mask=mask).last_hidden_state
            logits = head(hidden[:, :-1][keep])
        return torch.nn.functional.cross_entropy(logits.float(), target[keep], reduction="sum") * weight


def export_causal(model, tokenizer, folder: Path, *, weights: str, method: str, task: Task, dataset: Dataset,
                  base: str, recipe, metrics: dict, run_id: str) -> Path:
    """`folder/model/`: the merged model (and `folder/adapter/` when `weights` is lora), its
    protege.json recording `method`, and the model card. Every causal-LM method exports this way."""
    _save_merged(model, tokenizer, folder, weights)
    (folder / "model" / "protege.json").write_bytes(orjson.dumps(
        {"method": method, "task": task.name, "run_id": run_id, "labels": task.labels}))
    _model_card(folder / "model", task, dataset, base, method, recipe, metrics, run_id)
    return folder / "model"


def _save_merged(model, tokenizer, folder: Path, method: str) -> None:
    """Write the adapter (LoRA) and the merged model, each via a temporary folder."""
    if method == "lora":
        with folder_in_place(folder / "adapter") as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        merged = copy.deepcopy(model).merge_and_unload()
    else:
        merged = model
    with folder_in_place(folder / "model") as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)


def _model_card(folder: Path, task: Task, dataset: Dataset, base: str, method: str, recipe, metrics: dict,
                run_id: str) -> None:
    write_model_card(
        folder, title=f"{task.name} specialist ({method}, run {run_id})",
        intro=(f"Fine-tuned by protege from `{base}` on dataset `{dataset.id}` (hash "
               f"`{dataset.content_hash[:16]}`), {metrics['train_rows']:,} train rows."),
        best_label=f"best validation {metrics['metric']} ({metrics['validation_rows_scored']} rows)",
        metrics=metrics, recipe=recipe,
        usage=("The prompt it expects is the task's own (system prompt and template in the task file). "
               f"Bench it as `run:{run_id}`; serve the folder with vLLM or transformers."))
