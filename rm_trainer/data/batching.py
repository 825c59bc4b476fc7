"""Batches: seeded rank-sharded sampling, length grouping, right padding or padding-free packing, exact
eval sharding.

A row is what an objective's loss counts once: a pair (two sequences), a ranking (K), a rated response
(one). How a step's rows reach the ranks (train.batching, train.packing):
  the global batch     rows perm_e[s' * G : (s'+1) * G] of the epoch's seeded permutation: a pure
                       function of (seed, step), whatever the world size, accumulation split or mode
  random               micro step a of rank r takes slice a * W + r of it (micro rows each)
  grouped (default)    the same slicing after sorting the global batch by each row's longest sequence,
                       longest first: each micro-batch holds rows of similar length, the W ranks of one
                       micro step get neighbouring slices (similar work), and the longest rows come
                       first (an out-of-memory shows at step 1, not hours in)
  packing              the global batch is split into W x A groups of about equal token count
                       (longest-processing-time-first), group a * W + r to micro step a of rank r; each
                       group's sequences are packed into rows of at most pack_len tokens, without padding
Scoring (rm-score, rm-serve, rm-eval, score_texts) batches by a token budget instead: token_budget_batches.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from rm_trainer.data.segments import lay_out, spread


def pad_right(seqs: list[list[int]], pad_id: int, length: int | None = None) -> torch.Tensor:
    T = length or max(len(s) for s in seqs)
    out = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


@dataclass
class Sequences:
    """What one forward runs: S token sequences, right-padded (input_ids (S, T)) or packed (input_ids (R, L)
    with position_ids restarting at 0 for every sequence and `last`, the (row, column) of each sequence's
    final token). lens (S,): each sequence's real tokens, in both layouts. The reward of sequence i is read
    at its last token: row i of the forward's output."""

    input_ids: torch.Tensor
    lens: torch.Tensor
    position_ids: torch.Tensor | None = None
    last: torch.Tensor | None = None
    segments: torch.Tensor | None = None  # shared prompts (data.segments): (R, 2, L) segment and branch

    @classmethod
    def of(cls, seqs: list[list[int]], pad_id: int, pack_len: int | None = None, packing: bool = False) -> Sequences:
        """seqs right-padded to the longest, or packed into rows of at most pack_len tokens (pack_sequences)."""
        lens = torch.tensor([len(s) for s in seqs], dtype=torch.long)
        if packing:
            return cls(lens=lens, **pack_sequences(seqs, pad_id, pack_len))
        return cls(pad_right(seqs, pad_id), lens)

    @classmethod
    def shared(cls, groups: list[list[list[int]]], pad_id: int, rule, pack_len: int | None = None,
               packing: bool = False, order: list[int] | None = None) -> Sequences:
        """Rows of sequences (each row's prompt once where `rule` shares it: data.segments), the outputs
        row by row, or in `order` (indices into that row-by-row list)."""
        laid = lay_out(groups, pad_id, rule, pack_len, packing)
        lens = torch.tensor([len(s) for g in groups for s in g], dtype=torch.long)
        if order is not None:
            laid["last"], lens = laid["last"][order], lens[order]
        return cls(lens=lens, **laid)

    def run(self, model, device: torch.device) -> torch.Tensor:
        """The model's (or its engine's) output for every sequence: (S,) rewards, or (S, K) attributes."""
        if self.segments is not None:
            return model(self.input_ids.to(device), None, self.position_ids.to(device), self.last.to(device),
                         None, self.segments.to(device))
        if self.position_ids is not None:
            return model(self.input_ids.to(device), None, self.position_ids.to(device), self.last.to(device))
        return model(self.input_ids.to(device), self.lens.to(device))

    @property
    def tokens(self) -> int:
        """Real tokens the forward computes (a host value): with shared prompts, each prompt once."""
        if self.segments is not None:
            return int((self.segments[:, 0] >= 0).sum())
        return int(self.lens.sum())

    @property
    def slots(self) -> int:
        """Token positions the forward computes: real tokens + padding."""
        return self.input_ids.numel()


def pack_sequences(seqs: list[list[int]], pad_id: int, pack_len: int | None) -> dict[str, torch.Tensor]:
    """Pack sequences into rows of at most pack_len tokens (the fewest rows, filled evenly; None: all in
    one row, as flash-attention's varlen path wants when it reads the sequence boundaries from
    position_ids). Each sequence's position_ids restart at 0, so the model keeps the sequences apart (see
    model.RewardModel.forward); the tail of a row that is not full is padding with positions of its own.
    `last` holds (row, column) of each sequence's final token, where its reward is read, in seqs' order."""
    total = sum(len(x) for x in seqs)
    place, fill = spread([len(x) for x in seqs], pack_len or total)
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


