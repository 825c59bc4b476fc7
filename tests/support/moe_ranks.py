#!/usr/bin/env python
"""Test-only worker for tests/test_moe.py (launched by torchrun, 2 ranks, or by python, 1 rank): a per-expert
MoE block (an `nn.ModuleList` of experts, and a loop that skips the experts no token reached, as
DeepSeek's and older Mixtral code do) under ZeRO-3, where rank 0's tokens reach only expert 0 and rank 1's
only expert 1. Without the block as a leaf module the ranks would gather different experts' parameters.

  python tests/support/moe_ranks.py OUT.json [--no-leaf]

It trains 3 steps through rm_trainer's own engine (train/engine.initialize, with
moe.leaf_module_classes) and writes the per-step mean loss over the global batch to OUT.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout

from rm_trainer.model import moe  # noqa: E402
from rm_trainer.train import engine  # noqa: E402

H, E, N = 16, 4, 6  # hidden size, experts, tokens per rank


class PerExpertMoE(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(H, E, bias=False)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(H, 32), nn.SiLU(), nn.Linear(32, H)) for _ in range(E))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the router, steered by the input's first E features so a test decides which expert a token reaches
        weights, chosen = (self.gate(x) + 10 * x[:, :E]).softmax(-1).max(-1)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            idx = (chosen == e).nonzero().flatten()
            if idx.numel() == 0:  # no token here: this rank never enters this expert
                continue
            out = out.index_add(0, idx, weights[idx, None] * expert(x[idx]))
        return out


class Scorer(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(H, H)
        self.block = PerExpertMoE()
        self.head = nn.Linear(H, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.proj(x) * 0.1
        return self.head(h + self.block(h)).squeeze(-1)


def inputs(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(N, H, generator=g) * 0.1
    x[:, rank] += 3.0  # rank r's tokens all route to expert r
    return x, torch.randn(N, generator=g)


def main(out: str, leaf: bool) -> None:
    rt = engine.init_distributed(timeout_s=60)
    world = rt.world_size
    stage = 3 if world > 1 else 0
    cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "train_batch_size": world,
           "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}, "steps_per_print": 10**9}
    torch.manual_seed(0)
    keep = engine.zero3_context(cfg)
    if stage == 3:
        import deepspeed

        with deepspeed.zero.Init(config_dict_or_path=cfg):
            model = Scorer()
    else:
        model = Scorer()
    eng = engine.initialize(model, cfg, leaf_modules=moe.leaf_module_classes(model) if leaf else None)
    del keep
    # one process takes both halves at once (the same mean loss, hence the same gradient as two ranks)
    halves = [inputs(r) for r in range(2)] if world == 1 else [inputs(rt.rank)]
    x, y = torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])
    losses = []
    for _ in range(3):
        loss = ((eng(x) - y) ** 2).mean()
        eng.backward(loss)
        eng.step()
        losses.append(float(engine.all_reduce_sum(loss.detach().clone())) / world)
    if rt.rank == 0:
        Path(out).write_text(json.dumps({"losses": losses, "leaf": [c.__name__ for c in
                                                                    moe.leaf_module_classes(model)]}))


if __name__ == "__main__":
    main(sys.argv[1], "--no-leaf" not in sys.argv)
