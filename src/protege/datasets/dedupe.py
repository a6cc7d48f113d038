"""Exact and near-duplicate detection (MinHash + LSH, via datasketch).

Inputs are compared as sets of character 5-grams of their normalised text (lowercase,
collapsed whitespace): short support queries share too few word n-grams for word
shingles to work. Jaccard similarity at or above the threshold counts as a near-duplicate.
"""

from __future__ import annotations

import re

import numpy as np

NUM_PERM = 128
_WS = re.compile(r"\s+")


def canonical(text: str) -> str:
    return _WS.sub(" ", text.lower()).strip()


def shingles(text: str, k: int = 5) -> set[bytes]:
    t = canonical(text)
    if len(t) <= k:
        return {t.encode()}
    return {t[i:i + k].encode() for i in range(len(t) - k + 1)}


def minhashes(texts: list[str], seed: int = 1):
    from datasketch import MinHash

    return MinHash.bulk([list(shingles(t)) for t in texts], num_perm=NUM_PERM, seed=seed)


class NearIndex:
    """An LSH index over a set of texts; `query` returns indices of near-duplicates."""

    def __init__(self, threshold: float):
        from datasketch import MinHashLSH

        self.threshold = threshold
        self.lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM)
        self.hashes: dict[int, object] = {}

    def add(self, key: int, mh) -> None:
        self.lsh.insert(key, mh)
        self.hashes[key] = mh

    def query(self, mh) -> list[int]:
        # LSH gives candidates; keep those whose estimated Jaccard clears the threshold
        return [k for k in self.lsh.query(mh) if self.hashes[k].jaccard(mh) >= self.threshold]


def near_duplicate_groups(texts: list[str], threshold: float) -> list[int]:
    """For each text, the index of the first earlier text it near-duplicates, or -1."""
    hashes = minhashes(texts)
    index = NearIndex(threshold)
    first = np.full(len(texts), -1)
    for i, mh in enumerate(hashes):
        hits = index.query(mh)
        if hits:
            first[i] = min(hits)
        else:
            index.add(i, mh)
    return first.tolist()
