"""Ulysses sequence parallelism (`--sequence_parallel N`) from DeepSpeed's ALST
(deepspeed.runtime.sequence_parallel.ulysses_sp): the world is data-parallel groups x N sequence ranks.

- Consecutive ranks form a sequence group (DeepSpeed's parallel_state_sp lays them out so). The group
  shares one micro-batch. Each rank runs the backbone on its 1/N of every row's columns, with global
  position_ids, so RoPE sees the true positions. Inside attention, DeepSpeed's UlyssesSPAttentionHF
  trades sequence shards for head shards (all-to-all), attends over the whole sequence for H/N heads,
  and trades back.
- The reward is read where the last real token lives. Each sequence's last token is on exactly one
  rank of the group; that rank gathers its row from its own hidden states and runs the final norm and
  the head. The other ranks contribute zeros, and one all-reduce of a [sequences] tensor ([sequences, K]
  for an attribute head) gives every rank of the group all the rewards. No [B, T, H] tensor is ever
  gathered.
- Gradients: DeepSpeed sees every rank as data-parallel and averages gradients over the whole world, W =
  groups x N. The objective is then the mean of the ranks' losses, each group's loss counted N times,
  which is the mean over the groups' batches. Its gradient through the sum over a group is the sum of the
  group's N equal upstream gradients: N x the local one (the sum's backward). So the update equals that of
  the unsplit rows on one rank per group, under ZeRO-2 and ZeRO-3 alike.

  deepspeed.initialize gets no sequence-parallel `mpu`. With one, DeepSpeed 0.19.8 divides gradients by
  W / N on ZeRO-2 and on ZeRO-3's contiguous path, but by W on ZeRO-3's reduce-scatter path: ZeRO-3 runs
  trained with gradients (and clipping norms) 1/N too small. That was measured here. Without the mpu,
  every path divides by W, and checkpoints are those of W data-parallel ranks. The ZeRO config's
  "sequence_parallel_size" key keeps DeepSpeed's batch arithmetic over the W / N groups.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.distributed as dist

# attention implementations that DeepSpeed's Ulysses wraps (eager needs a full 4-D mask: not supported)
SP_ATTENTION = ("sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")


def problems(n: int, world: int, backbone: dict, attn: str | None, max_len: int, pack_len: int | None,
             moe: bool) -> list[str]:
    """Every reason train.sequence_parallel = n cannot run here, with the numbers (empty: it can).
    backbone: the model's config.json as a dict."""
    if n == 1:
        return []
    out, flag = [], f"train.sequence_parallel ({n})"
    if world % n:
        out.append(f"{flag} must divide the world size ({world} ranks): the world is data-parallel groups x "
                   f"{n} sequence ranks")
    text = backbone.get("text_config") or backbone
    heads = text.get("num_attention_heads")
    kv = text.get("num_key_value_heads") or heads
    if heads is not None and heads % n:
        out.append(f"{flag} must divide the attention heads ({heads}): each sequence rank attends with heads / N")
    if heads is not None and kv % n and n % kv:
        out.append(f"{flag} and the key-value heads ({kv}) must divide one another: N <= {kv} splits them, "
                   f"N a multiple of {kv} replicates each KV head N / {kv} times")
    if max_len % n:
        out.append(f"data.max_len ({max_len}) must be a multiple of {flag}: each rank holds max_len / N columns")
    if pack_len is not None and pack_len % n:
        out.append(f"train.pack_len ({pack_len}) must be a multiple of {flag}")
    if (attn or "sdpa") not in SP_ATTENTION:
        out.append(f"{flag} needs model.attn_implementation in {', '.join(SP_ATTENTION)} (got {attn}): "
                   "DeepSpeed's Ulysses attention does not wrap it")
    if moe:
        out.append(f"{flag} is not supported with an MoE backbone (its router loss is over a rank's own tokens)")
    return out


def check(cfg, world: int, backbone: dict) -> None:
    """ConfigError naming every reason the run config's sequence parallelism (or tiled MLP) cannot run on
    `world` ranks."""
    from rm_trainer.errors import ConfigError
    from rm_trainer.model import moe

    routed = moe.routing(SimpleNamespace(**backbone)) is not None
    found = problems(cfg.train.sequence_parallel, world, backbone, cfg.model.attn_implementation, cfg.data.max_len,
                     cfg.pack_len if cfg.train.packing != "off" else None, routed)
    if cfg.model.tiled_mlp and routed:  # experts a rank's tokens skip would leave its shard agreement unmatched
        found.append("model.tiled_mlp tiles dense gated MLPs; an MoE backbone's experts are not tiled")
    if found:
        raise ConfigError(found)


