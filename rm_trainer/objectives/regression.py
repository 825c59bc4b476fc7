"""`--objective regression`: rated responses (HelpSteer-style), one head output per attribute, trained with the
masked, weighted squared error (regression_loss.py); the scalar reward is a configured linear combination of
the attributes (model/attributes.py). The rows: rating_rows.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from rm_trainer.data.batching import Sequences
from rm_trainer.data.segments import ShareRule
from rm_trainer.model.attributes import combination
from rm_trainer.objectives.base import Batch, Objective, sequences_of, source_of
from rm_trainer.objectives.rating_rows import RatingReader
from rm_trainer.objectives.regression_loss import (
    ATTRIBUTE_SUMS,
    fused_regression_loss,
    regression_loss,
    regression_metrics,
    regression_sums,
)


@dataclass
class RatingBatch(Batch):
    """N rated rows, one sequence each: targets (N, K), NaN where a rating is missing."""

    targets: torch.Tensor | None = None


class Regression(Objective):
    name = "regression"
    shares_prompts = False  # a rated row is one response
    source_keys = ("loss",)  # and every rmse/<attribute>, pearson/<attribute>
    row_modules = ("rm_trainer.objectives.rating_rows", "rm_trainer.objectives.ranking_rows")

    def __init__(self, cfg) -> None:
        t, d = cfg.train, cfg.data
        self.data, self.fused = d, cfg.model.reward_path == "fused"
        self.attributes = list(d.attributes)
        w = t.attribute_weights
        self.attribute_weights = tuple(float(w.get(a, 1.0)) for a in self.attributes) if w else None
        self.combination = tuple(combination(self.attributes, cfg.model.reward_weights).tolist())
        self.reward_weights = cfg.model.reward_weights
        self.missing = d.missing_attributes
        self.micro, self.grad_accum = t.micro_batch_size, t.grad_accum
        self.sums_width = 2 + len(ATTRIBUTE_SUMS) * len(self.attributes)

    def weights(self, device: torch.device) -> torch.Tensor | None:
        return None if self.attribute_weights is None else torch.tensor(self.attribute_weights, device=device)

    def reader(self, tok, work_dir: str | None = None) -> RatingReader:
        return RatingReader(tok, self.data, work_dir)

    def identity(self) -> dict[str, Any]:
        d = self.data
        return {"prompt_key": d.prompt_key, "attributes": d.attributes, "response_key": d.response_key,
                "missing_attributes": d.missing_attributes}

    def collate(self, rows: list[dict], pad_id: int, pack_len: int | None = None, packing: bool = False,
                single: bool = False, share: ShareRule | None = None) -> RatingBatch:
        """share: unused, a rated row is one response (one sequence, nothing to share within it)."""
        targets = torch.tensor([r["targets"] for r in rows], dtype=torch.float32)
        return RatingBatch(Sequences.of(sequences_of(rows), pad_id, pack_len, packing), source_of(rows), len(rows),
                           targets)

    def loss(self, b: RatingBatch, out: torch.Tensor, scale: float | None, log_nu: torch.Tensor | None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        targets, weights = b.targets.to(out.device), self.weights(out.device)
        loss = (fused_regression_loss if self.fused else regression_loss)(out, targets, None, weights, scale)
        return loss, regression_sums(out, targets, weights)

    def sums(self, b: RatingBatch, out: torch.Tensor, keep: torch.Tensor | None = None,
             log_nu: torch.Tensor | None = None) -> torch.Tensor:
        return regression_sums(out, b.targets, self.weights(out.device), keep)

    def metrics(self, sums: torch.Tensor) -> dict[str, float]:
        return regression_metrics(sums, self.attributes)

    def throughput(self, m: dict[str, float], seconds: float) -> dict[str, float]:
        return {"sequences": m["rows"], "rows_per_s": m["rows"] / seconds}

    def checkpoint_key(self) -> dict[str, Any]:
        return {"objective": self.name, "attributes": self.attributes,
                "attribute_weights": dict(zip(self.attributes, self.attribute_weights, strict=True))
                if self.attribute_weights else None}

    def describe(self, report: dict) -> str:
        w = self.attribute_weights or (1.0,) * len(self.attributes)
        return (f"objective regression (MSE on {len(self.attributes)} attributes: "
                f"{', '.join(f'{a} x{x:g}' for a, x in zip(self.attributes, w, strict=True))}; missing values "
                f"{'masked' if self.missing == 'mask' else 'refused'}): each forward runs {self.micro} "
                f"sequences, one per rated response, {self.grad_accum} per step and rank")
