"""Tied pairs in a real 2-rank run (--tie_key): the demo's strict pairs plus tied ones, two responses of
equal quality where the first is padded with neutral words. Trained as ties, the two score alike; given
as strict pairs (what a trainer without ties does: the first response as chosen), the model learns that
padding wins. The logged eval numbers are checked against reward.pt scoring the same pairs. The Davidson
model (--tie_loss davidson) learns its tie parameter under ZeRO-3, leaves it out of reward.pt and the HF
export, and resumes bit-exact after kill -9."""

from __future__ import annotations

import json
import math
import random
import subprocess

import pytest
import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from helpers import (
    BIN,
    ROOT,
    load_artifact,
    metrics,
    resume_from_copy,
    run_env,
    same_artifact_weights,
    train,
    train_args,
)

from rm_trainer import load_reward_model
from rm_trainer.artifact.zero_merge import consolidated_state_dict
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
    for name, tie_key, tie_loss, ds in (("ties", "tie", None, "zero2"), ("as_strict", None, None, "zero2"),
                                        ("davidson", "tie", "davidson", "zero3")):
        runs[name] = out = tmp_path / name
        train(out, train_args(tiny_pretrained, data, test, ds, dtype="fp32", lr=1e-3, max_steps=36,
                              warmup_steps=2, max_len=64, seed=7, micro_batch_size=4, eval_every=36,
                              tie_key=tie_key, tie_loss=tie_loss))
    report = json.loads((runs["ties"] / "data_report.json").read_text())
    assert report["train"]["train"]["ties"] == 96 and report["train"]["test"]["ties"] == 32

    def gaps(out, rows):
        model = load_reward_model(out / "reward.pt")
        r = model.score_texts([(x["prompt"], x["chosen"]) for x in rows] +
                              [(x["prompt"], x["rejected"]) for x in rows])
        return r[:len(rows)] - r[len(rows):]

    tie_gap = {k: gaps(out, ties_test).abs().mean().item() for k, out in runs.items()}
    print("mean |r(long) - r(short)| on held-out tied pairs:", tie_gap)
    assert tie_gap["ties"] < 0.5 * tie_gap["as_strict"] and tie_gap["davidson"] < 0.5 * tie_gap["as_strict"]
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

    # Davidson: nu starts where P(tie | equal rewards) = nu / (2 + nu) is the training set's tie rate, and is
    # learned from there
    davidson = metrics(runs["davidson"])
    nus = [r["tie_nu"] for r in davidson]
    q = report["train"]["train"]["ties"] / report["train"]["train"]["used"]
    assert nus[0] == pytest.approx(2 * q / (1 - q), rel=1e-6) and len(set(nus)) > 10, (q, nus)
    assert "tie_nu" not in train_log[0]
    art = load_artifact(runs["davidson"])
    theta = consolidated_state_dict(str(runs["davidson"] / "checkpoints"), "step_36")["tie.log_nu"]
    assert art["tie_model"] == {"loss": "davidson", "nu": pytest.approx(math.exp(theta.item()), rel=1e-6)}
    assert not any(k.startswith("tie.") for k in art["state_dict"]) and "tie_model" not in load_artifact(runs["ties"])
    print("Davidson nu: first", nus[0], "last logged", nus[-1], "final", art["tie_model"]["nu"])
    ev = metrics(runs["davidson"], "eval")[-1]
    assert ev["acc"] >= 0.75 and ev["ties"] == 32, ev
    assert ev["tie_gap"] == pytest.approx(tie_gap["davidson"], rel=1e-4)

    # rm-eval --tie_key: the tied pairs apart (count, gap, the Davidson P(tie)), the accuracy over the strict
    ties_report = rm_eval_ties(runs["davidson"], test, tmp_path / "rm_eval")
    assert ties_report["diagnostics"]["pairs"] == 48
    assert ties_report["diagnostics"]["acc"] == pytest.approx((gaps(runs["davidson"], strict_test) > 0).float()
                                                              .mean().item(), abs=1e-9)
    t = ties_report["ties"]
    assert t["pairs"] == 32 and t["tie_gap"] == pytest.approx(tie_gap["davidson"], rel=1e-5)
    assert t["nu"] == art["tie_model"]["nu"] and t["p_tie_on_tied"] > t["p_tie_on_strict"], t
    assert "Tied pairs (not in the accuracy): 32" in (tmp_path / "rm_eval" / "report.md").read_text()


def rm_eval_ties(out, data, where) -> dict:
    p = subprocess.run([str(BIN / "rm-eval"), "--model", str(out / "reward.pt"), "--data", data, "--tie_key", "tie",
                        "--output_dir", str(where)], cwd=ROOT, env=run_env(), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads((where / "metrics.json").read_text())


def test_a_davidson_run_resumed_from_a_checkpoint_is_bit_exact(tmp_path, demo_assets, tiny_pretrained):
    rows = [r | {"tie": False} for r in make_pairs(48, 1)] + tied_rows(16, 3)  # a quarter tied: nu starts at 2/3
    random.Random(5).shuffle(rows)
    args = train_args(tiny_pretrained, write(tmp_path / "train.jsonl", rows), None, "zero2", dtype="fp32", lr=1e-3,
                      max_steps=8, warmup_steps=1, max_len=64, seed=7, micro_batch_size=4, save_every=2,
                      test_fraction=0, tie_key="tie", tie_loss="davidson", hf_export=False)
    a = tmp_path / "uninterrupted"
    train(a, args)
    # nu makes the ZeRO-2 no-decay group 6H + 1 elements: padded to a multiple of 2 x world, and that padding
    # is left out of the last rank's partition file; the merge still equals DeepSpeed's own zero_to_fp32
    want = get_fp32_state_dict_from_zero_checkpoint(str(a / "checkpoints"), "step_8")
    got = consolidated_state_dict(str(a / "checkpoints"), "step_8")
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    b = tmp_path / "resumed"
    resume_from_copy(a, b, args, 4)  # as a crash after step_4 leaves it (SIGKILL: the kill tests)
    ma, mb = metrics(a), metrics(b)
    for key in ("loss", "tie_nu"):
        assert [r[key] for r in ma] == [r[key] for r in mb], key  # exact float equality
    assert ma[0]["tie_nu"] == pytest.approx(2 / 3, rel=1e-6)
    assert load_artifact(a)["tie_model"] == load_artifact(b)["tie_model"] and same_artifact_weights(a, b)
