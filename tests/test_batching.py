import torch

from rm_trainer.batching import PairSampler, collate, eval_batches, get_preference_iterator


def test_collate_right_pads_to_common_length():
    rows = [{"chosen_ids": [5, 6, 7], "rejected_ids": [5, 8], "chosen_len": 3, "rejected_len": 2},
            {"chosen_ids": [9], "rejected_ids": [9, 9, 9, 9], "chosen_len": 1, "rejected_len": 4}]
    b = collate(rows, pad_id=0)
    assert b["chosen_ids"].tolist() == [[5, 6, 7, 0], [9, 0, 0, 0]]
    assert b["rejected_ids"].tolist() == [[5, 8, 0, 0], [9, 9, 9, 9]]
    assert b["chosen_len"].tolist() == [3, 1] and b["rejected_len"].tolist() == [2, 4]
    # the 2B concatenation of the trainer works because both halves share T
    assert torch.cat([b["chosen_ids"], b["rejected_ids"]]).shape == (4, 4)


def test_sampler_global_batch_is_independent_of_world_and_accumulation():
    n, steps = 50, 14  # 12 full batches of 4 per epoch: crosses an epoch boundary
    def global_batches(micro, accum, world):
        out = []
        for s in range(steps):
            per_rank = [PairSampler(n, micro, accum, world, r, seed=5).micro_batches(s) for r in range(world)]
            out.append(sorted(i for r in per_rank for mb in r for i in mb))
        return out
    ref = global_batches(4, 1, 1)
    assert global_batches(2, 1, 2) == ref
    assert global_batches(2, 2, 1) == ref
    assert global_batches(1, 2, 2) == ref
    first_epoch = [i for b in ref[:12] for i in b]
    assert len(set(first_epoch)) == 48  # no pair twice within an epoch
    assert ref[12] != ref[0]  # a new permutation each epoch


def test_sampler_ranks_are_disjoint_and_seed_matters():
    a = PairSampler(64, 4, 2, 2, 0, seed=1).micro_batches(3)
    b = PairSampler(64, 4, 2, 2, 1, seed=1).micro_batches(3)
    assert not set(sum(a, [])) & set(sum(b, []))
    assert PairSampler(64, 4, 2, 2, 0, seed=2).micro_batches(3) != a


def test_eval_batches_cover_each_pair_exactly_once_in_lockstep():
    for n, world, bs in ((7, 2, 2), (1, 2, 4), (10, 3, 3), (8, 2, 4)):
        per_rank = [eval_batches(n, world, r, bs) for r in range(world)]
        assert len({len(p) for p in per_rank}) == 1  # same number of forwards on every rank
        seen = [i for p in per_rank for idx, w in p for i, wt in zip(idx, w, strict=True) if wt > 0]
        assert sorted(seen) == list(range(n))


def test_preference_iterator_yields_collated_steps():
    rows = [{"chosen_ids": [1] * (i + 2), "rejected_ids": [2] * 3, "chosen_len": i + 2, "rejected_len": 3}
            for i in range(10)]

    class Rows(list):
        def __getitem__(self, idx):
            if isinstance(idx, list):
                return {k: [super(Rows, self).__getitem__(i)[k] for i in idx] for k in rows[0]}
            return super().__getitem__(idx)

    sampler = PairSampler(len(rows), micro=2, accum=2, world=1, rank=0, seed=0)
    steps = list(get_preference_iterator(Rows(rows), sampler, 0, done=1, total_steps=3))
    assert [s for s, _ in steps] == [2, 3]  # 1-based optimizer steps after the one already done
    assert all(len(mbs) == 2 and mbs[0]["chosen_ids"].shape[0] == 2 for _, mbs in steps)
    idx = sampler.micro_batches(1)[0]  # step 2 draws the sampler's global batch 1
    assert steps[0][1][0]["chosen_len"].tolist() == [rows[i]["chosen_len"] for i in idx]


def test_global_batch_indices_union_of_ranks_and_micro_steps():
    per = [PairSampler(40, 2, 2, 2, r, seed=3).micro_batches(5) for r in range(2)]
    union = sorted(i for r in per for mb in r for i in mb)
    assert union == sorted(PairSampler(40, 2, 2, 2, 0, 3).global_batch_indices(5))
