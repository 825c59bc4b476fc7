import functools

import numpy as np
import pytest
import torch
from helpers import objective

from rm_trainer.data.batching import RowSampler, balanced_groups, eval_batches, get_preference_iterator

PAIRS = objective()

LEN_RNG = np.random.default_rng(0)
CHOSEN, REJECTED = LEN_RNG.integers(2, 300, 97), LEN_RNG.integers(2, 300, 97)


def sampler(mode, micro, accum, world, rank, packing=False):
    return RowSampler(97, micro, accum, world, rank, seed=3, mode=mode, packing=packing,
                      longest=np.maximum(CHOSEN, REJECTED), tokens=CHOSEN + REJECTED)


def test_collate_right_pads_to_common_length():
    rows = [{"ids": [[5, 6, 7], [5, 8]]}, {"ids": [[9], [9, 9, 9, 9]]}]
    b = PAIRS.collate(rows, pad_id=0)
    # one 2B forward: chosen first, then rejected, padded to one common T
    assert b.seqs.input_ids.tolist() == [[5, 6, 7, 0], [9, 0, 0, 0], [5, 8, 0, 0], [9, 9, 9, 9]]
    assert b.seqs.lens.tolist() == [3, 1, 2, 4] and b.rows == 2


@pytest.mark.parametrize("mode,packing", [("random", False), ("grouped", False), ("grouped", True)])
def test_sampler_global_batch_is_independent_of_world_accumulation_and_mode(mode, packing):
    n, steps = 50, 14  # 12 full batches of 4 per epoch: crosses an epoch boundary
    lens = {"longest": np.maximum(np.arange(n) % 7 + 2, np.arange(n) % 5 + 2),
            "tokens": np.arange(n) % 7 + np.arange(n) % 5 + 4}

    def global_batches(micro, accum, world, mode="random", packing=False):
        out = []
        for s in range(steps):
            per_rank = [RowSampler(n, micro, accum, world, r, seed=5, mode=mode, packing=packing, **lens)
                        .micro_batches(s) for r in range(world)]
            assert all(len(mb) >= 1 for r in per_rank for mb in r) and all(len(r) == accum for r in per_rank)
            out.append(sorted(i for r in per_rank for mb in r for i in mb))
        return out
    ref = global_batches(4, 1, 1)
    assert global_batches(4, 1, 1, mode, packing) == ref
    assert global_batches(2, 1, 2, mode, packing) == ref
    assert global_batches(2, 2, 1, mode, packing) == ref
    assert global_batches(1, 2, 2, mode, packing) == ref
    first_epoch = [i for b in ref[:12] for i in b]
    assert len(set(first_epoch)) == 48  # no pair twice within an epoch
    assert ref[12] != ref[0]  # a new permutation each epoch


def test_sampler_ranks_are_disjoint_and_seed_matters():
    a = RowSampler(64, 4, 2, 2, 0, seed=1).micro_batches(3)
    b = RowSampler(64, 4, 2, 2, 1, seed=1).micro_batches(3)
    assert not set(sum(a, [])) & set(sum(b, []))
    assert RowSampler(64, 4, 2, 2, 0, seed=2).micro_batches(3) != a


def test_eval_batches_cover_each_pair_exactly_once_in_lockstep():
    for n, world, bs in ((7, 2, 2), (1, 2, 4), (10, 3, 3), (8, 2, 4)):
        per_rank = [eval_batches(n, world, r, bs) for r in range(world)]
        assert len({len(p) for p in per_rank}) == 1  # same number of forwards on every rank
        seen = [i for p in per_rank for idx, w in p for i, wt in zip(idx, w, strict=True) if wt > 0]
        assert sorted(seen) == list(range(n))


def test_preference_iterator_yields_collated_steps():
    rows = [{"ids": [[1] * (i + 2), [2] * 3]} for i in range(10)]

    class Rows(list):
        def __getitem__(self, idx):
            if isinstance(idx, list):
                return {k: [super(Rows, self).__getitem__(i)[k] for i in idx] for k in rows[0]}
            return super().__getitem__(idx)

    sampler = RowSampler(len(rows), micro=2, accum=2, world=1, rank=0, seed=0)
    collate = functools.partial(PAIRS.collate, pad_id=0)
    steps = list(get_preference_iterator(Rows(rows), sampler, collate, done=1, total_steps=3))
    assert [s for s, _ in steps] == [2, 3]  # 1-based optimizer steps after the one already done
    assert all(len(mbs) == 2 and mbs[0].rows == 2 for _, mbs in steps)
    idx = sampler.micro_batches(1)[0]  # step 2 draws the sampler's global batch 1
    assert steps[0][1][0].seqs.lens[:2].tolist() == [len(rows[i]["ids"][0]) for i in idx]


