"""K-wise ranking losses (rm_trainer.objectives): the fused closed-form backwards against plain autograd, in
fp32 and bf16, for any batch of prompts with 2..7 responses and any ties (hypothesis); K = 2 is the
Bradley-Terry loss; Plackett-Luce against a loop written from its definition; the evaluation sums."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rm_trainer.objectives.bt_loss import bradley_terry_loss, fused_bradley_terry
from rm_trainer.objectives.ranking_loss import (
    fused_ranking_loss,
    ordered_pairs,
    per_prompt_losses,
    plackett_luce_loss,
    ranking_metrics,
    ranking_pairs_loss,
    ranking_sums,
)

REFERENCE = {"pairs": ranking_pairs_loss, "plackett_luce": plackett_luce_loss}


def batch(sizes: list[int], seed: int, levels: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat rewards, prompt index and scores (integers in [0, levels): small `levels` gives many ties)."""
    g = torch.Generator().manual_seed(seed)
    group = torch.cat([torch.full((k,), i) for i, k in enumerate(sizes)])
    rewards = torch.randn(len(group), generator=g) * 3
    scores = torch.randint(0, levels, (len(group),), generator=g).float()
    return rewards, group, scores


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12))


def loss_and_grad(fn, rewards, *args, **kwargs):
    r = rewards.detach().clone().requires_grad_()
    loss = fn(r, *args, **kwargs)
    loss.backward()
    return loss.detach(), r.grad


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(2, 7), min_size=1, max_size=6), seed=st.integers(0, 10**6),
       levels=st.integers(1, 5), loss=st.sampled_from(["pairs", "plackett_luce"]),
       scale=st.sampled_from([None, 0.25]))
def test_fused_ranking_losses_equal_autograd_in_fp32(sizes, seed, levels, loss, scale):
    rewards, group, scores = batch(sizes, seed, levels)
    G = len(sizes)
    want, want_g = loss_and_grad(REFERENCE[loss], rewards, group, scores, G, scale=scale)
    got, got_g = loss_and_grad(fused_ranking_loss, rewards, group, scores, G, loss, scale=scale)
    assert got.dtype == torch.float32 and got_g.dtype == torch.float32
    assert rel(got, want) <= 1e-5 and rel(got_g, want_g) <= 1e-5, (got, want)


@pytest.mark.parametrize("loss", ["pairs", "plackett_luce"])
def test_bf16_rewards_get_an_fp32_loss_and_bf16_gradients_at_the_bf16_scale(loss):
    rewards, group, scores = batch([4, 2, 7, 5, 3], seed=3, levels=4)
    r16 = rewards.bfloat16()
    want, want_g = loss_and_grad(REFERENCE[loss], r16.float(), group, scores, 5)  # the same bf16 values, in fp32
    got, got_g = loss_and_grad(fused_ranking_loss, r16, group, scores, 5, loss)
    assert got.dtype == torch.float32 and got_g.dtype == torch.bfloat16
    assert rel(got, want) <= 1e-5  # the loss itself is computed in fp32 from the bf16 rewards
    assert rel(got_g.float(), want_g) <= 2 ** -8  # one bf16 rounding of each gradient


@pytest.mark.parametrize("loss", ["pairs", "plackett_luce"])
def test_two_responses_are_the_bradley_terry_loss(loss):
    """K = 2 with the better response first or second: the BT loss of (better, worse), value and gradient."""
    g = torch.Generator().manual_seed(0)
    B = 16
    chosen, rejected = torch.randn(B, generator=g), torch.randn(B, generator=g)
    first_better = torch.rand(B, generator=g) > 0.5
    a, b = torch.where(first_better, chosen, rejected), torch.where(first_better, rejected, chosen)
    rewards = torch.stack([a, b], 1).flatten()  # prompt i: responses 2i, 2i+1
    scores = torch.stack([first_better.float(), (~first_better).float()], 1).flatten()
    group = torch.arange(B).repeat_interleave(2)
    got, got_g = loss_and_grad(fused_ranking_loss, rewards, group, scores, B, loss)
    bt, bt_g = loss_and_grad(lambda r: fused_bradley_terry(r)[0], torch.cat([chosen, rejected]))
    assert rel(got, bt) <= 1e-6 and rel(got, bradley_terry_loss(chosen, rejected)) <= 1e-6
    want_g = torch.where(first_better[:, None], torch.stack([bt_g[:B], bt_g[B:]], 1),
                         torch.stack([bt_g[B:], bt_g[:B]], 1)).flatten()
    assert rel(got_g, want_g) <= 1e-6


