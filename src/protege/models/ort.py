"""An encoder classifier exported to ONNX (models/export.py), answered by ONNX Runtime.

Reached as `run:RUN_ID?runtime=onnx[&quantize=int8]` (the export is made once, beside the
run's model, and reused) or as an export folder itself (`protege serve FOLDER`). It answers
as the torch classifier does: the most probable label, a probability for every label.

Rows go to ONNX Runtime in groups of similar length (`length_groups`), so little compute
goes to padding, and the groups of a call run side by side, one single-threaded ONNX
Runtime call a core (`spread`): on a small encoder one thread a call does more work a core
than one call spread over every core (measured in docs/serving.md). A call of one group
(a lone request) goes instead to a second session computing on every core, whose threads
spin while it runs and sleep once it returns, leaving the cores to the server.

Options: `batch_size` (most rows a group, default 64), `threads` (ONNX Runtime's threads a
call of many, default 1), `workers` (such calls at once, default the cores over `threads`),
`lone_threads` (threads for a call of one group, default every core; 1: no second session,
which costs the model's weights again in memory).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
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
        cores = os.cpu_count() or 1
        threads = option(options, "threads", 1, int, spec)
        self.workers = option(options, "workers", max(1, cores // threads), int, spec)
        lone = option(options, "lone_threads", cores, int, spec)
        if min(threads, self.workers, lone) < 1:
            raise ProtegeError(f"{spec}: threads, workers and lone_threads must be at least 1")
        self.session = _session(ort, model, threads, spec)
        self.lone = self.session if lone == threads else _session(ort, model, lone, spec)
        self.labels = meta["labels"]
        self.max_length = meta.get("max_length", 128)
        self.batch_size = option(options, "batch_size", 64, int, spec)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        self.pad_id = tokenizer.pad_token_id or 0
        # the Rust tokenizer itself, its truncation set once: it is then only read, so calls
        # from several threads at once are safe (setting it per call, as the wrapper does, is not)
        self.tokenizer = tokenizer.backend_tokenizer
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(self.max_length)
        self.pool = ThreadPoolExecutor(self.workers, thread_name_prefix="protege-onnx") if self.workers > 1 else None
        if ctx.task.labels and set(ctx.task.labels) != set(self.labels):
            raise ProtegeError(f"{spec} was trained on other labels than task {ctx.task.name} has")

    def predict(self, rows, progress=None):
        enc = [e.ids for e in self.tokenizer.encode_batch([r["input"] for r in rows])]
        groups = spread(length_groups([len(ids) for ids in enc], self.batch_size), self.workers)
        calls = [[(i, enc[i]) for i in g] for g in groups]
        if len(calls) == 1:
            done = [self._run(calls[0], self.lone)]
        else:
            done = map(self._run, calls) if self.pool is None else self.pool.map(self._run, calls)
        out = [None] * len(rows)
        for answered in done:
            for i, pred in answered:
                out[i] = pred
            if progress:
                progress(len(answered))
        return out

    def _run(self, group: list[tuple[int, list[int]]], session=None) -> list[tuple[int, object]]:
        """One ONNX Runtime call on rows of similar length: (row index, prediction) each."""
        width = max(len(ids) for _, ids in group)
        ids = np.full((len(group), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(group), width), dtype=np.int64)
        for r, (_, row) in enumerate(group):
            ids[r, :len(row)] = row
            mask[r, :len(row)] = 1
        logits = (session or self.session).run(None, {"input_ids": ids, "attention_mask": mask})[0].astype(np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        probs /= probs.sum(axis=1, keepdims=True)
        return [(i, label_prediction(self.labels, probs[r].tolist(), len(row))) for r, (i, row) in enumerate(group)]

    def close(self):
        if self.pool is not None:
            self.pool.shutdown(wait=True)


def _session(ort, model: Path, threads: int, spec: str):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    # threads spin while a call runs (each operator starts without waking them) and stop when
    # it returns: between calls the server's event loop has the cores
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1")
    opts.add_session_config_entry("session.force_spinning_stop", "1")
    try:
        return ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own untyped errors for a bad file
        raise ProtegeError(f"{spec}: ONNX Runtime cannot load {model}: {exc}") from None


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


def spread(groups: list[list[int]], workers: int) -> list[list[int]]:
    """The groups split until there are at least `workers` of them (where rows allow), the
    largest halved first, so a call's rows keep every worker busy."""
    groups = [list(g) for g in groups]
    while len(groups) < workers:
        big = max(range(len(groups)), key=lambda k: len(groups[k]), default=None)
        if big is None or len(groups[big]) < 2:
            break
        g = groups.pop(big)
        groups[big:big] = [g[:len(g) // 2], g[len(g) // 2:]]
    return groups
