import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rm_trainer.objectives.bt_loss import (
    bradley_terry_loss,
    fused_bradley_terry,
    margin,
    metrics_from_sums,
    pair_sums,
    preference_accuracy,
)


def test_bt_loss_matches_formula_and_chance_value():
    c = torch.tensor([1.0, 0.0, -2.0])
    r = torch.tensor([0.0, 0.0, 1.0])
    want = sum(-math.log(1 / (1 + math.exp(-(a - b)))) for a, b in zip(c.tolist(), r.tolist(), strict=True)) / 3
    assert abs(bradley_terry_loss(c, r).item() - want) < 1e-6
    # equal rewards: loss is ln 2, the value a fresh reward model starts near
    assert abs(bradley_terry_loss(torch.zeros(4), torch.zeros(4)).item() - math.log(2)) < 1e-7


def test_bt_loss_gradient_is_closed_form():
    c = torch.tensor([0.3, -1.2, 2.0, 0.0], requires_grad=True)
    r = torch.tensor([0.1, 0.5, -1.0, 0.0], requires_grad=True)
    bradley_terry_loss(c, r).backward()
    d = (c - r).detach()
    want = -torch.sigmoid(-d) / 4  # d/dc of -log sigma(c - r), averaged over B=4
    assert torch.allclose(c.grad, want, atol=1e-7)
    assert torch.allclose(r.grad, -want, atol=1e-7)


def test_bt_loss_is_fp32_and_stable_for_half_inputs_and_huge_margins():
    c = torch.tensor([8192.0, -8192.0], dtype=torch.bfloat16)  # exact in bf16
    r = torch.zeros(2, dtype=torch.bfloat16)
    loss = bradley_terry_loss(c, r)
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss) and abs(loss.item() - 8192 / 2) < 1e-3


def test_accuracy_margin_and_ties():
    c = torch.tensor([2.0, 0.0, 1.0, 5.0])
    r = torch.tensor([1.0, 0.0, 3.0, 1.0])
    assert preference_accuracy(c, r).item() == 0.5  # the tie counts as not preferred
    assert margin(c, r).item() == (1 + 0 - 2 + 4) / 4


def test_pair_sums_aggregate_exactly_and_mask_padding():
    torch.manual_seed(0)
    c, r = torch.randn(10), torch.randn(10)
    whole = metrics_from_sums(pair_sums(c, r))
    split = metrics_from_sums(pair_sums(c[:3], r[:3]) + pair_sums(c[3:], r[3:]))
    for k in whole:
        assert abs(whole[k] - split[k]) < 1e-12
    assert abs(whole["loss"] - bradley_terry_loss(c, r).item()) < 1e-6
    assert abs(whole["acc"] - preference_accuracy(c, r).item()) < 1e-12
    # zero-weight filler pairs change nothing
    padded = pair_sums(torch.cat([c, torch.tensor([9.0])]), torch.cat([r, torch.tensor([-9.0])]),
                       torch.tensor([1.0] * 10 + [0.0]))
    assert torch.allclose(padded, pair_sums(c, r))


def test_margin_shifts_the_target_gap_in_both_paths():
    from rm_trainer.objectives.bt_loss import fused_bradley_terry

    c = torch.tensor([1.0, 0.5, -0.2], requires_grad=True)
    r = torch.tensor([0.0, 0.7, -1.0], requires_grad=True)
    m = torch.tensor([0.5, 0.0, 2.0])
    want = -torch.nn.functional.logsigmoid(c - r - m).mean()
    plain = bradley_terry_loss(c, r, m)
    assert torch.allclose(plain, want)
    plain.backward()
    x = torch.cat([c, r]).detach().requires_grad_()
    loss, acc, gap = fused_bradley_terry(x, m)
    loss.backward()
    assert torch.allclose(loss, want) and torch.allclose(x.grad, torch.cat([c.grad, r.grad]))
    assert acc.item() == pytest.approx(2 / 3)  # accuracy is about r_c > r_r, not the margin


