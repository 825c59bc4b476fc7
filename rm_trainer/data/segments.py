"""Shared-prompt segments: one row's prompt encoded once, its K responses after it (`--share_prompt`).

A row's K sequences (each the prompt, a response and EOS, by the one truncation rule) start with the same
tokens. Its segment holds those tokens once, then each response's own tokens:

    tokens     p_0 .. p_{S-1} | a_S .. a_{la-1} | b_S .. b_{lb-1} | ...
    positions  0   .. S-1     | S   .. la-1     | S   .. lb-1     | ...       (as each sequence alone)
    branch     0   .. 0       | 1   .. 1        | 2   .. 2        | ...

and a token sees the tokens before it in its own segment whose branch is 0 (the prompt) or its own: each
response attends to the whole prompt and causally to itself, never to another response, so its hidden
states - and the reward read at its final token - are those of the sequence alone (exact up to the
float rounding of a different matmul shape; train.build.check_sharing proves it on the run's model).
S is the longest common prefix of the row's sequences, at most one less than the shortest (a response
keeps its final token), so it is at least the prompt the truncation rule cut once for the row.

Which rows share (ShareRule): a row shares where its segment costs less than its sequences apart, by a
cost in FLOPs per token (the linear layers) and per attended (query, key) position pair (the attention a
dense mask makes every position pair in the segment cost); a row whose sequences have no common prefix
never does. A row that does not share is K segments of one sequence each.

Layout: one segment per batch row, right-padded, or with packing several segments per row of at most
pack_len tokens. `segments` (R, 2, L) holds each token's segment index in its row (-1: padding) and
branch; model.reward.segment_mask builds the (R, 1, L, L) additive attention mask from it on the device:
R x L^2 elements of the model's dtype (2 bytes in bf16: 2 MiB per row at L = 1024, 32 MiB at L = 4096),
made once per forward and shared by every layer, next to the R x L x H activations of each layer.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch


def shared_prefix(seqs: list[list[int]]) -> int:
    """Tokens the sequences share at their start, at most one less than the shortest (0 for one sequence)."""
    if len(seqs) < 2:
        return 0
    n = min(map(len, seqs)) - 1
    first = seqs[0]
    for s in seqs[1:]:
        k = 0
        while k < n and s[k] == first[k]:
            k += 1
        n = k
    return n


@dataclass(frozen=True)
class ShareRule:
    """Shares a row where its segment's modelled cost is below its K sequences' (module docstring).
    per_pair: the FLOPs of one attended (query, key) pair over those of one token's linear layers."""

    per_pair: float

    @classmethod
    def of(cls, config) -> ShareRule:
        """From a decoder's config: per token and layer the projections and MLP cost 2 (2H^2 + 2H kv + 3H I)
        FLOPs (q, o; k, v; gate, up, down), one (query, key) pair 4H (Q K^T and A V)."""
        h = config.hidden_size
        heads = config.num_attention_heads
        kv = getattr(config, "num_key_value_heads", None) or heads
        kv_dim = h // heads * kv
        inter = getattr(config, "intermediate_size", None) or 4 * h
        return cls(4 * h / (2 * (2 * h * h + 2 * h * kv_dim + 3 * h * inter)))

    def cost(self, n: int) -> float:
        return n + self.per_pair * n * n

    def batch_cost(self, rows: int, length: int, dense: bool) -> float:
        """A forward of rows x length token slots: a dense mask (packed rows, shared segments) computes every
        (query, key) pair of a row, causal attention without a mask about half of them."""
        return rows * (length + self.per_pair * length * length * (1.0 if dense else 0.5))

    def shares(self, lens: list[int], prefix: int) -> bool:
        if len(lens) < 2 or prefix == 0:
            return False
        return self.cost(prefix + sum(n - prefix for n in lens)) < sum(map(self.cost, lens))


ALWAYS = ShareRule(0.0)  # every row with a common prefix shares (--share_prompt on; the exactness tests)


@dataclass(frozen=True)
class Segment:
    """One segment: its tokens, positions and branches, and the column of each sequence's final token."""

    tokens: list[int]
    positions: list[int]
    branch: list[int]
    ends: list[int]


def segments_of(seqs: list[list[int]], rule: ShareRule, cap: int | None = None) -> list[Segment]:
    """One row's sequences as one shared segment, or one segment each where the rule says no or the
    shared one would be longer than cap (a packed row's pack_len)."""
    s = shared_prefix(seqs)
    lens = [len(x) for x in seqs]
    if not rule.shares(lens, s) or (cap is not None and s + sum(n - s for n in lens) > cap):
        return [Segment(list(x), list(range(len(x))), [1] * len(x), [len(x) - 1]) for x in seqs]
    tokens, positions, branch, ends = list(seqs[0][:s]), list(range(s)), [0] * s, []
    for k, x in enumerate(seqs, 1):
        tokens += x[s:]
        positions += range(s, len(x))
        branch += [k] * (len(x) - s)
        ends.append(len(tokens) - 1)
    return [Segment(tokens, positions, branch, ends)]


