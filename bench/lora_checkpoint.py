#!/usr/bin/env python
"""How big a LoRA checkpoint is on a mid-size model, under ZeRO-2 and ZeRO-3 (JSON out).

Trains a ~0.3 B Llama (random init) with LoRA for one step on 2 CPU ranks through the real entry point and
sums the files of its checkpoint, by kind (DeepSpeed's model-states and optimizer files, the rest). Run it
against another checkout with --code to compare (e.g. before exclude_frozen_parameters).

    python bench/lora_checkpoint.py                                        # ~0.3 B (about 4 minutes on 2 cores)
    python bench/lora_checkpoint.py --code /path/to/older/checkout
    python bench/lora_checkpoint.py --layers 2 --hidden 256 --vocab 8000   # seconds
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, add_model_size, add_output, child_env, finish, free_port, mid_size_assets


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_size(ap)
    ap.add_argument("--lora_r", type=int, default=16)
    ap.add_argument("--code", type=Path, default=ROOT, help="rm_trainer checkout to measure (default: this one)")
    add_output(ap)
    a = ap.parse_args(argv)
    code = a.code.resolve()
    env, py = child_env(1, PYTHONPATH=str(code)), sys.executable
    result = {"code": str(code), "lora_r": a.lora_r, "stages": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        assets = mid_size_assets(work, a)
        from transformers import AutoConfig, AutoModel

        AutoModel.from_config(AutoConfig.from_pretrained(assets["model"])).save_pretrained(work / "sft")
        for stage in ("zero2", "zero3"):
            out = work / stage
            cmd = [str(Path(py).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
                   str(code / "launch" / "train_reward.py"), "--model", str(work / "sft"), "--tokenizer",
                   assets["model"], "--data", assets["train"], "--test_data", assets["test"], "--ds_config",
                   str(code / "ds_configs" / f"{stage}.json"), "--dtype", "bf16", "--max_steps", "1",
                   "--micro_batch_size", "1", "--max_len", "32", "--lora_r", str(a.lora_r), "--output_dir",
                   str(out), "--no-hf_export", "--no-verify"]
            p = subprocess.run(cmd, env=env, cwd=code, capture_output=True, text=True)
            if p.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
            files = [f for f in (out / "checkpoints" / "step_1").rglob("*") if f.is_file()]
            kind = {"model_states": 0, "optim_states": 0, "other": 0}
            for f in files:
                k = next((k for k in ("model_states", "optim_states") if f.name.endswith(f"_{k}.pt")), "other")
                kind[k] += f.stat().st_size
            result["stages"][stage] = {"checkpoint_bytes": sum(kind.values()), **{f"{k}_bytes": v for k, v in
                                                                                 kind.items()}}
        import torch

        art = torch.load(work / "zero2" / "reward.pt", map_location="cpu", weights_only=True, mmap=True)
        result["params"] = sum(v.numel() for v in art["state_dict"].values())
        result["weight_bytes_bf16"] = sum(v.numel() * v.element_size() for v in art["state_dict"].values())
    return finish(result, a.output)


if __name__ == "__main__":
    main()
