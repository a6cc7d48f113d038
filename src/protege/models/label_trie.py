"""The labels of a classification task as a prefix tree of their tokens, and the two ways
protege decodes over it: a beam search that forces unbranched runs (constrained output),
and one forward pass that scores every label through a tree-shaped attention mask.

Used by `hf:` candidates and trained causal-LM specialists (models/causal.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class LabelTrie:
    """The labels' token sequences as a prefix tree; node 0 is the root."""

    def __init__(self, sequences: dict[str, list[int]]):
        self.children: list[dict[int, int]] = [{}]
        self.parent: list[int] = [-1]
        self.token: list[int] = [-1]
        self.depth: list[int] = [0]
        self.label_at: dict[int, str] = {}
        self.path: dict[str, list[int]] = {}
        for label, seq in sequences.items():
            node, path = 0, []
            for tok in seq:
                nxt = self.children[node].get(tok)
                if nxt is None:
                    nxt = len(self.children)
                    self.children.append({})
                    self.parent.append(node)
                    self.token.append(tok)
                    self.depth.append(self.depth[node] + 1)
                    self.children[node][tok] = nxt
                node = nxt
                path.append(node)
            self.label_at[node] = label
            self.path[label] = path

    def forced(self, token: int, node: int) -> tuple[list[int], int]:
        """(`token` and the tokens forced after it, the node they lead to): where the tree does
        not branch there is one way on, taken up to the last node before a label ends."""
        chunk = [token]
        while len(self.children[node]) == 1:
            (t, nxt), = self.children[node].items()
            if nxt in self.label_at:
                break
            chunk.append(t)
            node = nxt
        return chunk, node


def beam_search(trie: LabelTrie, state, best: list, width: int, extend, device) -> list[float]:
    """Beam search of width `width` over the label trie from the prefilled `state` (logits,
    cache, mask, positions), updating `best` (per row:
    (log-probability, label, tokens)) in place; returns per row the best score of the
    candidates left out for want of width (-inf when none was).

    A row stops once its best finished label outscores every unfinished beam. Where the
    trie does not branch, the tokens are forced: a beam takes the whole unbranched run in
    one forward pass (whose logits still give each forced token's probability), so
    decoding costs one pass per branch point, not one per token. `extend(chunks, cache,
    mask, positions)` runs the model on each beam's chunk and returns its log-probabilities."""
    import torch

    logits, cache, mask, cur = state
    # live hypotheses, one per batch row of the cache: (row, node, score, length)
    live = [(i, 0, 0.0, 0) for i in range(len(best))]
    next_logp = list(torch.log_softmax(logits.float(), dim=-1))
    open_ = [float("-inf")] * len(best)
    while live:
        expansions: dict[int, list[tuple[float, int, int, int]]] = {}
        for h, (row, node, score, length) in enumerate(live):
            children = trie.children[node]
            allowed = list(children)
            lp = next_logp[h][allowed].tolist()
            for tok, val in zip(allowed, lp):
                child, total = children[tok], score + val
                if child in trie.label_at:
                    if best[row] is None or total > best[row][0]:
                        best[row] = (total, trie.label_at[child], length + 1)
                else:
                    expansions.setdefault(row, []).append((total, h, tok, child))
        new_live, parents, chunks = [], [], []
        for row, cands in expansions.items():
            cands.sort(reverse=True)
            for k, (total, h, tok, child) in enumerate(cands):
                if best[row] is not None and total <= best[row][0]:
                    break
                if k == width:
                    open_[row] = max(open_[row], total)
                    break
                chunk, node = trie.forced(tok, child)
                new_live.append((row, node, total, live[h][3] + len(chunk)))
                parents.append(h)
                chunks.append(chunk)
        if not new_live:
            break
        if parents != list(range(len(live))):  # rows ended or beams branched: the cache follows them
            idx = torch.tensor(parents, device=device)
            cache.reorder_cache(idx)  # a copy of every layer's keys and values: skipped when nothing moved
            mask, cur = mask[idx], cur[idx]
        logps, cache, mask, cur = extend(chunks, cache, mask, cur)
        live, next_logp = [], []
        for (row, node, total, length), chunk, lp in zip(new_live, chunks, logps):
            forced = float(lp[torch.arange(len(chunk) - 1), chunk[1:]].sum()) if len(chunk) > 1 else 0.0
            live.append((row, node, total + forced, length))
            next_logp.append(lp[-1])
    return open_


@dataclass
class TreeInputs:
    """One batch laid out for scoring every label at once (see `tree_inputs`)."""

    ids: Any
    mask: Any
    pos: Any
    S: int
    """The longest row's own length: the trie's nodes start at this position."""
    col: dict[int, int]
    """Trie node -> its column among the node positions."""
    parents: list[int]
    """The nodes with children, whose outputs predict a child token."""
    nodes: list[int]


def tree_inputs(trie: LabelTrie, suffixes: list[list[int]], pad_id: int, P: int) -> TreeInputs:
    """Each row's own tokens followed by every node of the label trie, with a tree-shaped
    attention mask: a node sees the cached prefix (`P` positions), its row and its own
    ancestors only, at the position it would have after the row's last token."""
    import torch

    nodes = list(range(1, len(trie.children)))
    N = len(nodes)
    col = {n: i for i, n in enumerate(nodes)}
    B, S = len(suffixes), max(len(s) for s in suffixes)
    T = S + N
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    pos = torch.zeros((B, T), dtype=torch.long)
    allowed = torch.zeros((B, T, P + T), dtype=torch.bool)
    allowed[:, :, :P] = True
    # node n attends to its ancestors (and itself); same for every row
    tree = torch.zeros((N, N), dtype=torch.bool)
    for n in nodes:
        a = n
        while a > 0:
            tree[col[n], col[a]] = True
            a = trie.parent[a]
    node_tok = torch.tensor([trie.token[n] for n in nodes])
    node_depth = torch.tensor([trie.depth[n] for n in nodes])
    for i, suf in enumerate(suffixes):
        L = len(suf)
        ids[i, :L] = torch.tensor(suf)
        ids[i, S:] = node_tok
        pos[i, :S] = P + torch.arange(S)
        pos[i, S:] = P + L + node_depth - 1
        allowed[i, :S, P:P + S] = torch.tril(torch.ones((S, S), dtype=torch.bool))
        allowed[i, S:, P:P + L] = True
        allowed[i, S:, P + S:] = tree
    mask = torch.zeros((B, 1, T, P + T), dtype=torch.float32)
    mask.masked_fill_(~allowed[:, None], torch.finfo(torch.float32).min)
    parents = [n for n in nodes if trie.children[n]]  # nodes whose output predicts a child
    return TreeInputs(ids, mask, pos, S, col, parents, nodes)
