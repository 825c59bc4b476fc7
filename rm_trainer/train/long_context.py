"""Memory helpers for long inputs that DeepSpeed ships (ALST), each behind a flag and off by default:

- `--tiled_mlp`: DeepSpeed's TiledMLP in every gated MLP, in shards of about H tokens;
- `--offload_activations`: DeepSpeed's CheckpointHiddenStatesOffload, the checkpointed layer inputs
  waiting for the backward in pinned CPU memory.

Which of DeepSpeed's helpers help a reward model, and the memory each saves: docs/long-context.md.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist


class ActivationOffload:
    """--offload_activations: DeepSpeed's CheckpointHiddenStatesOffload. Inside a micro step, each
    checkpointed layer's input is copied to pinned CPU memory on a side stream once the next layer has it
    (the last one stays: the backward needs it first), and copied back when the backward recomputes that
    layer. The hooks' buffers are released when the micro step ends, so its backward runs inside.

    Its own marker tags a layer's input in GradientCheckpointingLayer.__call__, before the module's forward
    pre-hooks run; ZeRO-3's pre-hook replaces every input by a new tensor (a detach() for its backward
    hooks), so under ZeRO-3 no tagged tensor ever reached the checkpoint and nothing was offloaded
    (DeepSpeed 0.19.8; found by the counts below). `mark` is therefore called from the checkpoint function
    itself (model.enable_checkpointing), on the tensor the checkpoint saves. DeepSpeed leaves CPU tensors
    where they are: on a CPU machine the hooks count the inputs and move nothing."""

    def __init__(self) -> None:
        from deepspeed.runtime.activation_checkpointing.offload_activations import CheckpointHiddenStatesOffload

        self.hooks = CheckpointHiddenStatesOffload()
        self.active = False
        self.totals = {"inputs": 0, "offloaded": 0, "offloaded_bytes": 0, "kept": 0}  # this process, host ints

    def mark(self, hidden_states: torch.Tensor) -> None:
        if self.active:
            self.hooks.mark(hidden_states)
            self.totals["inputs"] += 1

    @contextlib.contextmanager
    def micro_step(self):
        self.active = True
        try:
            with self.hooks:
                yield
        finally:
            self.active = False
        s = self.hooks.stats  # reset when the hooks are next entered
        for key, n in (("offloaded", s.offloaded_tensors), ("offloaded_bytes", s.offloaded_bytes),
                       ("kept", s.skipped_marked_tensors + s.kept_last_tensors)):
            self.totals[key] += n


def tile_mlps(backbone: torch.nn.Module) -> int:
    """--tiled_mlp: every gated MLP (gate_proj, up_proj, down_proj, act_fn: Llama, Qwen, Mistral) runs through
    DeepSpeed's TiledMLP, in shards of about H tokens, recomputing each shard in the backward: the
    [tokens, intermediate] activations of a whole row never exist at once (the largest part of a layer's
    recompute peak under activation checkpointing, 4 x I values per token). Returns how many were tiled."""
    import types

    n = 0
    for m in backbone.modules():
        if all(hasattr(m, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            m.forward = types.MethodType(_tiled_mlp_forward, m)
            n += 1
    return n


def _gated_mlp(self, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def _tiled_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    rows = x.shape[-2]
    shards = torch.tensor([-(-rows // x.shape[-1]), -rows], device=x.device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        # every rank the same number of shards (under ZeRO-3 each shard's recompute gathers the weights, a
        # collective): the most any rank wants, but no more than the fewest rows any rank has
        dist.all_reduce(shards, op=dist.ReduceOp.MAX)
    n = max(1, min(int(shards[0]), -int(shards[1])))
    # every parameter the MLP trains (its weights, or LoRA's adapters on them): DeepSpeed holds their gradient
    # reduction back until the last shard's backward
    return TiledMLP.apply(_gated_mlp, self, x, n, list(self.parameters()))
