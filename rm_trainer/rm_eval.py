"""rm-eval: evaluate a reward model on preference files, RewardBench v1/v2 among them, with diagnostics.

    rm-eval --model OUT/reward.pt --data reward-bench.parquet [more files] [--output_dir OUT/eval]

Each file is read as one of:
  RewardBench 2   prompt, chosen: [texts], rejected: [texts], subset (id, num_correct for Ties): one chosen
                  against all its rejected; a prompt counts when chosen beats every one (rewardbench.py)
  pairs           every shape training reads (prompt/chosen/rejected, HH full texts, messages), with an
                  optional `subset` column; RewardBench v1 files (all subsets RewardBench's) also get
                  the leaderboard's section weighting
Pairs are tokenized exactly as training tokenized them (data.tokenize_source: same template, truncation
and EOS, same drops, counted by reason); RewardBench 2's completions as rm-score tokenizes a
(prompt, response). --chat auto renders RewardBench's plain prompts through the chat template when the
model's tokenizer has one (as RewardBench does), else as plain text.

All sequences are scored in one length-sorted token-budget pass (scoring.score_sequences, as
score_texts): results do not depend on --max_batch_tokens or --padding_side beyond fp32 rounding.
Writes OUTPUT_DIR/metrics.json, report.md, scores.jsonl (every reward) and the PNGs (eval_report.py).
"""

from __future__ import annotations

import json
import os
import sys
import types
from collections import Counter
from pathlib import Path

import torch

from rm_trainer import diagnostics, eval_report, rewardbench
from rm_trainer.errors import DataError, UserError


def _is_v2(path: str) -> bool:
    from rm_trainer.scoring import read_rows

    if Path(path).suffix not in (".jsonl", ".json", ".parquet"):
        return False
    ds = read_rows(path)
    if not {"prompt", "chosen", "rejected"} <= set(ds.column_names) or len(ds) == 0:
        return False
    c = ds[0]["chosen"]
    return isinstance(c, list) and all(isinstance(x, str) for x in c)


def _pairs_file(path: str, tok, max_len: int, chat: bool, on_error: str, sid: int):
    """(chosen ids, rejected ids, subset per pair, dropped counts) as training would tokenize the file."""
    from rm_trainer.data import DROP_REASONS, tokenize_source
    from rm_trainer.formats import Keys, load_source

    keys = Keys()
    ds, fmt, pre_bad = load_source(path, "auto", keys, on_error)
    if chat and fmt == "prompt":  # RewardBench style: a plain user prompt, rendered as the model's chat
        ds = ds.map(lambda r: {"chosen": [{"role": "assistant", "content": r["chosen"]}],
                               "rejected": [{"role": "assistant", "content": r["rejected"]}]})
        fmt = "conversational"
    subsets = ds["subset"] if "subset" in ds.column_names else [Path(path).name] * len(ds)
    cfg = types.SimpleNamespace(data=types.SimpleNamespace(
        prompt_key=keys.prompt, chosen_key=keys.chosen, rejected_key=keys.rejected, margin_key=None,
        max_len=max_len, on_error=on_error, num_proc=1))
    tokd = tokenize_source(ds, fmt, tok, cfg, sid, path)
    status = tokd["status"]
    keep = [i for i, s in enumerate(status) if s not in DROP_REASONS]
    dropped = Counter(s for s in status if s in DROP_REASONS) + Counter({"malformed": pre_bad} if pre_bad else {})
    c_ids, r_ids = tokd["chosen_ids"], tokd["rejected_ids"]
    return [c_ids[i] for i in keep], [r_ids[i] for i in keep], [str(subsets[i]) for i in keep], dropped


def _v2_problem(row: dict) -> str | None:
    for field in ("chosen", "rejected"):
        v = row.get(field)
        if not isinstance(v, list) or not v or not all(isinstance(x, str) and x.strip() for x in v):
            return f"field {field!r}: expected a non-empty list of non-empty texts"
    if not isinstance(row.get("prompt"), str) or not isinstance(row.get("subset"), str):
        return "fields 'prompt' and 'subset' must be text"
    return None


def _v2_file(path: str, tok, max_len: int, chat: bool, on_error: str, dropped: Counter):
    """Per prompt: its completions' ids (chosen first) and metadata."""
    from rm_trainer.data import encode_item, special_prefix
    from rm_trainer.scoring import read_rows

    prefix, prompts = special_prefix(tok), []
    for i, row in enumerate(read_rows(path)):
        problem = _v2_problem(row)
        if problem and on_error == "error":
            raise DataError(f"{path}:{i + 1}: {problem} (or pass --on_error skip to count and leave it out)")
        if problem:
            dropped["malformed"] += 1
            continue
        responses = row["chosen"] + row["rejected"]
        items = ([([{"role": "user", "content": row["prompt"]}], [{"role": "assistant", "content": r}])
                  for r in responses] if chat else [(row["prompt"], r) for r in responses])
        prompts.append({"subset": row["subset"], "id": row.get("id", i), "num_correct": len(row["chosen"]),
                        "seqs": [encode_item(tok, it, max_len, prefix) for it in items]})
    return prompts


