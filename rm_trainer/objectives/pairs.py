"""`--objective pairs`: Bradley-Terry on (chosen, rejected), with per-pair margins, reward centering and tied
pairs (the soft tie loss, or Davidson's with one learned parameter). The loss and its sums: bt_loss.py;
the rows: pair_rows.py.

A batch is one forward over 2B sequences, [chosen_0 .. chosen_B-1, rejected_0 .. rejected_B-1]: both
halves share every ZeRO-3 weight gather, and the fused loss reads the rewards in that order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from rm_trainer.data.segments import ShareRule
from rm_trainer.objectives.base import Batch, Objective, batch_sequences, single_view, source_of
from rm_trainer.objectives.bt_loss import N_SUMS, bradley_terry_loss, fused_bradley_terry, metrics_from_sums, pair_sums
from rm_trainer.objectives.pair_rows import PairReader


@dataclass
class PairBatch(Batch):
    """B pairs: seqs holds their 2B sequences, chosen first; margin (B,) with --margin_key, tie (B,) with
    --tie_key."""

    margin: torch.Tensor | None = None
    tie: torch.Tensor | None = None


class Pairs(Objective):
    name = "pairs"
    unit = "pairs"
    sums_width = N_SUMS
    source_keys = ("loss", "acc", "margin", "tie_gap")
    pair_report = True
    row_modules = ("rm_trainer.objectives.pair_rows",)

    def __init__(self, cfg) -> None:
        t, d = cfg.train, cfg.data
        self.data = d
        self.fused = cfg.model.reward_path == "fused"
        self.center = t.center_rewards_coefficient
        self.tie_loss = t.tie_loss
        self.micro = t.micro_batch_size
        self.grad_accum = t.grad_accum

    def reader(self, tok, work_dir: str | None = None) -> PairReader:
        return PairReader(tok, self.data, work_dir)

    def identity(self) -> dict[str, Any]:
        d = self.data
        return {k: getattr(d, k) for k in ("prompt_key", "chosen_key", "rejected_key", "margin_key", "tie_key")}

    def collate(self, rows: list[dict], pad_id: int, pack_len: int | None = None, packing: bool = False,
                single: bool = False, share: ShareRule | None = None) -> PairBatch:
        """single: each response as it is encoded on its own (the held-out rows' `single`), as score_texts
        encodes it, for the end-of-run report. share: each pair's prompt once where the rule says so."""
        views = [single_view(r["single"], r["ids"]) if single else r["ids"] for r in rows]
        d = self.data  # the labels the run reads (--margin_key, --tie_key); the others are not in its rows
        margin = torch.tensor([r["margin"] for r in rows], dtype=torch.float32) if d.margin_key else None
        tie = torch.tensor([bool(r["tie"]) for r in rows], dtype=torch.bool) if d.tie_key else None
        seqs = batch_sequences(views, pad_id, pack_len, packing, share, member_major=True)
        return PairBatch(seqs, source_of(rows), len(rows), margin, tie)

    def loss(self, b: PairBatch, out: torch.Tensor, scale: float | None, log_nu: torch.Tensor | None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """The BT loss of the batch's pairs (the tie loss on tied ones), mean over pairs or sum x scale."""
        device = out.device
        margin = b.margin.to(device) if b.margin is not None else None
        tie = b.tie.to(device) if b.tie is not None else None
        if self.fused:
            loss = fused_bradley_terry(out, margin, scale, self.center, tie, log_nu)[0]
        else:
            loss = bradley_terry_loss(out[:b.rows], out[b.rows:], margin, scale, self.center, tie, log_nu)
        return loss, pair_sums(out[:b.rows], out[b.rows:], tie=tie, log_nu=log_nu)

    def sums(self, b: PairBatch, out: torch.Tensor, keep: torch.Tensor | None = None,
             log_nu: torch.Tensor | None = None) -> torch.Tensor:
        return pair_sums(out[:b.rows], out[b.rows:], keep, b.tie, log_nu)

    def metrics(self, sums: torch.Tensor) -> dict[str, float]:
        return metrics_from_sums(sums)

    def throughput(self, m: dict[str, float], seconds: float) -> dict[str, float]:
        return {"pairs_per_s": m["pairs"] / seconds, "sequences": 2 * m["pairs"]}

    def rewards(self, b: PairBatch, out: torch.Tensor) -> torch.Tensor:
        """(B, 2): each pair's (chosen, rejected) rewards, for the evaluation's diagnostics."""
        return torch.stack([out[:b.rows], out[b.rows:]], 1)

    def strict(self, rows) -> torch.Tensor | None:
        """Which of these rows are strict preferences (None: no --tie_key, all of them): a tied pair has no
        preferred side, so the diagnostics leave it out."""
        return ~torch.tensor(rows["tie"], dtype=torch.bool) if self.data.tie_key else None

    def checkpoint_key(self) -> dict[str, Any]:
        return {"tie_loss": self.tie_loss}

    def tie_rate(self, train_ds) -> float | None:
        """The fraction of tied training pairs: where the Davidson nu starts (model.reward.DavidsonTie)."""
        if self.tie_loss != "davidson":
            return None
        return float(train_ds.data.column("tie").to_numpy().mean())

    def describe(self, report: dict) -> str:
        return (f"objective pairs (Bradley-Terry): each forward runs {2 * self.micro} sequences (chosen and "
                f"rejected of {self.micro} pairs), {self.grad_accum} per step and rank")
