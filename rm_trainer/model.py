"""RewardModel: an HF decoder backbone (no lm_head) plus a scalar `score` head read at the last real token."""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def gather_last(x: torch.Tensor, seq_lengths: torch.Tensor) -> torch.Tensor:
    """x[i, seq_lengths[i] - 1]: the last real token of each right-padded row. Works for (B,T) and (B,T,H)."""
    idx = (seq_lengths.to(x.device).long() - 1)
    return x[torch.arange(x.shape[0], device=x.device), idx]


class RewardModel(nn.Module):
    """Backbone from `AutoModel` (so no vocabulary logits are ever computed) + `score = Linear(H, 1)`.

    Batches are right-padded. Under causal attention the last real token never attends to the padding
    after it, so no attention mask is needed and the reward read there is exact.
    """

    def __init__(self, backbone: nn.Module, head_init_std: float | None = None, seed: int = 0):
        super().__init__()
        self.backbone = backbone
        hidden = backbone.config.hidden_size
        dtype = next(backbone.parameters()).dtype
        # Same dtype as the backbone: ZeRO-3 flattens all parameters into one dtype.
        self.score = nn.Linear(hidden, 1, bias=False, dtype=dtype)
        # Seeded generator: every rank (and every world size) starts from the same head.
        g = torch.Generator().manual_seed(seed)
        std = head_init_std or 1.0 / math.sqrt(hidden + 1)
        with torch.no_grad():
            self.score.weight.copy_(torch.randn(self.score.weight.shape, generator=g) * std)

    @property
    def config(self) -> PretrainedConfig:
        return self.backbone.config

    def forward_hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Final hidden states (B, T, H) of the backbone, after its final norm."""
        return self.backbone(input_ids=input_ids, use_cache=False).last_hidden_state

    def forward(self, input_ids: torch.Tensor, seq_lengths: torch.Tensor) -> torch.Tensor:
        """Rewards (B,) in fp32, read at position seq_lengths - 1.

        The head runs on the gathered (B, H) rows only, never on every token.
        """
        h = gather_last(self.forward_hidden(input_ids), seq_lengths)
        return self.score(h).squeeze(-1).float()

    @torch.no_grad()
    def score_texts(self, texts: list[str], batch_size: int = 8) -> torch.Tensor:
        """Rewards for full texts (prompt + response), tokenized exactly as in training.

        Needs `.tokenizer`, `.max_len` and `.pad_token_id`, which `load_reward_model` attaches."""
        from rm_trainer.data import encode, pad_right

        device = self.score.weight.device
        out = []
        for i in range(0, len(texts), batch_size):
            ids = [encode(self.tokenizer, t, self.max_len)[0] for t in texts[i:i + batch_size]]
            lens = torch.tensor([len(s) for s in ids], device=device)
            out.append(self(pad_right(ids, self.pad_token_id).to(device), lens))
        return torch.cat(out)


def build_backbone(path: str, dtype: torch.dtype, random_init: bool = False,
                   attn_implementation: str | None = None, init_context: Any = None) -> nn.Module:
    """Load an HF decoder as `AutoModel` (hidden states only), or build it from its config.

    `init_context` is where the engine puts ZeRO-3's partitioned construction; transformers itself
    also honours a live HfDeepSpeedConfig in from_pretrained/from_config.
    """
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    with init_context or nullcontext():
        if random_init:
            config = AutoConfig.from_pretrained(path)
            return AutoModel.from_config(config, dtype=dtype, **kwargs)
        return AutoModel.from_pretrained(path, dtype=dtype, **kwargs)


def backbone_from_config_dict(config: dict, dtype: torch.dtype) -> nn.Module:
    cfg = AutoConfig.for_model(**config)
    return AutoModel.from_config(cfg, dtype=dtype)
