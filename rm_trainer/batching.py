"""Batches: right padding, seeded rank-sharded sampling, exact eval sharding."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

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
        "chosen_len": torch.tensor([r["chosen_len"] for r in rows], dtype=torch.long),
        "rejected_len": torch.tensor([r["rejected_len"] for r in rows], dtype=torch.long),
    }
    if "margin" in rows[0]:
        batch["margin"] = torch.tensor([r["margin"] for r in rows], dtype=torch.float32)
    if "source" in rows[0]:
        batch["source"] = torch.tensor([r["source"] for r in rows], dtype=torch.long)
    return batch


class PairSampler:
    """Seeded, rank-sharded sampling that is a pure function of the step.

    Global batch g at step s is perm_e[s' * G : (s'+1) * G] (e = epoch, s' = step within it), the same
    permutation on every rank. Micro step a of rank r takes slice (a * W + r) of it. So any world size
    or accumulation split with the same global batch sees the same pairs per optimizer step, and a
    resumed run can jump to any step without replaying the data.
    """

    def __init__(self, n: int, micro: int, accum: int, world: int, rank: int, seed: int):
        self.n, self.micro, self.accum, self.world, self.rank, self.seed = n, micro, accum, world, rank, seed
        self.global_batch = micro * accum * world
        self.steps_per_epoch = n // self.global_batch
        self._perm: tuple[int, torch.Tensor] | None = None

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
        assert self.steps_per_epoch > 0
        epoch, within = divmod(step, self.steps_per_epoch)
        perm = self.permutation(epoch)
        base = within * self.global_batch
        return [perm[base + (a * self.world + self.rank) * self.micro:][: self.micro].tolist()
                for a in range(self.accum)]


def get_preference_iterator(dataset, sampler: PairSampler, pad_id: int, done: int,
                            total_steps: int) -> Iterator[tuple[int, list[dict[str, torch.Tensor]]]]:
    """Yield (step, [micro-batch, ...]) for optimizer steps done+1 .. total_steps (1-based: step s is
    the s-th update, drawn from the sampler's global batch s - 1), right-padded."""
    for step in range(done + 1, total_steps + 1):
        yield step, [collate(_rows(dataset, idx), pad_id) for idx in sampler.micro_batches(step - 1)]


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
