"""`knn:minilm`: nearest-neighbour classification over sentence embeddings of the train split.

The cheap "don't train" baseline: embed every training input once (mean-pooled,
L2-normalised all-MiniLM-L6-v2, or any HF encoder: `knn:ID_OR_PATH`), answer with the
label of the most similar training input (cosine). The confidence is the share of the
`k` nearest neighbours (option `k`, default 10) that carry the predicted label.
Embeddings of a dataset's train split are cached under `HOME/cache/embeddings/`.
"""

from __future__ import annotations

import hashlib
from collections import Counter

import numpy as np

from ..errors import ProtegeError
from .base import Context, Prediction, option


class Encoder:
    """Mean-pooled, normalised sentence embeddings from a Hugging Face encoder."""

    def __init__(self, name: str, ctx: Context, batch_size: int = 64):
        import torch
        from transformers import AutoModel, AutoTokenizer

        from ..bases import resolve

        path = resolve(name, ctx.home)
        self.name = name
        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path)
        self.model.eval()
        self.batch_size = batch_size

    def __call__(self, texts: list[str], progress=None) -> np.ndarray:
        torch = self.torch
        out = []
        # sorting by length keeps padding (wasted compute) small
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            enc = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=256,
                                 return_tensors="pt")
            with torch.inference_mode():
                hidden = self.model(**enc).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).float()
            emb = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
            emb = torch.nn.functional.normalize(emb, dim=-1)
            out.append((idx, emb.numpy()))
            if progress:
                progress(len(idx))
        result = np.zeros((len(texts), out[0][1].shape[1] if out else 0), dtype=np.float32)
        for idx, emb in out:
            result[idx] = emb
        return result


def vote(sims: np.ndarray, labels: list[str], k: int) -> list[Prediction]:
    """For each query row of `sims` (cosine similarity to every labelled row): the label of
    the most similar row, and the share of the `k` nearest that carry it as the confidence."""
    k = min(k, sims.shape[1])
    top = np.argpartition(-sims, kth=k - 1, axis=1)[:, :k]
    out = []
    for i in range(sims.shape[0]):
        label = labels[int(sims[i].argmax())]
        votes = Counter(labels[j] for j in top[i])
        out.append(Prediction(output=label, confidence=votes[label] / k, prompt_tokens=None, completion_tokens=None))
    return out


class KNN:
    kind = "local"

    def __init__(self, name: str, options: dict[str, str], ctx: Context):
        self.spec = f"knn:{name}"
        if ctx.task.kind != "classification":
            raise ProtegeError(f"candidate {self.spec} answers classification tasks only (task {ctx.task.name} is "
                               f"{ctx.task.kind})")
        if not ctx.train:
            raise ProtegeError(f"candidate {self.spec}: the dataset has no train rows to look up")
        self.k = option(options, "k", 10, int, self.spec)
        self.encoder = Encoder(name, ctx)
        self.labels = [r["reference"] for r in ctx.train]
        self.train = self._train_embeddings(ctx)

    def _train_embeddings(self, ctx: Context) -> np.ndarray:
        # keyed on what is embedded (not the dataset id): a subset, or train rows given
        # without a dataset, never reuse another set's vectors
        digest = hashlib.sha256(self.encoder.name.encode())
        for r in ctx.train:
            digest.update(b"\0" + r["input"].encode())
        key = digest.hexdigest()[:24]
        path = ctx.home / "cache" / "embeddings" / f"{key}.npy"
        if path.exists():
            emb = np.load(path)
            if emb.shape[0] == len(ctx.train):
                return emb
        emb = self.encoder([r["input"] for r in ctx.train])
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, emb)
        tmp.replace(path)
        return emb

    def predict(self, rows, progress=None):
        emb = self.encoder([r["input"] for r in rows], progress=progress)
        return vote(emb @ self.train.T, self.labels, self.k)

    def close(self):
        pass


def factory(rest: str, options: dict, ctx: Context) -> KNN:
    return KNN(rest or "minilm", options, ctx)
