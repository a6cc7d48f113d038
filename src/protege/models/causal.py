"""`hf:ID_OR_PATH`: a local causal LM through transformers, prompted zero- or k-shot.

    hf:smollm2-135m                         output constrained to the labels (classification)
    hf:smollm2-135m?mode=score              a probability for every label
    hf:smollm2-135m?mode=generate&shots=5   free generation, 5 training examples in the prompt

Options: `mode` — `constrained` (classification default: the most probable label under
the model, searched over a trie of the labels' tokens: a greedy pass, then a beam of width
`beam` (default 4) only for rows where a label it left aside could still be more probable;
always a valid label, with the model's probability of that label's tokens), `score` (every label scored in one batched
forward pass over the label trie with a tree attention mask: a probability for each label,
normalised over the label set, at more compute per row) or `generate` (free greedy
decoding);
`shots` (k-shot, default the task's prompt.few_shot), `batch_size`
(default 16), `max_new_tokens` (generate; default 48), `instructed` (default 1: tell the
model the label set / schema in the system prompt; a trained specialist sets 0).

Speed: the part of the prompt every row shares (system prompt with the label list,
few-shot examples) is run through the model once; its key/value cache is reused by every
row, so a row costs only its own tokens plus the answer's. Constrained decoding takes each
unbranched run of label tokens in one forward pass, so a label costs one pass per branch
point of the trie (BANKING77's 77 labels: 7.2 tokens each, 1.75 branch points), and the
LM head runs only on the positions whose logits are used.
"""

from __future__ import annotations

import copy
import math
import random
from typing import Any

from ..errors import ProtegeError
from ..tasks.metrics import normalize_text
from ..tasks.prompting import specialist_messages
from .base import Context, Prediction, option
from .hf import cache_keyword, causal_parts, eos_ids, run_decoder
from .label_trie import LabelTrie, beam_search, tree_inputs

SENTINEL = "\ue000"


def render_prompt(task, tokenizer, text: str, *, instructed: bool, shots) -> str:
    """The whole prompt a causal backend sends for `text`: the task's messages through the
    model's chat template (plain paragraphs for a model without one)."""
    messages = specialist_messages(task, text, instructed=instructed, shots=shots)
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "\n\n".join(m["content"] for m in messages) + "\n\n"


def prompt_parts(task, tokenizer, shots, *, instructed: bool):
    """(the text every row's prompt starts with, a function rendering a row's whole prompt):
    the prefix is decoded once and shared by every row."""
    def render(text: str) -> str:
        return render_prompt(task, tokenizer, text, instructed=instructed, shots=shots)

    return render(SENTINEL).split(SENTINEL)[0], render


