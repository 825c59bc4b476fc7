"""Objectives beyond one pair, in fp32 with closed-form backwards: K-wise rankings (`--objective ranking`).

A ranking batch is flat: S response sequences, each run through the backbone once, with `group` (S,) the
index of the prompt each belongs to (0..G-1) and `scores` (S,) its rating (higher is better; equal
scores are tied). The losses never build more than the batch's ordered pairs (P floats) or, for
Plackett-Luce, an S x S mask of the same prompt's responses: S is a micro-batch's responses, not tokens.

- `pairs` (the default): Bradley-Terry over every ordered pair (i, j) of one prompt with s_i > s_j,
  softplus(-(r_i - r_j)); a prompt's pairs are averaged, so each prompt counts once however many
  responses it has.
- `plackett_luce`: the listwise likelihood of the whole order. Responses are taken best first, each
  chosen from those not yet taken: -r_i + log sum_{j remaining} e^{r_j}. Tied responses form one level,
  and each member of a level is chosen from that level and all below it (Breslow's handling of ties).
  The last level has nothing left to beat and adds nothing. A prompt's terms are summed.

With K = 2 and distinct scores both are the BT loss of that pair, exactly. The batch loss is the mean
over the batch's G prompts, or their sum times `scale` (packing: micro-batches of different sizes, see
train.step), as for pairs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

RANKING_LOSSES = ("pairs", "plackett_luce")


def ordered_pairs(group: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(better, worse, weight): the indices of every ordered pair of one prompt's responses with different
    scores, and 1 / (that prompt's pair count) for each. A prompt whose responses all tie has no pair."""
    same = group[:, None] == group[None, :]
    better, worse = torch.nonzero(same & (scores[:, None] > scores[None, :]), as_tuple=True)
    per_group = torch.zeros(int(group.max()) + 1 if group.numel() else 0, dtype=torch.float32, device=group.device)
    per_group.index_add_(0, group[better], torch.ones_like(better, dtype=torch.float32))
    return better, worse, 1.0 / per_group[group[better]]


def _groups(group: torch.Tensor) -> int:
    return int(group.max()) + 1 if group.numel() else 0


