"""MoE backbones (Qwen3-MoE, Mixtral): the router's load-balancing loss at the seam (equal to transformers'
own function on the same router logits, over real tokens only, with a gradient to the routers), then real
2-rank runs where ZeRO-2 and ZeRO-3 take the same steps with it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from helpers import (
    BIN,
    ROOT,
    free_port,
    load_artifact,
    metrics,
    resume_from_copy,
    run_env,
    same_artifact_weights,
    train_args,
    trained,
)
from transformers import AutoModel, MixtralConfig, Qwen3MoeConfig

from rm_trainer import load_reward_model
from rm_trainer.model import moe
from rm_trainer.model.reward import RewardModel, real_tokens

FAMILIES = {
    "qwen3_moe": lambda: Qwen3MoeConfig(vocab_size=2000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, head_dim=16, intermediate_size=128,
                                        moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                                        max_position_embeddings=128, bos_token_id=2, eos_token_id=3, pad_token_id=1),
    "mixtral": lambda: MixtralConfig(vocab_size=2000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, head_dim=16, intermediate_size=32, num_local_experts=8,
                                     num_experts_per_tok=2, max_position_embeddings=128, bos_token_id=2,
                                     eos_token_id=3, pad_token_id=1),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_router_loss_is_transformers_own_over_real_tokens_and_trains_the_router(family):
    torch.manual_seed(0)
    backbone = AutoModel.from_config(FAMILIES[family](), attn_implementation="eager")
    model = RewardModel(backbone, seed=1)
    assert moe.routing(backbone.config) == (8, 2) and moe.leaf_module_classes(model)
    model.enable_router_aux(0.01)
    ids = torch.randint(4, 2000, (3, 12))
    lens = torch.tensor([12, 7, 4])
    model.train()
    r = model(ids, lens)
    out = backbone(input_ids=ids, use_cache=False, output_router_logits=True)
    mask = torch.arange(12)[None] < lens[:, None]
    fn = sys.modules[type(backbone).__module__].load_balancing_loss_func
    want = 0.01 * fn(out.router_logits, 8, 2, mask)
    assert torch.equal(model.aux_loss, want)
    assert not torch.equal(want, 0.01 * fn(out.router_logits, 8, 2, None))  # the padding would count
    model.aux_loss.backward()
    routers = [p.grad for n, p in model.named_parameters() if n.endswith("gate.weight") and p.grad is not None]
    assert routers and all(g.abs().sum() > 0 for g in routers)
    model.eval()  # scoring: no router loss, the same rewards
    with torch.no_grad():
        assert torch.equal(model(ids, lens), r.detach()) and model.aux_loss is None
    counts = moe.parameter_counts(backbone)
    assert counts["active_params"] == counts["total_params"] - counts["expert_params"] * 6 // 8



@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_packed_rows_count_only_their_real_tokens_in_the_router_loss(family):
    """The same 6 sequences, right-padded and packed into rows of 24 (each row's tail is padding): the
    router sees the same real tokens, so the two losses agree; counting the packed tail would not."""
    from rm_trainer.data.batching import Sequences

    torch.manual_seed(0)
    model = RewardModel(AutoModel.from_config(FAMILIES[family](), attn_implementation="sdpa"), seed=1)
    model.enable_router_aux(0.01)
    model.train()
    g = torch.Generator().manual_seed(3)
    lens = [9, 4, 7, 11, 5, 7]
    seqs = [torch.randint(4, 2000, (n,), generator=g).tolist() for n in lens]
    packed = Sequences.of(seqs, 1, 24, packing=True)
    assert (packed.input_ids == 1).sum() == 1  # rows of 22 and 21 tokens: a tail of padding
    r_packed = model(packed.input_ids, position_ids=packed.position_ids, last=packed.last)
    aux_packed = model.aux_loss
    with torch.no_grad():  # the whole packed rows, tails included, would give a different loss
        out = model.backbone(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False,
                             output_router_logits=True)
        whole = 0.01 * moe.load_balancing_loss(model.backbone, out.router_logits, None)
    ids = torch.full((6, max(lens)), 1)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
    r_padded = model(ids, torch.tensor(lens))
    assert torch.allclose(r_packed, r_padded, rtol=1e-5, atol=1e-5 * r_padded.abs().max().item())
    print(family, "packed vs padded router loss", float(abs(aux_packed - model.aux_loss) / model.aux_loss),
          "with the tail", float(abs(whole - model.aux_loss) / model.aux_loss))
    assert abs(aux_packed - model.aux_loss) <= 1e-6 * model.aux_loss, (aux_packed, model.aux_loss)
    assert abs(whole - model.aux_loss) > 1e-5 * model.aux_loss  # one padding token: 6e-5 (Mixtral), 8e-4 (Qwen3-MoE)
    assert real_tokens(packed.input_ids, None, None, packed.last).sum() == sum(lens)

def test_lora_on_an_moe_backbone_adapts_the_attention_and_names_the_3d_experts():
    from rm_trainer.errors import ConfigError
    from rm_trainer.model.lora import apply_lora

    backbone = AutoModel.from_config(FAMILIES["qwen3_moe"](), attn_implementation="eager")
    with pytest.raises(ConfigError, match="gate_up_proj.*experts' stacked 3-D weights"):
        apply_lora(backbone, {"lora_r": 4, "lora_target": ["q_proj", "gate_up_proj"]}, 0)
    model = RewardModel(apply_lora(backbone, {"lora_r": 4}, 0), seed=1)
    trained = {n.split(".")[-4] for n, p in model.named_parameters() if p.requires_grad and ".lora_" in n}
    assert trained == {"q_proj", "k_proj", "v_proj", "o_proj"}
    model.enable_router_aux(0.01)
    model.train()
    r = model(torch.randint(4, 2000, (2, 8)), torch.tensor([8, 5]))
    (r.sum() + model.aux_loss).backward()  # the frozen routers pass the gradient on to the adapters below
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)

def moe_args(sft, assets, ds):
    return train_args(sft, assets["train"], assets["test"], ds, dtype="fp32", lr=1e-3, max_steps=6, warmup_steps=1,
                      max_len=64, seed=5, micro_batch_size=2, eval_every=6, save_every=2, keep_last=2,
                      router_aux_loss_coef=0.01, hf_export=ds == "zero3")


@pytest.fixture(scope="module")
def moe_sft(demo_assets, tmp_path_factory):
    """family -> a saved tiny MoE backbone of that family (made once per module)."""
    from transformers import AutoTokenizer

    done = {}

    def get(family: str):
        if family not in done:
            done[family] = sft = tmp_path_factory.mktemp(f"sft_{family}")
            torch.manual_seed(0)
            AutoModel.from_config(FAMILIES[family]()).save_pretrained(sft)
            AutoTokenizer.from_pretrained(demo_assets["model"]).save_pretrained(sft)
        return done[family]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_zero2_and_zero3_take_the_same_steps_with_the_router_loss(family, demo_assets, moe_sft):
    runs = {ds: trained(moe_args(moe_sft(family), demo_assets, ds)) for ds in ("zero2", "zero3")}
    a, b = metrics(runs["zero2"]), metrics(runs["zero3"])
    for key in ("loss", "router_aux_loss"):
        x, y = [r[key] for r in a], [r[key] for r in b]
        assert len(x) == 6 and max(abs(p - q) / abs(p) for p, q in zip(x, y, strict=True)) <= 1e-5, (key, x, y)
    assert all(r["router_aux_loss"] > 0 for r in a)
    # consolidation verified each run's reward.pt against its live engine; the two agree
    wa, wb = load_artifact(runs["zero2"])["state_dict"], load_artifact(runs["zero3"])["state_dict"]
    err = max(((wa[k] - wb[k]).abs().max() / wb[k].abs().max().clamp_min(1e-12)).item() for k in wa)
    print(f"{family}: ZeRO-2 vs ZeRO-3 with the router loss, final weights max rel diff {err:.3g}")
    # measured 7.0e-6 (Mixtral) and 1.3e-5 (Qwen3-MoE): after 6 Adam steps at lr 1e-3 a summation-order
    # difference in a near-zero gradient moves its element by up to ~lr, relative to the tensor's largest
    assert err <= 1e-4
    hf_round_trip(runs["zero3"], family, demo_assets)


def hf_round_trip(out, family, assets):
    """OUT/hf is the family's own *ForSequenceClassification and scores like reward.pt."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    hf = AutoModelForSequenceClassification.from_pretrained(out / "hf").eval()
    assert type(hf).__name__ == {"qwen3_moe": "Qwen3MoeForSequenceClassification",
                                 "mixtral": "MixtralForSequenceClassification"}[family]
    rows = [json.loads(line) for line in open(assets["test"])][:4]
    texts = [r["prompt"] + r["chosen"] for r in rows] + [r["prompt"] + r["rejected"] for r in rows]
    want = load_reward_model(out / "reward.pt").score_texts(texts)
    batch = AutoTokenizer.from_pretrained(out / "hf")(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        got = hf(**batch).logits[:, 0]
    assert (got - want).abs().max() <= 1e-5 * want.abs().max(), (got, want)


@pytest.mark.slow
def test_a_moe_run_resumed_from_a_checkpoint_is_bit_exact_under_zero3(demo_assets, moe_sft, tmp_path):
    args = moe_args(moe_sft("qwen3_moe"), demo_assets, "zero3")
    a = trained(args)  # the ZeRO-3 run of the test above: trained once
    b = tmp_path / "resumed"
    resume_from_copy(a, b, args, 4)  # as a crash after step_4 leaves it (SIGKILL: the kill tests)
    ma, mb = metrics(a), metrics(b)
    for key in ("loss", "router_aux_loss"):
        assert [r[key] for r in ma] == [r[key] for r in mb], key  # exact float equality
    assert same_artifact_weights(a, b)


@pytest.mark.slow
def test_ranks_whose_tokens_reach_different_experts_do_not_hang_under_zero3(tmp_path):
    """tests/support/moe_ranks.py: a per-expert MoE block (a ModuleList, experts without tokens skipped) where rank 0's
    tokens reach only expert 0 and rank 1's only expert 1, under ZeRO-3 through our engine. As a leaf
    module it trains like one process holding both halves; without it the ranks disagree on what to
    gather (DeepSpeed fails them, or the collective timeout of 60 s would)."""
    def run(name, nprocs, *flags):
        out = tmp_path / f"{name}.json"
        cmd = [sys.executable] if nprocs == 1 else [str(BIN / "torchrun"), "--nproc_per_node", str(nprocs),
                                                    "--master_port", str(free_port()), "--master_addr", "127.0.0.1"]
        p = subprocess.run(cmd + [str(ROOT / "tests" / "support" / "moe_ranks.py"), str(out), *flags], cwd=ROOT,
                           env=run_env(), capture_output=True, text=True, timeout=240)
        return p, json.loads(out.read_text()) if out.exists() else None

    p, one = run("one", 1)
    assert p.returncode == 0, p.stderr[-3000:]
    p, two = run("two", 2)
    assert p.returncode == 0, p.stderr[-3000:]
    assert two["leaf"] == ["PerExpertMoE"] and len(two["losses"]) == 3
    assert all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(two["losses"], one["losses"], strict=True)), (two, one)
    p, bad = run("no_leaf", 2, "--no-leaf")
    assert p.returncode != 0 and bad is None and "disagreement" in p.stderr + p.stdout
