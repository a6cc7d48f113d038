"""A causal specialist exported to GGUF (models/gguf_export.py), answered by llama.cpp.

Reached as `run:RUN_ID?runtime=llama.cpp[&quantize=q8_0|q4_k_m|f16|f32]` (the GGUF is made
once, beside the run's model) or as an export folder (`protege serve FOLDER`). It prompts
exactly as the torch backend does (the task's own short prompt through the model's chat
template) and decodes through llama.cpp's C API (llama-cpp-python's bindings):

- the prompt part every row shares is decoded once, into sequence 0 of a unified KV cache;
  each row of a batch starts from a copy of it (a cheap cell-sharing copy) as its own
  sequence, and all rows decode together in one `llama_decode` per step;
- classification: the label set is a grammar, enforced as a prefix tree of the labels'
  tokens (models/label_trie.py). At each branch point every row takes its most probable
  allowed token; where the tree does not branch the forced tokens go in the same decode
  call, so a label costs one step per branch point, not one per token. The answer is
  always a label, with the model's probability of that label's tokens as its confidence:
  greedy over the grammar, as llama.cpp's own grammar sampling at temperature 0;
- other tasks: free greedy decoding until an end token or `max_new_tokens`.

Every llama.cpp call runs on one thread of the model's own, whichever thread asks: llama.cpp
computes with OpenMP, and a second thread starting its own OpenMP team makes libgomp count more
threads than cores and stop its threads spinning between calls (measured here: a row took 131
ms answered from a thread other than the one that loaded the model, against 75 ms).

Options: `batch_size` (rows decoded together, default 16), `threads` (default every core),
`ctx` (KV cells, default 8192), `max_new_tokens` (default 48), `shots`, `repack` (1:
llama.cpp's extra weight layouts for the CPU, its repacked and AMX kernels; 0: the plain
ones. Default 1, except on a CPU that advertises AMX: llama.cpp's AMX kernels crash the
process (SIGSEGV in ggml_backend_amx_mul_mat) under hypervisors that advertise AMX without
enabling it, as the machines protege is tested on do, so there the default is 0; set 1
where AMX truly works).
"""

from __future__ import annotations

import ctypes
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..errors import ProtegeError
from ..tasks.metrics import normalize_text
from .base import Context, Prediction, option
from .label_trie import LabelTrie

log = logging.getLogger("protege.llamacpp")
_LOG_CALLBACK = None
"""llama.cpp's log hook, kept referenced for as long as the library may call it."""


def _quiet(llama_cpp) -> None:
    """llama.cpp writes its load report to stderr; only its errors are worth a user's eye."""
    global _LOG_CALLBACK
    if _LOG_CALLBACK is None:
        @llama_cpp.llama_log_callback
        def callback(level, text, user_data):
            if level == 3:  # GGML_LOG_LEVEL_ERROR
                log.error("llama.cpp: %s", text.decode("utf-8", "replace").rstrip())

        _LOG_CALLBACK = callback
        llama_cpp.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))


