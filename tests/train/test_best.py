"""--keep_best: the ranking alone (any sequence of evaluations, hypothesis), then a real 2-rank run: the
kept checkpoint is the best of the logged metric, survives rotation, is exported as OUT/best/ and
verified, and a kill -9 and resume keep the ranking."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import kill_when_paused, load_artifact, metrics, start, train, train_args
from hypothesis import given
from hypothesis import strategies as st

from rm_trainer.artifact import checkpoint_files as ckpt
from rm_trainer.errors import ConfigError
from rm_trainer.train.best import BestCheckpoints, read_best, resolve_mode


@given(values=st.lists(st.floats(-5, 5, allow_nan=False) | st.sampled_from([0.5, 1.0, float("nan")]),
                       min_size=1, max_size=12),
       keep=st.integers(1, 4), metric=st.sampled_from(["eval/acc", "eval/loss"]))
def test_the_ranking_is_the_best_k_evaluations_with_ties_to_the_earlier_step(tmp_path_factory, values, keep,
                                                                             metric):
    root = tmp_path_factory.mktemp("ckpts")
    best = BestCheckpoints(root, keep, metric, "auto", 0)
    key = metric.removeprefix("eval/")
    for step, v in enumerate(values, 1):
        best.note(step, {key: v, "pairs": 10})
        (root / f"step_{step}").mkdir()
        best.committed(step, f"step_{step}")
    finite = [(v, s) for s, v in enumerate(values, 1) if v == v]
    sign = -1 if resolve_mode(metric, "auto") == "max" else 1
    want = [s for v, s in sorted(finite, key=lambda e: (sign * e[0], e[1]))[:keep]]
    assert [e["step"] for e in best.ranking] == want
    if want:
        assert read_best(root)["step"] == want[0]
        # a resume at step s keeps the entries up to s (the run redoes the rest)
        resumed = BestCheckpoints(root, keep, metric, "auto", want[0])
        assert [e["step"] for e in resumed.ranking] == [s for s in want if s <= want[0]]


def test_an_unknown_metric_names_the_ones_an_evaluation_logs(tmp_path):
    best = BestCheckpoints(tmp_path, 1, "eval/accuracy", "auto", 0)
    with pytest.raises(ConfigError, match=r"'eval/accuracy'.*\['eval/acc', 'eval/loss'\]"):
        best.note(2, {"loss": 0.5, "acc": 1.0, "pairs": 4})


STEPS = 12


def best_args(assets, model, **extra):
    return train_args(model, assets["train"], assets["test"], "zero2", dtype="fp32", lr=1e-3, max_steps=STEPS,
                      max_len=64, seed=5, micro_batch_size=2, warmup_steps=1, eval_every=2, keep_last=2,
                      keep_best=2, best_metric="eval/loss", **extra)


@pytest.mark.slow
def test_keep_best_keeps_exports_and_resumes_the_best_checkpoint(tmp_path, demo_assets, tiny_pretrained):
    args = best_args(demo_assets, tiny_pretrained, hf_export=True)
    a = tmp_path / "uninterrupted"
    train(a, args)
    evals = {r["step"]: r["loss"] for r in metrics(a, "eval")}
    assert sorted(evals) == list(range(2, STEPS + 1, 2))
    ranked = sorted(evals, key=lambda s: (evals[s], s))[:2]  # eval/loss: lower is better
    board = json.loads((a / "checkpoints" / "best.json").read_text())
    assert (board["metric"], board["mode"]) == ("eval/loss", "min")
    assert [e["step"] for e in board["ranking"]] == ranked
    assert [e["value"] for e in board["ranking"]] == [evals[s] for s in ranked]
    # rotation kept the best two beside the newest two (keep_last 2)
    kept = [s for s, _ in ckpt.committed(a / "checkpoints")]
    assert kept == sorted(set(ranked) | {STEPS - 2, STEPS}), kept
    # OUT/best/: the best step's weights, verified on the probe that step's live engine scored
    final = json.loads((a / "final_metrics.json").read_text())["best"]
    assert final["step"] == ranked[0] and final["reward_pt"]["probe_max_abs_diff"] <= \
        final["reward_pt"]["probe_tolerance"]
    best = load_artifact(a / "best")
    assert best["step"] == ranked[0] and (a / "best" / "hf" / "config.json").is_file()
    if ranked[0] != STEPS:
        assert any(not torch.equal(v, load_artifact(a)["state_dict"][k]) for k, v in best["state_dict"].items())

    # kill -9 during step 9 (evaluations 2..8 ranked and saved), resume: the same ranking and OUT/best/
    b = tmp_path / "killed"
    proc = start(b, args, env={"RM_FAULT_PAUSE_AT": "9.0"})
    kill_when_paused(proc, b)
    for f in b.glob(".paused_rank*"):
        f.unlink()
    train(b, args)
    assert json.loads((b / "checkpoints" / "best.json").read_text()) == board
    bb = load_artifact(b / "best")["state_dict"]
    assert all(torch.equal(bb[k], v) for k, v in best["state_dict"].items())
