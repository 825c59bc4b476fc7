"""Sequence parallelism (--sequence_parallel N, DeepSpeed's Ulysses) against the unsplit sequence.

- At the seam (tests/support/sp_ranks.py, no engine): rewards whose last token is on rank 1 of the group, pairs
  whose sides end on different ranks, a packed row with a sequence across the boundary, and the
  gradients summed over the group, each equal to one process holding the whole rows.
- Whole runs: 2 ranks at N=2 (one data-parallel group) against 1 rank at N=1 with the same global batch,
  fp32, 8 steps: per-step losses, the held-out metrics and reward.pt's rewards agree within 1e-5 relative
  (its weights within Adam's drift on near-zero gradients, 1e-3), and so does the first step's gradient
  norm. Padded
  under ZeRO-3, packed under ZeRO-2, and a Qwen2 backbone with grouped KV heads packed under ZeRO-3 (at N=2
  also with activation checkpointing, DeepSpeed's tiled MLP and its activation offload hooks).
- 4 ranks = 2 data-parallel groups x 2 sequence ranks against 2 data-parallel ranks, the same way.
- Kill -9 mid-run at N=2 and resume: bit-exact. A different N on resume, and impossible combinations,
  exit 2 naming the numbers.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import (
    BIN,
    ROOT,
    free_port,
    load_artifact,
    losses,
    metrics,
    resume_from_copy,
    run_env,
    same_artifact_weights,
    train,
    train_args,
)

pytestmark = pytest.mark.slow
REL = 1e-5


def close(a: list[float], b: list[float], rel: float = REL) -> bool:
    """Elementwise within rel of the larger magnitude compared."""
    scale = max(max(abs(x) for x in b), 1e-12)
    return len(a) == len(b) and all(abs(x - y) <= rel * scale for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_rewards_and_gradients_at_the_seam_equal_the_unsplit_forward(tmp_path, model_type):
    def run(n):
        out = tmp_path / f"{n}.json"
        cmd = [sys.executable] if n == 1 else [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port",
                                               str(free_port()), "--master_addr", "127.0.0.1"]
        p = subprocess.run(cmd + [str(ROOT / "tests" / "support" / "sp_ranks.py"), str(out), model_type], cwd=ROOT,
                           env=run_env(), capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        return json.loads(out.read_text())

    one, two = run(1), run(2)
    assert len(one["rewards"]) == 5 and len(set(one["rewards"])) == 5
    assert close(two["rewards"], one["rewards"])
    assert close(two["packed"], one["packed"])
    assert one["grads"].keys() == two["grads"].keys() and len(one["grads"]) > 10
    for name, want in one["grads"].items():  # every parameter: backbone (through the all-to-alls) and head
        assert max(map(abs, want)) > 0, name
        assert close(two["grads"][name], want), name


def qwen2_sft(tmp_path, tokenizer_dir) -> str:
    """A tiny Qwen2 (4 query heads of 4, 2 KV heads) for the demo's vocabulary, saved like an SFT checkpoint. Its
    runs take the demo's word-level tokenizer with --tokenizer (transformers would load a folder of model
    type qwen2 with Qwen2's own tokenizer class)."""
    from transformers import AutoConfig, AutoModel

    llama = AutoConfig.from_pretrained(tokenizer_dir)
    # H = 16: a rank's 32 columns of a 64-token packed row at N=2 are 2 shards of the tiled MLP (ceil(32 / H))
    cfg = AutoConfig.for_model("qwen2", vocab_size=llama.vocab_size, hidden_size=16, intermediate_size=48,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=256, **{k: getattr(llama, k) for k in
                                                               ("bos_token_id", "eos_token_id", "pad_token_id")})
    torch.manual_seed(5)
    out = tmp_path / "qwen2_sft"
    AutoModel.from_config(cfg).save_pretrained(out)
    return str(out)


COMMON = {"dtype": "fp32", "lr": 1e-3, "max_steps": 8, "warmup_steps": 1, "max_len": 64, "seed": 7,
          "eval_every": 4, "save_every": 4, "micro_batch_size": 2}


def assert_same_training(one, two, name: str) -> None:
    """Per-step losses and the held-out metrics within REL; and the first step's gradient norm, taken before
    any Adam update can amplify rounding: it checks the gradient's scale (a 1/N error would halve it, while
    Adam, nearly blind to a uniform scale, would leave the losses close)."""
    m1, m2 = metrics(one), metrics(two)
    assert len(m2) == 8 and close(losses(two), losses(one)), name
    assert close([m2[0]["grad_norm"]], [m1[0]["grad_norm"]]), (name, m1[0]["grad_norm"], m2[0]["grad_norm"])
    e1, e2 = metrics(one, "eval")[-1], metrics(two, "eval")[-1]
    assert e2["acc"] == e1["acc"] and close([e2["loss"], e2["margin"]], [e1["loss"], e1["margin"]]), name


