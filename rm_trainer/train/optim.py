"""AdamW with the usual no-decay groups, and warmup + cosine/linear/constant decay."""

from __future__ import annotations

import math

import torch

from rm_trainer.config import TrainConfig


def warmup_steps(cfg: TrainConfig, total_steps: int) -> int:
    return cfg.warmup_steps if cfg.warmup_steps is not None else int(cfg.warmup_ratio * total_steps)


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    # Norm weights, biases and the scalar head get no weight decay: decaying them only shrinks scales.
    # Under ZeRO-3 a parameter is already partitioned here (an empty tensor): its true shape is ds_shape.
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        ndim = len(getattr(p, "ds_shape", p.shape))
        (no_decay if ndim < 2 or "norm" in name or name.startswith("score.") else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=cfg.adam_betas,
                             eps=cfg.adam_eps)


def lr_lambda(cfg: TrainConfig, total_steps: int):
    warm = warmup_steps(cfg, total_steps)

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        if cfg.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total_steps - warm))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.lr_schedule == "cosine" else 1 - progress
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay

    return f


def scheduler_factory(cfg: TrainConfig, total_steps: int):
    """A callable DeepSpeed applies to whichever optimizer it ends up with (ours or the JSON's)."""
    return lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
