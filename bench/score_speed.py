#!/usr/bin/env python
"""rm-score's batching: rows/s with length-sorted vs input-order token-budgeted batches, and best-of-8 rows with
and without shared prompts (JSON out).

Rows are the real HH-RLHF pairs in ../shared/data, each chosen and each rejected response scored as a
(prompt, response) row, tokenized exactly as rm-score does (data.tokenize.encode_item) with a 2k byte-level BPE
trained locally on them, max_len 512. The reward model has real-model proportions but is small (H 512,
4 layers, GQA 8/2, random init, fp32). Both modes score the same rows with the same --max_batch_tokens
through model.score_sequences (rm-score's own code), in one process; their rewards must agree.

Best-of-8: --groups prompts of the real pairs, each with 8 responses (its own two and six of other
conversations, as a policy's samples differ), scored as rm-score scores a `responses` row: the prompt once
per group (data.segments, the model's ShareRule), or every response its own sequence. Target: shared
rows/s >= 1.8x; rewards within 1e-5 relative.

    python bench/score_speed.py               # 1,024 rows and 128 groups of 8 (~5 min on 2 cores)
    python bench/score_speed.py --smoke       # seconds (the tests)
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from pathlib import Path

from common import add_output, bpe_tokenizer, finish, hh_pairs, llama_config


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--groups", type=int, default=128, help="best-of-8 prompts")
    ap.add_argument("--max_len", type=int, default=512)
    ap.add_argument("--max_batch_tokens", type=int, default=8192)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, for the tests")
    add_output(ap)
    a = ap.parse_args(argv)
    if a.smoke:
        a.rows, a.groups, a.max_len, a.max_batch_tokens, a.hidden, a.layers = 64, 8, 128, 1024, 64, 2
    import torch
    from transformers import AutoModel

    from rm_trainer.data.batching import token_budget_batches
    from rm_trainer.data.formats import split_hh
    from rm_trainer.data.tokenize import encode_item, special_prefix
    from rm_trainer.model.reward import RewardModel
    from rm_trainer.model.scoring import score_sequences

    torch.set_num_threads(a.threads)
    hh = hh_pairs()
    with tempfile.TemporaryDirectory() as tmp:
        tok = bpe_tokenizer(hh, Path(tmp) / "tok")
    items, splits = [], []
    for r in hh:
        split = split_hh(r["chosen"], r["rejected"])
        if split is not None and split[1].strip() and split[2].strip():
            items += [(split[0], split[1]), (split[0], split[2])]
            splits.append(split)
    random.Random(0).shuffle(items)  # a scoring file in no particular length order
    items = items[:a.rows]
    prefix = special_prefix(tok)
    seqs = [encode_item(tok, it, a.max_len, prefix) for it in items]
    torch.manual_seed(0)
    model = RewardModel(AutoModel.from_config(llama_config(len(tok), a.hidden, a.layers, a.max_len))).eval()
    model.pad_token_id = tok.pad_token_id
    result: dict = {"rows": len(seqs), "max_len": a.max_len, "max_batch_tokens": a.max_batch_tokens,
                    "hidden": a.hidden, "layers": a.layers, "threads": a.threads,
                    "real_tokens": sum(len(s) for s in seqs), "modes": {}}
    rewards = {}
    score_sequences(model, seqs[:8], a.max_batch_tokens)  # warm-up
    for mode, sort in (("unsorted", False), ("sorted", True)):
        batches = token_budget_batches([len(s) for s in seqs], a.max_batch_tokens, sort)
        slots = sum(max(len(seqs[i]) for i in b) * len(b) for b in batches)
        t0 = time.perf_counter()
        rewards[mode] = score_sequences(model, seqs, a.max_batch_tokens, sort=sort)
        seconds = time.perf_counter() - t0
        result["modes"][mode] = {"seconds": round(seconds, 3), "rows_per_s": round(len(seqs) / seconds, 2),
                                 "forwards": len(batches),
                                 "padding_efficiency": round(result["real_tokens"] / slots, 4)}
    m = result["modes"]
    result["sorted_over_unsorted_rows_per_s"] = round(m["sorted"]["rows_per_s"] / m["unsorted"]["rows_per_s"], 3)
    diff = (rewards["sorted"] - rewards["unsorted"]).abs().max().item()
    result["max_reward_difference"] = diff
    result["rewards_agree"] = diff <= 1e-4 * max(1.0, rewards["sorted"].abs().max().item())
    result["best_of_8"] = best_of_8(model, tok, splits, a)
    return finish(result, a.output)


def best_of_8(model, tok, splits: list, a) -> dict:
    """Groups of one prompt and 8 responses, scored with and without shared prompts (module docstring)."""
    from rm_trainer.data.segments import ShareRule
    from rm_trainer.data.tokenize import encode_item, special_prefix
    from rm_trainer.model.scoring import Forwarded, score_sequences

    rng = random.Random(1)
    items, keys = [], []
    for g, (prompt, c, r) in enumerate(splits[:a.groups]):
        others = [x for s in rng.sample(splits, 3) for x in s[1:]]
        items += [(prompt, x) for x in (c, r, *others)]
        keys += [g] * 8
    prefix = special_prefix(tok)
    seqs = [encode_item(tok, it, a.max_len, prefix) for it in items]
    out: dict = {"groups": a.groups, "rows": len(seqs), "real_tokens": sum(map(len, seqs)), "modes": {}}
    rewards = {}
    for mode, share in (("unshared", None), ("shared", ShareRule.of(model.config))):
        count = Forwarded()
        t0 = time.perf_counter()
        rewards[mode] = score_sequences(model, seqs, a.max_batch_tokens, share=share, keys=keys, on_forward=count.add)
        seconds = time.perf_counter() - t0
        out["modes"][mode] = {"seconds": round(seconds, 3), "rows_per_s": round(len(seqs) / seconds, 2),
                              "tokens_forwarded": count.forwarded}
    m = out["modes"]
    out["shared_over_unshared_rows_per_s"] = round(m["shared"]["rows_per_s"] / m["unshared"]["rows_per_s"], 3)
    out["tokens_ratio"] = round(m["shared"]["tokens_forwarded"] / m["unshared"]["tokens_forwarded"], 4)
    err = float((rewards["shared"] - rewards["unshared"]).abs().max() / rewards["unshared"].abs().max())
    out["max_relative_reward_difference"] = err
    out["targets"] = {"shared rows/s >= 1.8x": out["shared_over_unshared_rows_per_s"] >= 1.8,
                      "rewards within 1e-5 relative": err <= 1e-5}
    return out


if __name__ == "__main__":
    main()
