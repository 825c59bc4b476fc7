"""`--objective bt+regression` (HelpSteer2-Preference style): pair sources and rating sources in one run, on
one attribute head. A pair adds bt_weight x BT of its combined rewards, a rated row its MSE, and each row
counts once. The rows: mixed_rows.py (each source read by the pair or the rating reader).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from rm_trainer.data.segments import ShareRule
from rm_trainer.model.attributes import combine
from rm_trainer.objectives.base import source_of
from rm_trainer.objectives.mixed_rows import MixedReader
from rm_trainer.objectives.ranking import RankingBatch, collate_groups
from rm_trainer.objectives.ranking_loss import RANKING_FIELDS, fused_ranking_loss, ranking_metrics, ranking_sums
from rm_trainer.objectives.regression import Regression
from rm_trainer.objectives.regression_loss import fused_regression_loss, regression_metrics, regression_sums


@dataclass
class MixedBatch(RankingBatch):
    """Pair rows (two sequences, scores [1, 0]) and rated rows (one sequence, scores [0]) as one forward:
    targets (S, K) each sequence's ratings, NaN for a pair's sequences."""

    targets: torch.Tensor | None = None


class BtRegression(Regression):
    name = "bt+regression"
    shares_prompts = True  # its pair rows (a rated row is one sequence, left as it is)
    source_keys = ("loss", "acc")
    row_modules = ("rm_trainer.objectives.mixed_rows", "rm_trainer.objectives.pair_rows",
                   "rm_trainer.objectives.rating_rows", "rm_trainer.objectives.ranking_rows")

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.bt_weight = cfg.train.bt_weight
        self.sums_width += len(RANKING_FIELDS)

    def reader(self, tok, work_dir: str | None = None) -> MixedReader:
        return MixedReader(tok, self.data, work_dir)

    def identity(self) -> dict[str, Any]:
        d = self.data
        return super().identity() | {"chosen_key": d.chosen_key, "rejected_key": d.rejected_key}

    def collate(self, rows: list[dict], pad_id: int, pack_len: int | None = None, packing: bool = False,
                single: bool = False, share: ShareRule | None = None) -> MixedBatch:
        seqs, group, scores = collate_groups(rows, pad_id, pack_len, packing, share=share)
        targets = torch.tensor([t for r in rows for t in r["targets"]], dtype=torch.float32)
        return MixedBatch(seqs, source_of(rows), len(rows), group, scores, targets)

    def loss(self, b: MixedBatch, out: torch.Tensor, scale: float | None, log_nu: torch.Tensor | None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row counts once: the batch loss is the mean over its rows (or their sum x scale)."""
        device = out.device
        group, scores, targets, weights = b.group.to(device), b.scores.to(device), b.targets.to(device), \
            self.weights(device)
        rewards = combine(out, torch.tensor(self.combination, device=device))  # (S,): what BT compares
        row_scale = 1 / max(b.rows, 1) if scale is None else scale
        loss = (self.bt_weight * fused_ranking_loss(rewards, group, scores, b.rows, "pairs", scale)
                + fused_regression_loss(out, targets, None, weights, row_scale))
        return loss, torch.cat([ranking_sums(rewards, group, scores, b.rows, "pairs"),
                                regression_sums(out, targets, weights)])

    def sums(self, b: MixedBatch, out: torch.Tensor, keep: torch.Tensor | None = None,
             log_nu: torch.Tensor | None = None) -> torch.Tensor:
        rewards = combine(out, torch.tensor(self.combination))
        return torch.cat([ranking_sums(rewards, b.group, b.scores, b.rows, "pairs", keep),
                          regression_sums(out, b.targets, self.weights(out.device),
                                          None if keep is None else keep[b.group])])

    def metrics(self, sums: torch.Tensor) -> dict[str, float]:
        """The pairs' accuracy and BT loss, each attribute's RMSE and Pearson r, and the loss per row."""
        n = len(RANKING_FIELDS)
        bt, reg = ranking_metrics(sums[:n]), regression_metrics(sums[n:], self.attributes)
        rows, pairs = float(sums[0]), float(sums[2])
        return reg | {"loss": (self.bt_weight * float(sums[1]) + float(sums[n + 1])) / rows,
                      "bt_loss": float(sums[1]) / pairs if pairs else float("nan"), "acc": bt["acc"],
                      "pairs": int(pairs), "rows": int(rows), "responses": bt["responses"]}

    def throughput(self, m: dict[str, float], seconds: float) -> dict[str, float]:
        return {"pairs_per_s": m["pairs"] / seconds, "sequences": m["responses"], "rows_per_s": m["rows"] / seconds}

    def checkpoint_key(self) -> dict[str, Any]:
        return super().checkpoint_key() | {"bt_weight": self.bt_weight, "reward_weights": self.reward_weights}

    def describe(self, report: dict) -> str:
        return (f"objective bt+regression (BT x{self.bt_weight:g} on the combined reward of pairs, MSE on "
                f"{', '.join(self.attributes)} of rated rows): each forward runs 2 sequences per pair and 1 per rated "
                f"row, {self.micro} rows, {self.grad_accum} per step and rank")
