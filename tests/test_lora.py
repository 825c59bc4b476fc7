"""LoRA: peft adapters on the backbone, merged by consolidation, exported as a peft folder.

Unit tests check the merge against the live adapted model (Llama's Linear and GPT-2's transposed Conv1D);
the real runs (2 ranks over gloo, ZeRO-2 and ZeRO-3) check equivalence, the artifacts and the optimizer
state. The LoRA runs use a wider tiny Llama (H=256) than the other tests: with H=64 a rank-8 adapter is
a fifth of a layer, nothing like its share at real scale.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import load_artifact, losses, train, train_args
from test_model import family_model

from rm_trainer import load_reward_model
from rm_trainer.artifact.lora import merge_lora
from rm_trainer.errors import ConfigError
from rm_trainer.model.backbone import backbone_from_config_dict
from rm_trainer.model.lora import apply_lora, trainable_summary
from rm_trainer.model.reward import RewardModel

LORA = {"lora_r": 4, "lora_alpha": 8}


def adapted(family: str, **cfg) -> RewardModel:
    model = family_model(family, "sdpa")
    model.backbone = apply_lora(model.backbone, LORA | cfg, seed=0)
    with torch.no_grad():  # B starts at zero (a no-op adapter); give it values so the merge has work to do
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn_like(p) * 0.1)
    return model.eval()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_merged_weights_score_like_the_adapted_model(family):
    model = adapted(family)
    ids, lens = torch.randint(4, 97, (3, 11)), torch.tensor([11, 7, 3])
    with torch.no_grad():
        want = model(ids, lens)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    config = model.config.to_diff_dict() | {"model_type": model.config.model_type}
    merged = merge_lora(state, {"r": 4, "alpha": 8.0}, config)
    assert merged == (8 if family == "gpt2" else 14)  # (c_attn, attn.c_proj, c_fc, mlp.c_proj) or q..down, x 2
    assert not any(".lora_" in k or ".base_layer." in k for k in state)
    plain = RewardModel(backbone_from_config_dict(config, torch.float32))
    plain.load_state_dict(state, strict=True)
    with torch.no_grad():
        got = plain.eval()(ids, lens)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max(), (got, want)


def test_only_adapters_and_the_head_train_and_training_starts_at_the_backbone():
    base = family_model("llama", "sdpa").eval()
    ids, lens = torch.randint(4, 97, (2, 9)), torch.tensor([9, 5])
    with torch.no_grad():
        before = base(ids, lens)
    base.backbone = apply_lora(base.backbone, LORA, seed=0)
    trainable = sorted(n for n, p in base.named_parameters() if p.requires_grad)
    assert "score.weight" in trainable and all(".lora_" in n for n in trainable if n != "score.weight")
    assert {n.split(".")[-4] for n in trainable if ".lora_A." in n} == {"q_proj", "k_proj", "v_proj", "o_proj",
                                                                        "gate_proj", "up_proj", "down_proj"}
    with torch.no_grad():
        assert torch.equal(base(ids, lens), before)  # B = 0: the adapted model is the backbone
    s = trainable_summary(base)
    assert 0 < s["trainable_params"] < s["total_params"]
    # the same seed gives the same adapters (every rank, every world size)
    other = family_model("llama", "sdpa")
    other.backbone = apply_lora(other.backbone, LORA, seed=0)
    a, b = dict(base.named_parameters()), dict(other.named_parameters())
    assert all(torch.equal(a[n], b[n]) for n in trainable)


def test_unknown_target_names_the_layers_that_exist():
    with pytest.raises(ConfigError, match="no linear layer named qkv_proj.*its linear layers are down_proj"):
        apply_lora(family_model("llama", "sdpa").backbone, LORA | {"lora_target": ["q_proj", "qkv_proj"]}, 0)


# ---------------------------------------------------------------- real runs
@pytest.fixture(scope="module")
def wide_sft(demo_assets, tmp_path_factory) -> str:
    """A tiny Llama with real-model proportions for LoRA: H=256, 2 layers, GQA, intermediate 1024."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    out = tmp_path_factory.mktemp("wide_sft")
    cfg = AutoConfig.from_pretrained(demo_assets["model"], hidden_size=256, intermediate_size=1024,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    torch.manual_seed(99)
    AutoModel.from_config(cfg).save_pretrained(out)
    AutoTokenizer.from_pretrained(demo_assets["model"]).save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def lora_run(demo_assets, wide_sft, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_runs")
    done = {}

    def get(name: str):
        if name not in done:
            ds, extra = {"z2": ("zero2", {"lora_r": 8, "packing": True, "pack_len": 128, "hf_export": True}),
                         "z3": ("zero3", {"lora_r": 8, "gradient_checkpointing": True, "lora_export": True,
                                          "hf_export": True}),
                         "full_z2": ("zero2", {})}[name]
            done[name] = out = root / name
            train(out, train_args(wide_sft, demo_assets["train"], demo_assets["test"], ds, dtype="fp32", lr=1e-3,
                                  max_steps=8, warmup_steps=1, max_len=64, seed=5, micro_batch_size=2, eval_every=4,
                                  **extra))
        return done[name]

    return get


@pytest.mark.slow
def test_lora_zero2_packed_and_zero3_with_checkpointing_take_the_same_steps(lora_run):
    """The same global batches: ZeRO-2 with packed rows vs ZeRO-3 with length-grouped padded batches and
    activation checkpointing."""
    a, b = losses(lora_run("z2")), losses(lora_run("z3"))
    assert len(a) == len(b) == 8
    diff = max(abs(x - y) for x, y in zip(a, b, strict=True))
    print("LoRA ZeRO-2 packed vs ZeRO-3 grouped + checkpointing, observed max |dloss|", diff)
    assert diff <= 1e-5, (a, b)
    assert a[-1] < a[0]  # it learns


@pytest.mark.slow
@pytest.mark.parametrize("name", ["z2", "z3"])
def test_merged_reward_pt_and_hf_export_hold_full_weights_and_a_trained_head(lora_run, wide_sft, name, demo_assets):
    from transformers import AutoModelForSequenceClassification

    out = lora_run(name)
    final = json.loads((out / "final_metrics.json").read_text())["reward_pt"]
    assert final["lora_layers_merged"] == 14 and final["probe_max_abs_diff"] <= final["probe_tolerance"]
    state = load_artifact(out)["state_dict"]
    assert not any("lora" in k or "base_layer" in k for k in state)
    assert state["score.weight"].shape == (1, 256)
    init = torch.randn((1, 256), generator=torch.Generator().manual_seed(5)) / math.sqrt(257)  # RewardModel's
    assert (state["score.weight"] - init).abs().max() > 1e-3 * init.abs().max(), "the head never trained"
    # the frozen base weights came through unchanged where no adapter sits (embeddings, norms)
    from safetensors.torch import load_file

    base = load_file(f"{wide_sft}/model.safetensors")
    assert torch.equal(state["backbone.embed_tokens.weight"], base["embed_tokens.weight"])
    assert not torch.equal(state["backbone.layers.0.self_attn.q_proj.weight"],
                           base["layers.0.self_attn.q_proj.weight"])  # merged: base + BA
    assert_scores_like_reward_pt(AutoModelForSequenceClassification.from_pretrained(out / "hf"), out, demo_assets,
                                 out / "hf")


def assert_scores_like_reward_pt(model, out, demo_assets, tokenizer_dir) -> None:
    """A transformers sequence classifier (one raw text at a time, tokenized by the tokenizer shipped in
    tokenizer_dir, which appends EOS as training did) vs load_reward_model(reward.pt) on held-out texts."""
    from transformers import AutoTokenizer

    rm = load_reward_model(out / "reward.pt")
    rows = [json.loads(line) for line in open(demo_assets["test"])][:4]
    texts = [r["prompt"] + r["chosen"] for r in rows] + [r["prompt"] + r["rejected"] for r in rows]
    want = rm.score_texts(texts)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    for t, w in zip(texts, want, strict=True):
        with torch.no_grad():
            got = model.eval()(**tok(t, return_tensors="pt")).logits[0, 0]
        assert abs(got - w) <= 1e-5 * max(1.0, abs(w)), (got, w)


@pytest.mark.slow
def test_peft_adapter_folder_reloads_with_the_head_and_gives_the_same_rewards(lora_run, wide_sft, demo_assets):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    out = lora_run("z3")
    adapter = out / "lora_adapter"
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["task_type"] == "SEQ_CLS" and "score" in cfg["modules_to_save"]
    base = AutoModelForSequenceClassification.from_pretrained(wide_sft, num_labels=1)
    assert_scores_like_reward_pt(PeftModel.from_pretrained(base, adapter), out, demo_assets, adapter)


@pytest.mark.slow
def test_lora_optimizer_state_is_under_five_percent_of_full_fine_tuning(lora_run):
    def optim_bytes(out):
        return sum(f.stat().st_size for f in (out / "checkpoints" / "step_8").glob("*_optim_states.pt"))

    lora, full = optim_bytes(lora_run("z2")), optim_bytes(lora_run("full_z2"))
    print(f"optimizer state: full {full} bytes, LoRA r=8 {lora} bytes ({lora / full:.2%})")
    assert lora <= 0.05 * full


@pytest.mark.slow
@pytest.mark.parametrize("name", ["z2", "z3"])
def test_a_lora_checkpoint_holds_what_trains_and_not_the_frozen_base(lora_run, name):
    """exclude_frozen_parameters: the frozen base weights are the run's --model; the checkpoint (every file
    of step_8 together) is a few percent of a full fine-tuning one, and consolidation reads them back."""
    def ckpt_bytes(out):
        return sum(f.stat().st_size for f in (out / "checkpoints" / "step_8").rglob("*") if f.is_file())

    lora, full = ckpt_bytes(lora_run(name)), ckpt_bytes(lora_run("full_z2"))
    log = (lora_run(name).parent / f"{name}.log").read_text()
    trainable = json.loads(log.split("[rm_trainer] LoRA: ", 1)[1].splitlines()[0])["trainable_params"]
    frozen = sum(v.numel() * v.element_size() for v in load_artifact(lora_run(name))["state_dict"].values()) \
        - 4 * trainable  # fp32
    print(f"checkpoint: full fine-tuning {full} bytes, LoRA r=8 under {name} {lora} bytes ({lora / full:.2%}); "
          f"{trainable} trainable parameters, frozen base weights {frozen} bytes")
    # fp32 weight + fp32 master + Adam's two moments per trainable parameter, plus the small files
    assert lora <= 16 * trainable + (256 << 10) and lora < frozen and lora < 0.05 * full
    report = json.loads((lora_run(name) / "final_metrics.json").read_text())["reward_pt"]
    assert report["base_weights_read"] > 0 and report["probe_max_abs_diff"] <= report["probe_tolerance"]
