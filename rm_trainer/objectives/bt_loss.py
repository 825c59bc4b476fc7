"""Bradley-Terry loss and the preference metrics, always in fp32.

A half-precision reward difference loses the small margins that late training lives on, and
logsigmoid of a bf16 value saturates early; the reward vectors are tiny (B,) so fp32 is free.

Ties (`--tie_key`): a tied pair is BT against a target of 1/2 (the soft tie loss),
-(log sigma(d) + log sigma(-d)) / 2 with d = r_c - r_r, minimal at d = 0; no margin applies to it. Tied
pairs count in the loss, never in the accuracy, and their mean |d| is reported (`tie_gap`).

`--tie_loss davidson` (Davidson 1970): a third outcome with P(c > r) = e^{d/2} / D, P(tie) = nu / D,
D = e^{d/2} + e^{-d/2} + nu, and theta = log nu one learned scalar. A strict pair's loss is
log D - z/2 (z = d - margin), a tied pair's log D - theta; nu -> 0 gives plain BT back. Its gradients in
closed form, with (p_w, p_l, p_t) = softmax(z/2, -z/2, theta): dL/dz = (p_w - p_l)/2 - [strict]/2 and
dL/dtheta = p_t - [tied].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_tie_loss(delta: torch.Tensor) -> torch.Tensor:
    """Per tied pair: BT against a target of 1/2, -(log sigma(d) + log sigma(-d)) / 2."""
    return 0.5 * (F.softplus(-delta) + F.softplus(delta))


def davidson_terms(z: torch.Tensor, log_nu: torch.Tensor) -> torch.Tensor:
    """(B, 3) logits (z/2, -z/2, theta) of the Davidson model's win, loss and tie per pair."""
    return torch.stack([z / 2, -z / 2, log_nu.to(z.dtype).reshape(()).expand_as(z)], 1)


def davidson_nll(delta: torch.Tensor, log_nu: torch.Tensor, tie: torch.Tensor | None,
                 margin: torch.Tensor | None = None) -> torch.Tensor:
    """Per pair: -log P(observed outcome) under the Davidson model (the margin only on strict pairs)."""
    tied = torch.zeros_like(delta, dtype=torch.bool) if tie is None else tie.bool()
    return _davidson_nll_at(_davidson_z(delta, tied, margin), log_nu, tied)


def _davidson_z(delta: torch.Tensor, tied: torch.Tensor, margin: torch.Tensor | None) -> torch.Tensor:
    """The Davidson model's reward gap: delta, less the margin on strict pairs."""
    return delta if margin is None else torch.where(tied, delta, delta - margin.to(delta))


