"""Bradley-Terry loss and the preference metrics, always in fp32.

A half-precision reward difference loses the small margins that late training lives on, and
logsigmoid of a bf16 value saturates early; the reward vectors are tiny (B,) so fp32 is free.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                       margin: torch.Tensor | None = None, scale: float | None = None,
                       center: float = 0.0) -> torch.Tensor:
    """-log sigma(r_c - r_r [- margin]) [+ center * (r_c + r_r)^2], averaged over pairs (or summed and
    times `scale`). logsigmoid is stable for any |delta|. The optional per-pair margin asks for a larger
    gap on clearer preferences (Llama-2 style); `center` is TRL's center_rewards_coefficient, which pulls
    the rewards towards zero mean (the BT loss alone only fixes differences)."""
    c, r = chosen_rewards.float(), rejected_rewards.float()
    delta = c - r
    if margin is not None:
        delta = delta - margin.float()
    per_pair = -F.logsigmoid(delta)
    if center:
        per_pair = per_pair + center * (c + r) ** 2
    return per_pair.mean() if scale is None else per_pair.sum() * scale


def preference_accuracy(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """Fraction of pairs ranked correctly (ties count as wrong: the model did not prefer chosen)."""
    return (chosen_rewards.float() > rejected_rewards.float()).float().mean()


def margin(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    return (chosen_rewards.float() - rejected_rewards.float()).mean()


class _FusedBT(torch.autograd.Function):
    """Bradley-Terry loss over a 2B reward vector [chosen; rejected] with a closed-form backward.

    Saves only delta = r_c - r_r (B floats), and s = r_c + r_r when centering. Per pair the loss is
    softplus(-z) + c s^2 (z = delta - margin): d/dr_c = -sigma(-z) + 2cs and d/dr_r = sigma(-z) + 2cs,
    times scale (1/B for the mean). Accuracy and margin come out of the same pass, without grad.
    """

    @staticmethod
    def forward(ctx, rewards: torch.Tensor, margin: torch.Tensor | None, scale: float | None, center: float
                ) -> tuple[torch.Tensor, ...]:
        B = rewards.shape[0] // 2
        c, r = rewards[:B].float(), rewards[B:].float()
        delta = c - r
        z = delta if margin is None else delta - margin.float()
        per_pair = F.softplus(-z)  # = -logsigmoid(z), stable for any |z|
        if center:
            s = c + r
            per_pair = per_pair + center * s * s
            ctx.save_for_backward(z, s)
        else:
            ctx.save_for_backward(z)
        ctx.in_dtype, ctx.scale, ctx.center = rewards.dtype, scale, center
        loss = per_pair.mean() if scale is None else per_pair.sum() * scale
        acc = (delta > 0).float().mean()
        ctx.mark_non_differentiable(acc)
        return loss, acc, delta.mean().detach()

    @staticmethod
    def backward(ctx, grad_loss, _grad_acc, _grad_margin):
        z, *s = ctx.saved_tensors
        weight = grad_loss / z.shape[0] if ctx.scale is None else grad_loss * ctx.scale
        g = -torch.sigmoid(-z)
        grads = torch.cat([g, -g]) if not s else torch.cat([g, -g]) + (2 * ctx.center * s[0]).repeat(2)
        return (grads * weight).to(ctx.in_dtype), None, None, None


def fused_bradley_terry(rewards: torch.Tensor, margin: torch.Tensor | None = None, scale: float | None = None,
                        center: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, accuracy, mean reward gap) from the concatenated [chosen; rejected] rewards of one 2B
    forward; `margin` (B,) optionally shifts the target gap per pair; `center` adds TRL's reward-centering
    term center * (r_c + r_r)^2 per pair. The loss is the mean over the B pairs, or with `scale` their
    *sum* times scale: micro-batches of different sizes (packing) then each contribute in proportion to
    their pairs (see step.train_step), centering term included."""
    assert rewards.dim() == 1 and rewards.shape[0] % 2 == 0, rewards.shape
    return _FusedBT.apply(rewards, margin, scale, float(center))


def pair_sums(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
              weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per-batch *sums* for exact aggregation across micro-batches and ranks.

    Returns a float64 vector [n, loss_sum, correct_sum, margin_sum, chosen_sum, rejected_sum,
    sum of squared rewards (chosen and rejected)]; `weight` (0/1 per pair) masks padding pairs that only
    exist to keep ranks in lock-step.
    """
    c, r = chosen_rewards.detach().double(), rejected_rewards.detach().double()
    w = torch.ones_like(c) if weight is None else weight.to(c)
    d = c - r
    return torch.stack([
        w.sum(),
        (-F.logsigmoid(d) * w).sum(),
        ((d > 0).double() * w).sum(),
        (d * w).sum(),
        (c * w).sum(),
        (r * w).sum(),
        ((c * c + r * r) * w).sum(),
    ])


SUM_FIELDS = ("n", "loss", "acc", "margin", "chosen_reward", "rejected_reward", "reward_sq")
N_SUMS = len(SUM_FIELDS)


def metrics_from_sums(sums: torch.Tensor) -> dict[str, float]:
    """Means per pair, plus the mean and std of all 2n rewards (the normalisation statistics)."""
    n = float(sums[0])
    assert n > 0, "metrics over zero pairs"
    out = {name: float(sums[i]) / n for i, name in enumerate(SUM_FIELDS[:-1]) if i > 0}
    mean = (out["chosen_reward"] + out["rejected_reward"]) / 2
    var = max(float(sums[6]) / (2 * n) - mean * mean, 0.0)
    return out | {"reward_mean": mean, "reward_std": var ** 0.5, "pairs": int(n)}
