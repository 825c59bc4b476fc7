#!/usr/bin/env python
"""Throughput and MFU of full ZeRO-2 reward-model training steps (forward, backward, optimizer), JSON out.

Model FLOPs per token = 6 * N_non_embedding + 12 * L * H * T (attention), recompute excluded, so the
figure is comparable across activation-checkpointing settings. Peak: 989 TFLOP/s dense bf16 for H100
SXM and H200.

    python bench/train_step.py --preset llama1b --steps 12      # one GPU
    python bench/train_step.py --preset smoke --steps 3         # CPU smoke (tests)
"""

from __future__ import annotations

import argparse
import time

import torch
from common import add_output, finish
from loss_memory import PRESETS, llama_config

from rm_trainer.config import TrainConfig
from rm_trainer.model.reward import DTYPES, RewardModel
from rm_trainer.objectives.bt_loss import fused_bradley_terry
from rm_trainer.train import engine
from rm_trainer.train.build import enable_checkpointing
from rm_trainer.train.optim import build_optimizer

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="llama1b")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--micro_pairs", type=int, default=None, help="pairs per micro batch (default: preset)")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--no_gc", action="store_true")
    add_output(ap)
    a = ap.parse_args(argv)
    p = PRESETS[a.preset]
    pairs = a.micro_pairs or p["seqs"] // 2
    rt = engine.init_distributed()
    cfg = llama_config(p)
    ds = {"train_batch_size": pairs * rt.world_size, "train_micro_batch_size_per_gpu": pairs,
          "gradient_accumulation_steps": 1, "gradient_clipping": 1.0, "bf16": {"enabled": a.dtype == "bf16"},
          "zero_optimization": {"stage": 2}, "steps_per_print": 10**9}
    from transformers import AutoModel

    torch.manual_seed(0)
    with torch.device(rt.device):
        backbone = AutoModel.from_config(cfg, dtype=DTYPES[a.dtype])
    if not a.no_gc:
        enable_checkpointing(backbone)
    model = RewardModel(backbone)
    eng = engine.initialize(model, ds, build_optimizer(model, TrainConfig(lr=1e-5)))
    T = p["seq"]
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, p["vocab"], (2 * pairs, T), generator=g).to(rt.device)
    lens = torch.full((2 * pairs,), T, device=rt.device)
    cuda = rt.device.type == "cuda"
    times, losses = [], []
    for i in range(a.warmup + a.steps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = fused_bradley_terry(eng(ids, lens))[0]
        eng.backward(loss)
        eng.step()
        if cuda:
            torch.cuda.synchronize()
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    n_total = sum(q.numel() for q in model.parameters())
    n_emb = model.backbone.embed_tokens.weight.numel()
    L, H = cfg.num_hidden_layers, cfg.hidden_size
    flops_per_token = 6 * (n_total - n_emb) + 12 * L * H * T
    step_s = sorted(times)[len(times) // 2]  # median
    tokens_per_s = 2 * pairs * T * rt.world_size / step_s
    name = torch.cuda.get_device_name() if cuda else "cpu"
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    result = {
        "device_name": name, "preset": a.preset, "shape": p, "dtype": a.dtype, "gc": not a.no_gc,
        "zero_stage": 2, "world_size": rt.world_size, "pairs_per_micro_batch": pairs, "seq_len": T,
        "params": n_total, "non_embedding_params": n_total - n_emb, "median_step_s": round(step_s, 4),
        "tokens_per_s": round(tokens_per_s, 1), "pairs_per_s": round(pairs * rt.world_size / step_s, 2),
        "model_tflops_per_s": round(tokens_per_s * flops_per_token / 1e12, 2),
        "mfu": None if peak is None else round(tokens_per_s * flops_per_token / 1e12 / peak / rt.world_size, 4),
        "peak_tflops_assumed": peak, "losses": [round(x, 4) for x in losses],
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
    }
    return finish(result, a.output, show=rt.is_main)


if __name__ == "__main__":
    main()
