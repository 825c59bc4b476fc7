"""Fused reward path (gather before the final norm + closed-form BT backward) vs the plain path."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModel, GPT2Config, GPTNeoXConfig, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from rm_trainer.model.reward import RewardModel
from rm_trainer.objectives.bt_loss import bradley_terry_loss, fused_bradley_terry

V, H = 97, 32
COMMON = dict(vocab_size=V, hidden_size=H, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
              max_position_embeddings=64)
FAMILIES = {
    "llama": lambda: LlamaConfig(**COMMON, num_key_value_heads=2),
    "mistral": lambda: MistralConfig(**COMMON, num_key_value_heads=2, sliding_window=None),
    "qwen2": lambda: Qwen2Config(**COMMON, num_key_value_heads=2),
    "qwen3": lambda: Qwen3Config(**COMMON, num_key_value_heads=2, head_dim=8),
    "gpt_neox": lambda: GPTNeoXConfig(**COMMON, rotary_pct=0.5, hidden_dropout=0.0, attention_dropout=0.0),
    "gpt2": lambda: GPT2Config(vocab_size=V, n_embd=H, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                               embd_pdrop=0.0, attn_pdrop=0.0),
}


def pair(family: str, dtype=torch.float32):
    torch.manual_seed(0)
    backbone = AutoModel.from_config(FAMILIES[family](), dtype=dtype)
    fused = RewardModel(backbone, seed=1, reward_path="fused")
    plain = RewardModel(copy.deepcopy(backbone), seed=1, reward_path="plain")
    plain.load_state_dict(fused.state_dict())
    assert fused.final_norm_name is not None, f"{family} should take the fused path"
    return fused, plain


def batch(B=3, T=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(2, T + 1, (2 * B,), generator=g)
    lens[0] = T
    ids = torch.randint(1, V, (2 * B, T), generator=g)
    ids[torch.arange(T)[None, :] >= lens[:, None]] = 0  # right padding
    return ids, lens


def step(model, ids, lens, fused: bool):
    model.zero_grad()
    rewards = model(ids, lens)
    B = ids.shape[0] // 2
    loss = fused_bradley_terry(rewards)[0] if fused else bradley_terry_loss(rewards[:B], rewards[B:])
    loss.backward()
    return loss.detach(), rewards.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def rel_err(a: torch.Tensor, b: torch.Tensor, scale: float | None = None) -> float:
    """max |a - b| relative to the magnitude compared: the largest |b|, or `scale` where that is larger.
    The two paths sum in different orders, so fp32 results differ by a few ulps of the magnitudes
    involved, whatever the CPU's kernels and thread count."""
    ref = max(float(b.abs().max()), scale or 0.0, torch.finfo(torch.float32).tiny)
    return float((a - b).abs().max()) / ref


