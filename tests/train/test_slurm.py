"""The real sbatch script on a real 2-node slurm cluster (see support/slurm_cluster.py), and preemption.

Skipped with the reason when slurm cannot be installed here (no root / no apt); in CI it runs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import ROOT, load_artifact, metrics, train, train_args
from support.slurm_cluster import Cluster, ensure_installed

pytestmark = pytest.mark.slow
SBATCH = ROOT / "launch" / "slurm" / "train_reward.sbatch"
STEPS = 40


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = ensure_installed()
    if reason:
        pytest.skip(reason)
    c = Cluster(Path(tmp_path_factory.mktemp("slurm")))
    c.start()
    yield c
    c.stop()


def args(demo_assets, model, out):
    return train_args(model, demo_assets["train"], demo_assets["test"], "zero3", dtype="fp32", lr=1e-3,
                      max_steps=STEPS, max_len=64, seed=5, micro_batch_size=2, eval_every=20, save_every=10,
                      output_dir=out)


def submit(cluster, log_dir: Path, run_args: list[str], wait: bool, sbatch: tuple = ()) -> tuple[int, str]:
    env = (f"ALL,PYTHON={sys.executable},NPROC_PER_NODE=1,OMP_NUM_THREADS=1,HF_HUB_OFFLINE=1,"
           "TOKENIZERS_PARALLELISM=false")
    cmd = ["sbatch", "--parsable", "--gpus-per-node=0", f"--export={env}", f"--output={log_dir}/slurm-%j.out",
           f"--chdir={ROOT}", *sbatch] + (["--wait"] if wait else []) + [str(SBATCH)] + run_args
    p = cluster.run(cmd, timeout=900)
    job = int(re.match(r"\d+", p.stdout.strip()).group()) if p.stdout.strip() else -1
    return job, p.stdout + p.stderr


def job_state(cluster, job: int) -> dict[str, str]:
    out = cluster.run(["scontrol", "show", "job", str(job), "-o"]).stdout
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in metrics(out)]


@pytest.fixture(scope="module")
def two_node_run(cluster, demo_assets, tiny_pretrained, tmp_path_factory):
    d = tmp_path_factory.mktemp("slurm_run")
    start = time.time()
    job, text = submit(cluster, d, args(demo_assets, tiny_pretrained, d / "out"), wait=True)
    # two nodes append to one log, so a multi-byte character (tqdm's bar) can be split: replace it
    log = (d / f"slurm-{job}.out").read_text(errors="replace") if job > 0 else text
    return d / "out", log, time.time() - start


def test_two_node_job_trains_and_matches_a_single_node_run(two_node_run, demo_assets, tiny_pretrained, tmp_path):
    out, log, wall = two_node_run
    print(f"2-node slurm job wall time {wall:.1f}s")
    assert (out / "reward.pt").is_file(), log[-4000:]
    assert "nodes n[1-2], 1 rank(s) per node" in log
    cfg = json.loads((out / "run_config.json").read_text())
    assert cfg["world_size"] == 2
    final = json.loads((out / "final_metrics.json").read_text())
    assert final["reward_pt"]["probe_max_abs_diff"] <= 1e-5  # reward.pt verifies against the engine
    single = tmp_path / "single"
    train(single, args(demo_assets, tiny_pretrained, single)[:-2], launcher="torchrun", nprocs=2)
    la, lb = losses(out), losses(single)
    assert len(la) == len(lb) == STEPS
    diff = max(abs(x - y) for x, y in zip(la, lb, strict=True))
    print(f"2 nodes x 1 rank vs 1 node x 2 ranks: max |dloss| {diff:.3g}")
    assert diff <= 1e-5
    ea, eb = metrics(out, "eval")[-1], metrics(single, "eval")[-1]
    assert abs(ea["loss"] - eb["loss"]) <= 1e-5 and ea["acc"] == eb["acc"]


def preempt(cluster, tmp_path, run_args, out, shrink: bool = False) -> tuple[int, str]:
    """Submit to both nodes, signal USR1 once step 2 is logged (what slurm does before a time limit with
    --signal=B:USR1@lead), and wait (bounded) until the job has completed after its restart. shrink: drain n2
    as the job stops, so the requeued job waits for 2 nodes, then let it take the 1 left (an operator's
    `scontrol update NumNodes=1 NumTasks=1`; a job submitted with --nodes=1-2 is scheduled onto whatever is free).
    Returns the step it stopped at and the job's log."""
    job, text = submit(cluster, tmp_path, run_args, wait=False)
    assert job > 0, text
    deadline = time.time() + 300
    while not ((out / "metrics.jsonl").exists() and any(r["step"] >= 2 for r in metrics(out))):
        assert time.time() < deadline, "job never started training"
        time.sleep(0.2)
    if shrink:
        assert cluster.run(["scontrol", "update", "NodeName=n2", "State=DRAIN", "Reason=test"]).returncode == 0
    p = cluster.run(["scancel", "--signal=USR1", "--batch", str(job)])
    assert p.returncode == 0, p.stderr
    try:
        while (state := job_state(cluster, job)).get("JobState") != "COMPLETED" or state.get("Restarts") == "0":
            assert time.time() < deadline + 300, f"job did not finish after requeue: {state}"
            assert state.get("JobState") not in ("FAILED", "CANCELLED", "TIMEOUT"), state
            if shrink and state.get("JobState") == "PENDING" and state.get("NumTasks") == "2":
                p = cluster.run(["scontrol", "update", f"JobId={job}", "NumNodes=1", "NumTasks=1"])
                assert p.returncode == 0, p.stderr
            time.sleep(0.5)
    finally:
        if shrink:
            cluster.run(["scontrol", "update", "NodeName=n2", "State=RESUME"])
    log = (tmp_path / f"slurm-{job}.out").read_text(errors="replace")
    m = re.search(r"preempted at \{\"step\": (\d+)", log)
    assert m, log[-4000:]
    stopped = int(m.group(1))
    assert 2 <= stopped < STEPS and "restart 1" in log and f"resumed from {out}/checkpoints/step_{stopped}" in log
    assert not list(Path(ROOT).glob(f".rm_trainer_preempted_{job}"))
    return stopped, log