def plackett_luce_by_definition(r: list[float], s: list[float]) -> float:
    """One prompt: levels best first; each member of a level chosen from it and every level below."""
    total = 0.0
    levels = sorted(set(s), reverse=True)
    for level in levels[:-1]:
        pool = [x for x, y in zip(r, s, strict=True) if y <= level]
        for x, y in zip(r, s, strict=True):
            if y == level:
                total += math.log(sum(math.exp(p) for p in pool)) - x
    return total


def test_plackett_luce_is_the_listwise_likelihood_with_ties_grouped():
    rewards, group, scores = batch([5, 4, 6, 2], seed=11, levels=3)
    want = sum(plackett_luce_by_definition(rewards[group == i].tolist(), scores[group == i].tolist())
               for i in range(4)) / 4
    assert rel(fused_ranking_loss(rewards, group, scores, 4, "plackett_luce"), torch.tensor(want)) <= 1e-6
    # no ties: the probability of the full order, as a product of softmaxes over the remaining responses
    r, s = [0.3, -1.2, 2.0, 0.1], [4.0, 1.0, 3.0, 2.0]
    order = sorted(range(4), key=lambda i: -s[i])
    nll = -sum(math.log(math.exp(r[i]) / sum(math.exp(r[j]) for j in order[k:])) for k, i in enumerate(order))
    got = plackett_luce_loss(torch.tensor(r), torch.zeros(4, dtype=torch.long), torch.tensor(s), 1)
    assert rel(got, torch.tensor(nll)) <= 1e-6


def test_pairs_average_within_a_prompt_so_each_prompt_counts_once():
    rewards, group, scores = batch([7, 2], seed=5, levels=10)
    w, n_pairs = ordered_pairs(group, scores)
    for i in range(2):
        mine = group == i
        n = sum(1 for a, b in itertools.permutations(range(int(mine.sum())), 2)
                if scores[mine][a] > scores[mine][b])
        assert int((w[mine] > 0).sum()) == n and torch.allclose(w[mine][w[mine] > 0], torch.full((n,), 1 / n))
        assert n_pairs[mine].eq(n).all()
    per_prompt = [ranking_pairs_loss(rewards[group == i], torch.zeros(int((group == i).sum()), dtype=torch.long),
                                     scores[group == i], 1) for i in range(2)]
    assert rel(ranking_pairs_loss(rewards, group, scores, 2), sum(per_prompt) / 2) <= 1e-6
    assert rel(per_prompt_losses(rewards, group, scores, 2), torch.stack(per_prompt)) <= 1e-6


def test_sums_count_pairs_accuracy_and_top_one():
    # prompt 0: the best response (score 3) has the highest reward; one of its 3 pairs is misordered
    # prompt 1: the highest reward is on a response scored below the best; prompt 2: all tied, no pair
    rewards = torch.tensor([2.0, 1.0, 1.5, 0.0, 5.0, 1.0, 1.0])
    group = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    scores = torch.tensor([3.0, 2.0, 1.0, 2.0, 1.0, 1.0, 1.0])
    m = ranking_metrics(ranking_sums(rewards, group, scores, 3))
    assert (m["prompts"], m["pairs"], m["responses"]) == (3, 4, 7)
    assert m["acc"] == pytest.approx(2 / 4) and m["top1"] == pytest.approx(1 / 3)
    assert m["loss"] == pytest.approx(float(ranking_pairs_loss(rewards, group, scores, 3)))
    assert m["reward_mean"] == pytest.approx(rewards.mean().item())
    assert m["reward_std"] == pytest.approx(rewards.std(unbiased=False).item())
    # a zero weight leaves prompt 1 out of every sum
    left = ranking_metrics(ranking_sums(rewards, group, scores, 3, weight=torch.tensor([1.0, 0.0, 1.0])))
    assert (left["prompts"], left["pairs"], left["responses"], left["acc"]) == (2, 3, 5, 2 / 3)
    assert left["top1"] == pytest.approx(1 / 2)
