"""`student:knn:minilm?folds=3`: a student taught only by the frontier's recorded replies
(no human label at all), scored out of fold on the benchmark itself.

Distillation from the logs: when the frontier answered only the benchmark's rows (the
demo's GPT-4 calls), a student cannot learn from those replies and be scored on the same
rows. So the rows are cut into `folds` parts (by a hash of the input text: the same parts
on every run and every import, and a repeated message never on both sides); each part is
answered by a nearest-neighbour student whose examples are the other parts' inputs
labelled with the frontier's replies. Every benchmark row is answered,
none by a student that saw it. The score shows how much of the teacher's error a student
inherits; the student itself is evidence, not a deployable model (a student trained on all
the logs would be).

Only replies a recorded model gave teach (a labelled ticket's answer is a human's). Options:
`folds` (default 3), `k` (neighbours voting for the confidence, default 10), `teacher` (the
recorded model whose replies teach; default every recorded model). The
encoder is any HF encoder (`student:knn:ID_OR_PATH`), mean-pooled as in `knn:`.
"""

from __future__ import annotations

import hashlib

import numpy as np

from ..errors import ProtegeError
from .base import Context, option, parse_spec
from .knn import Encoder, vote


def fold_of(text: str, folds: int) -> int:
    """The part (0 .. folds-1) an input belongs to, by a hash of its text."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") % folds


def taught(row: dict, teacher: str | None = None) -> bool:
    """Whether a row carries a reply a recorded model gave (with `teacher`, that model): a
    labelled ticket or a test file's answer has no model, and teaches no student."""
    model = (row.get("recorded") or {}).get("model")
    return bool(row.get("output")) and model is not None and (teacher is None or model == teacher)


class Student:
    kind = "local"

    def __init__(self, spec: str, encoder: str, options: dict, ctx: Context):
        self.spec = spec
        if ctx.task.kind != "classification":
            raise ProtegeError(f"candidate {spec} answers classification tasks only (task {ctx.task.name} is "
                               f"{ctx.task.kind})")
        self.folds = option(options, "folds", 3, int, spec)
        self.k = option(options, "k", 10, int, spec)
        self.teacher = option(options, "teacher", None, str, spec)
        if self.folds < 2:
            raise ProtegeError(f"candidate {spec}: folds must be 2 or more (got {self.folds})")
        self.encoder = Encoder(encoder, ctx)
        self.pool: dict[str, tuple[np.ndarray, str, int]] = {}
        """Every row seen with a recorded reply: id -> (embedding, the teacher's reply, fold)."""

    def predict(self, rows, progress=None):
        emb = self.encoder([r["input"] for r in rows], progress=progress)
        row_fold = [fold_of(r["input"], self.folds) for r in rows]
        for r, e, f in zip(rows, emb, row_fold):
            if taught(r, self.teacher):
                self.pool.setdefault(r["id"], (e, r["output"], f))
        if not self.pool:
            raise ProtegeError(f"candidate {self.spec}: the rows carry no reply of "
                               f"{self.teacher or 'a recorded model'} to learn from")
        ids = list(self.pool)
        pool_emb = np.stack([self.pool[i][0] for i in ids])
        pool_labels = [self.pool[i][1] for i in ids]
        pool_fold = np.array([self.pool[i][2] for i in ids])
        out = [None] * len(rows)
        for f in range(self.folds):
            mine = [i for i, g in enumerate(row_fold) if g == f]
            teach = np.flatnonzero(pool_fold != f)
            if not mine:
                continue
            if not len(teach):
                raise ProtegeError(f"candidate {self.spec}: fold {f + 1} of {self.folds} has no other fold's "
                                   "recorded replies to learn from; give it more rows")
            preds = vote(emb[mine] @ pool_emb[teach].T, [pool_labels[j] for j in teach], self.k)
            for i, p in zip(mine, preds):
                out[i] = p
        return out

    def close(self):
        pass


def factory(rest: str, options: dict, ctx: Context) -> Student:
    scheme, encoder, _ = parse_spec(rest)
    spec = "student:" + rest + ("?" + "&".join(f"{k}={v}" for k, v in options.items()) if options else "")
    if scheme != "knn":
        raise ProtegeError(f"candidate {spec}: a student is `student:knn:ENCODER` (got {rest or 'nothing'})")
    return Student(spec, encoder or "minilm", options, ctx)