def test_two_sequence_ranks_train_like_one_rank(tmp_path, demo_assets, tiny_pretrained):
    qwen2 = qwen2_sft(tmp_path, tiny_pretrained)
    cases = {  # name: (model, ZeRO config of the N=2 run, flags)
        "padded_z3": (tiny_pretrained, "zero3", {"packing": False}),
        "packed_z2": (tiny_pretrained, "zero2", {"packing": True, "pack_len": 64}),
        "qwen2_packed_z3": (qwen2, "zero3", {"packing": True, "pack_len": 64, "tokenizer": tiny_pretrained}),
    }
    # the long-context setup on the Qwen2 run at N=2: activation checkpointing, DeepSpeed's tiled MLP and its
    # activation offload hooks (which keep CPU tensors where they are: here they only count the inputs)
    long_context = {"qwen2_packed_z3": {"gradient_checkpointing": True, "tiled_mlp": True,
                                        "offload_activations": True}}
    for name, (model, ds, flags) in cases.items():
        one, two = tmp_path / f"{name}_one", tmp_path / f"{name}_two"
        train(one, train_args(model, demo_assets["train"], demo_assets["test"], "zero2", **COMMON | flags),
              launcher="python", nprocs=1)
        log = train(two, train_args(model, demo_assets["train"], demo_assets["test"], ds,
                                    **COMMON | flags | {"sequence_parallel": 2} | long_context.get(name, {})),
                    launcher="torchrun", nprocs=2).stdout
        if flags["packing"]:  # the start-up check passes through the sequence-parallel engine
            assert "packing off" not in log
        assert ("tiled MLP (DeepSpeed's TiledMLP) in 2 layers" in log) == (name in long_context)
        offload = json.loads((two / "final_metrics.json").read_text()).get("activation_offload")
        if name in long_context:  # each of the 8 steps' one forward: the inputs of the 2 checkpointed layers
            # every input reached DeepSpeed's hooks, under ZeRO-3 too (kept: CPU tensors stay where they are)
            assert offload == {"inputs": 16, "offloaded": 0, "offloaded_bytes": 0, "kept": 16}, offload
            assert "activation offload on rank 0: 16 checkpointed layer inputs, 0 of them moved to CPU" in log
        else:
            assert offload is None
        assert_same_training(one, two, name)
        a, b = load_artifact(one), load_artifact(two)
        # the reward function: reward.pt's rewards on the probe pairs (re-scored at consolidation)
        assert close(b["probe"]["rewards"].tolist(), a["probe"]["rewards"].tolist()), name
        # the weights: Adam divides each gradient by its own running RMS, so an element whose gradient is
        # ~0 moves by up to lr per step whatever its rounding; 8 steps at lr 1e-3 bound that drift
        assert a["state_dict"].keys() == b["state_dict"].keys()
        for k, w in a["state_dict"].items():
            assert close(b["state_dict"][k].flatten().tolist(), w.flatten().tolist(), rel=1e-3), (name, k)
        record = json.loads((two / "checkpoints" / "step_8" / "rm_trainer_meta.json").read_text())
        assert record["resume_keys"]["sequence_parallel"] == 2 and record["resume_keys"]["global_batch"] == 2


def test_two_groups_of_two_sequence_ranks_train_like_two_data_parallel_ranks(tmp_path, demo_assets,
                                                                            tiny_pretrained):
    """4 ranks = 2 data-parallel groups x 2 sequence ranks against 2 ranks of pure data parallelism, ZeRO-3,
    the same global batch: the averaging over groups composes with the sum over a group."""
    args = train_args(tiny_pretrained, demo_assets["train"], demo_assets["test"], "zero3",
                      **COMMON | {"packing": False})
    dp, dp_sp = tmp_path / "dp2", tmp_path / "dp2_sp2"
    train(dp, args, launcher="torchrun", nprocs=2)
    train(dp_sp, args + ["--sequence_parallel", "2"], launcher="torchrun", nprocs=4)
    assert_same_training(dp, dp_sp, "2 x 2")


def test_two_sequence_ranks_resume_bit_exact_and_only_at_their_own_n(tmp_path, demo_assets, tiny_pretrained):
    args = train_args(tiny_pretrained, demo_assets["train"], demo_assets["test"], "zero3",
                      **COMMON | {"save_every": 2, "sequence_parallel": 2})
    a = tmp_path / "straight"
    train(a, args)
    b = tmp_path / "resumed"
    resume_from_copy(a, b, args, 4)  # as a crash after step_4 leaves it (SIGKILL: the kill tests)
    assert [r["loss"] for r in metrics(a)] == [r["loss"] for r in metrics(b)]  # exact float equality
    assert same_artifact_weights(a, b)
    # the checkpoint resumes at its own N only: said, with both numbers, before any process group
    p = train(b, args[:-2] + ["--sequence_parallel", "1"], launcher="python", nprocs=1,
              check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "train.sequence_parallel 2, this run has 1" in p.stderr


def test_impossible_combinations_exit_2_with_the_numbers(tmp_path, demo_assets, tiny_pretrained):
    heads = json.loads(Path(demo_assets["model"], "config.json").read_text())["num_attention_heads"]
    assert heads % 3
    args = train_args(tiny_pretrained, demo_assets["train"], demo_assets["test"], "zero2",
                      **COMMON | {"sequence_parallel": 3, "max_len": 64})
    p = train(tmp_path / "bad", args, launcher="python", nprocs=1, check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    for says in ("must divide the world size (1 ranks)", f"must divide the attention heads ({heads})",
                 "data.max_len (64) must be a multiple of train.sequence_parallel (3)"):
        assert says in p.stderr, (says, p.stderr)
    assert not (tmp_path / "bad" / "checkpoints").exists()
