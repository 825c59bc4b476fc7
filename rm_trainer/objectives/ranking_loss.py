"""The K-wise ranking losses (`--objective ranking`), in fp32 with closed-form backwards, and their sums.

A ranking batch is flat: S response sequences, each run through the backbone once, with `group` (S,) the
index of the prompt each belongs to (0..G-1) and `scores` (S,) its rating (higher is better; equal
scores are tied). The losses work on S x S masks of the same prompt's responses (S is a micro-batch's
responses, not tokens), never on index lists, so nothing waits for the device; G comes from the host.

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


def ordered_pairs(group: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, S) float: 1 / (its prompt's pair count) where i and j answer the same prompt and s_i > s_j,
    else 0 (a prompt whose responses all tie has no pair); (S,) float: how many such pairs each prompt has,
    at each of its responses. Dense masks, no nonzero(): nothing waits for the device."""
    same = group[:, None] == group[None, :]
    better = same & (scores[:, None] > scores[None, :])
    n_pairs = torch.zeros_like(scores, dtype=torch.float32).index_add_(0, group, better.sum(1).float())[group]
    return better.float() / n_pairs.clamp_min(1)[:, None], n_pairs


def _fp32_at_least(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _reduce(per_prompt_sum: torch.Tensor, groups: int, scale: float | None) -> torch.Tensor:
    return per_prompt_sum / max(groups, 1) if scale is None else per_prompt_sum * scale


def _pair_terms(r: torch.Tensor, group: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """(S,) the weighted pair losses sum_j W_ij softplus(-(r_i - r_j)) of each better response i."""
    w, _ = ordered_pairs(group, scores)
    return (w.to(r.dtype) * F.softplus(-(r[:, None] - r[None, :]))).sum(1)


def _risk_sets(group: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, S) bool: j is in i's choice set (same prompt, s_j <= s_i); (S,) bool: i is above its prompt's
    last level (it beats something), i.e. its term counts."""
    same = group[:, None] == group[None, :]
    at_or_below = same & (scores[None, :] <= scores[:, None])
    beats = (same & (scores[None, :] < scores[:, None])).any(1)
    return at_or_below, beats


def _pl_terms(r: torch.Tensor, group: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(S,) each response's Plackett-Luce term (0 on its prompt's last level), and the log-sum-exps."""
    choice, counts = _risk_sets(group, scores)
    lse = torch.logsumexp(r[None, :].masked_fill(~choice, float("-inf")), 1)
    return torch.where(counts, lse - r, 0.0), lse


def per_prompt_losses(rewards: torch.Tensor, group: torch.Tensor, scores: torch.Tensor, groups: int,
                      loss: str = "pairs") -> torch.Tensor:
    """(G,) each prompt's loss: its pairs' mean BT loss, or its Plackett-Luce negative log-likelihood."""
    r = _fp32_at_least(rewards)
    terms = _pair_terms(r, group, scores) if loss == "pairs" else _pl_terms(r, group, scores)[0]
    return torch.zeros(groups, dtype=r.dtype, device=r.device).index_add_(0, group, terms)


def ranking_pairs_loss(rewards: torch.Tensor, group: torch.Tensor, scores: torch.Tensor, groups: int,
                       scale: float | None = None) -> torch.Tensor:
    """The plain autograd reference of `pairs` (module docstring) over `groups` prompts."""
    return _reduce(_pair_terms(_fp32_at_least(rewards), group, scores).sum(), groups, scale)


def plackett_luce_loss(rewards: torch.Tensor, group: torch.Tensor, scores: torch.Tensor, groups: int,
                       scale: float | None = None) -> torch.Tensor:
    """The plain autograd reference of `plackett_luce` (module docstring) over `groups` prompts."""
    return _reduce(_pl_terms(_fp32_at_least(rewards), group, scores)[0].sum(), groups, scale)


class _FusedPairs(torch.autograd.Function):
    """`pairs` with the closed-form backward: with W the pair weights and Z_ij = r_i - r_j,
    d/dZ softplus(-Z) = -sigma(-Z); dL/dr_i = sum_j G_ij - sum_j G_ji for G = -W sigma(-Z) x coef.
    Saves the rewards, the prompt index and the scores (S values each)."""

    @staticmethod
    def forward(ctx, rewards, group, scores, groups, scale):
        r = rewards.float()
        ctx.save_for_backward(r, group, scores)
        ctx.in_dtype, ctx.coef = rewards.dtype, 1 / max(groups, 1) if scale is None else scale
        return _pair_terms(r, group, scores).sum() * ctx.coef

    @staticmethod
    def backward(ctx, grad):
        r, group, scores = ctx.saved_tensors
        w, _ = ordered_pairs(group, scores)
        g = -w * torch.sigmoid(-(r[:, None] - r[None, :])) * (ctx.coef * grad)
        return (g.sum(1) - g.sum(0)).to(ctx.in_dtype), None, None, None, None


class _FusedPlackettLuce(torch.autograd.Function):
    """`plackett_luce` with the closed-form backward: for a counted term i with choice set C_i,
    d/dr_j (lse_i - r_i) = softmax over C_i at j, minus [j = i]. Saves the rewards, the prompt index, the
    scores and the log-sum-exps (S values each); the S x S choice sets are rebuilt in the backward."""

    @staticmethod
    def forward(ctx, rewards, group, scores, groups, scale):
        r = rewards.float()
        terms, lse = _pl_terms(r, group, scores)
        ctx.save_for_backward(r, group, scores, lse)
        ctx.in_dtype, ctx.coef = rewards.dtype, 1 / max(groups, 1) if scale is None else scale
        return terms.sum() * ctx.coef

    @staticmethod
    def backward(ctx, grad):
        r, group, scores, lse = ctx.saved_tensors
        choice, counts = _risk_sets(group, scores)
        c = counts.float() * (ctx.coef * grad)
        soft = torch.where(choice, torch.exp(r[None, :] - lse[:, None]), 0.0)  # row i: softmax over C_i
        return ((c[:, None] * soft).sum(0) - c).to(ctx.in_dtype), None, None, None, None


def fused_ranking_loss(rewards: torch.Tensor, group: torch.Tensor, scores: torch.Tensor, groups: int,
                       loss: str = "pairs", scale: float | None = None) -> torch.Tensor:
    """The ranking loss of one micro-batch's S rewards (one forward, each response once) over its `groups`
    prompts (a host int: nothing here waits for the device)."""
    assert rewards.dim() == 1 and rewards.shape == group.shape == scores.shape, (rewards.shape, group.shape)
    fn = {"pairs": _FusedPairs, "plackett_luce": _FusedPlackettLuce}[loss]
    return fn.apply(rewards, group, scores.float(), groups, scale)


RANKING_FIELDS = ("prompts", "loss", "pairs", "correct_pairs", "top1", "responses", "reward_sum", "reward_sq")


def ranking_sums(rewards: torch.Tensor, group: torch.Tensor, scores: torch.Tensor, groups: int,
                 loss: str = "pairs", weight: torch.Tensor | None = None) -> torch.Tensor:
    """float64 sums (RANKING_FIELDS) for exact aggregation over micro-batches and ranks: prompts, the sum of
    their `loss` losses, ordered pairs with different scores and those the rewards order the same way,
    prompts whose highest reward is on a best-scored response (its top level; a tie for the highest
    reward counts as wrong), responses, and the rewards' sum and sum of squares (the normalisation
    statistics). weight (G,), 0 or 1 per prompt: 0 leaves a filler prompt out (evaluation). On the device."""
    r, G = rewards.detach().double(), groups
    w = torch.ones(G, dtype=torch.float64, device=r.device) if weight is None else weight.to(r)
    pair_w, _ = ordered_pairs(group, scores)
    is_pair = (pair_w > 0).double() * w[group][:, None]
    top_r = torch.full((G,), float("-inf"), dtype=torch.float64, device=r.device).scatter_reduce(0, group, r, "amax")
    top_s = torch.full((G,), float("-inf"), dtype=scores.dtype, device=r.device).scatter_reduce(0, group, scores,
                                                                                               "amax")
    is_top = r == top_r[group]
    zeros = torch.zeros(G, dtype=torch.float64, device=r.device)
    n_top = zeros.index_add(0, group, is_top.double())
    hit = zeros.index_add(0, group, (is_top & (scores == top_s[group])).double())
    wr = w[group]
    return torch.stack([
        w.sum(),
        (per_prompt_losses(r, group, scores, G, loss) * w).sum(),
        is_pair.sum(),
        (is_pair * (r[:, None] > r[None, :]).double()).sum(),
        (((n_top == 1) & (hit == 1)).double() * w).sum(),
        wr.sum(),
        (r * wr).sum(),
        (r * r * wr).sum(),
    ])


def ranking_metrics(sums: torch.Tensor) -> dict[str, float]:
    """Per-prompt loss, pairwise accuracy over all ordered pairs, the top-1 rate, and the mean and std of
    every response's reward."""
    s = [float(x) for x in sums]
    assert s[0] > 0, "metrics over zero prompts"
    mean = s[6] / s[5]
    return {"loss": s[1] / s[0], "acc": s[3] / s[2] if s[2] else float("nan"), "top1": s[4] / s[0],
            "reward_mean": mean, "reward_std": max(s[7] / s[5] - mean * mean, 0.0) ** 0.5,
            "prompts": int(s[0]), "pairs": int(s[2]), "responses": int(s[5]), "responses_per_prompt": s[5] / s[0]}
