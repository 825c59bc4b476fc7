"""MetricsLogger: which steps get a line, and throughput timed over the window since the previous line
(from the first step's start to this line's sync), so eval or saving between lines is not counted."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import objective

from rm_trainer.objectives.bt_loss import pair_sums
from rm_trainer.train import logger as logger_mod
from rm_trainer.train.logger import MetricsLogger
from rm_trainer.train.step import StepRecord


def record(step: int, started: float, skipped: bool = False) -> StepRecord:
    sums = pair_sums(torch.tensor([1.0, 2.0, 0.5, 0.0]), torch.tensor([0.0, 1.0, 1.0, 0.5]))  # 4 pairs
    stats = torch.cat([sums, torch.tensor([400.0, 800.0], dtype=torch.float64)])  # tokens, slots
    return StepRecord(step, stats, skipped, 0, 1e-3, started, objective())


def test_lines_every_k_steps_timed_over_their_window(tmp_path, monkeypatch):
    log = MetricsLogger(tmp_path, enabled=True, tensorboard=False, total=7, every=3)
    clock = iter([13.0, 23.0, 31.0])  # the host clock at each line's sync
    monkeypatch.setattr(logger_mod.time, "perf_counter", lambda: next(clock))
    for step, started in ((1, 10.0), (2, 11.0), (3, 12.0),   # line at 3: (13 - 10) / 3 steps = 1 s each
                          (4, 20.0), (5, 21.0), (6, 22.0),   # eval and saving ran from 13 to 20: not counted
                          (7, 30.0)):                        # the last step always gets a line
        log.train_step(record(step, started), lambda: 0.5, skipped_steps=0)
    log.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 6, 7]
    assert [r["pairs_per_s"] for r in rows] == pytest.approx([4.0, 4.0, 4.0])
    assert [r["tokens_per_s"] for r in rows] == pytest.approx([400.0, 400.0, 400.0])
    assert rows[0]["padding_efficiency"] == 0.5 and rows[0]["grad_norm"] == 0.5


def test_a_skipped_step_always_gets_a_line(tmp_path, monkeypatch):
    log = MetricsLogger(tmp_path, enabled=True, tensorboard=False, total=10, every=5)
    monkeypatch.setattr(logger_mod.time, "perf_counter", lambda: 4.0)
    log.train_step(record(1, 0.0), lambda: None, skipped_steps=0)
    log.train_step(record(2, 1.0, skipped=True), lambda: float("nan"), skipped_steps=1)
    log.close()
    (row,) = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert row["step"] == 2 and row["skipped_steps"] == 1 and "grad_norm" not in row
    assert row["pairs_per_s"] == pytest.approx(4 / 2.0)  # two steps since the start, 4 s
