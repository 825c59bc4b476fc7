"""The decoder a reward model stands on: loaded from an HF folder (an SFT model, or a reward model whose
head a run continues from) as `AutoModel`, so no vocabulary logits are ever computed, or built from a
config dict (reward.pt, shape-only models on the meta device)."""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModel

from rm_trainer.errors import ConfigError


def build_backbone(path: str, dtype: torch.dtype, random_init: bool = False,
                   attn_implementation: str | None = None) -> tuple[nn.Module, torch.Tensor | None]:
    """Load an HF decoder as `AutoModel` (hidden states only), or build it from its config. Returns the
    backbone and, when `path` is a reward model (an HF *ForSequenceClassification folder with
    num_labels=1: our hf/ export, or another one with a `score` head), its head weight (1, H) to continue
    from; None for an SFT folder (the head is then initialised fresh).

    Under ZeRO-3 the engine keeps an HfDeepSpeedConfig alive meanwhile, and transformers then builds
    every layer already partitioned.
    """
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    config = AutoConfig.from_pretrained(path)
    is_rm = any(a.endswith("ForSequenceClassification") for a in getattr(config, "architectures", None) or [])
    if is_rm and config.num_labels != len(getattr(config, "rm_attributes", None) or [0]):
        raise ConfigError([f"model.path {path!r}: a sequence classifier with num_labels={config.num_labels}; a "
                           "reward model has one output (num_labels=1), or one per attribute of an rm_trainer "
                           "attribute head (rm_attributes). Start from its SFT backbone instead"])
    if random_init:
        return AutoModel.from_config(config, dtype=dtype, **kwargs), None
    backbone, info = AutoModel.from_pretrained(path, dtype=dtype, output_loading_info=True, **kwargs)
    if not is_rm:
        return backbone, None
    missing = sorted(info["missing_keys"])
    unexpected = sorted(k for k in info["unexpected_keys"] if k != "score.weight")
    if missing or unexpected:
        raise ConfigError([f"model.path {path!r}: the reward model's weights do not map onto "
                           f"{type(backbone).__name__}: missing {missing[:10] or 'none'}, unexpected "
                           f"{unexpected[:10] or 'none'} (only a bias-free `score` head may sit beside the "
                           "backbone)"])
    return backbone, read_head(path, config.num_labels)


def read_head(path: str, outputs: int = 1) -> torch.Tensor:
    """`score.weight` (outputs, H) of an HF folder's safetensors (single file or sharded with an index)."""
    import json as _json
    from pathlib import Path

    from safetensors import safe_open

    folder = Path(path)
    index = folder / "model.safetensors.index.json"
    name = (_json.loads(index.read_text())["weight_map"].get("score.weight") if index.is_file()
            else "model.safetensors")
    if name is None or not (folder / name).is_file():
        raise ConfigError([f"model.path {path!r}: no score.weight in its safetensors files"])
    with safe_open(str(folder / name), framework="pt") as f:
        if "score.weight" not in f.keys():
            raise ConfigError([f"model.path {path!r}: no score.weight in {name}"])
        head = f.get_tensor("score.weight")
    if head.shape[0] != outputs:
        raise ConfigError([f"model.path {path!r}: score.weight has shape {tuple(head.shape)}, expected "
                           f"({outputs}, H)"])
    return head


def backbone_from_config_dict(config: dict, dtype: torch.dtype) -> nn.Module:
    cfg = AutoConfig.for_model(**config)
    return AutoModel.from_config(cfg, dtype=dtype)
