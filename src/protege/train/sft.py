"""Methods `lora` and `full`: supervised fine-tuning of a causal LM on the task's own prompt.

    protege train examples/banking77/task.yaml --base smollm2-135m --method lora

Each training row becomes the specialist's chat (the task's short system prompt, the
input, the reference as the assistant's reply); the loss covers the reply tokens only.
Batches are bucketed by length, so padding wastes little compute. Every `eval_every` steps
the model answers the first `eval_rows` validation rows exactly as the bench will
(constrained to the labels for classification, greedy generation otherwise) and is scored
with the task's first metric; the best state is kept and training stops early when it
stops improving. The output folder `HOME/runs/RUN_ID/model/` is a merged safetensors
model with its tokenizer (plain transformers and vLLM load it); `adapter/` holds the PEFT
adapter of a LoRA run.
"""

from __future__ import annotations

import copy
import random
import shutil
import time
import warnings
from pathlib import Path

import orjson

from ..errors import ProtegeError
from ..models.prompting import specialist_messages
from ..tasks.metrics import get_metric
from ..tasks.spec import Task
from ..traces.store import Store
from .common import Stopper, bucketed_batches, format_score, nested_subset, progress_bar, tensorboard, warmup_cosine
from .recipe import SFTRecipe
from .runs import start_training_run, update_run

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


def _evaluate(model, tokenizer, task: Task, rows: list[dict], home: Path, recipe: SFTRecipe) -> float:
    from ..models.base import Context
    from ..models.causal import CausalLM

    model.eval()
    mode = "constrained" if task.kind == "classification" else "generate"
    lm = CausalLM("(training)", {"mode": mode, "instructed": "0", "max_new_tokens": str(recipe.max_new_tokens)},
                  Context(task=task, dataset={}, home=home), model=model, tokenizer=tokenizer)
    preds = [p.output for p in lm.predict(rows)]
    model.train()
    return get_metric(task.metric_names[0]).score(preds, [r["reference"] for r in rows])


