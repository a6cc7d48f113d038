"""An encoder classifier exported to ONNX (models/export.py), answered by ONNX Runtime.

Reached as `run:RUN_ID?runtime=onnx[&quantize=int8]` (the export is made once, beside the
run's model, and reused) or as an export folder itself (`protege serve FOLDER`). It answers
as the torch classifier does: the most probable label, a probability for every label.
Rows go to ONNX Runtime in groups of similar length (`length_groups`), so little compute
goes to padding. Options: `batch_size` (most rows a call, default 64), `threads` (ONNX
Runtime's intra-op threads; default every core), `spin` (1: idle threads spin, ONNX
Runtime's default; 0, protege's: they sleep, leaving the cores to the server between calls).
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
        # idle threads sleep instead of spinning: a server's event loop needs the cores between batches
        opts.add_session_config_entry("session.intra_op.allow_spinning", option(options, "spin", "0", str, spec))
        try:
            self.session = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own untyped errors for a bad file
            raise ProtegeError(f"{spec}: ONNX Runtime cannot load {model}: {exc}") from None
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.pad_id = self.tokenizer.pad_token_id or 0
        self.labels = meta["labels"]
        self.max_length = meta.get("max_length", 128)
        self.batch_size = option(options, "batch_size", 64, int, spec)
        if ctx.task.labels and set(ctx.task.labels) != set(self.labels):
            raise ProtegeError(f"{spec} was trained on other labels than task {ctx.task.name} has")

    def predict(self, rows, progress=None):
        enc = self.tokenizer([r["input"] for r in rows], truncation=True, max_length=self.max_length)["input_ids"]
        out = [None] * len(rows)
        for group in length_groups([len(ids) for ids in enc], self.batch_size):
            width = max(len(enc[i]) for i in group)
            ids = np.full((len(group), width), self.pad_id, dtype=np.int64)
            mask = np.zeros((len(group), width), dtype=np.int64)
            for r, i in enumerate(group):
                ids[r, :len(enc[i])] = enc[i]
                mask[r, :len(enc[i])] = 1
            logits = self.session.run(None, {"input_ids": ids, "attention_mask": mask})[0].astype(np.float64)
            logits -= logits.max(axis=1, keepdims=True)
            probs = np.exp(logits)
            probs /= probs.sum(axis=1, keepdims=True)
            for r, i in enumerate(group):
                out[i] = label_prediction(self.labels, probs[r].tolist(), len(enc[i]))
            if progress:
                progress(len(group))
        return out

    def close(self):
        pass


def length_groups(lengths: list[int], most: int, slack: float = 1.2) -> list[list[int]]:
    """Row indices in groups of similar length, at most `most` a group: every row of a group is
    padded to its longest, and a group takes the next row only while the padded tokens stay
    within `slack` times the real ones. The encoder's cost grows with the tokens it is given;
    one call per group costs little next to computing padding."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    groups: list[list[int]] = []
    real = 0
    for i in order:
        g = groups[-1] if groups else None
        if g is not None and len(g) < most and lengths[i] * (len(g) + 1) <= slack * (real + lengths[i]):
            g.append(i)
            real += lengths[i]
        else:
            groups.append([i])
            real = lengths[i]
    return groups
