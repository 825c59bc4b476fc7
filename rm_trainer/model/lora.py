"""LoRA's training half (peft): adapters on the backbone, in place, so the model is still our RewardModel.

peft wraps the chosen linear layers of the backbone in place (`inject_adapter_in_model`): the fused reward
path, packing, activation checkpointing and ZeRO-2/3 work unchanged. Only the adapters and the `score`
head require grad, so only they get optimizer state; the head is always fully trained (it is new: an
adapter on it would start from a random matrix). What consolidation does with the adapters (merge, or a
peft folder) is artifact/lora.py.
"""

from __future__ import annotations

import torch
from torch import nn

from rm_trainer.errors import ConfigError
from rm_trainer.model import moe

ADAPTER = "default"  # peft's adapter name; it appears in the parameter names
LORA_A, LORA_B, BASE = f".lora_A.{ADAPTER}.weight", f".lora_B.{ADAPTER}.weight", ".base_layer"


def linear_names(backbone: nn.Module) -> list[str]:
    """The distinct leaf names of the backbone's linear layers (q_proj, ..., down_proj; GPT-2's Conv1D
    c_attn, c_proj, c_fc): the default LoRA targets, 'every linear layer of the decoder'."""
    from transformers.pytorch_utils import Conv1D

    return sorted({n.rsplit(".", 1)[-1] for n, m in backbone.named_modules()
                   if n and isinstance(m, (nn.Linear, Conv1D))})


def settings(model_cfg: dict) -> dict | None:
    """r, alpha and targets of a run's `model` config section (a dict: also read back from checkpoints);
    None without LoRA."""
    r = int(model_cfg.get("lora_r") or 0)
    if not r:
        return None
    return {"r": r, "alpha": float(model_cfg.get("lora_alpha") or 2 * r),
            "dropout": float(model_cfg.get("lora_dropout") or 0.0), "target": model_cfg.get("lora_target")}


def apply_lora(backbone: nn.Module, model_cfg: dict, seed: int) -> nn.Module:
    """Wrap the target layers with LoRA adapters (A: kaiming-uniform from `seed`, B: zeros, so training
    starts exactly at the backbone) and freeze everything else of the backbone."""
    lora = settings(model_cfg)
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise ConfigError(["model.lora_r: LoRA needs peft; pip install 'rm_trainer[lora]' (or peft)"]) from None
    available = linear_names(backbone)
    targets = lora["target"] or available
    unknown = sorted(set(targets) - set(available))
    if unknown:
        raise ConfigError([f"model.lora_target: no linear layer named {', '.join(unknown)} in "
                           f"{type(backbone).__name__}; its linear layers are {', '.join(available)}"
                           + _expert_note(backbone, unknown)])
    config = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                        target_modules=list(targets), bias="none")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # same adapters on every rank and for every world size
        backbone = inject_adapter_in_model(config, backbone, adapter_name=ADAPTER)
    for name, p in backbone.named_parameters():
        p.requires_grad_(".lora_" in name)
    return backbone


def _expert_note(backbone: nn.Module, unknown: list[str]) -> str:
    """Why an MoE family's expert weights are not LoRA targets: transformers keeps them as 3-D tensors."""
    experts = sorted({n.rsplit(".", 1)[-1] for n, p in backbone.named_parameters() if ".experts." in f".{n}"
                      and len(getattr(p, "ds_shape", p.shape)) == 3})
    if not moe.routing(backbone.config) or not set(unknown) & set(experts):
        return ""
    return (f" ({', '.join(experts)} are the experts' stacked 3-D weights, not linear layers: LoRA adapts the "
            "attention of an MoE backbone, and the experts stay frozen)")


def trainable_summary(model: nn.Module) -> dict[str, int]:
    """Parameters that get optimizer state vs all parameters (ZeRO-3: their full sizes)."""
    def numel(p: torch.Tensor) -> int:
        return int(getattr(p, "ds_numel", p.numel()))

    params = list(model.parameters())
    return {"trainable_params": sum(numel(p) for p in params if p.requires_grad),
            "total_params": sum(numel(p) for p in params)}