def lay_out(groups: list[list[list[int]]], pad_id: int, rule: ShareRule, pack_len: int | None = None,
            packing: bool = False) -> dict[str, torch.Tensor]:
    """Rows of sequences (`groups`) as segments in a batch: input_ids and position_ids (R, L), segments
    (R, 2, L) and `last`, the (row, column) of every sequence's final token, row by row. Padded: one
    segment per batch row; packing: into the fewest rows of at most pack_len tokens (pack_len None: one)."""
    segs, owner = [], []  # owner: (segment, member) of each sequence, in the groups' order
    for seqs in groups:
        for seg in segments_of(seqs, rule, pack_len if packing else None):
            owner += [(len(segs), m) for m in range(len(seg.ends))]
            segs.append(seg)
    if packing:
        total = sum(len(s.tokens) for s in segs)
        place, fill = spread([len(s.tokens) for s in segs], pack_len or total)
    else:
        place, fill = [(i, 0) for i in range(len(segs))], [len(s.tokens) for s in segs]
    R, L = len(fill), max(fill)
    ids = torch.full((R, L), pad_id, dtype=torch.long)
    pos = torch.zeros((R, L), dtype=torch.long)
    segments = torch.full((R, 2, L), -1, dtype=torch.long)
    index = [0] * R
    for seg, (row, col) in zip(segs, place, strict=True):
        n = len(seg.tokens)
        ids[row, col:col + n] = torch.tensor(seg.tokens)
        pos[row, col:col + n] = torch.tensor(seg.positions)
        segments[row, 0, col:col + n] = index[row]
        segments[row, 1, col:col + n] = torch.tensor(seg.branch)
        index[row] += 1
    last = torch.tensor([(place[s][0], place[s][1] + segs[s].ends[m]) for s, m in owner], dtype=torch.long)
    return {"input_ids": ids, "position_ids": pos, "segments": segments, "last": last}


def spread(lengths: list[int], cap: int) -> tuple[list[tuple[int, int]], list[int]]:
    """((row, column) of each item, fill of each row): the fewest rows of at most cap tokens that hold
    every item, filled evenly (longest first, each to the emptiest row): every row is padded to the
    fullest one, so even rows waste least."""
    assert max(lengths) <= cap, f"a sequence is longer than pack_len={cap}"
    n_rows = -(-sum(lengths) // cap)
    while (found := _spread(lengths, n_rows, cap)) is None:
        n_rows += 1
    return found


def _spread(lengths: list[int], n_rows: int, cap: int):
    """((row, column) of each item, fill of each row) when the items, longest first, each go to the
    emptiest of n_rows rows; None if a row then holds more than cap tokens."""
    heap = [(0, k) for k in range(n_rows)]
    place = [(0, 0)] * len(lengths)
    fill = [0] * n_rows
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        used, row = heapq.heappop(heap)
        place[i] = (row, used)
        fill[row] = used + lengths[i]
        heapq.heappush(heap, (fill[row], row))
    return (place, fill) if max(fill) <= cap else None


def share_groups(seqs: list[list[int]], keys: list, rule: ShareRule, cap: int) -> list[list[int]]:
    """Scoring's segments: indices of `seqs` in groups that each share one segment. Only sequences with the
    same key (not None: e.g. one request, or one prompt) may share; those of one key, sorted by their tokens
    so that common prefixes are neighbours, each join the group before it where the grown segment costs less
    (by `rule`) than the group and it apart, and stays within cap tokens."""
    out: list[list[int]] = []
    buckets: dict = {}
    for i, k in enumerate(keys):
        if k is None:
            out.append([i])
        else:
            buckets.setdefault(k, []).append(i)
    for idx in buckets.values():
        idx.sort(key=seqs.__getitem__)
        group, prefix, tokens = [idx[0]], len(seqs[idx[0]]) - 1, len(seqs[idx[0]])
        for i in idx[1:]:
            x, first = seqs[i], seqs[group[0]]
            k = 0
            while k < min(prefix, len(x) - 1) and x[k] == first[k]:
                k += 1
            grown = k + sum(len(seqs[j]) - k for j in group) + len(x) - k
            if k > 0 and grown <= cap and rule.cost(grown) < rule.cost(tokens) + rule.cost(len(x)):
                group, prefix, tokens = group + [i], k, grown
            else:
                out.append(group)
                group, prefix, tokens = [i], len(x) - 1, len(x)
        out.append(group)
    return out