def _fp32_at_least(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _reduce(total: torch.Tensor, groups: int, scale: float | None) -> torch.Tensor:
    return total / max(groups, 1) if scale is None else total * scale


def ranking_pairs_loss(rewards: torch.Tensor, group: torch.Tensor, scores: torch.Tensor,
                       scale: float | None = None) -> torch.Tensor:
    """The plain autograd reference of `pairs` (module docstring)."""
    better, worse, w = ordered_pairs(group, scores)
    r = _fp32_at_least(rewards)
    return _reduce((w * F.softplus(-(r[better] - r[worse]))).sum(), _groups(group), scale)


def _risk_sets(group: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, S) bool: j is in i's choice set (same prompt, s_j <= s_i); (S,) bool: i is above its prompt's
    last level (it beats something), i.e. its term counts."""
    same = group[:, None] == group[None, :]
    at_or_below = same & (scores[None, :] <= scores[:, None])
    beats = (same & (scores[None, :] < scores[:, None])).any(1)
    return at_or_below, beats


def plackett_luce_loss(rewards: torch.Tensor, group: torch.Tensor, scores: torch.Tensor,
                       scale: float | None = None) -> torch.Tensor:
    """The plain autograd reference of `plackett_luce` (module docstring)."""
    choice, counts = _risk_sets(group, scores)
    r = _fp32_at_least(rewards)
    lse = torch.logsumexp(r[None, :].masked_fill(~choice, float("-inf")), 1)
    return _reduce(torch.where(counts, lse - r, 0.0).sum(), _groups(group), scale)


class _FusedPairs(torch.autograd.Function):
    """`pairs` with the closed-form backward: per pair z = r_i - r_j, d/dz softplus(-z) = -sigma(-z);
    saves z and the pair indices (P values each)."""

    @staticmethod
    def forward(ctx, rewards, group, scores, scale):
        better, worse, w = ordered_pairs(group, scores)
        r = rewards.float()
        z = r[better] - r[worse]
        coef = w / max(_groups(group), 1) if scale is None else w * scale
        ctx.save_for_backward(z, better, worse, coef)
        ctx.in_dtype, ctx.n = rewards.dtype, rewards.shape[0]
        return (coef * F.softplus(-z)).sum()

    @staticmethod
    def backward(ctx, grad):
        z, better, worse, coef = ctx.saved_tensors
        g = -torch.sigmoid(-z) * coef * grad
        out = torch.zeros(ctx.n, dtype=torch.float32, device=z.device)
        out.index_add_(0, better, g).index_add_(0, worse, -g)
        return out.to(ctx.in_dtype), None, None, None


class _FusedPlackettLuce(torch.autograd.Function):
    """`plackett_luce` with the closed-form backward: for a counted term i with choice set C_i,
    d/dr_j (lse_i - r_i) = softmax over C_i at j, minus [j = i]. Saves the rewards and the scores (S
    values each); the S x S choice sets are rebuilt in the backward."""

    @staticmethod
    def forward(ctx, rewards, group, scores, scale):
        choice, counts = _risk_sets(group, scores)
        r = rewards.float()
        lse = torch.logsumexp(r[None, :].masked_fill(~choice, float("-inf")), 1)
        coef = counts.float() / max(_groups(group), 1) if scale is None else counts.float() * scale
        ctx.save_for_backward(r, group, scores, lse, coef)
        ctx.in_dtype = rewards.dtype
        return (coef * (lse - r)).sum()

    @staticmethod
    def backward(ctx, grad):
        r, group, scores, lse, coef = ctx.saved_tensors
        choice, _ = _risk_sets(group, scores)
        soft = torch.where(choice, torch.exp(r[None, :] - lse[:, None]), 0.0)  # row i: softmax over C_i
        g = (coef[:, None] * soft).sum(0) - coef
        return (g * grad).to(ctx.in_dtype), None, None, None


def fused_ranking_loss(rewards: torch.Tensor, group: torch.Tensor, scores: torch.Tensor, loss: str = "pairs",
                       scale: float | None = None) -> torch.Tensor:
    """The ranking loss of one micro-batch's S rewards (one forward, each response once)."""
    assert rewards.dim() == 1 and rewards.shape == group.shape == scores.shape, (rewards.shape, group.shape)
    fn = {"pairs": _FusedPairs, "plackett_luce": _FusedPlackettLuce}[loss]
    return fn.apply(rewards, group, scores.float(), scale)


RANKING_FIELDS = ("prompts", "loss", "pairs", "correct_pairs", "top1", "responses")


def ranking_sums(rewards: torch.Tensor, group: torch.Tensor, scores: torch.Tensor, loss: str = "pairs"
                 ) -> torch.Tensor:
    """float64 sums for exact aggregation over micro-batches and ranks: [prompts, loss sum (the prompt
    losses of `loss`), ordered pairs with different scores, those the rewards order the same way, prompts
    whose highest reward is on a best-scored response (its top level; a tie for the highest reward
    counts as wrong), responses]."""
    r = rewards.detach().double()
    G = _groups(group)
    ref = ranking_pairs_loss if loss == "pairs" else plackett_luce_loss
    better, worse, _ = ordered_pairs(group, scores)
    top_r = torch.full((G,), float("-inf"), dtype=torch.float64, device=r.device).scatter_reduce(0, group, r, "amax")
    top_s = torch.full((G,), float("-inf"), dtype=scores.dtype, device=r.device).scatter_reduce(0, group, scores,
                                                                                               "amax")
    is_top = r == top_r[group]
    n_top = torch.zeros(G, dtype=torch.float64, device=r.device).index_add_(0, group, is_top.double())
    hit = torch.zeros(G, dtype=torch.float64, device=r.device).index_add_(
        0, group, (is_top & (scores == top_s[group])).double())
    return torch.stack([
        torch.tensor(float(G), dtype=torch.float64, device=r.device),
        ref(r, group, scores, scale=1.0).double(),
        torch.tensor(float(better.numel()), dtype=torch.float64, device=r.device),
        (r[better] > r[worse]).double().sum(),
        ((n_top == 1) & (hit == 1)).double().sum(),
        torch.tensor(float(r.numel()), dtype=torch.float64, device=r.device),
    ])


def ranking_metrics(sums: torch.Tensor) -> dict[str, float]:
    """Per-prompt loss, pairwise accuracy over all ordered pairs, and the top-1 rate."""
    s = [float(x) for x in sums]
    assert s[0] > 0, "metrics over zero prompts"
    return {"loss": s[1] / s[0], "acc": s[3] / s[2] if s[2] else float("nan"), "top1": s[4] / s[0],
            "prompts": int(s[0]), "pairs": int(s[2]), "responses_per_prompt": s[5] / s[0]}
