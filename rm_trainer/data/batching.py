"""Batches: seeded rank-sharded sampling, length grouping, right padding or padding-free packing, exact
eval sharding.

How a step's pairs reach the ranks (train.batching, train.packing):
  the global batch     pairs perm_e[s' * G : (s'+1) * G] of the epoch's seeded permutation: a pure
                       function of (seed, step), whatever the world size, accumulation split or mode
  random               micro step a of rank r takes slice a * W + r of it (micro pairs each)
  grouped (default)    the same slicing after sorting the global batch by pair length (the longer of
                       chosen and rejected), longest first: each micro-batch holds pairs of similar
                       length, the W ranks of one micro step get neighbouring slices (similar work), and
                       the longest pairs come first (an out-of-memory shows at step 1, not hours in)
  packing              the global batch is split into W x A groups of about equal token count
                       (longest-processing-time-first), group a * W + r to micro step a of rank r; each
                       group's 2B sequences are packed into rows of at most pack_len tokens, without padding
Scoring (rm-score, rm-serve, rm-eval, score_texts) batches by a token budget instead: token_budget_batches.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch


def pad_right(seqs: list[list[int]], pad_id: int, length: int | None = None) -> torch.Tensor:
    T = length or max(len(s) for s in seqs)
    out = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def collate(rows: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad chosen and rejected to one common length so they can be concatenated into 2B rows."""
    T = max(max(r["chosen_len"], r["rejected_len"]) for r in rows)
    batch = {
        "chosen_ids": pad_right([r["chosen_ids"] for r in rows], pad_id, T),
        "rejected_ids": pad_right([r["rejected_ids"] for r in rows], pad_id, T),
    }
    return batch | pair_fields(rows)


