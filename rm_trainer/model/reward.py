"""RewardModel: an HF decoder backbone (no lm_head) plus a scalar `score` head read at the last real token
(one output per attribute for an attribute head). Its one batched scorer is model/scoring.py."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from rm_trainer.data.tokenize import encode_item, expand_groups, special_prefix
from rm_trainer.errors import UserError
from rm_trainer.model import moe
from rm_trainer.model.attributes import combination, combine
from rm_trainer.model.scoring import score_sequences
from rm_trainer.model.sharing import scoring_rule

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def gather_last(x: torch.Tensor, seq_lengths: torch.Tensor) -> torch.Tensor:
    """x[i, seq_lengths[i] - 1]: the last real token of each right-padded row. Works for (B,T) and (B,T,H)."""
    idx = (seq_lengths.to(x.device).long() - 1)
    return x[torch.arange(x.shape[0], device=x.device), idx]


def real_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, seq_lengths: torch.Tensor | None,
                last: torch.Tensor | None) -> torch.Tensor | None:
    """(B, T) bool mask of the tokens that are not padding: attention_mask (left-padded rows), else up to each
    packed row's last sequence end (`last` = (row, column) of every final token), else seq_lengths."""
    if attention_mask is not None and attention_mask.dim() == 2:
        return attention_mask.bool()
    cols = torch.arange(input_ids.shape[1], device=input_ids.device)
    if last is not None:
        ends = torch.full((input_ids.shape[0],), -1, dtype=torch.long, device=input_ids.device)
        last = last.to(input_ids.device).long()
        ends = ends.scatter_reduce(0, last[:, 0], last[:, 1], reduce="amax")
        return cols[None] <= ends[:, None]
    return None if seq_lengths is None else cols[None] < seq_lengths.to(input_ids.device)[:, None]


