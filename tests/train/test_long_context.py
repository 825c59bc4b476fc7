"""The activation offload at its seam (no engine): DeepSpeed's hooks around a checkpointed backbone, with
the layer inputs marked where the checkpoint receives them (model.enable_checkpointing). On a CPU machine
DeepSpeed keeps the tensors where they are, so what can be checked here is that every checkpointed
input reaches its hooks once (also while its own marker tags the same tensor in __call__) and that no
number changes. Under a real ZeRO-3 engine: test_sequence_parallel.py."""

from __future__ import annotations

import contextlib

import torch
from transformers import AutoModel, LlamaConfig

from rm_trainer.train.build import enable_checkpointing
from rm_trainer.train.long_context import ActivationOffload


def backbone(mark=None):
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                      vocab_size=50, attn_implementation="sdpa")
    m = AutoModel.from_config(cfg)
    enable_checkpointing(m, mark=mark)
    return m.train()


def step(m, ctx) -> tuple[float, list[torch.Tensor]]:
    ids = torch.randint(0, 50, (2, 24), generator=torch.Generator().manual_seed(1))
    with ctx:
        out = m(input_ids=ids).last_hidden_state.pow(2).mean()
        out.backward()
    return out.item(), [p.grad for p in m.parameters()]


def test_every_checkpointed_input_reaches_the_offload_hooks_and_nothing_changes():
    loss, grads = step(backbone(), contextlib.nullcontext())
    off = ActivationOffload()
    m = backbone(off.mark)
    for k in (1, 2):  # two micro steps: the hooks' state is reset between them
        got, got_grads = step(m, off.micro_step())
        assert got == loss
        assert all(torch.equal(g, k * h) for g, h in zip(got_grads, grads, strict=True))
        assert off.totals == {"inputs": 3 * k, "offloaded": 0, "offloaded_bytes": 0, "kept": 3 * k}
    with torch.no_grad():  # eval forwards are not checkpointed: nothing marked
        m(input_ids=torch.ones(1, 4, dtype=torch.long))
    step(m, contextlib.nullcontext())  # outside a micro step the marks are not taken
    assert off.totals["inputs"] == 6
