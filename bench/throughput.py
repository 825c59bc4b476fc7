#!/usr/bin/env python
"""Throughput of random, grouped and packed batching, of shared prompts (each pair's prompt once), and of the
default, on real preference data, in one run (JSON out).

The data are the 2,312 real HH-RLHF pairs in ../shared/data with a 2k byte-level BPE trained locally on
them, max_len 512. The backbone has real-model proportions but is small (H 512, 4 layers, GQA 8/2,
random init, fp32): with a toy H attention dominates and hides what padding costs at scale.

  1. padding efficiency (real tokens / token slots computed) and the real tokens forwarded, of each mode over
     a whole epoch of global batches, from the batching code alone;
  2. each mode trains `--steps` steps through the real entry point (one process, ZeRO-2, the same seed,
     so the same initial weights and the same global batches); pairs/s and real tokens/s are the
     trainer's own per-step figures (metrics.jsonl), the first step left out as warm-up;
  3. ratios over random, the loss trajectories' largest difference (they must agree), and the targets.

    python bench/throughput.py                    # 256 pairs per step, 3 steps per mode (~15 min, 2 cores)
    python bench/throughput.py --smoke            # seconds (the tests)
    python bench/throughput.py --accum 1 --steps 12   # one micro-batch of 8 pairs per step: grouping cannot help
    python bench/throughput.py --hidden 2048 --layers 16 --max_len 2048 --pack_len 4096 --dtype bf16  # GPU suite
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from common import ROOT, SHARED_HH, add_output, bpe_tokenizer, child_env, finish, hh_pairs, llama_config

# "default": no batching flag at all, what a new user gets (--packing auto, --share_prompt auto)
OFF = ["--share_prompt", "off"]
MODES = {"random": ["--batching", "random", "--no-packing", *OFF],
         "grouped": ["--batching", "grouped", "--no-packing", *OFF], "packed": ["--packing", *OFF],
         "shared": ["--batching", "grouped", "--no-packing", "--share_prompt", "auto"],
         "shared_packed": ["--packing", "--share_prompt", "auto"], "default": []}
TARGETS = {"grouped efficiency >= 0.85": ("grouped", "efficiency", 0.85, 1),
           "packed efficiency >= 0.95": ("packed", "efficiency", 0.95, 1),
           "grouped tokens/s >= 1.5x random": ("grouped", "tokens_per_s_ratio", 1.5, 1),
           "packed tokens/s >= 1.8x random": ("packed", "tokens_per_s_ratio", 1.8, 1),
           "shared tokens/epoch <= 0.70x packed": ("shared", "epoch_tokens_vs_packed", 0.70, -1),
           "shared pairs/s >= 1.3x packed": ("shared", "pairs_per_s_vs_packed", 1.3, 1)}


def epoch_efficiency(rows: list[dict], objective, micro: int, accum: int, seed: int, mode: str, pack_len: int,
                     rule) -> tuple[float, int]:
    """(real tokens / slots, real tokens forwarded) over one epoch of `mode`'s batches (rule: the shared
    prompts' ShareRule of the model, for the shared modes and the default)."""
    from rm_trainer.data.batching import RowSampler

    packing = mode in ("packed", "shared_packed", "default")
    share = rule if mode in ("shared", "shared_packed", "default") else None
    longest, tokens = (np.array([r["segment" if share else k] for r in rows]) for k in ("longest", "tokens"))
    s = RowSampler(len(rows), micro, accum, 1, 0, seed, "random" if mode == "random" else "grouped", packing,
                   longest, tokens)
    real = slots = 0
    for step in range(s.steps_per_epoch):
        for idx in s.micro_batches(step):
            b = objective.collate([rows[i] for i in idx], 0, pack_len, packing, share=share)
            real += b.seqs.tokens
            slots += b.seqs.slots
    return real / slots, real


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--micro", type=int, default=8, help="pairs per micro-batch")
    ap.add_argument("--accum", type=int, default=32, help="micro-batches per step (global batch = micro x accum)")
    ap.add_argument("--steps", type=int, default=3, help="steps per mode; the first is warm-up")
    ap.add_argument("--max_len", type=int, default=512)
    ap.add_argument("--pack_len", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--dtype", default="fp32", help="fp32 (CPU) or bf16 (the GPU suite)")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES),
                    help="which modes (random and packed are always run: the ratios are over them)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, for the tests")
    add_output(ap)
    a = ap.parse_args(argv)
    if a.smoke:
        a.micro, a.accum, a.steps, a.max_len, a.pack_len, a.hidden, a.layers = 4, 2, 2, 128, 256, 64, 2
    from transformers import AutoConfig

    from rm_trainer import objectives
    from rm_trainer.cli.train_flags import load_run_config
    from rm_trainer.data.segments import ShareRule
    from rm_trainer.data.sources import prepare_sources
    from rm_trainer.data.tokenize import load_tokenizer

    seed = 1
    result: dict = {"micro": a.micro, "accum": a.accum, "global_batch": a.micro * a.accum, "max_len": a.max_len,
                    "pack_len": a.pack_len, "hidden": a.hidden, "layers": a.layers, "threads": a.threads, "modes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tok = bpe_tokenizer(hh_pairs(), work / "model")
        llama_config(len(tok), a.hidden, a.layers, 2 * a.pack_len).save_pretrained(work / "model")
        flags = ["--model", str(work / "model"), "--random_init", "--data", str(SHARED_HH), "--test_fraction", "0",
                 "--max_len", str(a.max_len), "--max_drop_fraction", "0.5", "--seed", str(seed),
                 "--cache_dir", str(work / "cache")]
        cfg, _ = load_run_config(flags + ["--output_dir", str(work / "x")])
        objective = objectives.build(cfg)
        ds = prepare_sources(cfg, load_tokenizer(cfg), objective, work_dir=str(work / "scratch"))[0][:]
        rows = [dict(zip(ds, v, strict=True)) for v in zip(*ds.values(), strict=True)]
        result["pairs"] = len(rows)
        result["real_tokens_per_pair"] = round(float(np.mean([r["tokens"] for r in rows])), 1)
        result["shared_tokens_per_pair"] = round(float(np.mean([r["segment"] for r in rows])), 1)
        rule = ShareRule.of(AutoConfig.from_pretrained(work / "model"))
        env = child_env(a.threads)
        for mode, extra in MODES.items():
            if mode not in a.modes and mode not in ("random", "packed"):
                continue
            out = work / mode
            cmd = [sys.executable, str(ROOT / "launch" / "train_reward.py"), *flags, "--output_dir", str(out),
                   "--dtype", a.dtype, "--ds_config", str(ROOT / "ds_configs" / "zero2.json"), "--micro_batch_size",
                   str(a.micro), "--grad_accum", str(a.accum), "--max_steps", str(a.steps), "--lr", "1e-4",
                   "--warmup_steps", "0", "--pack_len", str(a.pack_len), "--no-hf_export", "--no-verify",
                   "--no-tensorboard", *extra]
            p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
            if p.returncode != 0:
                raise RuntimeError(f"{mode} run failed:\n{p.stderr[-4000:]}")
            steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            steps = [s for s in steps if s["split"] == "train"]
            timed = steps[1:]  # the first step pays for warm-up
            if mode in ("shared", "shared_packed") and "shared prompts on" not in p.stdout:
                raise RuntimeError(f"{mode}: the run did not share its prompts:\n{p.stdout[-3000:]}")
            efficiency, epoch_tokens = epoch_efficiency(rows, objective, a.micro, a.accum, seed, mode, a.pack_len, rule)
            result["modes"][mode] = {
                "efficiency": round(efficiency, 4), "epoch_tokens": epoch_tokens,
                "efficiency_timed_steps": round(float(np.mean([s["padding_efficiency"] for s in timed])), 4),
                "pairs_per_s": round(float(np.mean([s["pairs_per_s"] for s in timed])), 3),
                "tokens_per_s": round(float(np.mean([s["tokens_per_s"] for s in timed])), 1),
                "losses": [s["loss"] for s in steps]}
    m = result["modes"]
    for mode in m:
        m[mode]["tokens_per_s_ratio"] = round(m[mode]["tokens_per_s"] / m["random"]["tokens_per_s"], 3)
        m[mode]["pairs_per_s_vs_packed"] = round(m[mode]["pairs_per_s"] / m["packed"]["pairs_per_s"], 3)
        m[mode]["epoch_tokens_vs_packed"] = round(m[mode]["epoch_tokens"] / m["packed"]["epoch_tokens"], 4)
    result["max_loss_difference"] = max(abs(x - y) for mode in m for x, y in
                                        zip(m[mode]["losses"], m["random"]["losses"], strict=True))
    result["targets"] = {name: sign * m[mode][key] >= sign * bar for name, (mode, key, bar, sign) in TARGETS.items()
                         if mode in m}
    result["all_targets_met"] = all(result["targets"].values())
    return finish(result, a.output)


if __name__ == "__main__":
    main()