def test_global_batch_indices_union_of_ranks_and_micro_steps():
    per = [RowSampler(40, 2, 2, 2, r, seed=3).micro_batches(5) for r in range(2)]
    union = sorted(i for r in per for mb in r for i in mb)
    assert union == sorted(RowSampler(40, 2, 2, 2, 0, 3).global_batch_indices(5))


def test_grouped_micro_batches_hold_similar_lengths_and_neighbouring_ranks():
    world, accum, micro = 2, 3, 4
    per_rank = [sampler("grouped", micro, accum, world, r).micro_batches(5) for r in range(world)]
    longest = np.maximum(CHOSEN, REJECTED)
    # micro step a of rank r is slice a * W + r of the global batch sorted longest first
    slices = [per_rank[r][a] for a in range(accum) for r in range(world)]
    flat = [i for sl in slices for i in sl]
    assert [int(longest[i]) for i in flat] == sorted((int(longest[i]) for i in flat), reverse=True)
    assert sorted(flat) == sorted(RowSampler(97, micro, accum, world, 0, 3).global_batch_indices(5))
    random = [i for r in range(world) for mb in sampler("random", micro, accum, world, r).micro_batches(5) for i in mb]
    pad = lambda mbs: sum(len(mb) * max(longest[i] for i in mb) for mb in mbs)  # noqa: E731
    assert pad(slices) < pad([random[k:k + micro] for k in range(0, len(random), micro)])  # less padding


def test_packed_groups_balance_tokens_and_keep_every_pair_once():
    tokens = CHOSEN + REJECTED
    idx = list(range(64))
    groups = balanced_groups(idx, tokens, 8)
    assert sorted(i for g in groups for i in g) == idx and all(groups)
    loads = [int(tokens[g].sum()) for g in groups]
    assert max(loads) - min(loads) <= int(tokens[idx].max())  # the longest-first greedy bound
    w, a = 2, 4
    per_rank = [sampler("grouped", 8, a, w, r, packing=True).micro_batches(2) for r in range(w)]
    assert [len(p) for p in per_rank] == [a, a]  # every rank runs exactly grad_accum forwards
    got = sorted(i for p in per_rank for mb in p for i in mb)
    assert got == sorted(RowSampler(97, 8, a, w, 0, 3).global_batch_indices(2))


def test_pack_places_every_sequence_once_with_restarting_positions():
    g = torch.Generator().manual_seed(1)
    rows = []
    for _ in range(6):
        c, r = (torch.randint(4, 50, (int(torch.randint(1, 30, (1,), generator=g)),), generator=g).tolist()
                for _ in range(2))
        rows.append({"ids": [c, r], "margin": 0.5})
    b = objective(data={"margin_key": "margin"}).collate(rows, pad_id=0, pack_len=32, packing=True)
    ids, pos, last = b.seqs.input_ids, b.seqs.position_ids, b.seqs.last
    assert ids.shape[1] <= 32 and len(last) == 12 and b.margin.shape == (6,)
    seqs = [r["ids"][0] for r in rows] + [r["ids"][1] for r in rows]
    for s, (row, end) in zip(seqs, last.tolist(), strict=True):
        start = end - len(s) + 1
        assert ids[row, start:end + 1].tolist() == s and pos[row, start:end + 1].tolist() == list(range(len(s)))
    real = sum(len(s) for s in seqs)
    assert b.seqs.slots == ids.numel() >= real and b.seqs.tokens == real
    assert (pos == 0).sum() >= 12  # each sequence (and each row's padding tail) starts a new segment
    one = PAIRS.collate(rows, pad_id=0, pack_len=None, packing=True)  # flash-attention: a single row
    assert one.seqs.input_ids.shape == (1, real) and one.seqs.slots == real
