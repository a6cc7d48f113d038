"""Method `grpo`: reinforcement learning from the task's own metric (GRPO).

    protege train examples/canard/task.yaml --base run:SFT_RUN_ID --method grpo

For each prompt of a batch the policy samples `group_size` completions; each is scored
with the reward metric against the row's reference (exact match, chrF, JSON field F1, or
your own `module:function`), and its advantage is its reward minus the group's mean,
divided by the group's standard deviation. The loss is the advantage-weighted log-
likelihood of each completion (averaged over its tokens) plus `beta` x the KL divergence to
the reference model, estimated per token as exp(r - p) - (r - p) - 1. Training is LoRA on
top of the base (or of a finished SFT run given as `--base run:RUN_ID`); the reference is
that same model with the adapters switched off, so it costs no second copy in memory.

Why our own loop instead of TRL's GRPOTrainer: it runs inside protege's one training loop,
so GRPO gets the same checkpoints and `--resume`, DDP through `--nproc`, evaluation with the
bench's own decoding, early stop and run records as every other method, with one sampling
step per update (on-policy: the importance ratio is 1, so no clipping is needed), and it
needs no vLLM or TRL install on a CPU machine.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..datasets.registry import Dataset
from ..errors import ProtegeError
from ..models.hf import eos_ids
from ..tasks.metrics import get_metric, normalize_text
from ..tasks.prompting import specialist_messages
from ..tasks.spec import Task
from .common import nested_subset
from .job import trainable
from .recipe import GRPORecipe
from .sft import export_causal, load_causal, validation_score


def reward_function(task: Task, name: str | None):
    """Per-completion rewards in [0, 1] from a metric that is a mean of per-example scores."""
    metric = get_metric(name or task.metric_names[0])
    if metric.per_example is None:
        raise ProtegeError(f"recipe key reward: metric {metric.name!r} is not a per-example score (it is an "
                           "aggregate); use exact_match, accuracy, chrf, rouge_l, field_f1 or your own function")

    def reward(preds: list[str], refs: list[str]) -> np.ndarray:
        return metric.per_example([normalize_text(p, task.normalize) for p in preds], refs)

    return metric.name, reward


class GRPOLoss(torch.nn.Module):
    def __init__(self, model, tokenizer, prompts: list[list[int]], refs: list[str], reward, recipe: GRPORecipe):
        super().__init__()
        self.model = model
        self.tokenizer, self.prompts, self.refs, self.reward, self.r = tokenizer, prompts, refs, reward, recipe
        self.eos = eos_ids(model, tokenizer)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos[0]
        self.stats: dict[str, list[float]] = {"reward": [], "kl": []}

    def _sample(self, idx: list[int]):
        """Left-padded prompts x group, and the sampled completions (eos kept, pad after)."""
        G = self.r.group_size
        rows = [self.prompts[i] for i in idx for _ in range(G)]
        P = max(len(p) for p in rows)
        ids = torch.full((len(rows), P), self.pad, dtype=torch.long)
        mask = torch.zeros((len(rows), P), dtype=torch.long)
        for r, p in enumerate(rows):
            ids[r, P - len(p):], mask[r, P - len(p):] = torch.tensor(p), 1
        dev = next(self.model.parameters()).device
        ids, mask = ids.to(dev), mask.to(dev)
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():
            out = self.model.generate(input_ids=ids, attention_mask=mask, do_sample=True,
                                      temperature=self.r.temperature, top_k=0, top_p=1.0,
                                      max_new_tokens=self.r.max_new_tokens, pad_token_id=self.pad,
                                      eos_token_id=self.eos)
        self.model.train(was_training)
        comp = out[:, P:]
        keep = torch.ones_like(comp, dtype=torch.bool)
        for r in range(comp.shape[0]):
            ends = [j for j, t in enumerate(comp[r].tolist()) if t in self.eos]
            if ends:
                keep[r, ends[0] + 1:] = False
        return ids, mask, comp, keep

    def forward(self, idx, weight):
        G = self.r.group_size
        ids, mask, comp, keep = self._sample(list(idx))
        texts = [self.tokenizer.decode([t for t, k in zip(row.tolist(), kk.tolist()) if k and t not in self.eos],
                                       skip_special_tokens=True) for row, kk in zip(comp, keep)]
        refs = [self.refs[i] for i in idx for _ in range(G)]
        rewards = torch.tensor(self.reward(texts, refs), dtype=torch.float32, device=comp.device).view(len(idx), G)
        adv = ((rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4)).view(-1)
        full = torch.cat([ids, comp], dim=1)
        full_mask = torch.cat([mask, keep.long()], dim=1)
        pos = (full_mask.cumsum(1) - 1).clamp(min=0)
        T = comp.shape[1]

        def logprobs():
            logits = self.model(input_ids=full, attention_mask=full_mask, position_ids=pos,
                                logits_to_keep=T + 1).logits[:, :-1].float()
            return torch.log_softmax(logits, -1).gather(-1, comp.unsqueeze(-1)).squeeze(-1)

        policy = logprobs()
        with torch.no_grad(), self.model.disable_adapter():
            ref = logprobs()
        delta = ref - policy
        kl = torch.exp(delta) - delta - 1
        per_token = -torch.exp(policy - policy.detach()) * adv[:, None] + self.r.beta * kl
        k = keep.float()
        per_seq = (per_token * k).sum(1) / k.sum(1).clamp(min=1)
        self.stats["reward"].append(float(rewards.mean()))
        self.stats["kl"].append(float(((kl.detach() * k).sum(1) / k.sum(1).clamp(min=1)).mean()))
        return per_seq.sum() * weight

    def take_stats(self) -> dict:
        out = {f"train_{k}": (float(np.mean(v)) if v else None) for k, v in self.stats.items()}
        self.stats = {k: [] for k in self.stats}
        return out


class GRPOJob:
    """Method grpo as the loop runs it (the `Job` protocol; DDP only, see `__init__`)."""

    unit = "completion"

    def __init__(self, task: Task, dataset: Dataset, home: Path, base: str, recipe: GRPORecipe, folder: Path,
                 run_id: str, *, train_fraction: float | None = None):

        if recipe.strategy == "fsdp":
            from .recipe import RecipeError

            raise RecipeError("recipe key strategy: grpo runs with ddp only (each process samples its own "
                              "completions, so sharded forwards would fall out of step)")
        reward_name, reward = reward_function(task, recipe.reward)
        train = nested_subset([r for r in dataset.split("train") if r.get("reference")], train_fraction)
        self.val = dataset.split("validation")[:recipe.eval_rows]
        if not train:
            raise ProtegeError(f"dataset {dataset.id} has no train rows with a reference to reward against")
        self.task, self.dataset, self.home, self.base, self.recipe = task, dataset, home, base, recipe
        self.folder, self.run_id = folder, run_id
        torch.manual_seed(recipe.seed)
        self.model, self.tokenizer = load_causal(base, home, "lora", recipe)
        tokenizer = self.tokenizer
        prompts = []
        for r in train:
            text = tokenizer.apply_chat_template(specialist_messages(task, r["input"]), tokenize=False,
                                                 add_generation_prompt=True)
            p = tokenizer(text, add_special_tokens=False).input_ids
            prompts.append(p[-recipe.max_length:])
        self.loss = GRPOLoss(self.model, tokenizer, prompts, [r["reference"] for r in train], reward, recipe)
        self.lengths = [len(p) for p in prompts]
        self.validates = bool(self.val)
        self.metrics = {"metric": task.metric_names[0], "reward": reward_name, "train_rows": len(train),
                        "validation_rows_scored": len(self.val)}

    def count(self, idx: list[int]) -> int:
        return len(idx) * self.recipe.group_size

    def work(self, idx: list[int]) -> int:
        return self.count(idx)

    def param_groups(self) -> list[dict]:
        return [{"params": trainable(self.model), "lr": self.recipe.lr}]

    def evaluate(self) -> float:
        """Scored as the bench scores, with the task's metric rather than the reward: the run is
        judged by what it will be benched on."""
        return validation_score(self.model, self.tokenizer, self.task, self.val, self.home, self.recipe.max_new_tokens)

    def stats(self) -> dict:
        return self.loss.take_stats()

    def export(self, metrics: dict) -> Path:
        return export_causal(self.model, self.tokenizer, self.folder, weights="lora", method="grpo", task=self.task,
                             dataset=self.dataset, base=self.base, recipe=self.recipe, metrics=metrics,
                             run_id=self.run_id)

