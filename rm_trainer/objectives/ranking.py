"""`--objective ranking`: rows of one prompt and K >= 2 rated responses, each response one sequence per step,
trained with BT over every ordered pair of the row or with Plackett-Luce (ranking_loss.py); the rows:
ranking_rows.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from rm_trainer.data.batching import Sequences
from rm_trainer.data.segments import ShareRule
from rm_trainer.objectives.base import Batch, Objective, batch_sequences, single_view, source_of
from rm_trainer.objectives.ranking_loss import RANKING_FIELDS, fused_ranking_loss, ranking_metrics, ranking_sums
from rm_trainer.objectives.ranking_rows import RankingReader


@dataclass
class RankingBatch(Batch):
    """G rows (`rows`) as one forward over their S responses, each once: group (S,) the row of each
    response (0..G-1), scores (S,) its rating (higher is better; equal scores tie)."""

    group: torch.Tensor | None = None
    scores: torch.Tensor | None = None


def collate_groups(rows: list[dict], pad_id: int, pack_len: int | None, packing: bool, single: bool = False,
                   share: ShareRule | None = None) -> tuple[Sequences, torch.Tensor, torch.Tensor]:
    """The sequences of rows of K responses, row by row (each row's prompt once where `share` says so),
    with each one's row and score."""
    group = torch.cat([torch.full((len(r["ids"]),), i, dtype=torch.long) for i, r in enumerate(rows)])
    scores = torch.tensor([float(s) for r in rows for s in r["scores"]], dtype=torch.float32)
    views = [single_view(r["single"], r["ids"]) if single else r["ids"] for r in rows]
    return batch_sequences(views, pad_id, pack_len, packing, share), group, scores


class Ranking(Objective):
    name = "ranking"
    sums_width = len(RANKING_FIELDS)
    source_keys = ("loss", "acc", "top1")
    row_modules = ("rm_trainer.objectives.ranking_rows",)

    def __init__(self, cfg) -> None:
        self.data, self.ranking_loss = cfg.data, cfg.train.ranking_loss
        self.micro, self.grad_accum = cfg.train.micro_batch_size, cfg.train.grad_accum

    def reader(self, tok, work_dir: str | None = None) -> RankingReader:
        return RankingReader(tok, self.data, work_dir)

    def identity(self) -> dict[str, Any]:
        return {"prompt_key": self.data.prompt_key, "ranking_score": self.data.ranking_score}

    def collate(self, rows: list[dict], pad_id: int, pack_len: int | None = None, packing: bool = False,
                single: bool = False, share: ShareRule | None = None) -> RankingBatch:
        seqs, group, scores = collate_groups(rows, pad_id, pack_len, packing, single, share)
        return RankingBatch(seqs, source_of(rows), len(rows), group, scores)

    def loss(self, b: RankingBatch, out: torch.Tensor, scale: float | None, log_nu: torch.Tensor | None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        group, scores = b.group.to(out.device), b.scores.to(out.device)
        loss = fused_ranking_loss(out, group, scores, b.rows, self.ranking_loss, scale)
        return loss, ranking_sums(out, group, scores, b.rows, self.ranking_loss)

    def sums(self, b: RankingBatch, out: torch.Tensor, keep: torch.Tensor | None = None,
             log_nu: torch.Tensor | None = None) -> torch.Tensor:
        return ranking_sums(out, b.group, b.scores, b.rows, self.ranking_loss, keep)

    def metrics(self, sums: torch.Tensor) -> dict[str, float]:
        return ranking_metrics(sums)

    def throughput(self, m: dict[str, float], seconds: float) -> dict[str, float]:
        return {"pairs_per_s": m["pairs"] / seconds, "sequences": m["responses"],
                "prompts_per_s": m["prompts"] / seconds}

    def checkpoint_key(self) -> dict[str, Any]:
        return {"objective": "ranking", "ranking_loss": self.ranking_loss}

    def describe(self, report: dict) -> str:
        k = [r["train"]["responses_per_row"]["mean"] if "responses_per_row" in r["train"] else 2.0
             for n, r in report.items() if not n.startswith("_")]
        k_mean = sum(k) / len(k) if k else 2.0
        m = self.micro
        return (f"objective ranking ({self.ranking_loss} loss): each response one sequence, each forward about "
                f"{m * k_mean:.1f} sequences ({m} rows of {k_mean:.2f} responses), {self.grad_accum} per step and "
                f"rank; splitting the rows into pairs would run {m * k_mean * (k_mean - 1):.1f}")
