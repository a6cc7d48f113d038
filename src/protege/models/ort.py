"""An encoder classifier exported to ONNX (models/export.py), answered by ONNX Runtime.

Reached as `run:RUN_ID?runtime=onnx[&quantize=int8]` (the export is made once, beside the
run's model, and reused) or as an export folder itself (`protege serve FOLDER`). It answers
as the torch classifier does: the most probable label, a probability for every label.

Rows go to ONNX Runtime in calls of similar length, planned per batch (`plan_calls`), and
the calls run side by side, single-threaded ONNX Runtime calls a core: on a small encoder one
thread a call does more work a core than one call spread over every core (measured in
docs/serving.md). A call costs its padded tokens plus a fixed part, the model's weights read
again (about 10 tokens' worth on MiniLM, fp32 and int8 alike, measured here): so a batch of a
few rows goes as one call a core, split where the longest call is shortest, and a large one in
groups of similar length dealt out to the cores. A batch that makes one call (a lone request)
goes instead to a second session computing on every core, whose threads spin while it runs and
sleep once it returns, leaving the cores to the server.

Options: `batch_size` (most rows a call, default 64), `threads` (ONNX Runtime's threads a call
of many, default 1), `workers` (such calls at once, default the cores over `threads`),
`lone_threads` (threads for a batch of one call, default every core; 1: no second session,
which costs the model's weights again in memory), `call_tokens` (the fixed part of a call, in
tokens, default 10).
"""

from __future__ import annotations

import heapq
import os
from concurrent.futures import ThreadPoolExecutor
from functools import partial
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
        self.call_tokens = option(options, "call_tokens", 10.0, float, spec)
        if self.batch_size < 1 or self.call_tokens < 0:
            raise ProtegeError(f"{spec}: batch_size must be at least 1 and call_tokens at least 0")
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
        """`progress(n)` is called as each call's n rows are answered, from the worker's thread."""
        enc = [e.ids for e in self.tokenizer.encode_batch([r["input"] for r in rows])]
        plan = plan_calls([len(ids) for ids in enc], self.workers, self.batch_size, self.call_tokens)
        calls = [[[(i, enc[i]) for i in g] for g in worker] for worker in plan]
        if len(calls) == 1 and len(calls[0]) == 1:
            done = [self._run_all(calls[0], progress, self.lone)]
        else:
            work = partial(self._run_all, progress=progress)
            done = list(map(work, calls) if self.pool is None else self.pool.map(work, calls))
        out = [None] * len(rows)
        for worker in done:
            for answered in worker:
                for i, pred in answered:
                    out[i] = pred
        return out

    def _run_all(self, calls: list, progress=None, session=None) -> list[list[tuple[int, object]]]:
        """One worker's calls, one after another."""
        done = []
        for group in calls:
            done.append(self._run(group, session))
            if progress:
                progress(len(group))
        return done

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


def plan_calls(lengths: list[int], workers: int, most: int, call_tokens: float = 10.0) -> list[list[list[int]]]:
    """The ONNX Runtime calls for rows of these token lengths: per worker, its calls (row
    indices, at most `most` a call), which it runs one after another, the workers side by
    side. A call of n rows padded to width w costs about `call_tokens` + n * w; of two plans,
    the one whose busiest worker is done first:
    - groups of similar length with the least cost in all (padding against calls), split
      until every worker has one (`spread`), dealt costliest first to the least busy worker;
    - for a batch of a few rows: one call a worker, the rows cut in length order where the
      costliest call is cheapest."""
    n = len(lengths)
    if n == 0:
        return []
    order = sorted(range(n), key=lengths.__getitem__)
    width = [lengths[i] for i in order]  # by position in length order: a group's last row is its widest

    def cost(g: list[int]) -> float:
        return call_tokens + len(g) * width[g[-1]]

    least, cut = [0.0] + [float("inf")] * n, [0] * (n + 1)  # least cost of the first j rows, and its last cut
    for j in range(1, n + 1):
        for i in range(max(0, j - most), j):
            c = least[i] + call_tokens + (j - i) * width[j - 1]
            if c < least[j]:
                least[j], cut[j] = c, i
    bounds, j = [], n
    while j:
        bounds.append((cut[j], j))
        j = cut[j]
    plans = [_deal(spread([list(range(i, j)) for i, j in reversed(bounds)], workers), workers, cost)]
    if 1 < workers < n <= min(64, workers * most):
        plans.append(_one_call_a_worker(width, workers, most, call_tokens))
    chosen = min(plans, key=lambda p: (max(sum(map(cost, w)) for w in p), sum(map(len, p))))
    return [[[order[k] for k in g] for g in w] for w in chosen]


def _deal(groups: list[list[int]], workers: int, cost) -> list[list[list[int]]]:
    """Groups dealt costliest first, each to the worker with the least work so far."""
    loads = [(0.0, k) for k in range(workers)]
    out: list[list[list[int]]] = [[] for _ in range(workers)]
    for g in sorted(groups, key=cost, reverse=True):
        load, k = heapq.heappop(loads)
        out[k].append(g)
        heapq.heappush(loads, (load + cost(g), k))
    return [w for w in out if w]


def _one_call_a_worker(width: list[int], workers: int, most: int, call_tokens: float) -> list[list[list[int]]]:
    """Positions 0..n-1 (in length order) cut into `workers` runs of at most `most`, one call
    each, where the costliest call is cheapest."""
    n, inf = len(width), float("inf")
    # worst[k][j]: the least cost of the costliest call when the first j rows make k calls
    worst = [[inf] * (n + 1) for _ in range(workers + 1)]
    cut = [[0] * (n + 1) for _ in range(workers + 1)]
    worst[0][0] = 0.0
    for k in range(1, workers + 1):
        for j in range(k, n + 1):
            for i in range(max(k - 1, j - most), j):
                c = max(worst[k - 1][i], call_tokens + (j - i) * width[j - 1])
                if c < worst[k][j]:
                    worst[k][j], cut[k][j] = c, i
    runs, j = [], n
    for k in range(workers, 0, -1):
        runs.append([list(range(cut[k][j], j))])
        j = cut[k][j]
    return runs[::-1]


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
