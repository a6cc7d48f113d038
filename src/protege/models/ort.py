"""An encoder classifier exported to ONNX (models/export.py), answered by ONNX Runtime.

Reached as `run:RUN_ID?runtime=onnx[&quantize=int8]` (the export is made once, beside the
run's model, and reused) or as an export folder itself (`protege serve FOLDER`). It answers
as the torch classifier does: the most probable label, a probability for every label.
Options: `batch_size` (default 64), `threads` (ONNX Runtime's intra-op threads; default
every core).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import ProtegeError
from .base import Context, label_prediction, option


class OnnxClassifier:
    kind = "local"

    def __init__(self, folder: Path, meta: dict, spec: str, options: dict, ctx: Context):
        try:
            import onnxruntime as ort
        except ImportError:
            raise ProtegeError(f"{spec}: ONNX Runtime is not installed: pip install 'protege[ml]'") from None
        from transformers import AutoTokenizer

        self.spec = spec
        model = Path(folder) / "model.onnx"
        if not model.exists():
            raise ProtegeError(f"{spec}: {model} is missing: export the run again (protege export RUN --format onnx)")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = option(options, "threads", os.cpu_count() or 1, int, spec)
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own untyped errors for a bad file
            raise ProtegeError(f"{spec}: ONNX Runtime cannot load {model}: {exc}") from None
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.labels = meta["labels"]
        self.max_length = meta.get("max_length", 128)
        self.batch_size = option(options, "batch_size", 64, int, spec)
        if ctx.task.labels and set(ctx.task.labels) != set(self.labels):
            raise ProtegeError(f"{spec} was trained on other labels than task {ctx.task.name} has")

    def predict(self, rows, progress=None):
        out = [None] * len(rows)
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input"]))
        for s in range(0, len(order), self.batch_size):
            idx = order[s:s + self.batch_size]
            enc = self.tokenizer([rows[i]["input"] for i in idx], padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="np")
            mask = enc["attention_mask"].astype(np.int64)
            logits = self.session.run(None, {"input_ids": enc["input_ids"].astype(np.int64),
                                             "attention_mask": mask})[0].astype(np.float64)
            logits -= logits.max(axis=1, keepdims=True)
            probs = np.exp(logits)
            probs /= probs.sum(axis=1, keepdims=True)
            for r, i in enumerate(idx):
                out[i] = label_prediction(self.labels, probs[r].tolist(), int(mask[r].sum()))
            if progress:
                progress(len(idx))
        return out

    def close(self):
        pass