def cpu_has_amx() -> bool:
    """Whether the CPU advertises Intel AMX (Linux's /proc/cpuinfo flags; False elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return "amx_int8" in line.split()
    except OSError:
        pass
    return False


class LlamaCppLM:
    kind = "local"

    def __init__(self, folder: Path, meta: dict, spec: str, options: dict, ctx: Context):
        try:
            import llama_cpp
        except ImportError:
            raise ProtegeError(f"{spec}: llama-cpp-python is not installed: pip install 'protege[ml]'") from None

        self.spec, self.ctx, self.lib = spec, ctx, llama_cpp
        task = ctx.task
        path = Path(folder) / "model.gguf"
        if not path.exists():
            raise ProtegeError(f"{spec}: {path} is missing: export the run again (protege export RUN --format gguf)")
        self.cctx = None
        self.batch_size = option(options, "batch_size", 16, int, spec)
        threads = option(options, "threads", os.cpu_count() or 1, int, spec)
        n_ctx = option(options, "ctx", 8192, int, spec)
        self.max_new_tokens = option(options, "max_new_tokens", 48, int, spec)
        shots = option(options, "shots", 0, int, spec)
        repack = option(options, "repack", 0 if cpu_has_amx() else 1, int, spec)
        if repack not in (0, 1):
            raise ProtegeError(f"{spec}: repack={repack}: choose 1 (llama.cpp's extra weight layouts) or 0 (the plain ones)")
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="protege-llama.cpp")
        try:
            self.thread.submit(self._open, path, folder, task, repack, threads, n_ctx, shots).result()
        except BaseException:
            self.close()
            raise

    def _open(self, path: Path, folder, task, repack: int, threads: int, n_ctx: int, shots: int) -> None:
        """Load the GGUF and decode the shared prompt part (on the model's own thread)."""
        from transformers import AutoTokenizer

        llama_cpp, spec, ctx = self.lib, self.spec, self.ctx
        _quiet(llama_cpp)
        llama_cpp.llama_backend_init()
        mparams = llama_cpp.llama_model_default_params()
        mparams.use_extra_bufts = repack == 1
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), mparams)
        if not self.model:
            raise ProtegeError(f"{spec}: llama.cpp cannot load {path} (not a GGUF file llama.cpp reads)")
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = cparams.n_ubatch = min(2048, n_ctx)
        cparams.n_seq_max = self.batch_size + 1
        cparams.kv_unified = True  # rows share the prompt's cells instead of each holding a copy
        cparams.n_threads = cparams.n_threads_batch = threads
        cparams.no_perf = True
        self.cctx = llama_cpp.llama_init_from_model(self.model, cparams)
        if not self.cctx:
            llama_cpp.llama_model_free(self.model)
            raise ProtegeError(f"{spec}: llama.cpp could not make a context of {n_ctx} cells for {path}")
        self.n_ctx, self.n_batch = n_ctx, cparams.n_batch
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.mem = llama_cpp.llama_get_memory(self.cctx)
        self.batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self.eos = self._end_tokens()
        self.hf = AutoTokenizer.from_pretrained(folder)  # renders the chat prompt the model was trained on
        from .causal import prompt_parts

        rows = ctx.train[:shots] if shots else []
        self.prefix_text, self.render = prompt_parts(task, self.hf, [(r["input"], r["reference"]) for r in rows],
                                                     instructed=False)
        self.prefix = self.tokenize(self.prefix_text)
        self.prefix_ok: bool | None = None
        self.trie = None
        if task.kind == "classification":
            if not task.labels:
                raise ProtegeError(f"{spec}: task {task.name} names no labels to constrain the answer to")
            self.trie = LabelTrie({lab: self.tokenize(lab) + [self.eos[0]] for lab in task.labels})
        self._decode_prefix()

    # -- tokens -----------------------------------------------------------------------------

    def tokenize(self, text: str) -> list[int]:
        return _tokenize(self.lib, self.vocab, text, special=True)

    def detokenize(self, tokens: list[int]) -> str:
        out = b""
        buf = ctypes.create_string_buffer(256)
        for t in tokens:
            n = self.lib.llama_token_to_piece(self.vocab, t, buf, len(buf), 0, False)
            out += buf.raw[:max(n, 0)]
        return out.decode("utf-8", "replace")

    def _end_tokens(self) -> list[int]:
        ends = []
        for t in (self.lib.llama_vocab_eot(self.vocab), self.lib.llama_vocab_eos(self.vocab)):
            if t >= 0 and t not in ends:
                ends.append(t)
        if not ends:
            raise ProtegeError(f"{self.spec}: the GGUF's vocabulary names no end-of-turn or end-of-sequence token")
        return ends

    def suffix(self, text: str) -> list[int]:
        """The row's own tokens after the shared prefix (its whole prompt if the two do not
        tokenize as the whole prompt does; then the row does not share the prefix's cells)."""
        full = self.render(text)
        if full.startswith(self.prefix_text):
            ids = self.tokenize(full[len(self.prefix_text):])
            if self.prefix_ok is None:
                self.prefix_ok = self.tokenize(full) == self.prefix + ids
            if self.prefix_ok:
                return ids
        self.prefix_ok = False
        return self.tokenize(full)

    # -- decoding ---------------------------------------------------------------------------

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> dict[int, np.ndarray]:
        """Decode (token, position, sequence, wants logits) entries in calls of at most
        n_batch tokens; returns the logits of each entry that wants them, by entry index."""
        lib, out = self.lib, {}
        for start in range(0, len(entries), self.n_batch):
            part = entries[start:start + self.n_batch]
            b = self.batch
            for i, (tok, pos, seq, want) in enumerate(part):
                b.token[i], b.pos[i], b.n_seq_id[i] = tok, pos, 1
                b.seq_id[i][0] = seq
                b.logits[i] = want
            b.n_tokens = len(part)
            code = lib.llama_decode(self.cctx, b)
            if code != 0:
                raise ProtegeError(f"{self.spec}: llama.cpp failed to decode a batch (code {code}: "
                                   f"{'no room in its KV cache: raise ?ctx=' if code == 1 else 'see its log'})")
            for i, (_, _, _, want) in enumerate(part):
                if want:
                    ptr = lib.llama_get_logits_ith(self.cctx, i)
                    out[start + i] = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).astype(np.float64)
        return out

    def _decode_prefix(self) -> None:
        self.lib.llama_memory_clear(self.mem, True)
        if self.prefix:
            self._decode([(t, p, 0, False) for p, t in enumerate(self.prefix)])

    def _start(self, suffixes: list[list[int]]) -> tuple[list[int], list[np.ndarray]]:
        """Each row (sequence i + 1) from the shared prefix, its own tokens decoded; returns the
        next position of each row and the logits after its last token."""
        P = len(self.prefix) if self.prefix_ok else 0
        entries, last = [], []
        for i, suf in enumerate(suffixes):
            if P:
                self.lib.llama_memory_seq_cp(self.mem, 0, i + 1, -1, -1)
            for j, t in enumerate(suf):
                entries.append((t, P + j, i + 1, j == len(suf) - 1))
            last.append(len(entries) - 1)
        logits = self._decode(entries)
        return [P + len(s) for s in suffixes], [logits[k] for k in last]

    def _release(self, n: int) -> None:
        for i in range(n):
            self.lib.llama_memory_seq_rm(self.mem, i + 1, -1, -1)

    def _classify(self, suffixes: list[list[int]]) -> list[tuple[str, float, int]]:
        trie = self.trie
        pos, logits = self._start(suffixes)
        node = [0] * len(suffixes)
        score = [0.0] * len(suffixes)
        steps = [0] * len(suffixes)
        result: list = [None] * len(suffixes)
        live = list(range(len(suffixes)))
        while live:
            entries, plan = [], []
            for i in live:
                lp = _log_softmax(logits[i])
                allowed = list(trie.children[node[i]])
                tok = max(allowed, key=lambda t: lp[t])
                score[i] += lp[tok]
                steps[i] += 1
                child = trie.children[node[i]][tok]
                if child in trie.label_at:
                    result[i] = (trie.label_at[child], float(np.exp(score[i])), steps[i])
                    continue
                chunk, node[i] = trie.forced(tok, child)
                first = len(entries)
                entries += [(t, pos[i] + j, i + 1, True) for j, t in enumerate(chunk)]
                plan.append((i, chunk, first))
                pos[i] += len(chunk)
            if not plan:
                break
            out = self._decode(entries)
            live = []
            for i, chunk, first in plan:
                for j in range(1, len(chunk)):  # the forced tokens' own probabilities
                    score[i] += _log_softmax(out[first + j - 1])[chunk[j]]
                    steps[i] += 1
                logits[i] = out[first + len(chunk) - 1]
                live.append(i)
        return result

    def _generate(self, suffixes: list[list[int]]) -> list[tuple[str, None, int]]:
        pos, logits = self._start(suffixes)
        made: list[list[int]] = [[] for _ in suffixes]
        live = list(range(len(suffixes)))
        for _ in range(self.max_new_tokens):
            entries, nxt = [], []
            for i in live:
                tok = int(np.argmax(logits[i]))
                made[i].append(tok)
                if tok not in self.eos:
                    entries.append((tok, pos[i], i + 1, True))
                    nxt.append(i)
                    pos[i] += 1
            if not entries:
                break
            out = self._decode(entries)
            live = nxt
            for k, i in enumerate(live):
                logits[i] = out[k]
        return [(normalize_text(self.detokenize([t for t in m if t not in self.eos]), self.ctx.task.normalize),
                 None, len(m)) for m in made]

    def predict(self, rows, progress=None):
        return self.thread.submit(self._predict, rows, progress).result()

    def _predict(self, rows, progress=None):
        suffixes = [self.suffix(r["input"]) for r in rows]
        P = len(self.prefix) if self.prefix_ok else 0
        order = sorted(range(len(rows)), key=lambda i: len(suffixes[i]))
        out: list = [None] * len(rows)
        run = self._classify if self.trie is not None else self._generate
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            try:
                answers = run([suffixes[i] for i in chunk])
            finally:
                self._release(len(chunk))
            for i, (text, conf, n) in zip(chunk, answers):
                out[i] = Prediction(output=text, confidence=conf, prompt_tokens=P + len(suffixes[i]),
                                    completion_tokens=n)
            if progress:
                progress(len(chunk))
        return out

    def close(self):
        if getattr(self, "thread", None) is None:
            return
        self.thread.submit(self._free).result()
        self.thread.shutdown(wait=True)
        self.thread = None

    def _free(self) -> None:
        if self.cctx:
            self.lib.llama_batch_free(self.batch)
            self.lib.llama_free(self.cctx)
            self.lib.llama_model_free(self.model)
            self.cctx = None


def _tokenize(lib, vocab, text: str, *, special: bool) -> list[int]:
    raw = text.encode()
    buf = (lib.llama_token * (len(raw) + 8))()
    n = lib.llama_tokenize(vocab, raw, len(raw), buf, len(buf), False, special)
    if n < 0:
        raise ProtegeError(f"llama.cpp could not tokenize a text of {len(raw)} bytes")
    return list(buf[:n])


def vocab_tokens(path: Path, text: str) -> list[int] | None:
    """How llama.cpp tokenizes `text` (special tokens as plain text) with the vocabulary of the
    GGUF at `path`; None when llama.cpp cannot read that vocabulary."""
    import llama_cpp

    _quiet(llama_cpp)
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        return None
    try:
        return _tokenize(llama_cpp, llama_cpp.llama_model_get_vocab(model), text, special=False)
    finally:
        llama_cpp.llama_model_free(model)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    m = logits.max()
    return logits - (m + np.log(np.exp(logits - m).sum()))