def balanced_groups(idx: list[int], tokens: np.ndarray, k: int) -> list[list[int]]:
    """Split rows `idx` into k groups of about equal token count: longest first, each to the group with
    the fewest tokens so far (ties: the lower group). Every group gets at least one row when len(idx) >= k."""
    heap = [(0, g) for g in range(k)]
    groups: list[list[int]] = [[] for _ in range(k)]
    for i in sorted(idx, key=lambda i: (-int(tokens[i]), i)):
        load, g = heapq.heappop(heap)
        groups[g].append(i)
        heapq.heappush(heap, (load + int(tokens[i]), g))
    return groups


class RowSampler:
    """Seeded, rank-sharded sampling that is a pure function of the step.

    Global batch g at step s is perm_e[s' * G : (s'+1) * G] (e = epoch, s' = step within it), the same
    permutation on every rank; how it is spread over ranks and micro steps is the module docstring's
    rule for `mode`. Any world size or accumulation split with the same global batch sees the same rows
    per optimizer step, and a resumed run can jump to any step without replaying the data.
    longest/tokens (each row's longest sequence and its total tokens) are needed for grouping and packing.
    """

    def __init__(self, n: int, micro: int, accum: int, world: int, rank: int, seed: int, mode: str = "random",
                 packing: bool = False, longest=None, tokens=None):
        self.n, self.micro, self.accum, self.world, self.rank, self.seed = n, micro, accum, world, rank, seed
        self.mode, self.packing = mode, packing
        self.global_batch = micro * accum * world
        self.steps_per_epoch = n // self.global_batch
        self._perm: tuple[int, torch.Tensor] | None = None
        if mode == "grouped" or packing:  # each row's longest sequence and its total tokens
            self.longest, self.tokens = np.asarray(longest), np.asarray(tokens)
            assert len(self.longest) == len(self.tokens) == n, "grouping and packing need every row's token counts"

    def permutation(self, epoch: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perm = (epoch, torch.randperm(self.n, generator=g))
        return self._perm[1]

    def global_batch_indices(self, step: int) -> list[int]:
        """Every row of step's global batch (all ranks, all micro steps)."""
        epoch, within = divmod(step, self.steps_per_epoch)
        base = within * self.global_batch
        return self.permutation(epoch)[base:base + self.global_batch].tolist()

    def micro_batches(self, step: int) -> list[list[int]]:
        """This rank's rows for each micro step of (0-based) step."""
        assert self.steps_per_epoch > 0
        g = self.global_batch_indices(step)
        W, A, r = self.world, self.accum, self.rank
        if self.packing:
            groups = balanced_groups(g, self.tokens, W * A)
            return [groups[a * W + r] for a in range(A)]
        if self.mode == "grouped":
            g = sorted(g, key=lambda i: (-int(self.longest[i]), i))
        return [g[(a * W + r) * self.micro:(a * W + r + 1) * self.micro] for a in range(A)]


def get_preference_iterator(dataset, sampler: RowSampler, collate: Callable[..., Any], done: int,
                            total_steps: int) -> Iterator[tuple[int, list[Any]]]:
    """Yield (step, [micro-batch, ...]) for optimizer steps done+1 .. total_steps (1-based: step s is the s-th
    update, drawn from the sampler's global batch s - 1). collate(rows, packing=...): the objective's batch of
    those rows (objectives/*: padded, or packed into rows of pack_len tokens when the sampler packs)."""
    for step in range(done + 1, total_steps + 1):
        yield step, [collate(rows_of(dataset, idx), packing=sampler.packing) for idx in sampler.micro_batches(step - 1)]


def rows_of(dataset, idx: list[int]) -> list[dict[str, Any]]:
    """Rows idx of an arrow dataset, each a dict (read column-major, once)."""
    cols = dataset[idx]  # column-major dict of lists
    return [dict(zip(cols, vals, strict=False)) for vals in zip(*cols.values(), strict=False)]


def eval_batches(n: int, world: int, rank: int, batch_size: int) -> list[tuple[list[int], list[float]]]:
    """Every test row exactly once across ranks: rank r takes r, r+W, ... Ranks with fewer rows get
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