def resolve(cfg, world: int, backbone: dict, cuda: bool = False) -> tuple[dict, object]:
    """The checks above, then the DeepSpeed config (ds_config.resolve_ds_config) of a run on `world` ranks:
    its batch arithmetic is over the world / N data-parallel groups, and its "sequence_parallel_size" key
    makes DeepSpeed check train_batch_size against them. Shared by rm-train (and --dry-run) and
    rm-estimate. Returns (DeepSpeed dict, run config)."""
    from rm_trainer.train.ds_config import resolve_ds_config

    check(cfg, world, backbone)
    n = cfg.train.sequence_parallel
    ds_cfg, cfg = resolve_ds_config(cfg, world // n, backbone.get("hidden_size"), cuda=cuda)
    if n > 1:
        ds_cfg["sequence_parallel_size"] = n
    return ds_cfg, cfg


class _SumOverGroup(torch.autograd.Function):
    """All-reduce (sum) over the sequence group. Its backward is the sum of the group's upstream gradients,
    which are equal (every rank of the group computes the same loss from the same sums): N x the local one,
    without a second collective."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * dist.get_world_size(ctx.group), None


@dataclass(frozen=True)
class Columns:
    """The global columns [lo, hi) of every row that this rank holds in one forward."""

    lo: int
    hi: int


class SequenceShard:
    """What RewardModel.forward asks of sequence parallelism: split a batch along its length, pick the
    last-token rows this rank holds, and sum the rewards over the group."""

    def __init__(self, mpu, n: int):
        self.n = n
        self.group = mpu.get_sequence_parallel_group()
        self.rank = mpu.get_sequence_parallel_rank()

    def split(self, input_ids: torch.Tensor, seq_lengths: torch.Tensor | None, position_ids: torch.Tensor | None,
              last: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Columns]:
        """(this rank's input_ids, their global position_ids, `last` = (row, global column) of every
        sequence's final token, the columns held). Right-padded rows (position_ids None) get positions
        0..T-1 and their last token at seq_lengths - 1; packed rows keep theirs. Rows are padded at the
        end to a multiple of N columns, after every real token (causal attention never reads them)."""
        B, T = input_ids.shape
        device = input_ids.device
        if position_ids is None:
            last = torch.stack([torch.arange(B, device=device), seq_lengths.to(device).long() - 1], 1)
            position_ids = torch.arange(T, device=device).expand(B, T)
        pad = -T % self.n
        if pad:
            input_ids = torch.cat([input_ids, input_ids.new_zeros(B, pad)], 1)
            step = torch.arange(1, pad + 1, device=device)
            position_ids = torch.cat([position_ids, position_ids[:, -1:] + step], 1)
        width = (T + pad) // self.n
        cols = Columns(self.rank * width, (self.rank + 1) * width)
        return (input_ids[:, cols.lo:cols.hi].contiguous(), position_ids[:, cols.lo:cols.hi].contiguous(),
                last.long(), cols)

    @staticmethod
    def pick(x: torch.Tensor, last: torch.Tensor, cols: Columns) -> torch.Tensor:
        """x[row, column] at every sequence's last token, from this rank's slice of x (B, T/N, ...): exact
        where the token is here, an arbitrary row of this slice elsewhere (reduce() zeroes those)."""
        local = (last[:, 1].to(x.device) - cols.lo).clamp(0, cols.hi - cols.lo - 1)
        return x[last[:, 0].to(x.device), local]

    def reduce(self, r: torch.Tensor, last: torch.Tensor, cols: Columns) -> torch.Tensor:
        """Every sequence's reward (N,), or an attribute head's (N, K), on every rank of the group: each from
        the rank holding its last token."""
        c = last[:, 1].to(r.device)
        mine = ((c >= cols.lo) & (c < cols.hi)).view(-1, *[1] * (r.dim() - 1))
        return _SumOverGroup.apply(torch.where(mine, r, torch.zeros_like(r)), self.group)


class _AnyBatch:
    """DeepSpeed's Ulysses attention (`uattn`) as transformers calls it, with two things added:
    - the batch size, fixed at its construction, follows each call (the reward model's forwards vary it:
      2 x micro-batch in training, the eval batch, a last smaller batch);
    - packed rows stay apart under sdpa. Ulysses attends by position_ids alone and drops the shard's mask
      (it would be wrong after the all-to-all); flash-attention's varlen path reads the sequence starts
      from the gathered position_ids, but sdpa would let packed sequences attend to each other. For sdpa
      the block-diagonal causal mask is built from the gathered position_ids (a [B, T, T] bool per forward:
      fine for packed rows of a few thousand tokens; use flash_attention_2 for long ones)."""

    def __init__(self, uattn):
        self.uattn = uattn
        self._key: weakref.ref | None = None  # the position_ids of the forward the cached mask belongs to
        self._mask: torch.Tensor | None = None

    def __call__(self, module, query, key, value, attention_mask, *args, **kwargs):
        u, bs = self.uattn, query.shape[0]
        if u.batch_size != bs:
            u.batch_size = bs
            for name in ("required_query_shape", "required_key_value_shape", "required_context_shape"):
                shape = list(getattr(u, name))
                shape[1] = bs
                setattr(u, name, torch.Size(shape))
        if u.core_attn_implementation == "flex_attention":  # its BlockMask is rebuilt inside Ulysses
            from torch.nn.attention.flex_attention import BlockMask

            mask = attention_mask if isinstance(attention_mask, BlockMask) else None
        else:
            mask = self.packed_mask(kwargs["position_ids"]) if u.core_attn_implementation == "sdpa" else None
        return u(module, query, key, value, mask, *args, **kwargs)

    def packed_mask(self, position_ids: torch.Tensor) -> torch.Tensor | None:
        """(B, 1, T, T) bool: causal within each sequence (a new one starts where the global position is 0),
        or None when every row holds one sequence (sdpa's own causal path). Built once per forward (every
        layer, and the recompute of a checkpointed one, gets the same position_ids tensor) from one small
        all-gather of the group's position ids. The mask is released with that tensor, i.e. once the
        forward and its backward are done, not held until the next forward."""
        if self._key is None or self._key() is not position_ids:
            parts = [torch.empty_like(position_ids) for _ in range(self.uattn.world_size)]
            dist.all_gather(parts, position_ids.contiguous(), group=self.uattn.process_group)
            doc = (torch.cat(parts, 1) == 0).cumsum(1)
            self._key, self._mask = weakref.ref(position_ids, self._release), None
            if bool((doc[:, -1] > 1).any()):
                T = doc.shape[1]
                causal = torch.ones(T, T, dtype=torch.bool, device=doc.device).tril()
                self._mask = ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]
        return self._mask

    def _release(self, ref: weakref.ref) -> None:
        if self._key is ref:
            self._key = self._mask = None


def setup(n: int, backbone_config, attn: str) -> SequenceShard:
    """After the process group exists, on every rank: DeepSpeed's sequence-parallel groups and its Ulysses
    attention in place of `attn` for this process."""
    import deepspeed.runtime.sequence_parallel.parallel_state_sp as mpu
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    mpu.initialize_sequence_parallel(sequence_parallel_size=n)
    _replaced[attn] = ALL_ATTENTION_FUNCTIONS[attn]
    text = backbone_config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    uattn = UlyssesSPAttentionHF(
        attn=ALL_ATTENTION_FUNCTIONS[attn], batch_size=1, attn_head_count=text.num_attention_heads,
        attn_head_size=head_dim, kv_head_count=text.num_key_value_heads or text.num_attention_heads,
        num_hidden_layers=text.num_hidden_layers, process_group=mpu.get_sequence_parallel_group(),
        seq_length_is_variable=True)
    uattn.core_attn_implementation = attn
    ALL_ATTENTION_FUNCTIONS[attn] = _AnyBatch(uattn)
    return SequenceShard(mpu, n)


_replaced: dict = {}  # attention implementation -> transformers' own function, while Ulysses stands in


def teardown() -> None:
    """After the process group is gone: transformers' own attention back (rank 0 then scores alone, to
    verify and export the artifact), and DeepSpeed's sequence-parallel groups released."""
    if not _replaced:
        return
    import deepspeed.runtime.sequence_parallel.parallel_state_sp as mpu
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    for attn, fn in _replaced.items():
        ALL_ATTENTION_FUNCTIONS[attn] = fn
    _replaced.clear()
    mpu._release_sequence_parallel_groups()