def _davidson_nll_at(z: torch.Tensor, log_nu: torch.Tensor, tied: torch.Tensor) -> torch.Tensor:
    logits = davidson_terms(z, log_nu.to(z.dtype))
    return torch.logsumexp(logits, 1) - torch.where(tied, logits[:, 2], logits[:, 0])


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                       margin: torch.Tensor | None = None, scale: float | None = None,
                       center: float = 0.0, tie: torch.Tensor | None = None,
                       log_nu: torch.Tensor | None = None) -> torch.Tensor:
    """-log sigma(r_c - r_r [- margin]) [+ center * (r_c + r_r)^2], averaged over pairs (or summed and
    times `scale`). logsigmoid is stable for any |delta|. The optional per-pair margin asks for a larger
    gap on clearer preferences (Llama-2 style); `center` is TRL's center_rewards_coefficient, which pulls
    the rewards towards zero mean (the BT loss alone only fixes differences). `tie` (B,) bool: those
    pairs take the soft tie loss instead; with `log_nu` every pair takes the Davidson loss (module
    docstring). The plain autograd reference of the fused path."""
    c, r = chosen_rewards.float(), rejected_rewards.float()
    delta = c - r
    z = delta if margin is None else delta - margin.float()
    per_pair = -F.logsigmoid(z)
    if log_nu is not None:
        per_pair = davidson_nll(delta, log_nu, tie, margin)
    elif tie is not None:
        per_pair = torch.where(tie.bool(), soft_tie_loss(delta), per_pair)
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

    Saves only z = r_c - r_r - margin (B floats), and s = r_c + r_r when centering. Per pair the loss is
    softplus(-z) + c s^2: d/dr_c = -sigma(-z) + 2cs and d/dr_r = sigma(-z) + 2cs, times scale (1/B for
    the mean). A tied pair (z = delta, no margin) has (softplus(-z) + softplus(z)) / 2, whose derivative
    in r_c is (sigma(z) - sigma(-z)) / 2. Accuracy (strict pairs only) and margin come out of the same
    pass, without grad.
    """

    @staticmethod
    def forward(ctx, rewards: torch.Tensor, margin: torch.Tensor | None, scale: float | None, center: float,
                tie: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        B = rewards.shape[0] // 2
        c, r = rewards[:B].float(), rewards[B:].float()
        delta = c - r
        z = delta if margin is None else delta - margin.float()
        per_pair = F.softplus(-z)  # = -logsigmoid(z), stable for any |z|
        strict = torch.ones_like(delta, dtype=torch.bool)
        if tie is not None:
            strict = ~tie.bool()
            z = torch.where(strict, z, delta)
            per_pair = torch.where(strict, per_pair, soft_tie_loss(delta))
        if center:
            s = c + r
            per_pair = per_pair + center * s * s
        ctx.save_for_backward(z, strict, *([s] if center else []))
        ctx.in_dtype, ctx.scale, ctx.center = rewards.dtype, scale, center
        loss = per_pair.mean() if scale is None else per_pair.sum() * scale
        acc = ((delta > 0) & strict).float().sum() / strict.sum().clamp_min(1)
        ctx.mark_non_differentiable(acc)
        return loss, acc, delta.mean().detach()

    @staticmethod
    def backward(ctx, grad_loss, _grad_acc, _grad_margin):
        z, strict, *s = ctx.saved_tensors
        weight = grad_loss / z.shape[0] if ctx.scale is None else grad_loss * ctx.scale
        g = torch.where(strict, -torch.sigmoid(-z), 0.5 * (torch.sigmoid(z) - torch.sigmoid(-z)))
        grads = torch.cat([g, -g]) if not s else torch.cat([g, -g]) + (2 * ctx.center * s[0]).repeat(2)
        return (grads * weight).to(ctx.in_dtype), None, None, None, None


class _FusedDavidson(torch.autograd.Function):
    """The Davidson loss (module docstring) over [chosen; rejected] rewards and the learned theta = log nu,
    with the closed-form backward. Saves z (B,), the tie mask and, when centering, s = r_c + r_r."""

    @staticmethod
    def forward(ctx, rewards: torch.Tensor, log_nu: torch.Tensor, margin: torch.Tensor | None,
                scale: float | None, center: float, tie: torch.Tensor) -> tuple[torch.Tensor, ...]:
        B = rewards.shape[0] // 2
        c, r = rewards[:B].float(), rewards[B:].float()
        delta, tied = c - r, tie.bool()
        z = _davidson_z(delta, tied, margin)
        per_pair = _davidson_nll_at(z, log_nu, tied)  # davidson_nll, keeping z for the backward
        if center:
            s = c + r
            per_pair = per_pair + center * s * s
        ctx.save_for_backward(z, log_nu, tied, *([s] if center else []))
        ctx.in_dtype, ctx.scale, ctx.center = rewards.dtype, scale, center
        loss = per_pair.mean() if scale is None else per_pair.sum() * scale
        strict = ~tied
        acc = ((delta > 0) & strict).float().sum() / strict.sum().clamp_min(1)
        ctx.mark_non_differentiable(acc)
        return loss, acc, delta.mean().detach()

    @staticmethod
    def backward(ctx, grad_loss, _grad_acc, _grad_margin):
        z, log_nu, tied, *s = ctx.saved_tensors
        weight = grad_loss / z.shape[0] if ctx.scale is None else grad_loss * ctx.scale
        p = torch.softmax(davidson_terms(z, log_nu), 1)  # (p_win, p_loss, p_tie) per pair
        # d/dz = (p_win - p_loss)/2 - [strict]/2 and d/dtheta = p_tie - [tied], each written without the
        # cancelling 1/2 - ... or p_tie - 1 (fp32 loses ~2e-5 of a 3e-3 gradient to it at p_win ~ 0.99)
        g = torch.where(tied, 0.5 * (p[:, 0] - p[:, 1]), -(p[:, 1] + 0.5 * p[:, 2]))
        grads = torch.cat([g, -g]) if not s else torch.cat([g, -g]) + (2 * ctx.center * s[0]).repeat(2)
        g_nu = (torch.where(tied, -(p[:, 0] + p[:, 1]), p[:, 2]).sum() * weight).reshape(log_nu.shape)
        g_nu = g_nu.to(log_nu.dtype)
        return (grads * weight).to(ctx.in_dtype), g_nu, None, None, None, None


def fused_bradley_terry(rewards: torch.Tensor, margin: torch.Tensor | None = None, scale: float | None = None,
                        center: float = 0.0, tie: torch.Tensor | None = None, log_nu: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, accuracy, mean reward gap) from the concatenated [chosen; rejected] rewards of one 2B
    forward; `margin` (B,) optionally shifts the target gap per pair; `center` adds TRL's reward-centering
    term center * (r_c + r_r)^2 per pair. The loss is the mean over the B pairs, or with `scale` their
    *sum* times scale: micro-batches of different sizes (packing) then each contribute in proportion to
    their pairs (see step.train_step), centering term included. `tie` (B,) bool: the soft tie loss there,
    or with `log_nu` (the learned Davidson scalar, which gets its gradient) the Davidson loss everywhere."""
    assert rewards.dim() == 1 and rewards.shape[0] % 2 == 0, rewards.shape
    if log_nu is not None:
        tie = torch.zeros(rewards.shape[0] // 2, dtype=torch.bool, device=rewards.device) if tie is None else tie
        return _FusedDavidson.apply(rewards, log_nu, margin, scale, float(center), tie)
    return _FusedBT.apply(rewards, margin, scale, float(center), tie)


def pair_sums(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
              weight: torch.Tensor | None = None, tie: torch.Tensor | None = None,
              log_nu: torch.Tensor | None = None) -> torch.Tensor:
    """Per-batch *sums* for exact aggregation across micro-batches and ranks.

    Returns a float64 vector [n, loss_sum, correct_sum, margin_sum, chosen_sum, rejected_sum,
    sum of squared rewards (chosen and rejected), tied pairs, sum of |r_c - r_r| over tied pairs];
    `weight` (0/1 per pair) masks padding pairs that only exist to keep ranks in lock-step. The loss is
    the BT loss without margin (the soft tie loss for tied pairs; with `log_nu`, the Davidson loss); a
    tied pair is never correct.
    """
    c, r = chosen_rewards.detach().double(), rejected_rewards.detach().double()
    w = torch.ones_like(c) if weight is None else weight.to(c)
    d = c - r
    t = torch.zeros_like(d) if tie is None else tie.to(c)
    if log_nu is not None:
        loss = davidson_nll(d, log_nu.detach().double(), t > 0)
    else:
        loss = torch.where(t > 0, soft_tie_loss(d), -F.logsigmoid(d))
    return torch.stack([
        w.sum(),
        (loss * w).sum(),
        ((d > 0).double() * (1 - t) * w).sum(),
        (d * w).sum(),
        (c * w).sum(),
        (r * w).sum(),
        ((c * c + r * r) * w).sum(),
        (t * w).sum(),
        (d.abs() * t * w).sum(),
    ])


SUM_FIELDS = ("n", "loss", "acc", "margin", "chosen_reward", "rejected_reward", "reward_sq", "ties", "tie_gap")
N_SUMS = len(SUM_FIELDS)


def metrics_from_sums(sums: torch.Tensor) -> dict[str, float]:
    """Means per pair (accuracy: per strict pair, NaN if every pair is tied), the mean and std of all 2n
    rewards (the normalisation statistics), and with tied pairs their count and mean |r_c - r_r|."""
    n, ties = float(sums[0]), float(sums[7])
    assert n > 0, "metrics over zero pairs"
    out = {name: float(sums[i]) / n for i, name in enumerate(SUM_FIELDS[:6]) if i > 0}
    out["acc"] = float(sums[2]) / (n - ties) if n > ties else float("nan")
    mean = (out["chosen_reward"] + out["rejected_reward"]) / 2
    var = max(float(sums[6]) / (2 * n) - mean * mean, 0.0)
    out |= {"reward_mean": mean, "reward_std": var ** 0.5, "pairs": int(n)}
    return out | ({"ties": int(ties), "tie_gap": float(sums[8]) / ties} if ties else {})
