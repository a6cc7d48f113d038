"""`run:RUN_ID`: a specialist trained by `protege train`, as a bench candidate.

The run's output folder says which method made it (`protege.json`); classifiers answer
with the most probable label and a probability for every label.
"""

from __future__ import annotations

from pathlib import Path

import orjson

from ..errors import ProtegeError
from .base import Context, Prediction, option


class TrainedClassifier:
    kind = "local"

    def __init__(self, run_id: str, folder: Path, meta: dict, options: dict, ctx: Context):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.spec = f"run:{run_id}"
        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModelForSequenceClassification.from_pretrained(folder)
        self.model.eval()
        quantize = option(options, "quantize", "none", str, self.spec)
        if quantize not in ("none", "int8"):
            raise ProtegeError(f"{self.spec}: quantize must be none or int8")
        if quantize == "int8":
            from .hf import quantize_int8

            self.model = quantize_int8(self.model, self.spec)
            self.spec += "?quantize=int8"
        self.labels = meta["labels"]
        self.max_length = meta.get("max_length", 128)
        self.batch_size = option(options, "batch_size", 64, int, self.spec)
        if ctx.task.labels and set(ctx.task.labels) != set(self.labels):
            raise ProtegeError(f"{self.spec} was trained on other labels than task {ctx.task.name} has")

    def predict(self, rows, progress=None):
        torch = self.torch
        out = [None] * len(rows)
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input"]))
        for s in range(0, len(order), self.batch_size):
            idx = order[s:s + self.batch_size]
            enc = self.tokenizer([rows[i]["input"] for i in idx], padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt")
            with torch.inference_mode():
                probs = torch.softmax(self.model(**enc).logits.float(), dim=-1)
            for r, i in enumerate(idx):
                p = probs[r].tolist()
                best = max(range(len(p)), key=p.__getitem__)
                out[i] = Prediction(output=self.labels[best], confidence=p[best],
                                    prompt_tokens=int(enc["attention_mask"][r].sum()), completion_tokens=0,
                                    label_probs=dict(zip(self.labels, p)))
            if progress:
                progress(len(idx))
        return out

    def close(self):
        pass


def finished_run_model(store, run_id: str) -> tuple[dict, Path, dict]:
    """(run, its model folder, its protege.json) of a finished training run."""
    from ..runs.registry import get_run

    run = get_run(store, run_id)
    if run["status"] != "done":
        raise ProtegeError(f"run {run['id']} is {run['status']}; only finished runs can be benched or served")
    folder = Path(run["checkpoint_path"] or "")
    meta_path = folder / "protege.json"
    if not meta_path.exists():
        raise ProtegeError(f"run {run['id']}: its model folder {folder} is missing or incomplete")
    return run, folder, orjson.loads(meta_path.read_bytes())


def specialist(folder: Path, meta: dict, run_id: str | None, options: dict, ctx: Context):
    """The candidate for a model folder made by protege train; its protege.json says which
    method made it, so which backend answers."""
    method = meta.get("method")
    if method == "classifier":
        return TrainedClassifier(run_id or folder.name, folder, meta, options, ctx)
    if method in ("lora", "full", "distill", "grpo"):
        from .causal import CausalLM

        # a fine-tuned specialist knows its task: it gets the task's own short prompt
        return CausalLM(str(folder), {"instructed": "0", **options}, ctx, spec=f"run:{run_id}",
                        instructed_default=False)
    raise ProtegeError(f"run {run_id or folder}: method {method!r} cannot be benched or served yet")


def factory(rest: str, options: dict, ctx: Context):
    """`run:RUN_ID`: the finished training run's specialist."""
    if ctx.store is None:  # bench, calibrate and serve pass theirs: a run is looked up where it was stored
        raise ProtegeError(f"run:{rest}: a trained run is looked up in the store, and this context has none")
    run, folder, meta = finished_run_model(ctx.store, rest)
    return specialist(folder, meta, run["id"], options, ctx)

