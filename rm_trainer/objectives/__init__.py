"""What a run trains: one class per objective (train.objective), the only code that knows the objectives.

    pairs          pairs.py       Bradley-Terry on (chosen, rejected), margins, centering, ties (soft, Davidson)
    ranking        ranking.py     rows of one prompt and K rated responses: BT over all pairs, or Plackett-Luce
    regression     regression.py  rated responses, one head output per attribute (HelpSteer-style)
    bt+regression  mixed.py       pair sources and rating sources on one attribute head

Each implements base.Objective: its rows (reader: *_rows.py), the typed batch of a micro-batch, the loss
with its fused closed-form backward (*_loss.py), the float64 sums and the metrics, the cache identity and
the checkpoint key. Adding a fifth objective is a class here, its rows and its loss.
"""

from __future__ import annotations

from rm_trainer.objectives.base import Batch, Objective
from rm_trainer.objectives.mixed import BtRegression
from rm_trainer.objectives.pairs import Pairs
from rm_trainer.objectives.ranking import Ranking
from rm_trainer.objectives.regression import Regression

__all__ = ["KINDS", "Batch", "Objective", "build"]

KINDS: dict[str, type[Objective]] = {c.name: c for c in (Pairs, Ranking, Regression, BtRegression)}


def build(cfg) -> Objective:
    """The objective of a run config (train.objective), built from its sections."""
    return KINDS[cfg.train.objective](cfg)