def segment_mask(segments: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(R, 1, L, L) additive attention mask of shared-prompt segments (data.segments; (R, 2, L) segment and
    branch of each token): a query sees the keys before it in its segment whose branch is 0 (the prompt) or
    its own; padding sees itself only. Additive (0 or the dtype's minimum), never boolean: eager attention
    reads a boolean 4D mask wrongly (measured: 0.29 relative error), sdpa and eager agree on this one."""
    seg, branch = segments[:, 0], segments[:, 1]
    L = seg.shape[1]
    cols = torch.arange(L, device=seg.device)
    sees = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] >= 0) & (cols[None, :, None] >= cols[None, None, :])
    sees &= (branch[:, None, :] == 0) | (branch[:, :, None] == branch[:, None, :])
    sees |= torch.eye(L, dtype=torch.bool, device=seg.device)
    mask = torch.zeros(sees.shape, dtype=dtype, device=seg.device).masked_fill_(~sees, torch.finfo(dtype).min)
    return mask[:, None]


# Where each decoder family keeps its final norm (applied per row, so it commutes with gather_last).
FINAL_NORM = {
    "llama": "norm", "mistral": "norm", "qwen2": "norm", "qwen3": "norm", "qwen3_moe": "norm", "mixtral": "norm",
    "gpt_neox": "final_layer_norm",
    "gpt2": "ln_f",
}
REWARD_PATHS = ("fused", "plain")


class ScoreHead(nn.Linear):
    """`Linear(H, 1, bias=False)` that computes in its input's dtype (fp32 on the fused path)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype))


class DavidsonTie(nn.Module):
    """theta = log nu, the Davidson model's tie parameter (`--tie_loss davidson`, loss.py): one learned
    scalar, trained with the model but left out of reward.pt and the HF export (a reward needs no nu;
    consolidation records its value). Read through its own forward, so ZeRO-3 gathers it like any module."""

    def __init__(self, dtype: torch.dtype, tie_rate: float = 1 / 3):
        super().__init__()
        # Starts where P(tie | equal rewards) = nu / (2 + nu) is the training pairs' tie rate q, the
        # maximum-likelihood nu while rewards are still about equal (nu = 1 for q = 1/3): a scalar moving at a
        # language model's learning rate would otherwise stay near wherever it started.
        q = min(max(float(tie_rate), 1e-3), 0.999)
        self.log_nu = nn.Parameter(torch.full((1,), math.log(2 * q / (1 - q)), dtype=dtype))

    def forward(self) -> torch.Tensor:
        # a new tensor (never the Parameter itself, which a module attribute would register a second time)
        return self.log_nu.to(torch.float32, copy=True)


TIE_PREFIX = "tie."  # the DavidsonTie's parameter names in a training state dict


@contextmanager
def bypass(module: nn.Module, name: str) -> Iterator[nn.Module]:
    """Temporarily replace submodule `name` by Identity; yields the original."""
    original = module._modules[name]
    module._modules[name] = nn.Identity()
    try:
        yield original
    finally:
        module._modules[name] = original


class RewardModel(nn.Module):
    """Backbone from `AutoModel` (so no vocabulary logits are ever computed) + `score = Linear(H, 1)`.

    Batches are right-padded. Under causal attention the last real token never attends to the padding
    after it, so no attention mask is needed and the reward read there is exact.

    reward_path="fused" (default): the decoder stack runs with its final norm bypassed, the last real
    row of each sequence is gathered, and only those (2B, H) rows go through the final norm and, in
    fp32, the head. Norms act per row, so this equals the plain path, but the full-sequence norm's
    saved activations (HF RMSNorm keeps fp32 copies: ~4 layers' worth of checkpoints) never exist.
    reward_path="plain": the seed's formulation, norm and head over every token, then gather.
    """

    def __init__(self, backbone: nn.Module, head_init_std: float | None = None, seed: int = 0,
                 reward_path: str = "fused", head: torch.Tensor | None = None, tie_rate: float | None = None,
                 seq=None, attributes: list[str] | None = None):
        super().__init__()
        assert reward_path in REWARD_PATHS, reward_path
        self.backbone = backbone
        hidden = backbone.config.hidden_size
        dtype = next(backbone.parameters()).dtype
        # --objective regression: one output per attribute, (N, K) per forward; else the scalar reward (N,)
        self.attributes = list(attributes) if attributes else None
        # (K,): the scalar reward of the attributes (set_reward_weights; default the first)
        self.combination = combination(self.attributes, None) if self.attributes else None
        # Same dtype as the backbone: ZeRO-3 flattens all parameters into one dtype.
        self.score = ScoreHead(hidden, len(self.attributes or [0]), bias=False, dtype=dtype)
        # Seeded generator: every rank (and every world size) starts from the same head.
        g = torch.Generator().manual_seed(seed)
        std = head_init_std or 1.0 / math.sqrt(hidden + 1)
        if self.score.weight.device.type != "meta":  # meta: shape-only model for checks and estimates
            with torch.no_grad():  # `head`: continue from a reward model's head
                init = torch.randn(self.score.weight.shape, generator=g) * std if head is None else head
                self.score.weight.copy_(init.reshape(self.score.weight.shape))
        self.reward_path = reward_path
        # The backbone's dtype, for the shared-prompt mask, read without touching a parameter (under ZeRO-3 that
        # would fetch it outside its module's forward and break DeepSpeed's recorded fetch order); a buffer
        # follows .to(dtype) and DeepSpeed's conversion, and is left out of the state dict.
        self.register_buffer("dtype_probe", torch.empty(0, dtype=dtype), persistent=False)
        self.normalization: tuple[float, float] | None = None  # (mean, std) applied in forward if set
        self.aux_coef, self.aux_loss = 0.0, None  # MoE: see enable_router_aux
        # --tie_loss davidson (tie_rate: the training pairs' fraction of ties): each forward leaves theta in tie_log_nu
        self.tie = DavidsonTie(dtype, tie_rate) if tie_rate is not None else None
        self.tie_log_nu: torch.Tensor | None = None
        # --sequence_parallel N (train/sequence_parallel.SequenceShard): each rank runs 1/N of every row's columns
        self.seq = seq
        self.final_norm_name = FINAL_NORM.get(backbone.config.model_type)
        if reward_path == "fused" and (self.final_norm_name is None
                                       or self.final_norm_name not in backbone._modules):
            warnings.warn(f"rm_trainer: fused reward path does not know where {type(backbone).__name__} keeps "
                          "its final norm; running that norm over all tokens (correct, less memory-lean)",
                          stacklevel=2)
            self.final_norm_name = None

    def enable_router_aux(self, coef: float) -> None:
        """MoE backbones (moe.py): every forward in training mode also leaves coef x the router's
        load-balancing loss (over real tokens) in self.aux_loss, for the training step to add."""
        self.aux_coef = float(coef)

    def _run_backbone(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None,
                      attention_mask: torch.Tensor | None, seq_lengths: torch.Tensor | None,
                      last: torch.Tensor | None = None) -> torch.Tensor:
        route = self.training and self.aux_coef > 0
        out = self.backbone(**self._inputs(input_ids, position_ids, attention_mask),
                            **({"output_router_logits": True} if route else {}))
        self.aux_loss = None
        if route:
            mask = real_tokens(input_ids, attention_mask, seq_lengths, last)
            self.aux_loss = self.aux_coef * moe.load_balancing_loss(self.backbone, out.router_logits, mask)
        return out.last_hidden_state

    def set_reward_weights(self, spec: dict[str, float] | None) -> None:
        """The scalar reward of an attribute head: sum_k spec[name_k] x attribute_k (default the first)."""
        self.combination = combination(self.attributes, spec)

    def reward_of(self, out: torch.Tensor) -> torch.Tensor:
        """The scalar reward (N,) of a forward's output: itself, or an attribute head's combination."""
        return out if self.attributes is None else combine(out, self.combination)

    def set_normalization(self, mean: float, std: float) -> None:
        self.normalization = (float(mean), max(float(std), 1e-6))

    @property
    def config(self) -> PretrainedConfig:
        return self.backbone.config

    def forward_hidden(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                       attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states (B, T, H) of the backbone, after its final norm."""
        return self._run_backbone(input_ids, position_ids, attention_mask, None)

    @staticmethod
    def _inputs(input_ids: torch.Tensor, position_ids: torch.Tensor | None,
                attention_mask: torch.Tensor | None = None) -> dict:
        # use_cache=False always: with a cache, transformers skips packed-sequence detection silently.
        # Packed rows: position_ids restart at 0 for every sequence and attention_mask is None, so
        # transformers builds a per-sequence causal mask (sdpa, eager; see check_packing). Left-padded
        # rows (scoring only) pass their attention_mask and position_ids that start at the first real token.
        kw = {"input_ids": input_ids, "use_cache": False}
        return kw if position_ids is None else kw | {"position_ids": position_ids, "attention_mask": attention_mask}

    def forward(self, input_ids: torch.Tensor, seq_lengths: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, last: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, segments: torch.Tensor | None = None) -> torch.Tensor:
        """Rewards in fp32, one per sequence ((N, K) attributes with `attributes`). Right-padded rows (B, T):
        read at seq_lengths - 1. Packed rows (data.batching.pack): several sequences per row, position_ids
        restarting at 0 for each, rewards read at `last` = (row, column) of every sequence's final token.
        Left-padded rows (score_sequences with padding_side="left"): attention_mask and position_ids given,
        `last` = (row, T - 1). Shared prompts (data.segments): `segments` (R, 2, L), position_ids and `last`;
        the attention mask is built from them here (segment_mask)."""
        if segments is not None:
            attention_mask = segment_mask(segments, self.dtype_probe.dtype)
        if self.seq is not None:  # sequence parallel: this rank's columns; `last` global (row, column)
            input_ids, position_ids, last, cols = self.seq.split(input_ids, seq_lengths, position_ids, last)
            pick = lambda x: self.seq.pick(x, last, cols)  # noqa: E731
        elif position_ids is None:
            pick = lambda x: gather_last(x, seq_lengths)  # noqa: E731
        else:
            pick = lambda x: x[last[:, 0].to(x.device), last[:, 1].to(x.device)]  # noqa: E731
        if self.reward_path == "plain":
            hidden = self._run_backbone(input_ids, position_ids, attention_mask, seq_lengths, last)
            r = pick(self.score(hidden)).float()
        else:
            if self.final_norm_name is None:
                rows = pick(self._run_backbone(input_ids, position_ids, attention_mask, seq_lengths, last))
            else:
                with bypass(self.backbone, self.final_norm_name) as norm:
                    h = self._run_backbone(input_ids, position_ids, attention_mask, seq_lengths, last)
                rows = norm(pick(h))  # (N, H): the only rows that carry a reward
            r = self.score(rows.float())
        r = r if self.attributes else r.squeeze(-1)
        if self.seq is not None:  # each reward from the rank holding its last token: one [sequences] all-reduce
            r = self.seq.reduce(r, last, cols)
        if self.normalization is not None:
            r = (r - self.normalization[0]) / self.normalization[1]
        if self.tie is not None:
            self.tie_log_nu = self.tie()
        return r

    @torch.no_grad()
    def score_texts(self, texts: list, max_batch_tokens: int = 16384, attributes: bool = False,
                    share_prompt: str = "auto"):
        """Rewards (fp32, on the CPU, in input order) for texts, tokenized exactly as in training. Each item is
        a full text, a (prompt, response) pair (reproduces training tokenization bit for bit), a
        conversation (a list of {role, content} messages, rendered with the chat template the model was
        trained with), or a (prompt, response messages) pair. See data.tokenize.encode_item. Batched as `rm-score`
        batches: sorted by length, at most max_batch_tokens padded tokens per forward.

        A (prompt, [response, ...]) item (best-of-n, a GRPO group) gives one reward per response, in order.
        Sequences that start with the same tokens (items of one prompt) encode them once (share_prompt
        auto|on|off, model.sharing.scoring_rule); each reward is the one its sequence has alone, to float
        rounding (fp32: within 1e-5 relative, the check's bound).

        An attribute head (--objective regression) returns its combined reward (what PPO reads), or with
        attributes=True (rewards (N,), attributes (N, K) in the order of `.attributes`).

        Needs `.tokenizer`, `.max_len` and `.pad_token_id`, which `load_reward_model` attaches."""
        if attributes and self.attributes is None:
            raise UserError("attributes=True: this reward model has one scalar output, no attributes")
        prefix = special_prefix(self.tokenizer)
        seqs = [encode_item(self.tokenizer, t, self.max_len, prefix) for t in expand_groups(texts)]
        out = score_sequences(self, seqs, max_batch_tokens, attributes=attributes,
                              share=scoring_rule(self, share_prompt))
        return (self.reward_of(out), out) if attributes else out
