#!/usr/bin/env python
"""Memory and FLOPs of one forward+backward of the reward loss, three ways, in one run (JSON out).

  (a) ours:   RewardModel(reward_path="fused"): decoder stack without its final norm, gather the last
              real row, norm + fp32 head on (2B, H) rows, closed-form Bradley-Terry backward
  (b) hf_seq: AutoModelForSequenceClassification(num_labels=1): norm + head over every token, then pool
  (c) causal: AutoModelForCausalLM with a value head on the last hidden state (the TRL/LLaMA-Factory
              value-head pattern): full-vocabulary logits are computed and upcast to fp32

Per path: autograd-saved bytes (saved_tensors_hooks, deduplicated by storage, parameters excluded),
FLOPs (FlopCounterMode), and peak bytes allocated during the step (CUDA: max_memory_allocated; CPU: the
profiler's memory timeline). Checkpointing uses reentrant mode here so that the layer inputs it keeps
go through saved_tensors_hooks and are counted (non-reentrant mode keeps them in a closure, invisible
to the hooks); the memory it keeps is the same.

    python bench/loss_memory.py                       # CPU preset: H=512, L=4, T=512, 2B=8
    python bench/loss_memory.py --preset smoke        # seconds; what the tests run
    python bench/loss_memory.py --preset llama1b --device cuda --dtypes bf16 --gc on   # GPU suite
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from common import add_output, finish
from torch.utils.flop_counter import FlopCounterMode

from rm_trainer.model.reward import DTYPES, RewardModel
from rm_trainer.objectives.bt_loss import bradley_terry_loss, fused_bradley_terry
from rm_trainer.train.build import enable_checkpointing

PRESETS = {
    "smoke": dict(hidden=64, layers=4, heads=4, kv_heads=4, inter=172, vocab=8000, seq=64, seqs=4),
    "cpu": dict(hidden=512, layers=4, heads=8, kv_heads=8, inter=1376, vocab=32000, seq=512, seqs=8),
    "llama1b": dict(hidden=2048, layers=16, heads=32, kv_heads=8, inter=8192, vocab=128256, seq=2048, seqs=8),
}
PAD = 0


def llama_config(p: dict):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=p["vocab"], hidden_size=p["hidden"], num_hidden_layers=p["layers"],
                       num_attention_heads=p["heads"], num_key_value_heads=p["kv_heads"],
                       intermediate_size=p["inter"], max_position_embeddings=p["seq"], pad_token_id=PAD,
                       tie_word_embeddings=False, num_labels=1)


def batch(p: dict, device: str):
    g = torch.Generator().manual_seed(0)
    n, T = p["seqs"], p["seq"]
    lens = torch.randint(T // 2, T + 1, (n,), generator=g)
    lens[0] = T
    ids = torch.randint(1, p["vocab"], (n, T), generator=g)
    ids[torch.arange(T)[None, :] >= lens[:, None]] = PAD
    return ids.to(device), lens.to(device)


def build(path: str, p: dict, dtype: torch.dtype, gc: bool, device: str):
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    cfg = llama_config(p)
    torch.manual_seed(0)
    cls = {"ours": AutoModel, "backbone": AutoModel, "hf_seq": AutoModelForSequenceClassification,
           "causal": AutoModelForCausalLM}[path]
    with torch.device(device):  # initialise on the device: a 1B model's CPU init alone takes ~20 s
        model = cls.from_config(cfg, dtype=dtype)
    if gc:
        enable_checkpointing(model, use_reentrant=True)
    if path == "ours":
        model = RewardModel(model)
    elif path == "causal":
        model.v_head = torch.nn.Linear(cfg.hidden_size, 1, bias=False, dtype=dtype, device=device)
    return model.to(device).train()


def forward_fn(path: str, model, ids, lens):
    """A callable running the forward pass and returning the scalar loss to backpropagate."""
    B = ids.shape[0] // 2
    if path == "ours":
        return lambda: fused_bradley_terry(model(ids, lens))[0]
    if path == "backbone":  # the backbone's own forward + full backward: the FLOP reference
        def fwd():
            h = model(input_ids=ids, use_cache=False).last_hidden_state
            return (h * torch.ones_like(h)).sum()  # every token gets a gradient
        return fwd
    if path == "hf_seq":
        def fwd():
            r = model(input_ids=ids, use_cache=False).logits.squeeze(-1).float()  # pooled at last non-pad
            return bradley_terry_loss(r[:B], r[B:])
        return fwd

    def fwd():  # causal LM + value head
        out = model(input_ids=ids, use_cache=False, output_hidden_states=True)
        fwd.logits = out.logits.float()  # value-head wrappers return these alongside the value
        h = out.hidden_states[-1]
        r = model.v_head(h[torch.arange(h.shape[0], device=h.device), lens - 1]).squeeze(-1).float()
        return bradley_terry_loss(r[:B], r[B:])
    return fwd


def saved_bytes(model, fwd) -> int:
    """Bytes autograd keeps from the forward for the backward (the backward's own recompute under
    checkpointing is transient and not counted)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fwd()
    loss.backward()
    return sum(seen.values())


