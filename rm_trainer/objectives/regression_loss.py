"""Multi-attribute regression (HelpSteer-style ratings), the loss layer: in fp32, with a closed-form backward.

A rated response has K attribute values (helpfulness, correctness, ...; any may be missing). The head
predicts all K at the last token, p (N, K). Per response the loss is the weighted squared error over the
attributes it has,

    l_n = sum_k w_k m_nk (p_nk - y_nk)^2      (m_nk = 1 where y_nk is present, w_k >= 0 the attribute weights)

and the batch loss is the mean over the N responses, or their sum times `scale` (micro-batches of
different sizes, as for pairs in train.step). Missing values add nothing and get no gradient. The
scalar reward that PPO reads is a fixed linear combination of the attributes, r = p @ c
(model/attributes.py).

Statistics (regression_sums) are float64 sums, exact over micro-batches and ranks, from which
regression_metrics gives each attribute's RMSE and Pearson correlation.
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


ATTRIBUTE_SUMS = ("rated", "sse", "y", "yy", "p", "pp", "py")  # per attribute, after (rows, loss sum)


def regression_sums(preds: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None = None,
                    keep: torch.Tensor | None = None) -> torch.Tensor:
    """float64 sums for exact aggregation over micro-batches and ranks: [rows, sum of the rows' losses] and
    per attribute ATTRIBUTE_SUMS over the rows that rate it (count, squared error, and the sums of y, y^2,
    p, p^2 and p y from which Pearson's r follows). keep (N,) 0/1 leaves filler rows out (evaluation).
    On the device, no sync."""
    p = preds.detach().double()
    y, wm = _prepare(targets.to(p.device), None, weights, p)
    k = torch.ones(p.shape[0], dtype=p.dtype, device=p.device) if keep is None else keep.to(p)
    m = torch.isfinite(targets.to(p.device)).to(p.dtype) * k[:, None]  # rated (whatever its loss weight)
    per_attr = torch.stack([m.sum(0), (m * (p - y) ** 2).sum(0), (m * y).sum(0), (m * y * y).sum(0),
                            (m * p).sum(0), (m * p * p).sum(0), (m * p * y).sum(0)], 1)
    head = torch.stack([k.sum(), ((wm * (p - y) ** 2).sum(1) * k).sum()])
    return torch.cat([head, per_attr.reshape(-1)])


def regression_metrics(sums: torch.Tensor, names: list[str]) -> dict[str, float]:
    """The mean loss per row, and per attribute its RMSE and Pearson r (NaN where fewer than two rows rate
    it or either side is constant), keyed rmse/<name> and pearson/<name>."""
    s = [float(x) for x in sums]
    assert s[0] > 0, "metrics over zero rows"
    out: dict[str, float] = {"loss": s[1] / s[0], "rows": int(s[0])}
    for i, name in enumerate(names):
        n, sse, sy, syy, sp, spp, spy = s[2 + 7 * i: 9 + 7 * i]
        out[f"rmse/{name}"] = (sse / n) ** 0.5 if n else float("nan")
        var_y, var_p = syy - sy * sy / n if n else 0.0, spp - sp * sp / n if n else 0.0
        ok = n > 1 and var_y > 1e-12 * max(syy, 1e-300) and var_p > 1e-12 * max(spp, 1e-300)
        out[f"pearson/{name}"] = (spy - sy * sp / n) / (var_y * var_p) ** 0.5 if ok else float("nan")
    return out