def test_preemption_saves_requeues_resumes_and_finishes_identically(cluster, two_node_run, demo_assets,
                                                                   tiny_pretrained, tmp_path):
    reference, _, _ = two_node_run
    out = tmp_path / "out"
    start = time.time()
    preempt(cluster, tmp_path, args(demo_assets, tiny_pretrained, out), out)
    print(f"preempted slurm job wall time {time.time() - start:.1f}s")
    assert losses(out) == losses(reference)  # every step once, equal to the uninterrupted job
    a, b = load_artifact(out)["state_dict"], load_artifact(reference)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_job_preempted_on_two_nodes_resumes_on_the_one_it_gets(cluster, two_node_run, demo_assets,
                                                                 tiny_pretrained, tmp_path):
    """n2 is drained while the job stops, and the requeued job runs on n1 alone: an elastic resume (2 ranks ->
    1, grad_accum doubled) of the same global batch and data order."""
    reference, _, _ = two_node_run
    out = tmp_path / "out"
    stopped, log = preempt(cluster, tmp_path, args(demo_assets, tiny_pretrained, out), out, shrink=True)
    assert "nodes n[1-2], 1 rank(s) per node" in log and "restart 1: nodes n1, 1 rank(s) per node" in log
    la, lb = losses(out), losses(reference)
    assert len(la) == len(lb) == STEPS and la[:stopped] == lb[:stopped]
    diff = max(abs(x - y) / abs(y) for x, y in zip(la, lb, strict=True))
    print(f"slurm 2 nodes -> 1 after step {stopped}: max rel |dloss| {diff:.3g}")
    assert diff <= 1e-5
    a, b = load_artifact(out)["state_dict"], load_artifact(reference)["state_dict"]
    assert max(((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-12)).item() for k in a) <= 1e-5


def test_teardown_kills_only_what_it_started(tmp_path):
    reason = ensure_installed()
    if reason:
        pytest.skip(reason)
    c = Cluster(tmp_path / "c")
    (tmp_path / "c").mkdir()
    c.start()
    pids = list(c.pids)
    assert len(pids) == 4 and all(os.path.exists(f"/proc/{p}") for p in pids)
    c.stop()
    time.sleep(0.5)
    alive = [p for p in pids if os.path.exists(f"/proc/{p}") and "Z" not in
             open(f"/proc/{p}/stat").read().split()[2]]
    assert not alive
    shutil.rmtree(tmp_path / "c", ignore_errors=True)