class CausalLM:
    kind = "local"

    def __init__(self, name: str, options: dict[str, str], ctx: Context, *, spec: str | None = None,
                 instructed_default: bool = True, model=None, tokenizer=None):
        """`model`/`tokenizer` given: use those objects (training evaluates its own model
        this way) instead of loading `name`."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from ..bases import resolve

        self.spec = spec or f"hf:{name}"
        self.ctx = ctx
        task = ctx.task
        default_mode = "constrained" if task.kind == "classification" else "generate"
        self.mode = option(options, "mode", default_mode, str, self.spec)
        if self.mode not in ("score", "constrained", "generate"):
            raise ProtegeError(f"candidate {self.spec}: mode must be score, constrained or generate")
        if self.mode in ("score", "constrained") and task.kind != "classification":
            raise ProtegeError(f"candidate {self.spec}: mode={self.mode} needs a classification task")
        self.shots = option(options, "shots", task.prompt.few_shot, int, self.spec)
        self.batch_size = option(options, "batch_size", 16, int, self.spec)
        self.beam = option(options, "beam", 4, int, self.spec)
        self.max_new_tokens = option(options, "max_new_tokens", 48, int, self.spec)
        self.instructed = bool(option(options, "instructed", int(instructed_default), int, self.spec))
        # a model handed in (training evaluates its own) goes on training afterwards: tensors
        # made under inference_mode (FSDP's gathered weights, say) could not be updated then
        self._no_grad = torch.no_grad if model is not None else torch.inference_mode
        if model is not None:
            self.model, self.tokenizer = model, tokenizer
        else:
            path = resolve(name, ctx.home)
            try:
                self.tokenizer = AutoTokenizer.from_pretrained(path)
                self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            except OSError as exc:
                raise ProtegeError(f"candidate {self.spec}: cannot load model {name!r}: {exc}") from None
            self.model.eval()
        if model is None and torch.cuda.is_available():
            self.model.to("cuda")
        quantize = option(options, "quantize", "none", str, self.spec)
        if quantize not in ("none", "int8"):
            raise ProtegeError(f"candidate {self.spec}: quantize must be none or int8")
        if quantize == "int8":
            from .hf import quantize_int8

            self.model = quantize_int8(self.model, self.spec)
        self.device = next(self.model.parameters()).device
        self.torch = torch
        self._decoder, self._head, self._cache_kw = _parts(self.model)
        self.eos_ids = eos_ids(self.model, self.tokenizer, self.spec)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_ids[0]
        self._prefix_ok: bool | None = None
        """Whether prefix + suffix tokenise exactly as the whole prompt (checked on first use)."""
        shots = self._pick_shots(ctx.train)
        self._prefix_text = prompt_parts(task, self.tokenizer, shots, instructed=self.instructed)[0]
        self._shots = shots
        self._prefix_ids = self.tokenizer(self._prefix_text, add_special_tokens=False).input_ids
        self._prefix_cache = None
        self.trie = None
        if self.mode in ("score", "constrained"):
            seqs = {label: self.tokenizer(label, add_special_tokens=False).input_ids + [self.eos_ids[0]]
                    for label in task.labels}
            self.trie = LabelTrie(seqs)

    def _pick_shots(self, train: list[dict]) -> list[tuple[str, str]]:
        if not self.shots or not train:
            return []
        rng = random.Random(0)
        return [(r["input"], r["reference"]) for r in rng.sample(train, min(self.shots, len(train)))]

    def _render(self, text: str, shots) -> str:
        return render_prompt(self.ctx.task, self.tokenizer, text, instructed=self.instructed, shots=shots)

    def _suffix_ids(self, text: str) -> list[int]:
        full = self._render(text, self._shots)
        if full.startswith(self._prefix_text):
            ids = self.tokenizer(full[len(self._prefix_text):], add_special_tokens=False).input_ids
            if self._prefix_ok is None:
                whole = self.tokenizer(full, add_special_tokens=False).input_ids
                self._prefix_ok = whole == self._prefix_ids + ids
            if self._prefix_ok:
                return ids
        self._prefix_ok = False
        return self.tokenizer(full, add_special_tokens=False).input_ids

    def _forward(self, ids, mask, pos, cache):
        """The last layer's hidden states for `ids` after `cache` (extended and returned).
        Callers apply the LM head only to the positions they need: over a 49k-token
        vocabulary the head costs a quarter of the model per position."""
        return run_decoder(self._decoder, self._cache_kw, ids, mask, pos, cache)

    def _cache_for(self, batch: int):
        torch = self.torch
        if not self._prefix_ok or not self._prefix_ids:
            return None, 0
        if self._prefix_cache is None:
            with self._no_grad():
                n = len(self._prefix_ids)
                _, self._prefix_cache = self._forward(
                    torch.tensor([self._prefix_ids], device=self.device), torch.ones((1, n), dtype=torch.long,
                                                                                    device=self.device),
                    torch.arange(n, device=self.device)[None], None)
        cache = copy.deepcopy(self._prefix_cache)
        if batch > 1:
            cache.batch_repeat_interleave(batch)
        return cache, len(self._prefix_ids)

    def _prefill(self, suffixes: list[list[int]]):
        """Run each row's own tokens after the shared prefix; returns the state to decode from."""
        torch = self.torch
        cache, P = self._cache_for(len(suffixes))
        if cache is None:
            P = 0
        B, S = len(suffixes), max(len(s) for s in suffixes)
        ids = torch.full((B, S), self.pad_id, dtype=torch.long)
        mask = torch.zeros((B, P + S), dtype=torch.long)
        mask[:, :P] = 1
        for i, s in enumerate(suffixes):
            ids[i, :len(s)] = torch.tensor(s)
            mask[i, P:P + len(s)] = 1
        dev = self.device
        lens = torch.tensor([len(s) for s in suffixes], device=dev)
        pos = (P + torch.arange(S, device=dev)).unsqueeze(0).expand(B, S)
        ids, mask = ids.to(dev), mask.to(dev)
        hidden, cache = self._forward(ids, mask, pos, cache)
        return self._head(hidden[torch.arange(B, device=dev), lens - 1]), cache, mask, P + lens

    def _step(self, tokens: list[int], cache, mask, cur):
        torch = self.torch
        mask = torch.cat([mask, torch.ones((mask.shape[0], 1), dtype=torch.long, device=mask.device)], dim=1)
        hidden, cache = self._forward(torch.tensor(tokens, device=mask.device)[:, None], mask, cur[:, None], cache)
        return self._head(hidden[:, -1]), cache, mask, cur + 1

    def _extend(self, chunks: list[list[int]], cache, mask, cur):
        """Append a chunk of one or more tokens to each row in one forward pass; returns each
        row's log-probabilities at every position of its chunk (K_i x vocabulary)."""
        torch = self.torch
        dev = mask.device
        H, K = len(chunks), max(len(c) for c in chunks)
        ids = torch.full((H, K), self.pad_id, dtype=torch.long)
        real = torch.zeros((H, K), dtype=torch.long)
        for i, c in enumerate(chunks):
            ids[i, :len(c)] = torch.tensor(c)
            real[i, :len(c)] = 1
        real = real.to(dev)
        lens = real.sum(1)
        mask = torch.cat([mask, real], dim=1)  # padding inside a chunk stays masked from then on
        hidden, cache = self._forward(ids.to(dev), mask, cur[:, None] + torch.arange(K, device=dev), cache)
        logp = torch.log_softmax(self._head(hidden[real.bool()]).float(), dim=-1)
        return logp.split(lens.tolist()), cache, mask, cur + lens

    def _generate(self, suffixes: list[list[int]]) -> list[tuple[str, float | None, int]]:
        """Free greedy decoding until an end token or max_new_tokens."""
        with self._no_grad():
            logits, cache, mask, cur = self._prefill(suffixes)
            B = len(suffixes)
            generated: list[list[int]] = [[] for _ in range(B)]
            done = [False] * B
            for _ in range(self.max_new_tokens):
                nxt = logits.argmax(-1).tolist()
                for i in range(B):
                    if done[i]:
                        nxt[i] = self.pad_id
                        continue
                    generated[i].append(nxt[i])
                    done[i] = nxt[i] in self.eos_ids
                if all(done):
                    break
                logits, cache, mask, cur = self._step(nxt, cache, mask, cur)
        results = []
        for toks in generated:
            text = self.tokenizer.decode([t for t in toks if t not in self.eos_ids], skip_special_tokens=True)
            results.append((normalize_text(text, self.ctx.task.normalize), None, len(toks)))
        return results

    def _constrained(self, suffixes: list[list[int]]) -> list[tuple[str, float | None, int]]:
        """The most probable label of each row, searched over the trie of label token
        sequences; its confidence is the model's probability of that label's tokens.

        First a greedy pass (one hypothesis per row). Log-probabilities only fall as tokens
        are added, so a candidate it left aside that already scores below the label it found
        can never win: when none is left above it, that label is the most probable one, with
        no wider search. Only the rows where some candidate still could win are searched again
        with a beam of width `beam`, which prunes everything below the greedy label."""
        torch = self.torch
        B = len(suffixes)
        with self._no_grad():
            best: list[tuple[float, str, int] | None] = [None] * B
            logits, cache, mask, cur = self._prefill(suffixes)
            kept = copy.deepcopy(cache) if self.beam > 1 else None  # the wider search starts from here
            open_ = beam_search(self.trie, (logits, cache, mask, cur), best, 1, self._extend, self.device)
            again = [i for i in range(B) if open_[i] > best[i][0]]
            if again and kept is not None:
                idx = torch.tensor(again, device=self.device)
                kept.reorder_cache(idx)
                better: list[tuple[float, str, int] | None] = [best[i] for i in again]
                beam_search(self.trie, (logits[idx], kept, mask[idx], cur[idx]), better, self.beam, self._extend, self.device)
                for i, b in zip(again, better):
                    best[i] = b
        return [(label, math.exp(score), n) for score, label, n in best]

    def _score(self, suffixes: list[list[int]]) -> list[tuple[str, float | None, int]]:
        """Score every label in one forward pass per batch: each row's own tokens are followed
        by all nodes of the label trie, and a tree-shaped attention mask lets each node see
        the prompt and its ancestors only. A label's log-probability is the sum over its
        path; the probabilities returned are normalised over the label set."""
        torch = self.torch
        trie = self.trie
        cache, P = self._cache_for(len(suffixes))
        if cache is None:
            P = 0
        tree = tree_inputs(trie, suffixes, self.pad_id, P)
        ids, mask, pos = tree.ids, tree.mask, tree.pos
        S, col, parents, nodes = tree.S, tree.col, tree.parents, tree.nodes
        ids, mask, pos = ids.to(self.device), mask.to(self.device), pos.to(self.device)
        with self._no_grad():
            hidden, _ = self._forward(ids, mask, pos, cache)
            head = self._head
            results = []
            for i, suf in enumerate(suffixes):
                # outputs that predict trie tokens: the row's last token (root) and each inner node
                h = torch.cat([hidden[i, len(suf) - 1:len(suf)], hidden[i, [S + col[n] for n in parents]]])
                logp = torch.log_softmax(head(h).float(), dim=-1)
                row_of = {0: 0, **{n: k + 1 for k, n in enumerate(parents)}}
                node_lp = {n: float(logp[row_of[trie.parent[n]], trie.token[n]]) for n in nodes}
                labels = list(trie.path)
                scores = torch.tensor([sum(node_lp[n] for n in trie.path[lab]) for lab in labels])
                probs = torch.softmax(scores, dim=0)
                best = int(scores.argmax())
                results.append((labels[best], float(probs[best]), len(trie.path[labels[best]]),
                                dict(zip(labels, probs.tolist()))))
        return results

    def predict(self, rows, progress=None):
        suffixes = [self._suffix_ids(r["input"]) for r in rows]
        order = sorted(range(len(rows)), key=lambda i: len(suffixes[i]))
        out: list[Any] = [None] * len(rows)
        P = len(self._prefix_ids) if self._prefix_ok else 0
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            run = {"score": self._score, "constrained": self._constrained, "generate": self._generate}[self.mode]
            for i, (text, conf, n_out, *scores) in zip(chunk, run([suffixes[i] for i in chunk])):
                out[i] = Prediction(output=text, confidence=conf, prompt_tokens=P + len(suffixes[i]),
                                    completion_tokens=n_out, label_probs=scores[0] if scores else None)
            if progress:
                progress(len(chunk))
        return out

    def close(self):
        self._prefix_cache = None


def _parts(model):
    """(decoder, LM head, the decoder's cache keyword) for decoding."""
    parts = causal_parts(model)
    if parts is None:
        raise ProtegeError(f"{type(model).__name__} has no decoder / LM head split that protege can decode with")
    return parts[0], parts[1], cache_keyword(parts[0])


def factory(rest: str, options: dict, ctx: Context) -> CausalLM:
    return CausalLM(rest, options, ctx)
