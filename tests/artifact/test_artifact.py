"""Loading and verifying reward.pt without copies: the model is built around the artifact's tensors, and
half-precision models are verified in fp32 one module at a time."""

from __future__ import annotations

import copy

import torch
from transformers import AutoModel, LlamaConfig

from rm_trainer.artifact.format import fp32_compute, model_from_state
from rm_trainer.model.reward import RewardModel

CFG = LlamaConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=64, max_position_embeddings=64)


def reference(dtype=torch.float32) -> RewardModel:
    torch.manual_seed(0)
    return RewardModel(AutoModel.from_config(CFG, dtype=dtype), seed=1).eval()


def probe():
    g = torch.Generator().manual_seed(3)
    return torch.randint(1, 97, (4, 9), generator=g), torch.tensor([9, 5, 7, 2])


def test_model_from_state_uses_the_given_tensors_without_copying():
    ref = reference()
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    cfg = CFG.to_diff_dict() | {"model_type": "llama"}
    m = model_from_state(cfg, state, torch.float32)
    for k, p in m.state_dict().items():
        assert p.data_ptr() == state[k].data_ptr(), k  # the artifact's memory itself, not a copy
    ids, lens = probe()
    with torch.no_grad():
        assert torch.equal(m(ids, lens), ref(ids, lens))  # rotary buffers were computed, not left on meta


def test_fp32_compute_equals_an_fp32_copy_and_restores_the_half_weights():
    half = reference(torch.bfloat16)
    full = copy.deepcopy(half).float()
    before = {k: v.clone() for k, v in half.state_dict().items()}
    ids, lens = probe()
    with torch.no_grad(), fp32_compute(half):
        got = half(ids, lens)
    with torch.no_grad():
        want = full(ids, lens)
    assert torch.equal(got, want)
    after = half.state_dict()
    assert all(after[k].dtype == torch.bfloat16 and torch.equal(after[k], before[k]) for k in before)
