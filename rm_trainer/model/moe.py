"""Mixture-of-experts backbones (Qwen3-MoE, Mixtral, and any model whose config routes tokens to experts).

They load and train as any backbone; what MoE training adds is here:
- the router's load-balancing loss (Switch Transformer's), computed by the family's own transformers
  function (`load_balancing_loss_func`) on the router logits of the same forward, over real tokens only,
  weighted by `--router_aux_loss_coef` (default: the model config's `router_aux_loss_coef`). Without it
  the router collapses onto a few experts. The logged `loss` stays the BT loss; `router_aux_loss` is
  logged beside it.
- the sparse MoE block as a ZeRO-3 leaf module (train/engine.py): its parameters are gathered when the
  block is entered, all at once, so ranks whose tokens reach different experts still agree on what to
  gather (per-expert implementations would otherwise hang).
- total and active parameters per token, for the dry-run.
"""

from __future__ import annotations

import sys

import torch
from torch import nn


def routing(config) -> tuple[int, int] | None:
    """(experts, experts per token) of a routing config, else None."""
    experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    top_k = getattr(config, "num_experts_per_tok", None)
    return (int(experts), int(top_k)) if experts and top_k else None


def aux_coefficient(config, coef: float | None) -> float:
    return float(coef if coef is not None else getattr(config, "router_aux_loss_coef", 0.0) or 0.0)


def load_balancing_loss(backbone: nn.Module, router_logits: tuple, mask: torch.Tensor | None) -> torch.Tensor:
    """The family's own load-balancing loss (its modeling module's load_balancing_loss_func)."""
    experts, top_k = routing(backbone.config)
    fn = sys.modules[type(backbone).__module__].load_balancing_loss_func
    return fn(tuple(router_logits), experts, top_k, mask)


def leaf_module_classes(model: nn.Module) -> list[type]:
    """Classes of the sparse MoE blocks: modules holding `experts` beside a router (`gate` or `router`)."""
    return sorted({type(m) for m in model.modules() if hasattr(m, "experts") and
                   (hasattr(m, "gate") or hasattr(m, "router"))}, key=lambda c: c.__name__)


def parameter_counts(backbone: nn.Module) -> dict[str, int]:
    """Total parameters, and those one token uses: of every expert's weights only top_k / experts."""
    def numel(p: torch.Tensor) -> int:
        return int(getattr(p, "ds_numel", p.numel()))

    total = sum(numel(p) for p in backbone.parameters())
    route = routing(backbone.config)
    if route is None:
        return {"total_params": total, "active_params": total}
    expert = sum(numel(p) for n, p in backbone.named_parameters() if ".experts." in f".{n}")
    return {"total_params": total, "expert_params": expert,
            "active_params": total - expert + expert * route[1] // route[0]}
