"""Elastic resume: a checkpoint written by one world size (or ZeRO stage) resumed on another, through
DeepSpeed's universal checkpoints, against the uninterrupted run (conftest.RUNS: 12 steps, saved at 6).

The resumed run is launched with the same flags as the original, on a different number of ranks: it must
keep the global batch (grad_accum recomputed), train the same pairs at every step, and land on the same
losses and weights.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import RUNS
from helpers import load_artifact, losses, metrics, train, train_args

from rm_trainer.artifact import checkpoint_files as ckpt
from rm_trainer.artifact.consolidate import consolidate
from rm_trainer.data.batching import RowSampler
from rm_trainer.errors import CheckpointError
from rm_trainer.train.elastic import UNIVERSAL, convert

pytestmark = pytest.mark.slow

TOL = 1e-5  # relative, fp32
FLAGS = dict(dtype="fp32", lr=1e-3, max_steps=12, warmup_steps=1, max_len=64, seed=7, eval_every=6, save_every=6)


def from_step_6(src, dst):
    """dst/checkpoints holds src's step_6 only, as if the job had been stopped there."""
    shutil.copytree(src / "checkpoints" / "step_6", dst / "checkpoints" / "step_6")
    (dst / "checkpoints" / "latest").write_text("step_6")


def resume(tmp_path, run, name, assets, ds, launcher, nprocs, **extra):
    """The run's own flags (conftest.RUNS), with `extra` over them, on another launcher, world or stage."""
    out = tmp_path / f"{name}_resumed"
    from_step_6(run(name), out)
    flags = FLAGS | RUNS[name][3] | extra
    proc = train(out, train_args(assets["model"], assets["train"], assets["test"], ds, **flags),
                 launcher=launcher, nprocs=nprocs)
    return out, proc.stdout + proc.stderr


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


def assert_continues(resumed, original) -> dict:
    """Steps 7-12 of the resumed run against the uninterrupted one: losses, eval, final weights, and the
    pair ids each step trained (from each run's own resolved config)."""
    lr, lo = losses(resumed), losses(original)
    assert len(lr) == 6 and len(lo) == 12
    loss_err = max(rel(a, b) for a, b in zip(lr, lo[6:], strict=True))
    assert loss_err <= TOL, (lr, lo[6:])
    (er,), eo = metrics(resumed, "eval"), metrics(original, "eval")
    assert er["step"] == 12 and rel(er["loss"], eo[-1]["loss"]) <= TOL and er["acc"] == eo[-1]["acc"]
    a, b = load_artifact(resumed)["state_dict"], load_artifact(original)["state_dict"]
    assert a.keys() == b.keys()
    weight_err = max(((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-12)).item() for k in a)
    assert weight_err <= TOL
    assert same_pairs_per_step(resumed, original, steps=range(6, 12))
    print(f"{resumed.name}: steps 7-12 loss max rel err {loss_err:.3g}, final weights {weight_err:.3g}")
    return {"loss": loss_err, "weights": weight_err}


def same_pairs_per_step(a, b, steps) -> bool:
    def split(out):
        rc = json.loads((out / "run_config.json").read_text())
        t, w, n = rc["run"]["train"], rc["world_size"], rc["train_pairs"]
        samplers = [RowSampler(n, t["micro_batch_size"], t["grad_accum"], w, r, t["seed"]) for r in range(w)]
        # every micro-batch of the step, in the order (accumulation step, rank): the same micro-batches
        # whatever the split, so the same sums
        return [[mb for a in range(t["grad_accum"]) for mb in [s.micro_batches(step)[a] for s in samplers]]
                for step in steps]

    return split(a) == split(b)