def peak_bytes(run, device: str) -> int:
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=True) as prof:
        run()
    cur = peak = 0
    for _, action, _, size in prof._memory_profile().timeline:
        if action == Action.CREATE:
            cur += size
        elif action == Action.DESTROY:
            cur -= size
        peak = max(peak, cur)
    return peak


def measure(path: str, p: dict, dtype: str, gc: bool, device: str) -> dict:
    model = build(path, p, DTYPES[dtype], gc, device)
    ids, lens = batch(p, device)
    fwd = forward_fn(path, model, ids, lens)

    def run():
        fwd().backward()
        fwd.__dict__.pop("logits", None)

    out = {"saved_bytes": saved_bytes(model, fwd)}  # also the warm-up (lazy inits) for the passes below
    fwd.__dict__.pop("logits", None)
    model.zero_grad(set_to_none=True)
    # Attention through the math backend for counting: its matmuls are counted as they are, while the
    # fused kernels' FLOP formulas reject grouped-query (GQA) shapes in some torch releases.
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        run()
    out["flops"] = fc.get_total_flops()
    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    out["peak_bytes"] = peak_bytes(run, device)
    out["step_s"] = round(time.perf_counter() - t0, 3)
    del model
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--gc", default="on,off", help="activation checkpointing settings to run")
    ap.add_argument("--vocab", type=int, default=None, help="override the preset's vocabulary size")
    add_output(ap)
    a = ap.parse_args(argv)
    p = PRESETS[a.preset] | ({"vocab": a.vocab} if a.vocab else {})
    result = {"preset": a.preset, "shape": p, "device": a.device, "torch": torch.__version__,
              "device_name": torch.cuda.get_device_name() if a.device == "cuda" else "cpu", "runs": []}
    for dtype in a.dtypes.split(","):
        for gc in (s == "on" for s in a.gc.split(",")):
            row = {"dtype": dtype, "gc": gc}
            for path in ("ours", "hf_seq", "causal", "backbone"):
                row[path] = measure(path, p, dtype, gc, a.device)
            o, b, c = row["ours"], row["hf_seq"], row["causal"]
            row["ratios"] = {
                "saved_ours_over_hf_seq": o["saved_bytes"] / b["saved_bytes"],
                "flops_ours_over_backbone": o["flops"] / row["backbone"]["flops"],
                "peak_ours_over_hf_seq": o["peak_bytes"] / b["peak_bytes"],
                "peak_causal_over_ours": c["peak_bytes"] / o["peak_bytes"],
            }
            if gc:
                # what the full-sequence norm + head keep, in units of one layer's checkpoint (2B*T*H)
                per_layer = o["saved_bytes"] / p["layers"]
                extra = (b["saved_bytes"] - o["saved_bytes"]) / per_layer
                row["ratios"]["hf_seq_extra_saved_in_layer_checkpoints"] = extra
            r = row["ratios"]
            row["targets"] = {
                "flops_ours_le_1.001x_backbone": r["flops_ours_over_backbone"] <= 1.001,
                "peak_ours_le_1.02x_hf_seq": r["peak_ours_over_hf_seq"] <= 1.02,
                "peak_causal_ge_2x_ours": r["peak_causal_over_ours"] >= 2,
            }
            if dtype == "bf16" and gc and p["layers"] <= 4:
                # the target for a 4-layer model; for L layers the ratio is ~L / (L + 4)
                row["targets"]["saved_ours_le_0.55x_hf_seq"] = r["saved_ours_over_hf_seq"] <= 0.55
            result["runs"].append(row)
            print(f"# {dtype} gc={gc}: {json.dumps(r)}", file=sys.stderr, flush=True)
    result["all_targets_met"] = all(v for row in result["runs"] for v in row["targets"].values())
    return finish(result, a.output)


if __name__ == "__main__":
    main()
