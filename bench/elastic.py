#!/usr/bin/env python
"""What an elastic resume costs on a mid-size model: the universal conversion's time and disk (JSON out).

  1. train a ~0.3 B Llama (random init) for 2 steps under 2-rank ZeRO-3 on CPU with the real entry point,
     saving a checkpoint at every step;
  2. drop step_2, as if the job had been stopped after step 1, and rerun the same command on 1 rank:
     rank 0 converts step_1 with DeepSpeed's ds_to_universal into step_1/universal/ (train/elastic.py),
     loads it, and trains step 2 with grad_accum doubled;
  3. report the conversion's seconds (from its conversion.json), the bytes of the sharded checkpoint and of
     the universal folder, the resumed run's wall time, and step 2's loss in both runs.

    python bench/elastic.py                                        # ~0.3 B, fp32 (about 6 minutes on 2 cores)
    python bench/elastic.py --layers 2 --hidden 256 --vocab 8000   # seconds (the tests)
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, add_model_size, add_output, child_env, finish, free_port, mid_size_assets


def tree_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def run(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return time.perf_counter() - t0


def step_loss(out: Path, step: int) -> float:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return next(r["loss"] for r in rows if r["split"] == "train" and r["step"] == step)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_size(ap)
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    add_output(ap)
    a = ap.parse_args(argv)
    env, py = child_env(1, PYTHONPATH=str(ROOT)), sys.executable  # this checkout, wherever it lies
    with tempfile.TemporaryDirectory() as tmp:
        work = a.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        assets = mid_size_assets(work, a)
        flags = [str(ROOT / "launch" / "train_reward.py"), "--model", assets["model"], "--random_init", "--data",
                 assets["train"], "--test_data", assets["test"], "--ds_config", str(ROOT / "ds_configs" / "zero3.json"),
                 "--dtype", "fp32", "--max_steps", "2", "--save_every", "1", "--micro_batch_size", "1",
                 "--max_len", "32", "--no-hf_export", "--no-verify", "--seed", "3"]
        full, resumed = work / "two_ranks", work / "resumed_on_one"
        two = [str(Path(py).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port())]
        train_s = run(two + flags + ["--output_dir", str(full)], env)
        shutil.copytree(full / "checkpoints" / "step_1", resumed / "checkpoints" / "step_1")
        (resumed / "checkpoints" / "latest").write_text("step_1")
        resume_s = run([py] + flags + ["--output_dir", str(resumed)], env)
        step1 = resumed / "checkpoints" / "step_1"
        conv = json.loads((step1 / "universal" / "conversion.json").read_text())
        universal = tree_bytes(step1 / "universal")
        import torch

        art = torch.load(full / "reward.pt", map_location="cpu", weights_only=True, mmap=True)
        params = sum(v.numel() for v in art["state_dict"].values())
        del art
        la, lb = step_loss(full, 2), step_loss(resumed, 2)
        result = {
            "params": params, "dtype": "fp32", "from": "2-rank ZeRO-3", "to": "1 rank ZeRO-3 (grad_accum 2)",
            "train_2_steps_seconds": round(train_s, 1),
            "conversion_seconds": conv["seconds"],
            "sharded_checkpoint_bytes": tree_bytes(step1) - universal,
            "universal_bytes": universal,
            "universal_over_sharded": round(universal / (tree_bytes(step1) - universal), 3),
            "resumed_run_seconds": round(resume_s, 1),
            "step2_loss": {"uninterrupted": la, "resumed": lb, "rel_diff": abs(la - lb) / abs(la)},
        }
    return finish(result, a.output)


if __name__ == "__main__":
    main()