def test_two_rank_zero3_resumed_on_one_rank_continues_the_same_run(run, demo_assets, tiny_pretrained, tmp_path):
    assets = demo_assets | {"model": tiny_pretrained}
    out, log = resume(tmp_path, run, "torchrun_z3_w2", assets, "zero3", "python", 1, micro_batch_size=2)
    assert "grad_accum 1 -> 2" in log and "world_size 2 -> 1" in log
    rc = json.loads((out / "run_config.json").read_text())
    assert (rc["world_size"], rc["run"]["train"]["grad_accum"]) == (1, 2)
    assert rc["deepspeed"]["checkpoint"]["load_universal"] is True
    assert_continues(out, run("torchrun_z3_w2"))
    # the conversion is a verified checkpoint of its own, recording what it converted
    universal = out / "checkpoints" / "step_6" / "universal"
    ckpt.verify_manifest(universal)
    conv = json.loads((universal / "conversion.json").read_text())
    assert (conv["converted_from"], conv["world_size"], conv["step"]) == ("step_6", 2, 6)
    assert conv["loads_under_zero12"] is False  # a ZeRO-3 load: the states were not rewritten
    # the checkpoints written after the resume are ordinary 1-rank ones
    assert ckpt.CheckpointRecord.read(out / "checkpoints" / "step_12" / ckpt.META_FILE).world_size == 1


def test_one_rank_resumed_on_two_ranks_continues_the_same_run(run, demo_assets, tiny_pretrained, tmp_path):
    assets = demo_assets | {"model": tiny_pretrained}
    out, log = resume(tmp_path, run, "single_accum", assets, "zero2", "deepspeed", 2, micro_batch_size=2,
                      grad_accum=2)
    assert "grad_accum 2 -> 1" in log
    assert_continues(out, run("single_accum"))


@pytest.mark.parametrize("name,ds,change", [("ds_z2_w2", "zero3", "zero_stage 2 -> 3"),
                                             ("torchrun_z3_w2", "zero2", "zero_stage 3 -> 2")])
def test_a_checkpoint_resumed_under_the_other_zero_stage(run, demo_assets, tiny_pretrained, tmp_path, name, ds,
                                                         change):
    assets = demo_assets | {"model": tiny_pretrained}
    out, log = resume(tmp_path, run, name, assets, ds, "deepspeed", 2, micro_batch_size=2)
    assert change in log and "world_size" not in log.split(change)[0].rsplit("universal:", 1)[-1]
    assert_continues(out, run(name))


def test_a_universal_folder_consolidates_like_the_sharded_checkpoint(run, tmp_path):
    """Consolidation reads either form: step_6/universal/ gives step_6's weights, verified on its probe."""
    root = tmp_path / "checkpoints"
    shutil.copytree(run("torchrun_z3_w2") / "checkpoints" / "step_6", root / "step_6")
    info = convert(root / "step_6", root / "step_6" / UNIVERSAL)
    assert info["world_size"] == 2 and info["bytes"] > 0
    sharded = consolidate(root, tmp_path / "sharded.pt", "step_6", hf_out=None)
    universal = consolidate(root, tmp_path / "universal.pt", f"step_6/{UNIVERSAL}", hf_out=None)
    a = torch.load(tmp_path / "sharded.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "universal.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert universal["probe_max_abs_diff"] == sharded["probe_max_abs_diff"] <= universal["probe_tolerance"]
    # a damaged universal folder is refused like any checkpoint, and converted again by the next resume
    victim = next((root / "step_6" / UNIVERSAL / "zero").glob("*/exp_avg.pt"))
    victim.write_bytes(victim.read_bytes()[:-8])
    with pytest.raises(CheckpointError, match="exp_avg.pt has"):
        consolidate(root, tmp_path / "again.pt", f"step_6/{UNIVERSAL}", hf_out=None)


def test_a_global_batch_the_new_world_cannot_split_exits_2_naming_the_numbers(run, demo_assets, tiny_pretrained,
                                                                              tmp_path):
    out = tmp_path / "bad_split"
    from_step_6(run("torchrun_z3_w2"), out)  # global batch 4 = 2 x 1 x 2 ranks
    proc = train(out, train_args(tiny_pretrained, demo_assets["train"], demo_assets["test"], "zero3", **FLAGS,
                                 micro_batch_size=3), launcher="python", nprocs=1, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "global batch of 4 pairs" in proc.stderr and "micro_batch_size 3" in proc.stderr
    assert "micro_batch_size one of [1, 2, 4]" in proc.stderr and "Traceback" not in proc.stderr
    assert not (out / "checkpoints" / "step_6" / UNIVERSAL).exists()  # refused before anything was written
