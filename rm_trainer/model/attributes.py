"""The scalar reward of an attribute head: a fixed linear combination r = p @ c of its K predicted
attributes (`--reward_weights helpfulness=1,verbosity=-0.3`; default the first attribute). What PPO reads,
saved with every artifact; the regression loss that trains the attributes is objectives/regression_loss.py."""

from __future__ import annotations

import torch


def _fp32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def combination(names: list[str], spec: dict[str, float] | None) -> torch.Tensor:
    """The reward's coefficients over `names` (K,): `spec` maps some attributes to their weights
    (`--reward_weights helpfulness=1,verbosity=-0.3`); without one the reward is the first attribute.
    Raises ValueError naming an attribute that is not among `names`."""
    if not spec:
        return torch.eye(len(names))[0]
    unknown = sorted(set(spec) - set(names))
    if unknown:
        raise ValueError(f"reward weights name {', '.join(unknown)}, not among the attributes {', '.join(names)}")
    return torch.tensor([float(spec.get(n, 0.0)) for n in names])


def combine(preds: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """The scalar reward (N,) of predicted attributes (N, K), in fp32: what PPO reads. A sum per row, not a
    matrix product, so a row's reward has the same bits in any batch."""
    p = _fp32(preds)
    return (p * coefficients.to(p)).sum(-1)
