import pytest
import torch
from transformers import AutoConfig, AutoModel

from rm_trainer.model import RewardModel, gather_last


def test_gather_last_varied_lengths_2d_and_3d():
    x = torch.arange(3 * 5).view(3, 5)
    lens = torch.tensor([1, 5, 3])
    assert gather_last(x, lens).tolist() == [0, 9, 12]
    h = torch.randn(3, 5, 7)
    out = gather_last(h, lens)
    assert out.shape == (3, 7)
    for i, n in enumerate(lens.tolist()):
        assert torch.equal(out[i], h[i, n - 1])


@pytest.fixture(scope="module")
def tiny(demo_assets):
    torch.manual_seed(0)
    cfg = AutoConfig.from_pretrained(demo_assets["model"])
    return RewardModel(AutoModel.from_config(cfg), seed=3).eval()


def test_reward_read_at_last_real_token_ignores_right_padding(tiny):
    torch.manual_seed(1)
    V = tiny.config.vocab_size
    a, b = torch.randint(4, V, (6,)), torch.randint(4, V, (9,))
    ids = torch.full((2, 12), 1)
    ids[0, :6], ids[1, :9] = a, b
    batch = tiny(ids, torch.tensor([6, 9]))
    alone_a = tiny(a[None], torch.tensor([6]))
    alone_b = tiny(b[None], torch.tensor([9]))
    assert torch.allclose(batch, torch.cat([alone_a, alone_b]), atol=1e-6)
    # the seed's formulation (head on every token, then pick) gives the same numbers
    per_token = tiny.score(tiny.forward_hidden(ids)).squeeze(-1)
    assert torch.allclose(batch, gather_last(per_token, torch.tensor([6, 9])), atol=1e-6)
    assert batch.dtype == torch.float32 and batch.shape == (2,)


def test_head_is_seeded_same_dtype_and_bias_free(demo_assets):
    cfg = AutoConfig.from_pretrained(demo_assets["model"])
    m1 = RewardModel(AutoModel.from_config(cfg, dtype=torch.bfloat16), seed=7)
    m2 = RewardModel(AutoModel.from_config(cfg, dtype=torch.bfloat16), seed=7)
    assert m1.score.bias is None and m1.score.weight.shape == (1, cfg.hidden_size)
    assert m1.score.weight.dtype == torch.bfloat16
    assert torch.equal(m1.score.weight, m2.score.weight)
    assert not torch.equal(m1.score.weight, RewardModel(AutoModel.from_config(cfg), seed=8).score.weight.bfloat16())


def test_backbone_has_no_lm_head(tiny):
    assert not any("lm_head" in n for n, _ in tiny.named_parameters())


def test_disable_dropout_makes_training_forward_deterministic():
    from transformers import GPT2Config

    from rm_trainer.model import disable_dropout

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=16)  # dropout 0.1 by default
    m = RewardModel(AutoModel.from_config(cfg)).train()
    ids, lens = torch.randint(0, 50, (2, 8)), torch.tensor([8, 5])
    assert not torch.equal(m(ids, lens), m(ids, lens))  # the check can fail: dropout is live
    assert disable_dropout(m.backbone) > 0
    assert torch.equal(m(ids, lens), m(ids, lens))
