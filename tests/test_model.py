import pytest
import torch
from transformers import AutoConfig, AutoModel

from rm_trainer.model.reward import RewardModel, gather_last


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

    from rm_trainer.train.build import disable_dropout

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=16)  # dropout 0.1 by default
    m = RewardModel(AutoModel.from_config(cfg)).train()
    ids, lens = torch.randint(0, 50, (2, 8)), torch.tensor([8, 5])
    assert not torch.equal(m(ids, lens), m(ids, lens))  # the check can fail: dropout is live
    assert disable_dropout(m.backbone) > 0
    assert torch.equal(m(ids, lens), m(ids, lens))


CHAT = ("{% for m in messages %}{% if m['role'] == 'user' %}Human: {{ m['content'] }} {% else %}Assistant: "
        "{{ m['content'] }} {% endif %}{% endfor %}{% if add_generation_prompt %}Assistant: {% endif %}")


@pytest.mark.slow
def test_score_texts_of_conversations_matches_training_tokenization_and_rewards(demo_assets, tiny_pretrained,
                                                                                tmp_path):
    """A model trained on messages (through --chat_template) scores messages exactly as training saw them:
    the probe pairs' token ids, and the live engine's rewards for them."""
    import json

    from helpers import load_artifact, train, train_args

    from rm_trainer import load_reward_model

    def conv(path):
        out = tmp_path / path.split("/")[-1]
        rows = [json.loads(line) for line in open(path)]
        with open(out, "w") as f:
            for r in rows:
                user = r["prompt"].removeprefix("Human: ").removesuffix(" Assistant:")
                f.write(json.dumps({side: [{"role": "user", "content": user},
                                           {"role": "assistant", "content": r[side].strip()}]
                                    for side in ("chosen", "rejected")}) + "\n")
        return str(out)

    (tmp_path / "chat.jinja").write_text(CHAT)
    out = tmp_path / "run"
    train(out, train_args(tiny_pretrained, conv(demo_assets["train"]), conv(demo_assets["test"]),
                          chat_template=tmp_path / "chat.jinja", dtype="fp32", max_steps=3, max_len=64,
                          micro_batch_size=4, lr=1e-3), launcher="python", nprocs=1)
    rm = load_reward_model(out / "reward.pt")
    assert rm.tokenizer.chat_template == CHAT  # carried inside reward.pt
    probe = load_artifact(out)["probe"]
    rows = [json.loads(line) for line in open(tmp_path / "test.jsonl")][:4]
    items = [r["chosen"] for r in rows] + [r["rejected"] for r in rows]  # whole conversations
    from rm_trainer.data.tokenize import encode_item, special_prefix

    prefix = special_prefix(rm.tokenizer)
    for item, ids, n in zip(items, probe["input_ids"], probe["seq_lengths"], strict=True):
        assert encode_item(rm.tokenizer, item, rm.max_len, prefix) == ids[:n].tolist()
    got = rm.score_texts(items)
    want = probe["rewards"]
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    as_pairs = rm.score_texts([(r["chosen"][:1], r["chosen"][1:]) for r in rows])  # (prompt msgs, response msgs)
    assert torch.equal(as_pairs, rm.score_texts(items[:4]))  # the same sequences, so the same batches and bits
    # rm-score on a `messages` file: the chat template inside reward.pt, the same rewards as score_texts
    import subprocess
    import sys

    from helpers import ROOT, run_env

    (tmp_path / "msgs.jsonl").write_text("".join(json.dumps({"messages": m}) + "\n" for m in items))
    p = subprocess.run([sys.executable, "-m", "rm_trainer.cli.score", "--model", str(out / "reward.pt"), "--data",
                        str(tmp_path / "msgs.jsonl"), "--output", str(tmp_path / "scored.jsonl")], cwd=ROOT,
                       env=run_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    scored = torch.tensor([json.loads(line)["reward"] for line in open(tmp_path / "scored.jsonl")])
    assert torch.equal(scored, got)


PACK_FAMILIES = ("llama", "qwen2", "gpt2")


def family_model(family: str, impl: str) -> RewardModel:
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    common = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                  max_position_embeddings=64)
    cfg = {"llama": lambda: LlamaConfig(**common, num_key_value_heads=2),
           "qwen2": lambda: Qwen2Config(**common, num_key_value_heads=2),
           "gpt2": lambda: GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                                      embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2)}[family]()
    torch.manual_seed(0)
    return RewardModel(AutoModel.from_config(cfg, attn_implementation=impl), seed=1)


