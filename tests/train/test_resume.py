"""Checkpoints in real runs: exact resume after a real SIGKILL (at a step boundary, mid-accumulation,
packed, LoRA), refused inexact resumes, the non-finite guard, a damaged newest checkpoint, a stop signal on
one rank, and what a finished run's checkpoint becomes: verified consolidation, HF export, reward
normalisation.

Faults are injected by tests/support/fault_launch.py (RM_FAULT_PAUSE_AT, RM_FAULT_NAN_GRAD), a test-only
entry point that patches the step function; see helpers.train(env=...).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import ROOT, kill_when_paused, load_artifact, metrics, run_env, start, train, train_args, trained

from rm_trainer import load_reward_model
from rm_trainer.artifact import checkpoint_files as ckpt

# ---------------------------------------------------------------- real runs
STEPS = 12


def base_args(assets, model, accum=1, micro=2, **extra):
    return train_args(model, assets["train"], assets["test"], "zero3", dtype="fp32", lr=1e-3, max_steps=STEPS,
                      max_len=64, seed=11, save_every=3, keep_last=2, micro_batch_size=micro, grad_accum=accum,
                      warmup_steps=1, **extra)


def train_losses(out):
    return [r["loss"] for r in metrics(out) if r["step"] >= 7]


@pytest.mark.slow
@pytest.mark.parametrize("accum,micro,pause,extra", [(1, 2, "8.0", []), (2, 1, "8.1", []),
                                                     (2, 1, "8.1", ["--packing", "--pack_len", "64"]),
                                                     (2, 1, "8.1", ["--lora_r", "8"])],
                         ids=["boundary", "mid_accumulation", "packed_mid_accumulation", "lora_mid_accumulation"])
def test_sigkill_then_resume_is_bit_exact(tmp_path, demo_assets, tiny_pretrained, accum, micro, pause, extra):
    args = base_args(demo_assets, tiny_pretrained, accum, micro) + extra
    a = trained(args)  # the boundary case's is also the stop-signal test's reference
    b = tmp_path / "killed"
    proc = start(b, args, env={"RM_FAULT_PAUSE_AT": pause})
    kill_when_paused(proc, b)
    assert [s for s, _ in ckpt.committed(b / "checkpoints")] == [3, 6]  # step 7 is done, 8 is in flight
    (b / "checkpoints" / "step_9.tmp").mkdir()  # as if the kill had landed mid-save
    for f in b.glob(".paused_rank*"):
        f.unlink()
    proc = train(b, args)  # --resume auto is the default
    assert "resumed from" in proc.stdout and "step_6" in proc.stdout
    assert "shared prompts on" in proc.stdout  # --share_prompt auto: each pair's prompt encoded once
    assert "half-written checkpoint" in proc.stderr and not (b / "checkpoints" / "step_9.tmp").exists()
    la, lb = train_losses(a), train_losses(b)
    assert len(la) == len(lb) == STEPS - 6
    assert la == lb, f"losses after resume differ: {la} vs {lb}"  # exact float equality
    assert [r["step"] for r in metrics(b)] == list(range(1, STEPS + 1))  # no step logged twice
    ra, rb = load_artifact(a)["state_dict"], load_artifact(b)["state_dict"]
    assert ra.keys() == rb.keys() and all(torch.equal(ra[k], rb[k]) for k in ra)
    assert [s for s, _ in ckpt.committed(b / "checkpoints")] == [9, 12]  # keep_last=2 after rotation


@pytest.mark.slow
def test_resume_refuses_inexact_changes(tmp_path, demo_assets, tiny_pretrained, finished):
    """Against the checkpoints of a finished 2-rank run (the module's shared one: each command below is
    refused before anything is written)."""
    out = finished
    args = base_args(demo_assets, tiny_pretrained) + ["--max_steps", "3"]
    cmd = [sys.executable, "launch/train_reward.py"] + args + ["--output_dir", str(out)]
    # one rank instead of two would be an elastic resume (tests/train/test_elastic.py); these are not
    p = subprocess.run(cmd + ["--max_len", "48", "--seed", "1"], cwd=ROOT, env=run_env(), capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "max_len: checkpoint has 64, this run has 48" in p.stderr and "seed: checkpoint has 11" in p.stderr
    assert "world_size" not in p.stderr and not list(out.glob("checkpoints/*/universal*"))
    p = subprocess.run(cmd + ["--resume", str(tmp_path / "nope")], cwd=ROOT, env=run_env(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "no such checkpoint folder" in p.stderr


@pytest.mark.slow
def test_nan_on_one_rank_skips_the_step_everywhere_and_training_continues(tmp_path, demo_assets, tiny_pretrained):
    args = base_args(demo_assets, tiny_pretrained) + ["--max_steps", "5", "--save_every", "1", "--keep_last", "10"]
    ref = tmp_path / "ref"
    train(ref, args, timeout=400)
    out = tmp_path / "nan"
    train(out, args, env={"RM_FAULT_NAN_GRAD": "3:1"}, timeout=400)  # rank 1's gradients, not its loss
    rows, ref_rows = {r["step"]: r for r in metrics(out)}, {r["step"]: r for r in metrics(ref)}
    assert rows[2]["skipped_steps"] == 0 and rows[3]["skipped_steps"] == 1 and rows[5]["skipped_steps"] == 1
    assert "grad_norm" not in rows[3] and rows[4]["grad_norm"] > 0
    # the skipped step logs the mean pair loss of its batch (the weights before it are the reference's)
    assert [rows[s]["loss"] for s in (1, 2, 3)] == [ref_rows[s]["loss"] for s in (1, 2, 3)]
    from rm_trainer.artifact.zero_merge import consolidated_state_dict

    w = {s: consolidated_state_dict(str(out / "checkpoints"), f"step_{s}") for s in (2, 3, 4)}
    assert all(torch.equal(w[2][k], w[3][k]) for k in w[2])  # the poisoned step changed no weight
    assert any(not torch.equal(w[3][k], w[4][k]) for k in w[3])  # and training went on
    assert all(torch.isfinite(v).all() for v in w[4].values())


@pytest.mark.slow
def test_consecutive_non_finite_steps_abort_with_the_batch(tmp_path, demo_assets, tiny_pretrained):
    out = tmp_path / "abort"
    args = base_args(demo_assets, tiny_pretrained) + ["--max_steps", "4", "--max_consecutive_skips", "1"]
    p = train(out, args, env={"RM_FAULT_NAN_GRAD": "2:0"}, check=False, timeout=400)
    assert p.returncode != 0
    assert "step 2: 1 consecutive steps with a non-finite loss" in p.stdout + p.stderr
    assert "training pairs [" in p.stdout + p.stderr


@pytest.mark.slow
def test_damaged_newest_checkpoint_is_skipped_by_auto_and_refused_by_path(tmp_path, demo_assets, tiny_pretrained):
    """The issue's case: one rank's optimizer shard of the newest committed checkpoint is truncated."""
    out = tmp_path / "run"
    args = base_args(demo_assets, tiny_pretrained) + ["--max_steps", "6", "--keep_last", "3"]
    train(out, args)
    want_losses, want = [r["loss"] for r in metrics(out)], load_artifact(out)["state_dict"]
    bad = out / "checkpoints" / "step_6" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    p = train(out, args + ["--resume", str(bad.parent)], launcher="deepspeed", check=False)  # torchrun adds a traceback
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert f"refusing to load {bad.parent}: checkpoint is damaged: {bad.name} has" in p.stderr
    p = train(out, args)  # --resume auto
    assert f"skips {bad.parent}: checkpoint is damaged: {bad.name} has" in p.stderr
    assert f"resumed from {out}/checkpoints/step_3 at step 3" in p.stdout
    assert [r["loss"] for r in metrics(out)] == want_losses  # steps 4-6 redone exactly
    got = load_artifact(out)["state_dict"]
    assert all(torch.equal(got[k], want[k]) for k in want)
    ckpt.verify_manifest(bad.parent)  # step_6 was written anew


# ---------------------------------------------------------------- artifacts of a finished run
@pytest.fixture(scope="module")
def finished(demo_assets, tiny_pretrained, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    train(out, base_args(demo_assets, tiny_pretrained, hf_export=True) + ["--max_steps", "6"], launcher="torchrun")
    return out


@pytest.mark.slow
def test_hf_export_loads_in_plain_transformers_and_matches_reward_pt(finished, demo_assets):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    hf_dir = finished / "hf"
    model, info = AutoModelForSequenceClassification.from_pretrained(hf_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert model.config.num_labels == 1 and model.config.pad_token_id is not None
    assert type(model).__name__.endswith("ForSequenceClassification") and hasattr(model, "score")
    assert "raw reward" in (hf_dir / "README.md").read_text()
    assert (hf_dir / "model.safetensors").is_file()
    tok = AutoTokenizer.from_pretrained(hf_dir)
    rm = load_reward_model(finished / "reward.pt")
    rows = [json.loads(line) for line in open(demo_assets["test"])][:4]
    texts = [r["prompt"] + r["chosen"] for r in rows] + [r["prompt"] + r["rejected"] for r in rows]
    want = rm.score_texts(texts)
    model.eval()
    for side in ("right", "left"):
        tok.padding_side = side
        batch = tok(texts, return_tensors="pt", padding=True)  # the tokenizer appends EOS itself
        with torch.no_grad():
            got = model(**batch).logits[:, 0]
        assert (got - want).abs().max() <= 1e-5, (side, got, want)


@pytest.mark.slow
@pytest.mark.parametrize("launcher,ranks,ds,source", [("python", 1, "zero2", "reward.pt"),
                                                       ("deepspeed", 2, "zero3", "hf")])
def test_a_run_continues_from_the_exported_model_with_its_head(finished, demo_assets, tmp_path, launcher, ranks, ds,
                                                               source):
    """--model OUT/hf or OUT/reward.pt: the step-0 eval of the new run is the finished run's final eval (same
    rewards), under ZeRO-2 in one process and ZeRO-3 on 2 ranks (partitioned loading)."""
    out = tmp_path / "continued"
    args = base_args(demo_assets, str(finished / source)) + ["--max_steps", "1", "--eval_at_start", "--ds_config",
                                                             f"ds_configs/{ds}.json", "--micro_batch_size", "4"]
    proc = train(out, args, launcher=launcher, nprocs=ranks)
    assert "continuing from the reward head of" in proc.stdout
    want, got = metrics(finished, "eval")[-1], metrics(out, "eval")[0]
    assert got["step"] == 0 and got["acc"] == want["acc"]
    for k in ("loss", "margin", "reward_mean", "reward_std"):
        assert abs(got[k] - want[k]) <= 1e-5 * max(1.0, abs(want[k])), (k, got, want)


@pytest.mark.slow
def test_reward_normalisation_uses_held_out_statistics(finished, demo_assets):
    art = load_artifact(finished)
    stats = art["reward_stats"]
    assert stats["pairs"] == sum(1 for _ in open(demo_assets["test"])) and stats["std"] > 0
    rm = load_reward_model(finished / "reward.pt", normalize=True)
    rows = [json.loads(line) for line in open(demo_assets["test"])]
    r = rm.score_texts([x["prompt"] + x["chosen"] for x in rows] + [x["prompt"] + x["rejected"] for x in rows])
    assert abs(r.mean().item()) < 1e-4 and abs(r.std(unbiased=False).item() - 1) < 1e-4
    hf_cfg = json.loads((finished / "hf" / "config.json").read_text())
    assert hf_cfg["reward_mean"] == pytest.approx(stats["mean"]) and hf_cfg["reward_std"] == pytest.approx(stats["std"])


@pytest.mark.slow
def test_consolidate_refuses_a_checkpoint_with_a_missing_rank_file(finished, tmp_path):
    import shutil

    src = finished / "checkpoints"
    broken = tmp_path / "checkpoints"
    shutil.copytree(src, broken)
    tag = (broken / "latest").read_text()
    (broken / tag / "zero_pp_rank_1_mp_rank_00_model_states.pt").unlink()
    p = subprocess.run([sys.executable, "launch/consolidate.py", "--checkpoint_dir", str(broken), "--output",
                        str(tmp_path / "r.pt")],
                       cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "missing zero_pp_rank_1_mp_rank_00_model_states.pt" in p.stderr
    assert not (tmp_path / "r.pt").exists()


def test_check_state_dict_catches_empty_and_misshapen_tensors(demo_assets):
    from transformers import AutoConfig

    from rm_trainer.artifact.format import check_state_dict
    from rm_trainer.model.backbone import backbone_from_config_dict
    from rm_trainer.model.reward import RewardModel

    cfg = AutoConfig.from_pretrained(demo_assets["model"]).to_dict()
    sd = RewardModel(backbone_from_config_dict(cfg, torch.float32)).state_dict()
    check_state_dict(sd, cfg, "ok")
    bad = dict(sd) | {"score.weight": torch.empty(0)}
    with pytest.raises(ValueError, match="score.weight is empty"):
        check_state_dict(bad, cfg, "x")
    bad = dict(sd) | {"backbone.norm.weight": torch.ones(3)}
    with pytest.raises(ValueError, match=r"backbone.norm.weight has shape \(3,\)"):
        check_state_dict(bad, cfg, "x")
    bad = {k: v for k, v in sd.items() if k != "score.weight"}
    with pytest.raises(ValueError, match="missing score.weight"):
        check_state_dict(bad, cfg, "x")


@pytest.mark.slow
def test_stop_signal_on_one_rank_stops_every_rank_at_one_committed_checkpoint(tmp_path, demo_assets,
                                                                             tiny_pretrained):
    """Preemption without slurm: USR1 reaches only rank 1, while both ranks wait before step 5; the ranks
    agree at the end of that step, commit one checkpoint and exit 75 (nobody hangs); the rerun resumes and
    matches the uninterrupted run (the SIGKILL test's, trained once)."""
    args = base_args(demo_assets, tiny_pretrained)
    out = tmp_path / "sig"
    proc = start(out, args, env={"RM_FAULT_PAUSE_AT": "5.0"})
    deadline = time.time() + 300
    while not all((out / f".paused_rank{r}").exists() for r in range(2)):
        assert proc.poll() is None and time.time() < deadline, "training never reached step 5"
        time.sleep(0.1)
    os.kill(int((out / ".paused_rank1").read_text()), signal.SIGUSR1)  # the paused rank wrote its pid
    (out / ".resume").write_text("")
    assert proc.wait(timeout=300) != 0  # the launcher reports the ranks' exit code 75
    marker = json.loads((out / "preempted.json").read_text())
    assert marker["ranks_signalled"] == 1 and marker["step"] == 5
    assert [s for s, _ in ckpt.committed(out / "checkpoints")] == [3, 5]  # save_every 3, and the stop's
    assert max(r["step"] for r in metrics(out)) == 5
    p = train(out, args)
    assert f"resumed from {out}/checkpoints/step_5" in p.stdout
    assert [r["loss"] for r in metrics(out)] == [r["loss"] for r in metrics(trained(args))]
