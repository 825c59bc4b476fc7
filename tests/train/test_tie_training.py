"""Tied pairs in a real 2-rank run (--tie_key): the demo's strict pairs plus tied ones, two responses of
equal quality where the first is padded with neutral words. Trained as ties, the two score alike; given
as strict pairs (what a trainer without ties does: the first response as chosen), the model learns that
padding wins. The logged eval numbers are checked against reward.pt scoring the same pairs."""

from __future__ import annotations

import json
import random

import pytest
import torch
from helpers import metrics, train, train_args

from rm_trainer import load_reward_model
from rm_trainer.demo import HARMFUL, HELPFUL, NEUTRAL, make_pairs

pytestmark = pytest.mark.slow


def tied_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        good = rng.randint(0, 2)
        core = [rng.choice(HELPFUL) for _ in range(good)] + [rng.choice(HARMFUL) for _ in range(2 - good)]
        short = core + [rng.choice(NEUTRAL) for _ in range(3)]
        long = core + [rng.choice(NEUTRAL) for _ in range(14)]
        rng.shuffle(short)
        rng.shuffle(long)
        rows.append({"prompt": "Human: tell me about code please Assistant:", "chosen": " " + " ".join(long),
                     "rejected": " " + " ".join(short), "tie": True})
    return rows


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_ties_train_to_equal_rewards_and_eval_reports_them(tmp_path, demo_assets, tiny_pretrained):
    strict_train = [r | {"tie": False} for r in make_pairs(192, 1)]
    strict_test = [r | {"tie": False} for r in make_pairs(48, 2)]
    ties_train, ties_test = tied_rows(96, 3), tied_rows(32, 4)
    rows = strict_train + ties_train
    random.Random(5).shuffle(rows)
    data = write(tmp_path / "train.jsonl", rows)
    test = write(tmp_path / "test.jsonl", strict_test + ties_test)
    runs = {}
    for name, tie_key in (("ties", "tie"), ("as_strict", None)):
        runs[name] = out = tmp_path / name
        train(out, train_args(tiny_pretrained, data, test, "zero2", dtype="fp32", lr=1e-3, max_steps=36,
                              warmup_steps=2, max_len=64, seed=7, micro_batch_size=4, eval_every=36,
                              tie_key=tie_key))
    report = json.loads((runs["ties"] / "data_report.json").read_text())
    assert report["train"]["train"]["ties"] == 96 and report["train"]["test"]["ties"] == 32

    def gaps(out, rows):
        model = load_reward_model(out / "reward.pt")
        r = model.score_texts([(x["prompt"], x["chosen"]) for x in rows] +
                              [(x["prompt"], x["rejected"]) for x in rows])
        return r[:len(rows)] - r[len(rows):]

    tie_gap = {k: gaps(out, ties_test).abs().mean().item() for k, out in runs.items()}
    print("mean |r(long) - r(short)| on held-out tied pairs:", tie_gap)
    assert tie_gap["ties"] < 0.5 * tie_gap["as_strict"]
    # the logged eval: accuracy over the strict pairs only, the tied pairs' mean gap, and their count
    ev = metrics(runs["ties"], "eval")[-1]
    strict = gaps(runs["ties"], strict_test)
    assert ev["ties"] == 32
    assert ev["acc"] == pytest.approx((strict > 0).float().mean().item(), abs=1e-9)
    assert ev["tie_gap"] == pytest.approx(tie_gap["ties"], rel=1e-4)
    assert ev["acc"] >= 0.75, ev
    train_log = metrics(runs["ties"])
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in train_log)
    assert "ties" not in metrics(runs["as_strict"], "eval")[-1]
