"""Memory estimate: DeepSpeed's formulas on the fixed Llama-3-8B case, and --dry-run end to end."""

import json
import subprocess
import sys

import pytest
from helpers import ROOT, run_env
from transformers import LlamaConfig

from rm_trainer.train.estimate import activation_bytes, count_params, estimate, report

GiB = 1024**3


@pytest.fixture(scope="module")
def llama3_8b(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama3_8b")
    LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8).save_pretrained(d)
    return str(d)


def test_llama3_8b_counts_on_meta_device(llama3_8b):
    total, largest, name, _ = count_params(llama3_8b)
    assert round(total / 1e9, 3) == 7.505 and name == "embed_tokens" and largest == 128256 * 4096


def test_llama3_8b_on_8_gpus_matches_deepspeed_numbers(llama3_8b):
    z3 = estimate(llama3_8b, {"zero_optimization": {"stage": 3}}, world_size=8)
    z2 = estimate(llama3_8b, {"zero_optimization": {"stage": 2}}, world_size=8)
    assert z3.model_states_gpu_gib == pytest.approx(17.68, abs=0.01)
    assert z2.model_states_gpu_gib == pytest.approx(29.71, abs=0.01)
    # independent re-derivation of DeepSpeed's formulas (18 bytes/param of sharded states)
    total, largest = z3.params, z3.largest_layer_params
    assert z3.model_states_gpu_gib == round((4 * largest + int(18 * total / 8)) / GiB, 2)
    assert z2.model_states_gpu_gib == round((2 * total + int(18 * total / 8)) / GiB, 2)
    off = estimate(llama3_8b, {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"},
                                                     "offload_param": {"device": "cpu"}}}, world_size=8)
    assert off.model_states_gpu_gib == round(4 * largest / GiB, 2) and off.offload_param


def test_activation_estimate_formula():
    cfg = {"hidden_size": 8, "num_hidden_layers": 5, "intermediate_size": 16, "num_attention_heads": 2}
    tokens = 2 * 2 * 5
    per_layer = 2 * (8 * 8 + 4 * 8 + 4 * 16) + 8 * 8
    assert activation_bytes(cfg, 2, 5, "bf16", True) == (5 * tokens * 8 * 2 + tokens * per_layer, 0)
    assert activation_bytes(cfg, 2, 5, "bf16", False) == (5 * tokens * per_layer, 0)
    # --tiled_mlp: the MLP's 4 x I values for one shard of H (= 8) tokens instead of all 20
    tiled = per_layer - 2 * 4 * 16
    want = 5 * tokens * 8 * 2 + tokens * tiled + 2 * 4 * 16 * 8
    assert activation_bytes(cfg, 2, 5, "bf16", True, tiled_mlp=True) == (want, 0)
    # --offload_activations: 3 of the 5 saved layer inputs on the device (the last, two copies in flight),
    # 2 in host memory; the total is unchanged, and without checkpointing there is nothing to offload
    device, host = activation_bytes(cfg, 2, 5, "bf16", True, offload=True)
    assert (device, host) == (3 * tokens * 8 * 2 + tokens * per_layer, 2 * tokens * 8 * 2)
    assert device + host == activation_bytes(cfg, 2, 5, "bf16", True)[0]
    assert activation_bytes(cfg, 2, 5, "bf16", False, offload=True) == (5 * tokens * per_layer, 0)
    # MoE (Qwen3-MoE's names): top-2 of 8 experts of width 4 replace the dense MLP of width 16
    moe = cfg | {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 4}
    per_layer = 2 * (8 * 8 + 4 * 8 + 4 * 2 * 4 + 2 * 2 * 8 + 8) + 8 * 8 + 4 * 8
    assert activation_bytes(moe, 2, 5, "bf16", False) == (5 * tokens * per_layer, 0)
    mixtral = cfg | {"num_local_experts": 8, "num_experts_per_tok": 2}  # experts of intermediate_size
    assert activation_bytes(mixtral, 2, 5, "bf16", False)[0] == 5 * tokens * (
        2 * (8 * 8 + 4 * 8 + 4 * 2 * 16 + 2 * 2 * 8 + 8) + 8 * 8 + 4 * 8)


