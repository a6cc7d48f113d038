"""`run:RUN_ID`: a specialist trained by `protege train`, as a bench candidate.

The run's output folder says which method made it (`protege.json`); classifiers answer
with the most probable label and a probability for every label; a student (train/student.py)
answers each input with the fold classifier that never saw it.
"""

from __future__ import annotations

from pathlib import Path

import orjson

from ..errors import ProtegeError
from .base import Context, label_prediction, option
from .export import CAUSAL
from .hf import quantize_int8, quiet_transformers, sequence_logits, set_pooling


class TrainedClassifier:
    kind = "local"

    def __init__(self, run_id: str, folder: Path, meta: dict, options: dict, ctx: Context):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.spec = f"run:{run_id}"
        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        with quiet_transformers():
            self.model = AutoModelForSequenceClassification.from_pretrained(folder)
        self.model.eval()
        self.pooling = set_pooling(self.model, meta.get("pooling", "cls"), self.spec)  # older runs: cls
        quantize = option(options, "quantize", "none", str, self.spec)
        if quantize not in ("none", "int8"):
            raise ProtegeError(f"{self.spec}: quantize must be none or int8")
        if quantize == "int8":
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
                logits = sequence_logits(self.model, enc["input_ids"], enc["attention_mask"], self.pooling)
                probs = torch.softmax(logits.float(), dim=-1)
            for r, i in enumerate(idx):
                out[i] = label_prediction(self.labels, probs[r].tolist(), int(enc["attention_mask"][r].sum()))
            if progress:
                progress(len(idx))
        return out

    def close(self):
        pass


class TrainedStudent:
    """Method student's folds: each input is answered by the classifier of its part (by a hash
    of its text), which learnt from the other parts only."""

    kind = "local"

    def __init__(self, run_id: str, folder: Path, meta: dict, options: dict, ctx: Context):
        self.folds = []
        for k in range(meta["folds"]):
            sub = folder / f"fold-{k + 1}"
            if not (sub / "protege.json").exists():
                raise ProtegeError(f"run {run_id}: its student's {sub.name} is missing or incomplete ({sub})")
            self.folds.append(TrainedClassifier(run_id, sub, orjson.loads((sub / "protege.json").read_bytes()),
                                                options, ctx))
        self.spec = self.folds[0].spec

    def predict(self, rows, progress=None):
        from .student import fold_of

        out = [None] * len(rows)
        part = [fold_of(r["input"], len(self.folds)) for r in rows]
        for k, model in enumerate(self.folds):
            mine = [i for i, p in enumerate(part) if p == k]
            if mine:
                for i, p in zip(mine, model.predict([rows[i] for i in mine], progress=progress)):
                    out[i] = p
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


RUNTIMES = {"classifier": ("torch", "onnx"), "student": ("torch",), "causal": ("torch", "llama.cpp")}
RUNTIME_FORMAT = {"onnx": "onnx", "llama.cpp": "gguf"}
RUNTIME_QUANTIZE = {"onnx": "none", "llama.cpp": "q8_0"}
"""What a runtime reads when the spec names no quantisation: ONNX in fp32 (the torch model's
answers exactly), llama.cpp at q8_0 (what llama.cpp users serve; f32 is the exact one)."""


def runtime_folder(folder: Path, meta: dict, runtime: str, quantize: str, run_id: str | None) -> Path:
    """The export `runtime` reads, made once beside the run's model (`RUN/exports/FORMAT-QUANT/`)
    and reused by every later bench and serve."""
    from .export import export

    fmt = RUNTIME_FORMAT[runtime]
    out = folder.parent / "exports" / f"{fmt}-{quantize}"
    if not (out / "protege.json").exists():
        export(folder, meta, fmt, out, quantize, run_id=run_id)
    return out


def specialist(folder: Path, meta: dict, run_id: str | None, options: dict, ctx: Context):
    """The candidate for a model folder made by protege train, or for an export of one; its
    protege.json says which method made it (so which backend answers) and which format it is
    in. `runtime` (torch, onnx for classifiers, llama.cpp for causal specialists) picks the
    engine; a runtime other than torch answers from an export, made on first use."""
    method = meta.get("method")
    name = run_id or meta.get("run_id") or folder.name
    fmt = meta.get("format")
    options = dict(options)
    if fmt == "onnx":
        from .ort import OnnxClassifier

        return OnnxClassifier(folder, meta, _spec(name, "onnx", meta.get("quantize", "none")), options, ctx)
    if fmt == "gguf":
        from .llamacpp import LlamaCppLM

        return LlamaCppLM(folder, meta, _spec(name, "llama.cpp", meta.get("quantize", "f32")), options, ctx)
    family = "causal" if method in CAUSAL else method
    runtime = options.pop("runtime", "torch")
    if family in RUNTIMES and runtime not in RUNTIMES[family]:
        raise ProtegeError(f"run:{name}: runtime {runtime!r} does not run a {method} model: choose "
                           f"{' or '.join(RUNTIMES[family])}")
    if runtime != "torch":
        quantize = options.pop("quantize", RUNTIME_QUANTIZE[runtime])
        out = runtime_folder(folder, meta, runtime, quantize, name)
        return specialist(out, orjson.loads((out / "protege.json").read_bytes()), run_id, options, ctx)
    if method == "classifier":
        return TrainedClassifier(name, folder, meta, options, ctx)
    if method == "student":
        return TrainedStudent(name, folder, meta, options, ctx)
    if family == "causal":
        from .causal import CausalLM

        # a fine-tuned specialist knows its task: it gets the task's own short prompt
        return CausalLM(str(folder), {"instructed": "0", **options}, ctx, spec=f"run:{name}",
                        instructed_default=False)
    raise ProtegeError(f"run {name}: method {method!r} cannot be benched or served yet")


def _spec(name: str, runtime: str, quantize: str) -> str:
    return f"run:{name}?runtime={runtime}&quantize={quantize}"


def factory(rest: str, options: dict, ctx: Context):
    """`run:RUN_ID`: the finished training run's specialist."""
    if ctx.store is None:  # bench, calibrate and serve pass theirs: a run is looked up where it was stored
        raise ProtegeError(f"run:{rest}: a trained run is looked up in the store, and this context has none")
    run, folder, meta = finished_run_model(ctx.store, rest)
    return specialist(folder, meta, run["id"], options, ctx)