def pairs(n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        c, r = (torch.randint(4, 97, (int(torch.randint(2, 20, (1,), generator=g)),), generator=g).tolist()
                for _ in range(2))
        out.append({"ids": [c, r]})
    return out


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("family", PACK_FAMILIES)
def test_packed_rows_give_the_rewards_and_gradients_of_padded_rows(family, impl):
    from helpers import objective

    from rm_trainer.objectives.bt_loss import fused_bradley_terry

    rows = pairs()
    b, p = (objective().collate(rows, 0, pack_len=40, packing=packing).seqs for packing in (False, True))
    assert p.input_ids.shape[0] < 10  # really packed: fewer rows than the 10 sequences
    results = []
    for packed in (False, True):
        m = family_model(family, impl)
        r = m(p.input_ids, None, p.position_ids, p.last) if packed else m(b.input_ids, b.lens)
        fused_bradley_terry(r)[0].backward()
        results.append((r.detach(), {n: q.grad for n, q in m.named_parameters()}))
    (rp, gp), (rk, gk) = results
    assert (rk - rp).abs().max() <= 1e-5 * rp.abs().max()
    scale = max(float(g.abs().max()) for g in gp.values())
    assert max(float((gk[n] - gp[n]).abs().max()) for n in gp) <= 1e-5 * scale


def test_packing_guard_catches_sequences_that_see_each_other(monkeypatch):
    from rm_trainer.train.build import check_packing

    m = family_model("llama", "sdpa").eval()
    assert check_packing(m, m.config, torch.device("cpu")) is None
    # the silent failure: without position_ids (or with a cache) the packed row is one long sequence
    monkeypatch.setattr(RewardModel, "_inputs",
                        staticmethod(lambda ids, pos, mask=None: {"input_ids": ids, "use_cache": False}))
    assert "attend to each other" in check_packing(m, m.config, torch.device("cpu"))
    m.config._attn_implementation = "flex_attention"
    assert "cannot keep packed sequences apart" in check_packing(m, m.config, torch.device("cpu"))


def test_starting_from_a_reward_model_loads_its_head_and_refuses_what_does_not_fit(tmp_path):
    """--model may be an HF *ForSequenceClassification folder with num_labels=1 (ours or e.g. Skywork's):
    the backbone loads from its `model.` keys and the head is kept. Other label counts and extra weights
    are refused with a message naming them."""
    from safetensors.torch import load_file, save_file
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from rm_trainer.errors import ConfigError
    from rm_trainer.model.backbone import build_backbone

    cfg = LlamaConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                      num_key_value_heads=2, num_labels=1, pad_token_id=0)
    torch.manual_seed(0)
    rm = LlamaForSequenceClassification(cfg).eval()
    rm.save_pretrained(tmp_path / "rm")
    backbone, head = build_backbone(str(tmp_path / "rm"), torch.float32)
    assert torch.equal(head, rm.score.weight.detach())
    model = RewardModel(backbone, head=head).eval()
    ids = torch.randint(4, 97, (1, 9))
    with torch.no_grad():
        assert torch.allclose(model(ids, torch.tensor([9])), rm(input_ids=ids).logits[:, 0], rtol=1e-5, atol=0)
    # an SFT folder has no head to continue from
    rm.model.save_pretrained(tmp_path / "sft")
    assert build_backbone(str(tmp_path / "sft"), torch.float32)[1] is None

    cfg.num_labels = 2
    LlamaForSequenceClassification(cfg).save_pretrained(tmp_path / "two")
    with pytest.raises(ConfigError, match="num_labels=2; a reward model has one output"):
        build_backbone(str(tmp_path / "two"), torch.float32)

    weights = load_file(tmp_path / "rm" / "model.safetensors")
    weights["v_head.weight"] = torch.zeros(1, 32)
    del weights["model.norm.weight"]
    save_file(weights, tmp_path / "rm" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConfigError, match=r"missing \['norm.weight'\], unexpected \['v_head.weight'\]"):
        build_backbone(str(tmp_path / "rm"), torch.float32)