def train_sft(store: Store, task: Task, dataset: dict, home: Path, base: str, recipe: SFTRecipe, method: str,
              *, time_budget_min: float | None = None, console=None,
                     train_fraction: float | None = None) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..datasets.registry import load_split
    from ..models.local import resolve

    train = nested_subset(load_split(dataset, "train"), train_fraction)
    val = load_split(dataset, "validation")[:recipe.eval_rows]
    if not train:
        raise ProtegeError(f"dataset {dataset['id']} has no train rows")
    run_id, folder = start_training_run(store, home, task=task.name, dataset=dataset, base=base, method=method,
                                        recipe=recipe, time_budget_min=time_budget_min,
                                        train_fraction=train_fraction)
    try:
        torch.manual_seed(recipe.seed)
        rng = random.Random(recipe.seed)
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
        examples = [encode(tokenizer, task, r["input"], r["reference"], recipe.max_length) for r in train]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
        micro_per_epoch = -(-len(examples) // recipe.batch_size)
        total = max(1, int(micro_per_epoch * recipe.epochs) // recipe.grad_accum)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(total, recipe.warmup_fraction))
        tb = tensorboard(folder / "tensorboard")
        history: list[dict] = []
        if val:
            history.append({"step": 0, "loss": None, "val_score": _evaluate(model, tokenizer, task, val, home, recipe),
                            "elapsed_s": 0.0})
        best_state = {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k or method == "full"}
        step, micro, tokens = 0, 0, 0
        model.train()
        t0 = time.monotonic()
        stop = Stopper(recipe.early_stop_patience, time_budget_min,
                       best=history[0]["val_score"] if history else float("-inf"))
        with progress_bar(console, unit="tok") as bar:
            tid = bar.add_task("train", total=total, run=run_id[:13], loss=float("nan"), rate=0.0,
                               val=f"{stop.best:.4f}" if history else "—")
            while not stop.done:
                for batch in bucketed_batches([len(e[0]) for e in examples], recipe.batch_size, rng):
                    width = max(len(examples[i][0]) for i in batch)
                    ids = torch.full((len(batch), width), pad, dtype=torch.long)
                    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
                    mask = torch.zeros((len(batch), width), dtype=torch.long)
                    for r, i in enumerate(batch):
                        x, y = examples[i]
                        ids[r, :len(x)], labels[r, :len(y)], mask[r, :len(x)] = torch.tensor(x), torch.tensor(y), 1
                    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss / recipe.grad_accum
                    loss.backward()
                    micro += 1
                    tokens += int(mask.sum())
                    if micro % recipe.grad_accum:
                        continue
                    torch.nn.utils.clip_grad_norm_(params, 1.0)
                    opt.step()
                    sched.step()
                    opt.zero_grad(set_to_none=True)
                    step += 1
                    loss_value = loss.detach().item() * recipe.grad_accum
                    rate = tokens / max(time.monotonic() - t0, 1e-6)
                    if tb:
                        tb.add_scalar("train/loss", loss_value, step)
                        tb.add_scalar("train/lr", sched.get_last_lr()[0], step)
                    bar.update(tid, advance=1, loss=loss_value, rate=rate)
                    last = step >= total
                    out_of_time = stop.out_of_time()
                    if val and (step % recipe.eval_every == 0 or last or out_of_time):
                        score = _evaluate(model, tokenizer, task, val, home, recipe)
                        history.append({"step": step, "loss": loss_value, "val_score": score,
                                        "elapsed_s": time.monotonic() - t0})
                        if tb:
                            tb.add_scalar(f"val/{task.metric_names[0]}", score, step)
                        bar.update(tid, val=f"{score:.4f}")
                        if stop.record(step, score):
                            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()
                                          if k in best_state}
                        update_run(store, run_id, metrics={"history": history, "best_val_score": stop.best,
                                                           "best_step": stop.best_step})
                    if stop.end_of_step(last, out_of_time):
                        break
        if tb:
            tb.close()
        wall = time.monotonic() - t0
        if not val:
            best_state, stop.best_step = {}, step  # nothing to choose with: keep the last weights
        model.load_state_dict(best_state, strict=False)
        _export(model, tokenizer, folder, method)
        metrics = {"history": history, "metric": task.metric_names[0], "best_val_score": stop.best if val else None,
                   "best_step": stop.best_step, "steps": step, "stop_reason": stop.reason, "wall_s": wall,
                   "train_tokens_per_s": tokens / wall if wall else None, "train_rows": len(train),
                   "validation_rows_scored": len(val)}
        (folder / "model" / "protege.json").write_bytes(orjson.dumps(
            {"method": method, "task": task.name, "run_id": run_id, "labels": task.labels}))
        _model_card(folder / "model", task, dataset, base, method, recipe, metrics, run_id)
        update_run(store, run_id, status="done", metrics=metrics)
        return run_id
    except BaseException as exc:
        update_run(store, run_id, status="failed", error=f"{type(exc).__name__}: {exc}"[:2000])
        raise


def _export(model, tokenizer, folder: Path, method: str) -> None:
    """Write the adapter (LoRA) and the merged model, each via a temporary folder."""
    out = folder / "model"
    tmp = folder / "model.tmp"
    for p in (out, tmp):
        if p.exists():
            shutil.rmtree(p)
    if method == "lora":
        model.save_pretrained(folder / "adapter")
        tokenizer.save_pretrained(folder / "adapter")
        merged = copy.deepcopy(model).merge_and_unload()
    else:
        merged = model
    merged.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)


def _model_card(folder: Path, task: Task, dataset: dict, base: str, method: str, recipe, metrics: dict,
                run_id: str) -> None:
    lines = [f"# {task.name} specialist ({method}, run {run_id})", "",
             f"Fine-tuned by protege from `{base}` on dataset `{dataset['id']}` (hash "
             f"`{dataset['content_hash'][:16]}`), {metrics['train_rows']:,} train rows.", "",
             "| figure | value |", "| --- | --- |",
             f"| best validation {metrics['metric']} ({metrics['validation_rows_scored']} rows) | "
             f"{format_score(metrics['best_val_score'])} (step {metrics['best_step']}) |",
             f"| steps | {metrics['steps']} ({metrics['stop_reason']}) |",
             f"| training wall time | {metrics['wall_s']:.0f} s |",
             f"| training throughput | {metrics['train_tokens_per_s']:.0f} tokens/s |", "",
             "Recipe:", "", "```yaml", *(f"{k}: {v}" for k, v in recipe.model_dump().items()), "```", "",
             "The prompt it expects is the task's own (system prompt and template in the task file). "
             f"Bench it as `run:{run_id}`; serve the folder with vLLM or transformers."]
    (folder / "README.md").write_text("\n".join(lines) + "\n")