def test_sum_mode_weights_micro_batches_by_their_pairs():
    """Packing: micro-batches of 3 and 5 pairs, each loss = pair-loss sum x (1 / 8), add up to the mean
    over all 8 pairs, in value and gradient, in both paths (fp32 inside: tolerances of a few ulps)."""
    torch.manual_seed(0)
    r = torch.randn(16, dtype=torch.float64)
    whole = r.clone().requires_grad_()
    fused_bradley_terry(whole)[0].backward()
    ia, ib = [0, 1, 2, 8, 9, 10], [3, 4, 5, 6, 7, 11, 12, 13, 14, 15]  # [chosen; rejected] of 3 and 5 pairs
    a, b = r[ia].clone().requires_grad_(), r[ib].clone().requires_grad_()
    la, lb = fused_bradley_terry(a, scale=1 / 8)[0], fused_bradley_terry(b, scale=1 / 8)[0]
    (la + lb).backward()
    assert torch.allclose(la + lb, bradley_terry_loss(r[:8], r[8:]), rtol=1e-6)
    got = torch.empty(16, dtype=torch.float64)
    got[ia], got[ib] = a.grad, b.grad
    assert torch.allclose(got, whole.grad, rtol=1e-6)
    plain = bradley_terry_loss(r[[0, 1, 2]], r[[8, 9, 10]], scale=1 / 8) + bradley_terry_loss(
        r[[3, 4, 5, 6, 7]], r[[11, 12, 13, 14, 15]], scale=1 / 8)
    assert torch.allclose(plain, la + lb, rtol=1e-6)


@pytest.mark.parametrize("scale", [None, 0.3])
def test_reward_centering_equals_trls_formula_in_loss_and_gradient(scale):
    """TRL: loss = -logsigmoid(r_c - r_r).mean() + c * mean((r_c + r_r) ** 2). The fused path's closed-form
    backward and the plain path give the same loss and gradients; with `scale` both are sums x scale."""
    coef = 0.01
    torch.manual_seed(0)
    c0, r0 = torch.randn(6) * 3 + 2, torch.randn(6) * 3 + 2  # far from zero mean: the term matters
    c, r = c0.clone().requires_grad_(), r0.clone().requires_grad_()
    per_pair = -torch.nn.functional.logsigmoid(c - r) + coef * (c + r) ** 2
    want = per_pair.mean() if scale is None else per_pair.sum() * scale
    want.backward()
    rewards = torch.cat([c0, r0]).requires_grad_()
    loss, acc, gap = fused_bradley_terry(rewards, scale=scale, center=coef)
    loss.backward()
    plain_c, plain_r = c0.clone().requires_grad_(), r0.clone().requires_grad_()
    plain = bradley_terry_loss(plain_c, plain_r, scale=scale, center=coef)
    plain.backward()
    for got in (loss, plain):
        assert abs(got.item() - want.item()) <= 1e-6 * abs(want.item())
    g_want = torch.cat([c.grad, r.grad])
    for g in (rewards.grad, torch.cat([plain_c.grad, plain_r.grad])):
        assert (g - g_want).abs().max() <= 1e-6 * g_want.abs().max()
    # the centering term is real: without it the loss is smaller by c * mean(s^2)
    no_center = fused_bradley_terry(torch.cat([c0, r0]), scale=scale)[0]
    term = coef * ((c0 + r0) ** 2)
    assert abs((loss - no_center).item() - (term.mean() if scale is None else term.sum() * scale).item()) <= 1e-5
    assert acc.item() == ((c0 - r0) > 0).float().mean().item() and abs(gap.item() - (c0 - r0).mean().item()) < 1e-6


# ---------------------------------------------------------------- ties (--tie_key): the soft tie loss


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 12), st.integers(0, 2**31 - 1), st.booleans(), st.sampled_from([0.0, 0.1]),
       st.sampled_from([None, 0.25]), st.sampled_from([torch.float32, torch.bfloat16]))
def test_fused_tie_loss_and_gradient_equal_the_autograd_reference(B, seed, with_margin, center, scale, dtype):
    g = torch.Generator().manual_seed(seed)
    rewards = (torch.randn(2 * B, generator=g) * 3).to(dtype)
    tie = torch.rand(B, generator=g) < 0.5
    m = torch.rand(B, generator=g) if with_margin else None
    a = rewards.clone().requires_grad_()
    loss, acc, _ = fused_bradley_terry(a, m, scale, center, tie)
    loss.backward()
    b = rewards.float().clone().requires_grad_()  # the reference in fp32 on the same (rounded) rewards
    want = bradley_terry_loss(b[:B], b[B:], m, scale, center, tie)
    want.backward()
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: the gradient is rounded to bf16 (8 bits)
    assert abs(loss.item() - want.item()) <= 1e-6 * max(1.0, abs(want.item()))
    assert a.grad.dtype == dtype
    assert torch.allclose(a.grad.float(), b.grad, rtol=tol, atol=tol * b.grad.abs().max().item() + 1e-12)
    strict = ~tie
    d = (rewards[:B].float() - rewards[B:].float())
    want_acc = ((d > 0) & strict).float().sum() / max(int(strict.sum()), 1)
    assert acc.item() == pytest.approx(want_acc.item())


