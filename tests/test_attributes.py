"""The multi-attribute regression loss (rm_trainer.attributes): the fused backward against plain autograd in
fp32 and bf16 for any shapes, missing values and weights (hypothesis); missing values add nothing and get
no gradient; the reward's combination of the attributes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rm_trainer.model.attributes import combination, combine
from rm_trainer.objectives.regression_loss import (
    fused_regression_loss,
    regression_loss,
    regression_metrics,
    regression_sums,
)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12))


def batch(n: int, k: int, seed: int, missing: float):
    g = torch.Generator().manual_seed(seed)
    preds = torch.randn(n, k, generator=g) * 2
    targets = torch.randint(0, 5, (n, k), generator=g).float()  # HelpSteer's 0-4 ratings
    targets[torch.rand(n, k, generator=g) < missing] = float("nan")
    weights = torch.rand(k, generator=g) * 2
    return preds, targets, weights


def loss_and_grad(fn, preds, *args, **kwargs):
    p = preds.detach().clone().requires_grad_()
    loss = fn(p, *args, **kwargs)
    loss.backward()
    return loss.detach(), p.grad


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 12), k=st.integers(1, 6), seed=st.integers(0, 10**6), missing=st.sampled_from([0, 0.3, 1]),
       weighted=st.booleans(), scale=st.sampled_from([None, 0.1]))
def test_fused_regression_equals_autograd_in_fp32(n, k, seed, missing, weighted, scale):
    preds, targets, weights = batch(n, k, seed, missing)
    w = weights if weighted else None
    want, want_g = loss_and_grad(regression_loss, preds, targets, weights=w, scale=scale)
    got, got_g = loss_and_grad(fused_regression_loss, preds, targets, weights=w, scale=scale)
    assert torch.isfinite(got) and torch.isfinite(got_g).all()
    assert abs(float(got - want)) <= 1e-5 * max(abs(float(want)), 1e-12)
    assert rel(got_g, want_g) <= 1e-5 or float(want_g.abs().max()) == 0.0


def test_bf16_predictions_get_an_fp32_loss_and_bf16_gradients_at_the_bf16_scale():
    preds, targets, weights = batch(16, 5, 1, 0.3)
    p16 = preds.bfloat16()
    want, want_g = loss_and_grad(regression_loss, p16.float(), targets, weights=weights)
    got, got_g = loss_and_grad(fused_regression_loss, p16, targets, weights=weights)
    assert got.dtype == torch.float32 and got_g.dtype == torch.bfloat16
    assert rel(got, want) <= 1e-6 and rel(got_g.float(), want_g) <= 2 ** -8


def test_missing_values_add_nothing_and_get_no_gradient():
    preds, targets, _ = batch(8, 3, 2, 0.0)
    targets[2, 1] = float("nan")
    present = torch.ones(8, 3, dtype=torch.bool)
    present[5, 0] = False
    loss, g = loss_and_grad(fused_regression_loss, preds, targets, present)
    assert g[2, 1] == 0 and g[5, 0] == 0
    keep = torch.isfinite(targets) & present
    want = ((preds - torch.nan_to_num(targets)) ** 2 * keep).sum() / 8
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    far = preds.clone()
    far[2, 1], far[5, 0] = 1e6, -1e6  # a missing value's prediction may be anything
    assert fused_regression_loss(far, targets, present).item() == pytest.approx(loss.item(), rel=1e-6)


def test_the_reward_combines_the_attributes():
    names = ["helpfulness", "correctness", "verbosity"]
    assert combination(names, None).tolist() == [1.0, 0.0, 0.0]  # default: the first attribute
    c = combination(names, {"helpfulness": 1, "verbosity": -0.3})
    assert c.tolist() == pytest.approx([1.0, 0.0, -0.3])
    preds = torch.tensor([[3.0, 2.0, 4.0], [1.0, 0.0, 0.0]], dtype=torch.bfloat16)
    r = combine(preds, c)
    assert r.dtype == torch.float32 and r.tolist() == pytest.approx([3.0 - 1.2, 1.0])
    with pytest.raises(ValueError, match="reward weights name coherence, not among the attributes"):
        combination(names, {"coherence": 1.0})


# ---------------------------------------------------------------- statistics: RMSE and Pearson from exact sums


def direct(preds: torch.Tensor, targets: torch.Tensor, k: int) -> tuple[float, float]:
    """(RMSE, Pearson r) of attribute k over the rows that rate it, computed directly in float64."""
    m = torch.isfinite(targets[:, k])
    p, y = preds[m, k].double(), targets[m, k].double()
    pc, yc = p - p.mean(), y - y.mean()
    return float(((p - y) ** 2).mean().sqrt()), float((pc * yc).sum() / (pc.norm() * yc.norm()))


@settings(max_examples=60, deadline=None)
@given(n=st.integers(3, 24), k=st.integers(1, 4), seed=st.integers(0, 10**6), missing=st.sampled_from([0, 0.3]),
       cut=st.integers(1, 23))
def test_metrics_from_sums_equal_the_direct_ones_and_sums_add_over_micro_batches(n, k, seed, missing, cut):
    preds, targets, weights = batch(n, k, seed, missing)
    cut = min(cut, n - 1)
    whole = regression_sums(preds, targets, weights)
    parts = regression_sums(preds[:cut], targets[:cut], weights) + regression_sums(preds[cut:], targets[cut:], weights)
    assert torch.allclose(whole, parts, rtol=1e-12, atol=1e-12 * float(whole.abs().max()))
    names = [f"a{i}" for i in range(k)]
    m = regression_metrics(whole, names)
    assert m["rows"] == n
    assert m["loss"] == pytest.approx(regression_loss(preds, targets, None, weights).item(), rel=1e-5)
    for i, name in enumerate(names):
        rated = torch.isfinite(targets[:, i])
        ys = targets[rated, i]
        if rated.sum() < 2 or float(ys.max() - ys.min()) == 0:
            assert m[f"pearson/{name}"] != m[f"pearson/{name}"]  # NaN: undefined on fewer than 2 or constant
            continue
        rmse, r = direct(preds, targets, i)
        assert m[f"rmse/{name}"] == pytest.approx(rmse, rel=1e-9)
        assert m[f"pearson/{name}"] == pytest.approx(r, rel=1e-9, abs=1e-12)


def test_filler_rows_and_weights_leave_the_statistics_as_they_should():
    preds = torch.tensor([[1.0, 2.0], [3.0, 0.0], [9.0, 9.0]])
    targets = torch.tensor([[1.5, float("nan")], [2.0, 1.0], [0.0, 0.0]])
    keep = torch.tensor([1.0, 1.0, 0.0])  # the third row is filler (evaluation): counted nowhere
    s = regression_sums(preds, targets, torch.tensor([2.0, 0.0]), keep)
    m = regression_metrics(s, ["h", "v"])
    assert m["rows"] == 2 and m["loss"] == pytest.approx((2 * 0.25 + 2 * 1.0) / 2)  # weight 0: v out of the loss
    assert m["rmse/h"] == pytest.approx(((0.25 + 1.0) / 2) ** 0.5) and m["rmse/v"] == pytest.approx(1.0)  # still rated
    assert m["pearson/h"] == pytest.approx(1.0)  # two rated points, both rising: r = 1
    assert m["pearson/v"] != m["pearson/v"]  # one rated point: undefined
