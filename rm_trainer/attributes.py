"""Multi-attribute regression (HelpSteer-style ratings), the loss layer: in fp32, with a closed-form backward.

A rated response has K attribute values (helpfulness, correctness, ...; any may be missing). The head
predicts all K at the last token, p (N, K). Per response the loss is the weighted squared error over the
attributes it has,

    l_n = sum_k w_k m_nk (p_nk - y_nk)^2      (m_nk = 1 where y_nk is present, w_k >= 0 the attribute weights)

and the batch loss is the mean over the N responses, or their sum times `scale` (micro-batches of
different sizes, as for pairs in train.step). Missing values add nothing and get no gradient. The
scalar reward that PPO reads is a fixed linear combination of the attributes, r = p @ c (`combine`).

Not wired into rm-train yet (issue 19): the head of K outputs, the data columns and the artifact follow.
"""

from __future__ import annotations

import torch


def _fp32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _prepare(targets: torch.Tensor, present: torch.Tensor | None, weights: torch.Tensor | None, like: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets with missing values zeroed, per-element weight w_k m_nk), both in `like`'s dtype."""
    m = torch.isfinite(targets) if present is None else present.bool() & torch.isfinite(targets)
    w = torch.ones(targets.shape[-1], dtype=like.dtype, device=like.device) if weights is None else weights.to(like)
    return torch.where(m, targets.to(like), 0.0), m.to(like.dtype) * w


def regression_loss(preds: torch.Tensor, targets: torch.Tensor, present: torch.Tensor | None = None,
                    weights: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """The plain autograd reference (module docstring). targets (N, K): NaN, or present False, where missing."""
    p = _fp32(preds)
    y, wm = _prepare(targets, present, weights, p)
    per_row = (wm * (p - y) ** 2).sum(1)
    return per_row.mean() if scale is None else per_row.sum() * scale


class _FusedRegression(torch.autograd.Function):
    """The same loss; d/dp_nk = 2 w_k m_nk (p_nk - y_nk) x coef. Saves the residual and its weights."""

    @staticmethod
    def forward(ctx, preds, targets, present, weights, scale):
        p = preds.float()
        y, wm = _prepare(targets, present, weights, p)
        diff = torch.where(wm > 0, p - y, 0.0)
        ctx.save_for_backward(diff, wm)
        ctx.in_dtype, ctx.coef = preds.dtype, 1 / max(preds.shape[0], 1) if scale is None else scale
        return (wm * diff * diff).sum() * ctx.coef

    @staticmethod
    def backward(ctx, grad):
        diff, wm = ctx.saved_tensors
        return (2 * wm * diff * (ctx.coef * grad)).to(ctx.in_dtype), None, None, None, None


def fused_regression_loss(preds: torch.Tensor, targets: torch.Tensor, present: torch.Tensor | None = None,
                          weights: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """The regression loss of N responses' K predicted attributes (module docstring)."""
    assert preds.dim() == 2 and preds.shape == targets.shape, (preds.shape, targets.shape)
    return _FusedRegression.apply(preds, targets, present, weights, scale)


def combination(names: list[str], spec: dict[str, float] | None) -> torch.Tensor:
    """The reward's coefficients over `names` (K,): `spec` maps some attributes to their weights
    (`--reward_weights helpfulness=1,verbosity=-0.3`); without one the reward is the first attribute.
    Raises ValueError naming an attribute that is not among `names`."""
    if not spec:
        return torch.eye(len(names))[0]
    unknown = sorted(set(spec) - set(names))
    if unknown:
        raise ValueError(f"reward weights name {', '.join(unknown)}, not among the attributes {', '.join(names)}")
    return torch.tensor([float(spec.get(n, 0.0)) for n in names])


def combine(preds: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """The scalar reward (N,) of predicted attributes (N, K), in fp32: what PPO reads."""
    return _fp32(preds) @ coefficients.to(_fp32(preds))