def test_the_soft_tie_loss_is_bt_against_one_half_and_ignores_the_margin():
    c, r = torch.tensor([0.0, 2.0, -1.0]), torch.tensor([0.0, 0.5, 1.0])
    tie = torch.tensor([True, True, False])
    d = c - r
    p = torch.sigmoid(d)
    want = torch.stack([-(0.5 * p.log() + 0.5 * (1 - p).log())[0], -(0.5 * p.log() + 0.5 * (1 - p).log())[1],
                        -torch.nn.functional.logsigmoid(d[2] - 0.3)])
    got = bradley_terry_loss(c, r, torch.full((3,), 0.3), tie=tie)
    assert torch.allclose(got, want.mean(), rtol=1e-6)
    assert abs(bradley_terry_loss(torch.zeros(1), torch.zeros(1), tie=torch.tensor([True])).item()
               - math.log(2)) < 1e-7  # its minimum: equal rewards
    # no pair tied: exactly the plain BT loss, bit for bit
    no = torch.zeros(3, dtype=torch.bool)
    assert torch.equal(bradley_terry_loss(c, r, tie=no), bradley_terry_loss(c, r))
    assert torch.equal(fused_bradley_terry(torch.cat([c, r]), tie=no)[0], fused_bradley_terry(torch.cat([c, r]))[0])


def test_tied_pairs_count_in_the_loss_not_the_accuracy_and_report_their_gap():
    c, r = torch.tensor([2.0, 0.0, 1.0, 5.0]), torch.tensor([1.0, 0.5, 3.0, 1.0])
    tie = torch.tensor([False, True, False, True])
    m = metrics_from_sums(pair_sums(c[:2], r[:2], tie=tie[:2]) + pair_sums(c[2:], r[2:], tie=tie[2:]))
    assert m["acc"] == 0.5 and m["ties"] == 2 and m["tie_gap"] == pytest.approx((0.5 + 4.0) / 2)
    assert m["loss"] == pytest.approx(bradley_terry_loss(c, r, tie=tie).item(), rel=1e-6)
    assert "ties" not in metrics_from_sums(pair_sums(c, r))
    assert math.isnan(metrics_from_sums(pair_sums(c, r, tie=torch.ones(4, dtype=torch.bool)))["acc"])


# ---------------------------------------------------------------- ties: the Davidson model (--tie_loss davidson)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 12), st.integers(0, 2**31 - 1), st.booleans(), st.sampled_from([0.0, 0.1]),
       st.sampled_from([None, 0.25]), st.sampled_from([torch.float32, torch.bfloat16]),
       st.floats(-4.0, 3.0))
def test_fused_davidson_loss_and_gradients_equal_the_autograd_reference(B, seed, with_margin, center, scale,
                                                                         dtype, theta):
    g = torch.Generator().manual_seed(seed)
    rewards = (torch.randn(2 * B, generator=g) * 3).to(dtype)
    tie = torch.rand(B, generator=g) < 0.5
    m = torch.rand(B, generator=g) if with_margin else None
    a, nu_a = rewards.clone().requires_grad_(), torch.tensor([theta], dtype=dtype, requires_grad=True)
    loss, acc, _ = fused_bradley_terry(a, m, scale, center, tie, nu_a)
    loss.backward()
    b, nu_b = rewards.float().clone().requires_grad_(), nu_a.detach().float().clone().requires_grad_()
    want = bradley_terry_loss(b[:B], b[B:], m, scale, center, tie, nu_b)
    want.backward()
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: gradients are rounded to bf16 (8 bits)
    assert abs(loss.item() - want.item()) <= 1e-6 * max(1.0, abs(want.item()))
    assert a.grad.dtype == dtype and nu_a.grad.dtype == dtype and nu_a.grad.shape == (1,)
    # the autograd reference's softmax-minus-one-hot cancels (terms of up to 1/2 x weight per reward, and
    # of up to 1 x weight per pair in d/dtheta, the fused backward does not): its float error is relative
    # to those terms, not to the (possibly tiny) result; B=1, p_win=0.996 differed by 2e-5 of it
    weight = scale if scale is not None else 1 / B
    assert torch.allclose(a.grad.float(), b.grad, rtol=tol, atol=tol * max(b.grad.abs().max().item(), weight))
    assert abs(nu_a.grad.float().item() - nu_b.grad.item()) <= tol * max(abs(nu_b.grad.item()), B * weight)
    strict = ~tie
    d = rewards[:B].float() - rewards[B:].float()
    assert acc.item() == pytest.approx((((d > 0) & strict).float().sum() / max(int(strict.sum()), 1)).item())