RTOL_FP32 = 1e-5  # ~84 ulps of fp32; a real bug (a wrong row, a missing norm) is off by O(1)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fused_equals_plain_fp32(family):
    fused, plain = pair(family)
    ids, lens = batch()
    lf, rf, gf = step(fused, ids, lens, fused=True)
    lp, rp, gp = step(plain, ids, lens, fused=False)
    assert rel_err(lf, lp) <= RTOL_FP32 and rel_err(rf, rp) <= RTOL_FP32
    assert gf.keys() == gp.keys()
    # Gradients are compared at the scale of the model's gradients: a tensor whose true gradient is 0
    # (the final norm's bias adds the same to chosen and rejected, so it cancels in the BT loss) holds
    # only rounding noise in both paths, and noise relative to noise is meaningless.
    scale = max(float(g.abs().max()) for g in gp.values())
    for n in gf:
        assert rel_err(gf[n], gp[n], scale) <= RTOL_FP32, (n, rel_err(gf[n], gp[n], scale))
    assert any(g.abs().max() > 0 for n, g in gf.items() if "norm" in n or "ln_f" in n)  # norm still learns


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_fused_bf16_is_as_accurate_as_plain_bf16(family):
    # In bf16 neither path is exact, so compare both against the fp32 truth computed on the *same*
    # (bf16-representable) weights. The fused path may differ from plain by bf16 rounding (eps 2^-8),
    # but must not be less accurate: its error vs the truth is at most 1.25x plain's (+ 1e-3 slack).
    fused, plain = pair(family, torch.bfloat16)
    truth = copy.deepcopy(plain).float()
    ids, lens = batch()
    lf, rf, gf = step(fused, ids, lens, fused=True)
    lp, rp, gp = step(plain, ids, lens, fused=False)
    lt, rt, gt = step(truth, ids, lens, fused=False)

    def rel(g):
        a = torch.cat([g[n].float().flatten() for n in gt])
        b = torch.cat([gt[n].flatten() for n in gt])
        return ((a - b).norm() / b.norm()).item()

    err_f, err_p = rel(gf), rel(gp)
    print(f"{family} bf16 grad error vs fp32: fused {err_f:.3g}, plain {err_p:.3g}; "
          f"reward error: fused {(rf - rt).abs().max():.3g}, plain {(rp - rt).abs().max():.3g}")
    assert err_f <= 1.25 * err_p + 1e-3
    assert (rf - rt).abs().max() <= 1.25 * (rp - rt).abs().max() + 1e-3
    # |d loss / d r_i| <= 1/B over 2B rewards, so the loss error is bounded by 2x the reward error
    assert abs(lf - lt) <= 2 * (rf - rt).abs().max() + 1e-6


def test_fused_loss_stable_and_exact_for_huge_margins():
    r = torch.tensor([5e3, -5e3, 1.0, -5e3, 5e3, 0.5], dtype=torch.float64, requires_grad=True)
    loss, acc, margin = fused_bradley_terry(r.float().requires_grad_())
    ref_in = r.detach().clone().requires_grad_()
    ref = bradley_terry_loss(ref_in[:3], ref_in[3:])
    assert torch.isfinite(loss) and abs(loss.item() - ref.item()) < 1e-3
    assert acc.item() == pytest.approx(2 / 3) and margin.item() == pytest.approx((1e4 - 1e4 + 0.5) / 3)
    x = r.detach().float().requires_grad_()
    fused_bradley_terry(x)[0].backward()
    ref.backward()
    assert torch.isfinite(x.grad).all()
    assert torch.allclose(x.grad.double(), ref_in.grad, atol=1e-7)
    assert x.grad[1].item() == pytest.approx(-1 / 3)  # delta = -1e4: gradient saturates at -1/B


class ShapeRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.shapes.append((str(func), tuple(t.shape), t.dtype))
        return out


def test_fused_path_never_builds_vocab_or_per_token_reward_tensors():
    fused, plain = pair("llama")
    ids, lens = batch(B=3, T=11)
    for model, fused_loss, expect_per_token in ((fused, True, False), (plain, False, True)):
        rec = ShapeRecorder()
        with rec:
            step(model, ids, lens, fused=fused_loss)
        assert not any(s and s[-1] == V for _, s, _ in rec.shapes)  # no (..., V) logits
        # the head's matmul over every token would output (2B*T, 1) = (66, 1)
        per_token = [f for f, s, d in rec.shapes if "mm" in f and s == (66, 1)]
        assert bool(per_token) == expect_per_token, per_token  # the check can fail: plain does build them


def test_unknown_architecture_warns_and_stays_correct():
    torch.manual_seed(0)
    backbone = AutoModel.from_config(FAMILIES["llama"]())
    backbone.config.model_type = "my_custom_decoder"
    with pytest.warns(UserWarning, match="LlamaModel"):
        m = RewardModel(backbone, seed=1)
    assert m.final_norm_name is None
    fused, _ = pair("llama")
    ids, lens = batch()
    assert torch.allclose(m(ids, lens), fused(ids, lens), atol=1e-6)
