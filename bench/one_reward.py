#!/usr/bin/env python
"""Is a reward one function of (prompt, response)? rm-eval's per-response rewards and per-subset
accuracies against score_texts' (= rm-score's = rm-serve's), with each truncation policy. (JSON out)

A tiny Llama is trained for a few steps through the real entry point on real HH-RLHF pairs at
max_len 128 (bench/hf_consumers.train). The evaluation file has RewardBench v1's schema: 36 held-out HH
pairs, split into prompt / chosen / rejected, in six 6-pair subsets, most of them longer than max_len.
  pair     rm-eval --truncation pair: the loss's view (what rm-eval did before: a prompt too long for the
           longer side is cut for both sides, so a response's reward depends on its partner)
  single   rm-eval's default: each response on its own, as score_texts, rm-score and rm-serve score it

    python bench/one_reward.py            # ~1 min on 2 cores
    python bench/one_reward.py --smoke    # 2 training steps (the tests)
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path

from common import add_output, finish, hh_pairs
from hf_consumers import diff, train

SUBSETS = ("alpacaeval-easy", "mt-bench-hard", "refusals-dangerous", "math-prm", "hep-python", "xstest-should-respond")


def rewardbench_rows(pairs: list[dict], n: int) -> list[dict]:
    from rm_trainer.data.formats import split_hh

    rows = []
    for r in pairs:
        s = split_hh(r["chosen"], r["rejected"])
        if s and s[1].strip() and s[2].strip() and s[1] != s[2]:
            rows.append({"prompt": s[0], "chosen": s[1], "rejected": s[2], "subset": SUBSETS[len(rows) % 6],
                         "id": len(rows)})
        if len(rows) == n:
            return rows
    return rows


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--max_len", type=int, default=128)
    ap.add_argument("--smoke", action="store_true", help="2 training steps (the tests)")
    add_output(ap)
    a = ap.parse_args(argv)
    a.steps = 2 if a.smoke else a.steps
    import torch

    from rm_trainer import load_reward_model
    from rm_trainer.data.tokenize import encode_item, special_prefix
    from rm_trainer.eval.files import EvalOptions, evaluate

    pairs = hh_pairs()
    random.Random(0).shuffle(pairs)
    result: dict = {"steps": a.steps, "max_len": a.max_len}
    with tempfile.TemporaryDirectory() as tmp:
        out = train(Path(tmp), "bos", pairs[:600], a.steps, a.max_len)
        rows = rewardbench_rows(pairs[600:], 36)
        path = Path(tmp) / "rb.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        rm = load_reward_model(out / "reward.pt")
        prefix = special_prefix(rm.tokenizer)
        longer = [(r["prompt"], max(r["chosen"], r["rejected"], key=len)) for r in rows]
        result["pairs_over_max_len"] = sum(len(encode_item(rm.tokenizer, x, 1 << 30, prefix)) > a.max_len
                                           for x in longer)
        items = [(r["prompt"], r["chosen"]) for r in rows] + [(r["prompt"], r["rejected"]) for r in rows]
        want = rm.score_texts(items)
        n = len(rows)
        acc_want = {s: sum(float(want[i] > want[n + i]) for i in range(n) if rows[i]["subset"] == s) / 6
                    for s in SUBSETS}
        result["reward_scale"] = float(want.abs().max())
        for policy in ("pair", "single"):
            res, _, c, r = evaluate(rm, [str(path)], EvalOptions(truncation=policy))
            acc = {s: res["diagnostics"]["groups"][s]["acc"] for s in SUBSETS}
            result[policy] = {"reward_vs_score_texts": diff(torch.cat([c, r]), want),
                              "subset_acc_max_diff_points": 100 * max(abs(acc[s] - acc_want[s]) for s in SUBSETS),
                              "subset_acc": acc}
        result["score_texts_subset_acc"] = acc_want
    return finish(result, a.output)


if __name__ == "__main__":
    main()
