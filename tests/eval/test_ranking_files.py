"""rm-eval's ranking statistics at the seam: summed a chunk of prompts at a time (so no [responses,
responses] matrix of a whole file is ever built), they equal ranking_sums over all prompts at once, for any
K per prompt, tied scores and chunk size."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rm_trainer.eval.rankings import _sums
from rm_trainer.objectives.ranking_loss import ranking_sums

prompt = st.lists(st.integers(0, 3), min_size=2, max_size=6)  # each response's score (ties allowed)


@settings(max_examples=60, deadline=None)
@given(st.lists(prompt, min_size=1, max_size=12), st.integers(1, 5), st.sampled_from(["pairs", "plackett_luce"]),
       st.integers(0, 2**31 - 1))
def test_chunked_sums_equal_the_whole(prompts, chunk, loss, seed):
    group = torch.tensor([k for k, p in enumerate(prompts) for _ in p])
    scores = torch.tensor([float(v) for p in prompts for v in p])
    rewards = torch.randn(len(group), generator=torch.Generator().manual_seed(seed))
    starts = [0] + torch.bincount(group).cumsum(0).tolist()
    want = ranking_sums(rewards, group, scores, len(prompts), loss)
    got = _sums(rewards, group, scores, starts, 0, len(prompts), loss, chunk)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12 * float(want.abs().max())), (got, want)
    # a run of the prompts (one file's): the sums of those prompts alone
    lo, hi = len(prompts) // 3, len(prompts) - len(prompts) // 3
    if hi > lo:
        weight = torch.zeros(len(prompts), dtype=torch.float64)
        weight[lo:hi] = 1
        want = ranking_sums(rewards, group, scores, len(prompts), loss, weight)
        got = _sums(rewards, group, scores, starts, lo, hi, loss, chunk)
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-12 * float(want.abs().max())), (got, want)
