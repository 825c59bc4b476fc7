#!/usr/bin/env python
"""Host memory of the end of a run, on a mid-size model: peak RSS of consolidation, loading and HF export,
each in its own process, over the bytes of the artifact's weights (JSON out).

  1. train a ~0.3 B Llama (random init) for one step under 2-rank ZeRO-3 on CPU, with the real entry
     point, so the checkpoint is a real DeepSpeed one;
  2. consolidate:  rm-consolidate --checkpoint_dir CKPT --output reward.pt      (merge + verify)
     end_of_run:   the same plus --hf_output_dir (what rank 0 does at the end of training)
     load:         load_reward_model(reward.pt) + score the probe batch (every weight is touched)
     export:       rm-export-hf --model reward.pt --output_dir hf --hf_shard_size 200MB
     baseline:     python importing the same modules and nothing else (interpreter + torch + transformers)
  3. check the issue's bounds: consolidate <= 1.5 x W + 1 GiB, load <= 1.2 x W + 1 GiB (W = weight bytes).

Peak RSS is the kernel's ru_maxrss of each child (memory-mapped file pages that were read count too).

    python bench/artifact_memory.py                        # ~0.3 B, fp32 (about 3 minutes on 2 cores)
    python bench/artifact_memory.py --layers 2 --hidden 256 --vocab 8000   # seconds (the tests)
    python bench/artifact_memory.py --code /path/to/other/checkout          # another checkout (this layout)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import GIB, ROOT, add_model_size, add_output, child_env, finish, free_port, mid_size_assets


def peak_rss(cmd: list[str], env: dict, cwd: Path) -> tuple[int, float, str]:
    """(peak RSS in bytes, seconds, output) of one child process."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        p = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        out = log.read()
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{out[-4000:]}")
    return usage.ru_maxrss * 1024, time.perf_counter() - t0, out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_size(ap)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--hf_shard_size", "--shard_size", dest="hf_shard_size", default="200MB")
    ap.add_argument("--code", type=Path, default=ROOT, help="rm_trainer checkout to measure (default: this one)")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    add_output(ap)
    a = ap.parse_args(argv)
    code = a.code.resolve()
    env = child_env(1, PYTHONPATH=str(code))
    py = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        work = a.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        # ---- a real checkpoint of a mid-size model
        assets = mid_size_assets(work, a)
        run = work / "run"
        train_cmd = [str(Path(py).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
                     str(code / "launch" / "train_reward.py"), "--model", assets["model"], "--random_init",
                     "--data", assets["train"], "--test_data", assets["test"], "--ds_config",
                     str(code / "ds_configs" / "zero3.json"), "--dtype", a.dtype, "--max_steps", "1",
                     "--micro_batch_size", "1", "--max_len", "32", "--output_dir", str(run), "--no-hf_export",
                     "--no-verify"]
        _, train_s, _ = peak_rss(train_cmd, env, code)
        ckpt = run / "checkpoints"
        import torch

        art = torch.load(run / "reward.pt", map_location="cpu", weights_only=True, mmap=True)
        weight_bytes = sum(v.numel() * v.element_size() for v in art["state_dict"].values())
        params = sum(v.numel() for v in art["state_dict"].values())
        del art

        # ---- the end-of-run commands, each in a fresh process
        imports = ("import torch, transformers, deepspeed, accelerate, rm_trainer.artifact.consolidate, "
                   "rm_trainer.artifact.hf_export")
        load = ("import sys, torch; from rm_trainer import load_reward_model; m = load_reward_model(sys.argv[1]); "
                "a = torch.load(sys.argv[1], weights_only=True, mmap=True)['probe']; "
                "torch.no_grad().__enter__(); print(m(a['input_ids'], a['seq_lengths']))")
        consolidate = [py, "-m", "rm_trainer.cli.consolidate", "--checkpoint_dir", str(ckpt), "--output"]
        cmds = {
            "baseline": [py, "-c", imports],
            "consolidate": consolidate + [str(work / "a.pt")],
            "load": [py, "-c", load, str(work / "a.pt")],
            "export": [py, "-m", "rm_trainer.cli.export_hf", "--model", str(work / "a.pt"), "--output_dir",
                       str(work / "hf"), "--hf_shard_size", a.hf_shard_size],
            "end_of_run": consolidate + [str(work / "b.pt"), "--hf_output_dir", str(work / "hf2"), "--hf_shard_size",
                                         a.hf_shard_size],
        }
        result = {"params": params, "weight_bytes": weight_bytes, "dtype": a.dtype, "code": str(code),
                  "train_seconds": round(train_s, 1), "runs": {}}
        for name, cmd in cmds.items():
            rss, secs, _ = peak_rss(cmd, env, code)
            result["runs"][name] = {"peak_rss_gib": round(rss / GIB, 3), "over_weights": round(rss / weight_bytes, 3),
                                    "seconds": round(secs, 1)}
        hf = work / "hf"
        result["hf_files"] = sorted(p.name for p in hf.glob("*.safetensors*"))
        from transformers import AutoModelForSequenceClassification

        _, info = AutoModelForSequenceClassification.from_pretrained(hf, output_loading_info=True)
        result["hf_loads_cleanly"] = not info["missing_keys"] and not info["unexpected_keys"]
    r, w = result["runs"], weight_bytes
    result["bounds"] = {
        "consolidate <= 1.5 W + 1 GiB": r["consolidate"]["peak_rss_gib"] * GIB <= 1.5 * w + GIB,
        "load <= 1.2 W + 1 GiB": r["load"]["peak_rss_gib"] * GIB <= 1.2 * w + GIB,
    }
    result["bounds"]["end_of_run <= 1.5 W + 1 GiB"] = r["end_of_run"]["peak_rss_gib"] * GIB <= 1.5 * w + GIB
    result["bounds_met"] = all(result["bounds"].values())
    return finish(result, a.output)


if __name__ == "__main__":
    main()