def evaluate(model, files: list[str], max_batch_tokens: int = 16384, padding_side: str = "right",
             chat: str = "auto", on_error: str = "error") -> tuple[dict, list[dict], torch.Tensor, torch.Tensor]:
    """(result, per-sequence score rows, chosen rewards, rejected rewards of every pair)."""
    from rm_trainer.scoring import score_sequences

    tok = model.tokenizer
    use_chat = bool(getattr(tok, "chat_template", None)) if chat == "auto" else chat == "on"
    pairs_c, pairs_r, groups, dropped, v2, v1_subsets = [], [], [], Counter(), [], set()
    for sid, path in enumerate(files):
        if _is_v2(path):
            v2 += _v2_file(path, tok, model.max_len, use_chat, on_error, dropped)
        else:
            c, r, g, d = _pairs_file(path, tok, model.max_len, use_chat, on_error, sid)
            if rewardbench.is_v1(set(g)):
                v1_subsets |= set(g)
            pairs_c, pairs_r, groups = pairs_c + c, pairs_r + r, groups + g
            dropped.update(d)
    seqs = pairs_c + pairs_r + [s for p in v2 for s in p["seqs"]]
    if not seqs:
        raise UserError(f"--data {' '.join(files)}: no usable pairs (dropped: {dict(dropped)})")
    rewards = score_sequences(model, seqs, max_batch_tokens, padding_side=padding_side)
    n = len(pairs_c)
    r_c, r_r = rewards[:n], rewards[n:2 * n]
    # per-pair view of everything (a v2 prompt contributes chosen[0] against each rejected)
    lens = [diagnostics.response_lengths(a, b) for a, b in zip(pairs_c, pairs_r, strict=True)]
    all_c, all_r, all_g = list(r_c.tolist()), list(r_r.tolist()), list(groups)
    k = 2 * n
    for p in v2:
        p["scores"] = rewards[k:k + len(p["seqs"])].tolist()
        k += len(p["seqs"])
        for j in range(p["num_correct"], len(p["seqs"])):
            all_c.append(p["scores"][0])
            all_r.append(p["scores"][j])
            all_g.append(p["subset"])
            lens.append(diagnostics.response_lengths(p["seqs"][0], p["seqs"][j]))
    tc, tr = torch.tensor(all_c), torch.tensor(all_r)
    lc, lr = torch.tensor([a for a, _ in lens]), torch.tensor([b for _, b in lens])
    result = {"files": files, "dropped": dict(dropped), "chat_template": use_chat,
              "diagnostics": diagnostics.diagnose(tc, tr, lc, lr, all_g)}
    subset_acc = {g: v["acc"] for g, v in result["diagnostics"]["groups"].items()}
    if v1_subsets:
        result["rewardbench"] = rewardbench.v1_sections({g: subset_acc[g] for g in v1_subsets})
    if v2:
        result["rewardbench2"] = rewardbench.v2_scores(v2)
    rows = ([{"kind": "pair", "subset": g, "chosen": a, "rejected": b}
             for g, a, b in zip(groups, r_c.tolist(), r_r.tolist(), strict=True)]
            + [{"kind": "v2", "subset": p["subset"], "id": p["id"], "num_correct": p["num_correct"],
                "scores": p["scores"]} for p in v2])
    return result, rows, tc, tr


def parser():
    from rm_trainer.cli_surface import Parser

    p = Parser(prog="rm-eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="reward.pt or the hf/ folder of a run")
    p.add_argument("--data", required=True, nargs="+", help="preference files (.jsonl, .json, .parquet, ...)")
    p.add_argument("--output_dir", default=None,
                   help="default: eval/<first data file's name>/ beside the model (the run's own eval/ report "
                        "of its held-out set stays)")
    p.add_argument("--max_batch_tokens", type=int, default=16384, help="padded tokens per forward")
    p.add_argument("--padding_side", choices=("right", "left"), default="right",
                   help="how batches are padded (the results do not depend on it)")
    p.add_argument("--chat", choices=("auto", "on", "off"), default="auto",
                   help="render RewardBench's plain prompts with the chat template (auto: if the tokenizer has one)")
    p.add_argument("--on_error", choices=("error", "skip"), default="error",
                   help="a malformed row stops the run, or is counted and left out")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from rm_trainer.artifact import load_reward_model

    name = Path(args.data[0]).name.split(".")[0] or "data"
    out = Path(args.output_dir or Path(args.model).resolve().parent / "eval" / name)
    try:
        model = load_reward_model(args.model, device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        result, rows, r_c, r_r = evaluate(model, args.data, args.max_batch_tokens, args.padding_side, args.chat,
                                          args.on_error)
    except UserError as e:
        print(f"rm-eval: error: {e}", file=sys.stderr, flush=True)
        return 2
    result["model"] = str(args.model)
    written = eval_report.write(out, result, r_c, r_r)
    with open(out / "scores.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    d = result["diagnostics"]
    summary = {"pairs": d["pairs"], "acc": d["acc"], "prefer_longer_acc": d["prefer_longer_acc"], "ece": d["ece"],
               "rewardbench": (result.get("rewardbench") or {}).get("score"),
               "rewardbench2": (result.get("rewardbench2") or {}).get("score"), "dropped": result["dropped"]} | written
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
