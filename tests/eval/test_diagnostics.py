"""Diagnostics on hand-made pairs: ECE, length buckets with the prefer-longer baseline, correlation,
margins, per-group accuracy."""

from __future__ import annotations

import math

import pytest
import torch

from rm_trainer.eval.diagnostics import calibration, diagnose, pearson, response_lengths, scalars


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_ece_by_hand():
    # deltas 2, -1, 0: confidences sig(2), 1 - sig(-1) = sig(1), 0.5; outcomes 1, 0, 0.5 (a tie)
    ece, bins = calibration(torch.tensor([2.0, -1.0, 0.0]))
    assert ece == pytest.approx(((1 - sig(2)) + sig(1) + 0.0) / 3, rel=1e-9)
    assert [b["n"] for b in bins] == [1, 1, 1]
    assert calibration(torch.tensor([20.0] * 4))[0] == pytest.approx(0.0, abs=1e-8)  # sure and right


def test_lengths_buckets_baseline_and_groups():
    assert response_lengths([1, 2, 3, 4, 5], [1, 2, 9]) == (3, 1)
    assert response_lengths([1, 2], [1, 2, 7]) == (0, 1)
    r_c = torch.tensor([1.0, 1.0, 0.0, 3.0])
    r_r = torch.tensor([0.0, 2.0, 0.0, 1.0])
    len_c = torch.tensor([10, 10, 20, 100])
    len_r = torch.tensor([20, 10, 10, 50])
    d = diagnose(r_c, r_r, len_c, len_r, ["a", "a", "b", "b"])
    assert d["acc"] == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    assert d["prefer_longer_acc"] == pytest.approx((0 + 0.5 + 1 + 1) / 4)
    by = {b["bucket"]: b for b in d["length_buckets"]}
    assert by["chosen shorter by >25%"]["n"] == 1 and by["chosen shorter by >25%"]["acc"] == 1.0
    assert by["within 5%"]["n"] == 1 and by["within 5%"]["acc"] == 0.0 and by["within 5%"]["prefer_longer_acc"] == 0.5
    assert by["chosen longer by >25%"]["n"] == 2 and by["chosen longer by >25%"]["acc"] == 0.75
    assert sum(b["n"] for b in d["length_buckets"]) == 4
    assert d["groups"]["a"] == {"n": 2, "acc": 0.5, "prefer_longer_acc": 0.25, "margin": 0.0}
    assert d["margin"]["mean"] == pytest.approx((1 - 1 + 0 + 2) / 4) and d["margin"]["frac_negative"] == 0.25
    assert d["length_corr"] == pytest.approx(pearson(r_c - r_r, (len_c - len_r).double()), rel=1e-12)
    assert pearson(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 4.0, 6.0])) == pytest.approx(1.0)
    s = scalars(d)
    assert s["acc_by_length_gap/chosen_longer_by_gt25pct"] == 0.75 and s["ece"] == d["ece"]
