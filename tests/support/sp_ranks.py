#!/usr/bin/env python
"""Test-only worker for tests/train/test_sequence_parallel.py: the reward model's forward and backward at
the sequence-parallel seam, without an engine.

  torchrun --nproc_per_node 2 tests/support/sp_ranks.py OUT.json MODEL_TYPE   # N=2: each rank holds half the columns
  python tests/support/sp_ranks.py OUT.json MODEL_TYPE                        # the unsplit reference

A tiny backbone (llama, or qwen2 with grouped KV heads) from a fixed seed, one right-padded batch whose last
tokens fall on rank 0, on rank 1 and on either side of the boundary, and a batch of a packed row and a padded
one. Writes the rewards and the gradients of sum(w * r), averaged over the ranks as DeepSpeed averages them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout

from rm_trainer.model.reward import RewardModel  # noqa: E402
from rm_trainer.train import engine  # noqa: E402

T = 16  # columns of the padded batch: rank 0 holds 0..7, rank 1 holds 8..15


def backbone(model_type: str):
    from transformers import AutoConfig, AutoModel

    cfg = AutoConfig.for_model(model_type, vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2 if model_type == "qwen2" else 4,
                               max_position_embeddings=64, attn_implementation="sdpa")
    torch.manual_seed(0)
    return AutoModel.from_config(cfg, attn_implementation="sdpa").float()


def main(out: str, model_type: str) -> None:
    rt = engine.init_distributed(timeout_s=120)
    bb = backbone(model_type)
    seq = None
    if rt.world_size > 1:
        from rm_trainer.train.sequence_parallel import setup

        seq = setup(rt.world_size, bb.config, "sdpa")
    model = RewardModel(bb, seed=3, seq=seq)
    g = torch.Generator().manual_seed(1)
    # last tokens at columns 4 (rank 0), 13 (rank 1), 7 and 8 (either side of the boundary), 15 (the end):
    # pairs (row 0, row 1) and (row 2, row 3) end on different ranks
    lens = torch.tensor([5, 14, 8, 9, 16])
    ids = torch.randint(1, 97, (len(lens), T), generator=g)
    w = torch.randn(len(lens), generator=g)
    r = model(ids, lens)
    (w * r).sum().backward()
    # packed: three sequences in one row of 12 columns (the third ends on rank 1), and a padded row
    pos = torch.stack([torch.cat([torch.arange(4), torch.arange(3), torch.arange(5)]), torch.arange(12)])
    with torch.no_grad():
        packed = model(ids[:2, :12], None, pos, torch.tensor([[0, 3], [0, 6], [0, 11], [1, 9]]))
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    for v in grads.values():  # averaged over the ranks, as DeepSpeed averages them over the world
        engine.all_reduce_sum(v).div_(rt.world_size)
    if rt.is_main:
        grads = {k: v.flatten().tolist() for k, v in grads.items()}
        Path(out).write_text(json.dumps({"rewards": r.tolist(), "packed": packed.tolist(), "grads": grads}))
    engine.leave_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