def test_the_fused_davidson_gradient_keeps_fp32_precision_near_certainty():
    """The fused backward has no 1/2 - p or p_tie - 1 to cancel: against a float64 reference it is good to
    a few fp32 ulps of the gradient itself, also where the outcome is nearly certain."""
    from rm_trainer.objectives.bt_loss import davidson_nll
    rewards = torch.tensor([3.0, 0.5, -9.0, -3.0, 0.0, 2.0])  # gaps 12, 0.5, -11: p_win ~ 1, 1/2, ~ 0
    tie = torch.tensor([False, True, False])
    a, nu = rewards.clone().requires_grad_(), torch.tensor([-3.8], requires_grad=True)
    fused_bradley_terry(a, None, None, 0.0, tie, nu)[0].backward()
    b, nu_b = rewards.double().requires_grad_(), torch.tensor([-3.8], dtype=torch.float64, requires_grad=True)
    davidson_nll(b[:3] - b[3:], nu_b, tie).mean().backward()
    assert torch.allclose(a.grad.double(), b.grad, rtol=1e-6, atol=0)
    assert torch.allclose(nu.grad.double(), nu_b.grad, rtol=1e-6, atol=0)


def test_davidson_probabilities_are_the_models_and_reduce_to_bt_as_nu_vanishes():
    from rm_trainer.objectives.bt_loss import davidson_nll

    d, theta = torch.tensor([0.7, -1.3, 0.0]), torch.tensor(math.log(0.8))
    nu = 0.8
    denominator = torch.exp(d / 2) + torch.exp(-d / 2) + nu
    win, tied = torch.exp(d / 2) / denominator, nu / denominator
    assert torch.allclose(davidson_nll(d, theta, torch.tensor([False, False, False])), -torch.log(win))
    assert torch.allclose(davidson_nll(d, theta, torch.tensor([True, True, True])), -torch.log(tied))
    # nu -> 0: a strict pair's loss is BT's
    bt = -torch.nn.functional.logsigmoid(d)
    assert torch.allclose(davidson_nll(d, torch.tensor(-30.0), None), bt, atol=1e-6)
    # the margin moves strict pairs only
    m = torch.tensor([0.5, 0.5, 0.5])
    tie = torch.tensor([False, True, False])
    got = davidson_nll(d, theta, tie, m)
    assert got[1] == davidson_nll(d, theta, tie)[1] and got[0] == davidson_nll(d - m, theta, tie)[0]


def test_davidson_learns_the_tie_rate_of_the_data():
    """Minimising the Davidson loss over theta alone, with every pair at d = 0 and a fraction q tied,
    gives P(tie | d = 0) = nu / (2 + nu) = q: the learned scalar is the data's tie rate, not a knob."""
    q = 0.25
    tie = torch.tensor([True] * 25 + [False] * 75)
    theta = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([theta], lr=1.0)
    for _ in range(300):
        opt.zero_grad()
        fused_bradley_terry(torch.zeros(200), tie=tie, log_nu=theta)[0].backward()
        opt.step()
    nu = math.exp(theta.item())
    assert nu / (2 + nu) == pytest.approx(q, rel=1e-4)
    m = metrics_from_sums(pair_sums(torch.zeros(100), torch.zeros(100), tie=tie, log_nu=theta))
    assert m["loss"] == pytest.approx(fused_bradley_terry(torch.zeros(200), tie=tie, log_nu=theta)[0].item(),
                                      rel=1e-6)
