#!/usr/bin/env python
"""K-wise rankings against the K-choose-2 pair split, in one run (JSON out).

The rows are UltraFeedback-shaped ({"instruction", "completions": [{"response", "overall_score"}]}), built
from the real HH-RLHF texts in ../shared/data: row i is HH pair i's prompt with four responses, pair i's
chosen and rejected and pair i+1's, scored 3, 0, 2, 1 (six ordered pairs per row). The backbone has
real-model proportions but is small (random init, fp32, a 2k BPE trained on the HH texts).

  1. `--objective ranking` trains on the rows: each response one sequence, run once per step;
  2. the same rows split into their six pairs train with `--objective pairs`: 12 sequences per row;
  Both see the same rows per step (ranking: micro rows; split: 6 x micro pairs) for `--rows` rows, one
  epoch, one process, ZeRO-2. Reported: sequences per step (counted by the trainer), seconds per step and
  per epoch (the first step left out as warm-up), ordered pairs and real tokens per second, and the
  ratios. Expected:
  about (K - 1) = 3x fewer sequences.

    python bench/objectives.py                    # 96 rows, H 256, 4 layers (~4 min, 2 cores)
    python bench/objectives.py --smoke            # seconds (the tests)
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from common import ROOT, add_output, bpe_tokenizer, child_env, finish, hh_pairs, llama_config

SCORES = (3, 0, 2, 1)


def uf_rows(pairs: list[dict], n: int) -> list[dict]:
    from rm_trainer.data.formats import split_hh

    split = [s for s in (split_hh(p["chosen"], p["rejected"]) for p in pairs) if s is not None]
    return [{"instruction": split[i][0], "completions": [
        {"response": text, "overall_score": score}
        for text, score in zip((split[i][1], split[i][2], split[i + 1][1], split[i + 1][2]), SCORES, strict=True)]}
        for i in range(n)]


def as_pairs(rows: list[dict]) -> list[dict]:
    return [{"prompt": r["instruction"], "chosen": a["response"], "rejected": b["response"]}
            for r in rows for a, b in itertools.permutations(r["completions"], 2)
            if a["overall_score"] > b["overall_score"]]


def run(work: Path, name: str, data: Path, flags: list[str], env: dict) -> dict:
    out = work / name
    cmd = [sys.executable, str(ROOT / "launch" / "train_reward.py"), "--data", str(data), "--output_dir", str(out),
           *flags]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{name} run failed:\n{p.stderr[-4000:]}")
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if s["split"] == "train"]
    return {"steps": len(steps), "sequences_per_step": steps[0]["sequences"], "timed": steps[1:]}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=96)
    ap.add_argument("--micro", type=int, default=4, help="rows per micro-batch (the split: 6 x as many pairs)")
    ap.add_argument("--accum", type=int, default=2)
    ap.add_argument("--max_len", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, for the tests")
    add_output(ap)
    a = ap.parse_args(argv)
    if a.smoke:
        a.rows, a.micro, a.accum, a.max_len, a.hidden, a.layers = 16, 2, 2, 64, 64, 2
    k = len(SCORES)
    result: dict = {"rows": a.rows, "responses_per_row": k, "pairs_per_row": k * (k - 1) // 2, "micro_rows": a.micro,
                    "accum": a.accum, "max_len": a.max_len, "hidden": a.hidden, "layers": a.layers,
                    "threads": a.threads}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pairs = hh_pairs()
        tok = bpe_tokenizer(pairs, work / "model")
        llama_config(len(tok), a.hidden, a.layers, 2 * a.max_len).save_pretrained(work / "model")
        rows = uf_rows(pairs, a.rows)
        (work / "uf.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (work / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in as_pairs(rows)))
        common = ["--model", str(work / "model"), "--random_init", "--test_fraction", "0", "--max_len",
                  str(a.max_len), "--dtype", "fp32", "--ds_config", str(ROOT / "ds_configs" / "zero2.json"),
                  "--grad_accum", str(a.accum), "--lr", "1e-4", "--warmup_steps", "0", "--seed", "1",
                  "--max_drop_fraction", "0.5", "--no-hf_export", "--no-verify", "--no-tensorboard"]
        env = child_env(a.threads)
        ranked = run(work, "ranking", work / "uf.jsonl",
                     common + ["--objective", "ranking", "--micro_batch_size", str(a.micro)], env)
        split = run(work, "split", work / "pairs.jsonl",
                    common + ["--micro_batch_size", str(a.micro * k * (k - 1) // 2)], env)
    rows_per_step = a.micro * a.accum
    for name, r, seconds in (("ranking", ranked, lambda s: rows_per_step / s["prompts_per_s"]),
                             ("pair_split", split, lambda s: rows_per_step * 6 / s["pairs_per_s"])):
        step_s = float(np.mean([seconds(s) for s in r["timed"]]))
        result[name] = {"steps_per_epoch": r["steps"], "sequences_per_step": r["sequences_per_step"],
                        "sequences_per_row": r["sequences_per_step"] / rows_per_step,
                        "seconds_per_step": round(step_s, 4), "seconds_per_epoch": round(step_s * r["steps"], 3),
                        "pairs_per_s": round(float(np.mean([s["pairs_per_s"] for s in r["timed"]])), 2),
                        "tokens_per_s": round(float(np.mean([s["tokens_per_s"] for s in r["timed"]])), 1)}
    rk, sp = result["ranking"], result["pair_split"]
    result["sequences_ratio_split_over_ranking"] = sp["sequences_per_step"] / rk["sequences_per_step"]
    result["epoch_time_ratio_split_over_ranking"] = round(sp["seconds_per_epoch"] / rk["seconds_per_epoch"], 3)
    result["pairs_per_s_ratio_ranking_over_split"] = round(rk["pairs_per_s"] / sp["pairs_per_s"], 3)
    result["tokens_per_s_ratio_ranking_over_split"] = round(rk["tokens_per_s"] / sp["tokens_per_s"], 3)
    return finish(result, a.output)


if __name__ == "__main__":
    main()