def test_dry_run_reports_fit_without_starting(llama3_8b, demo_assets, tmp_path):
    out = tmp_path / "o"
    p = subprocess.run([sys.executable, "launch/train_reward.py", "--model", llama3_8b, "--tokenizer",
                        demo_assets["model"], "--data",
                        demo_assets["train"], "--output_dir", str(out), "--ds_config", "ds_configs/zero3.json",
                        "--dry-run", "--world_size", "8", "--gpu_memory_gb", "80", "--max_len", "2048",
                        "--gradient_checkpointing"], cwd=ROOT, env=run_env(), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "model states per GPU: 17.68 GiB" in p.stdout and "FITS in 80 GB per GPU" in p.stdout
    body = json.JSONDecoder().raw_decode(p.stdout[p.stdout.index("{"):])[0]
    assert body["estimate"]["world_size"] == 8 and body["deepspeed"]["zero_optimization"]["stage"] == 3
    assert not out.exists()
    p = subprocess.run([sys.executable, "-m", "rm_trainer.cli.estimate", "--model", llama3_8b, "--world_size", "1",
                        "--micro_batch_size", "8", "--max_len", "4096", "--ds_config", "ds_configs/zero2.json",
                        "--gpu_memory_gb", "24"], cwd=ROOT, env=run_env(), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0 and "DOES NOT FIT in 24 GB per GPU" in p.stdout, p.stdout + p.stderr


def test_sequence_parallel_counts_activations_at_t_over_n(llama3_8b, demo_assets, tmp_path):
    """A rank holds T / N tokens of every row: its activations are those of a run at T / N, the model states
    (sharded over the whole world) unchanged. --dry-run says so for Llama-3-8B at 64K on 8 GPUs."""
    z3 = {"zero_optimization": {"stage": 3}}
    kw = {"world_size": 8, "micro_pairs": 1, "dtype": "bf16", "checkpointing": True}
    sp4 = estimate(llama3_8b, z3, seq_len=65536, sequence_parallel=4, **kw)
    at_16k = estimate(llama3_8b, z3, seq_len=16384, **kw)
    one = estimate(llama3_8b, z3, seq_len=65536, **kw)
    assert sp4.activations_gpu_gib == at_16k.activations_gpu_gib == pytest.approx(one.activations_gpu_gib / 4, rel=1e-3)
    assert sp4.model_states_gpu_gib == one.model_states_gpu_gib
    assert "1/4 of each row per rank" in report(sp4)
    # --offload_activations: 29 of the 32 saved layer inputs (2 x 64K tokens x 4096 x bf16: 1 GiB each) wait
    # in host memory
    off = estimate(llama3_8b, z3, seq_len=65536, offload_activations=True, **kw)
    assert off.activations_cpu_gib == round(29 * 2 * 65536 * 4096 * 2 / GiB, 2) == 29.0
    assert off.activations_gpu_gib + off.activations_cpu_gib == pytest.approx(one.activations_gpu_gib, abs=0.02)
    assert "29.00 GiB of pinned CPU memory per GPU (232.00 GiB per node)" in report(off)
    p = subprocess.run([sys.executable, "launch/train_reward.py", "--model", llama3_8b, "--tokenizer",
                        demo_assets["model"], "--data", demo_assets["train"], "--output_dir", str(tmp_path / "o"),
                        "--ds_config", "ds_configs/zero3.json", "--dry-run", "--world_size", "8", "--max_len",
                        "65536", "--micro_batch_size", "1", "--gradient_checkpointing", "--sequence_parallel", "4",
                        "--gpu_memory_gb", "80"], cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    body = json.JSONDecoder().raw_decode(p.stdout[p.stdout.index("{"):])[0]
    assert body["estimate"]["sequence_parallel"] == 4 and body["deepspeed"]["sequence_parallel_size"] == 4
    assert body["deepspeed"]["train_batch_size"] == 2  # 1 pair x 8 / 4 data-parallel groups
    assert body["estimate"]["activations_gpu_gib"] == sp4.activations_gpu_gib


def test_lora_dry_run_reports_trainable_parameters_and_the_memory_saved(llama3_8b):
    lora = {"lora_r": 8}
    e = estimate(llama3_8b, {"zero_optimization": {"stage": 3}}, world_size=8, lora=lora)
    # rank 8 on q, k, v, o (k/v project to 8 KV heads x 128) and gate, up, down, x 32 layers, + the head
    per_layer = 8 * (2 * (4096 + 4096) + 2 * (4096 + 1024) + 3 * (4096 + 14336))
    assert e.trainable_params == 32 * per_layer + 4096 == 20_975_616
    full = estimate(llama3_8b, {"zero_optimization": {"stage": 3}}, world_size=8)
    assert e.full_model_states_gpu_gib == full.model_states_gpu_gib
    frozen = (e.params - 4096) * 2 // 8  # every base weight in bf16, sharded over 8
    assert e.model_states_gpu_gib == round((4 * e.largest_layer_params + int(18 * e.trainable_params / 8) + frozen)
                                           / GiB, 2)
    assert e.model_states_gpu_gib < full.model_states_gpu_gib / 4
    assert "LoRA: 21.0 M trainable (0.28%)" in report(e)


def test_moe_dry_run_reports_active_parameters(tmp_path):
    """Qwen3-30B-A3B's shape: 128 experts of which 8 per token, on the meta device."""
    from transformers import Qwen3MoeConfig

    Qwen3MoeConfig(vocab_size=151936, hidden_size=2048, num_hidden_layers=48, num_attention_heads=32,
                   num_key_value_heads=4, head_dim=128, moe_intermediate_size=768, num_experts=128,
                   num_experts_per_tok=8, intermediate_size=6144).save_pretrained(tmp_path)
    e = estimate(str(tmp_path), {"zero_optimization": {"stage": 3}}, world_size=8)
    experts = 48 * 128 * 3 * 2048 * 768  # gate, up and down of every expert of every layer
    assert e.active_params == e.params - experts + experts * 8 // 128
    assert round(e.params / 1e9, 2) == 30.22 and round(e.active_params / 1e9, 2) == 3.04  # + lm_head: 30.5 / 3.3
    assert "MoE: 3.042 B active parameters per token of 30.221 B" in report(e)