def pair_fields(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Per-pair tensors every batch carries, padded or packed: lengths, and margin, source and tie if present."""
    out = {"chosen_len": torch.tensor([r["chosen_len"] for r in rows], dtype=torch.long),
           "rejected_len": torch.tensor([r["rejected_len"] for r in rows], dtype=torch.long)}
    if "margin" in rows[0]:
        out["margin"] = torch.tensor([r["margin"] for r in rows], dtype=torch.float32)
    if "source" in rows[0]:
        out["source"] = torch.tensor([r["source"] for r in rows], dtype=torch.long)
    if "tie" in rows[0]:
        out["tie"] = torch.tensor([bool(r["tie"]) for r in rows], dtype=torch.bool)
    return out


def pack(rows: list[dict[str, Any]], pad_id: int, pack_len: int | None) -> dict[str, torch.Tensor]:
    """Pack the 2B sequences of `rows` ([chosen_0..chosen_B-1, rejected_0..]) as pack_sequences does;
    `last` is then in [chosen; rejected] order."""
    seqs = [r["chosen_ids"] for r in rows] + [r["rejected_ids"] for r in rows]
    return pack_sequences(seqs, pad_id, pack_len) | pair_fields(rows)


def pack_sequences(seqs: list[list[int]], pad_id: int, pack_len: int | None) -> dict[str, torch.Tensor]:
    """Pack sequences into rows of at most pack_len tokens (the fewest rows, filled evenly; None: all in
    one row, as flash-attention's varlen path wants when it reads the sequence boundaries from
    position_ids). Each sequence's position_ids restart at 0, so the model keeps the sequences apart (see
    model.RewardModel.forward); the tail of a row that is not full is padding with positions of its own.
    `last` holds (row, column) of each sequence's final token, where its reward is read, in seqs' order."""
    total = sum(len(x) for x in seqs)
    pack_len = pack_len or total
    assert max(len(x) for x in seqs) <= pack_len, f"a sequence is longer than pack_len={pack_len}"
    # The fewest rows that hold every sequence, filled evenly (longest first, each to the emptiest row):
    # every row is padded to the fullest one, so even rows waste least.
    n_rows = -(-total // pack_len)
    while (spread := _spread(seqs, n_rows, pack_len)) is None:
        n_rows += 1
    place, fill = spread
    L = max(fill)
    ids = torch.full((len(fill), L), pad_id, dtype=torch.long)
    pos = torch.zeros((len(fill), L), dtype=torch.long)
    for i, (row, col) in enumerate(place):
        n = len(seqs[i])
        ids[row, col:col + n] = torch.tensor(seqs[i], dtype=torch.long)
        pos[row, col:col + n] = torch.arange(n)
    for row, used in enumerate(fill):
        pos[row, used:] = torch.arange(L - used)  # padding: a segment of its own, never attended to
    return {"input_ids": ids, "position_ids": pos,
            "last": torch.tensor([(row, col + len(seqs[i]) - 1) for i, (row, col) in enumerate(place)])}


def _spread(seqs: list[list[int]], n_rows: int, cap: int):
    """((row, column) of each sequence, fill of each row) when the sequences, longest first, each go to the
    emptiest of n_rows rows; None if a row then holds more than cap tokens."""
    heap = [(0, k) for k in range(n_rows)]
    place = [(0, 0)] * len(seqs)
    fill = [0] * n_rows
    for i in sorted(range(len(seqs)), key=lambda i: (-len(seqs[i]), i)):
        used, row = heapq.heappop(heap)
        place[i] = (row, used)
        fill[row] = used + len(seqs[i])
        heapq.heappush(heap, (fill[row], row))
    return (place, fill) if max(fill) <= cap else None


def token_slots(b: dict[str, torch.Tensor]) -> int:
    """Token positions the forward computes for batch b (real tokens + padding)."""
    if "input_ids" in b:
        return b["input_ids"].numel()
    return b["chosen_ids"].numel() + b["rejected_ids"].numel()


def balanced_groups(idx: list[int], tokens: np.ndarray, k: int) -> list[list[int]]:
    """Split pairs `idx` into k groups of about equal token count: longest first, each to the group with
    the fewest tokens so far (ties: the lower group). Every group gets at least one pair when len(idx) >= k."""
    heap = [(0, g) for g in range(k)]
    groups: list[list[int]] = [[] for _ in range(k)]
    for i in sorted(idx, key=lambda i: (-int(tokens[i]), i)):
        load, g = heapq.heappop(heap)
        groups[g].append(i)
        heapq.heappush(heap, (load + int(tokens[i]), g))
    return groups


class PairSampler:
    """Seeded, rank-sharded sampling that is a pure function of the step.

    Global batch g at step s is perm_e[s' * G : (s'+1) * G] (e = epoch, s' = step within it), the same
    permutation on every rank; how it is spread over ranks and micro steps is the module docstring's
    rule for `mode`. Any world size or accumulation split with the same global batch sees the same pairs
    per optimizer step, and a resumed run can jump to any step without replaying the data.
    chosen_len/rejected_len (token counts per pair) are needed for grouping and packing.
    """

    def __init__(self, n: int, micro: int, accum: int, world: int, rank: int, seed: int, mode: str = "random",
                 packing: bool = False, chosen_len=None, rejected_len=None, longest=None, tokens=None):
        self.n, self.micro, self.accum, self.world, self.rank, self.seed = n, micro, accum, world, rank, seed
        self.mode, self.packing = mode, packing
        self.global_batch = micro * accum * world
        self.steps_per_epoch = n // self.global_batch
        self._perm: tuple[int, torch.Tensor] | None = None
        if longest is not None:  # rows of more than two sequences (rankings): their longest and their total
            self.longest, self.tokens = np.asarray(longest), np.asarray(tokens)
            assert len(self.longest) == len(self.tokens) == n, "grouping and packing need every row's token counts"
        elif mode == "grouped" or packing:
            c, r = np.asarray(chosen_len), np.asarray(rejected_len)
            assert len(c) == len(r) == n, "grouping and packing need every pair's token counts"
            self.longest, self.tokens = np.maximum(c, r), c + r

    def permutation(self, epoch: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perm = (epoch, torch.randperm(self.n, generator=g))
        return self._perm[1]

    def global_batch_indices(self, step: int) -> list[int]:
        """Every pair of step's global batch (all ranks, all micro steps)."""
        epoch, within = divmod(step, self.steps_per_epoch)
        base = within * self.global_batch
        return self.permutation(epoch)[base:base + self.global_batch].tolist()

    def micro_batches(self, step: int) -> list[list[int]]:
        """This rank's pairs for each micro step of (0-based) step."""
        assert self.steps_per_epoch > 0
        g = self.global_batch_indices(step)
        W, A, r = self.world, self.accum, self.rank
        if self.packing:
            groups = balanced_groups(g, self.tokens, W * A)
            return [groups[a * W + r] for a in range(A)]
        if self.mode == "grouped":
            g = sorted(g, key=lambda i: (-int(self.longest[i]), i))
        return [g[(a * W + r) * self.micro:(a * W + r + 1) * self.micro] for a in range(A)]


def get_preference_iterator(dataset, sampler: PairSampler, pad_id: int, done: int, total_steps: int,
                            pack_len: int | None = None, collate_fn=None
                            ) -> Iterator[tuple[int, list[dict[str, torch.Tensor]]]]:
    """Yield (step, [micro-batch, ...]) for optimizer steps done+1 .. total_steps (1-based: step s is
    the s-th update, drawn from the sampler's global batch s - 1), right-padded, or packed into rows of
    pack_len tokens when the sampler packs. collate_fn(rows, pad_id, pack_len, packing): another row kind's
    batches (data.rankings.collate_rankings)."""
    for step in range(done + 1, total_steps + 1):
        rows = [_rows(dataset, idx) for idx in sampler.micro_batches(step - 1)]
        if collate_fn is not None:
            yield step, [collate_fn(r, pad_id, pack_len, sampler.packing) for r in rows]
        else:
            yield step, [pack(r, pad_id, pack_len) if sampler.packing else collate(r, pad_id) for r in rows]


def _rows(dataset, idx: list[int]) -> list[dict[str, Any]]:
    cols = dataset[idx]  # column-major dict of lists
    return [dict(zip(cols, vals, strict=False)) for vals in zip(*cols.values(), strict=False)]


def eval_batches(n: int, world: int, rank: int, batch_size: int) -> list[tuple[list[int], list[float]]]:
    """Every test pair exactly once across ranks: rank r takes r, r+W, ... Ranks with fewer pairs get
    zero-weight filler so all ranks run the same number of forwards (ZeRO-3 gathers are collective)."""
    mine = list(range(rank, n, world))
    per_rank = -(-n // world)
    n_batches = max(1, -(-per_rank // batch_size))
    out = []
    for b in range(n_batches):
        idx = mine[b * batch_size:(b + 1) * batch_size]
        w = [1.0] * len(idx)
        if not idx:
            idx, w = [0], [0.0]
        out.append((idx, w))
    return out


MIN_FILL = 0.75


def token_budget_batches(lengths: list[int], max_batch_tokens: int, sort: bool = True) -> list[list[int]]:
    """Indices grouped into batches whose padded size (longest x count) stays within max_batch_tokens
    (a sequence longer than the budget gets a batch of its own). sort=True orders by length, longest
    first, and also starts a new batch at a sequence shorter than MIN_FILL of its batch's longest, so at
    most a quarter of any batch is padding (measured on CPU: a mixed-length batch costs up to 2x the
    forwards of its rows one at a time, see bench/serve_speed.py); sort=False keeps input order and
    splits only at the budget (the naive baseline, for comparison)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i]) if sort else list(range(len(lengths)))
    batches: list[list[int]] = []
    cur: list[int] = []
    longest = 0
    for i in order:
        if cur and (max(longest, lengths[i]) * (len(cur) + 1) > max_batch_tokens
                    or (sort and lengths[i] < MIN_FILL * longest)):
            batches.append(cur)
            cur, longest = [], 0
        cur.append(i)
        longest = max(longest, lengths[i])
    if cur:
        batches.append(cur)
    return batches
