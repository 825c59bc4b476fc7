"""rm-eval's files: read preference files, RewardBench v1/v2 among them, and score them with diagnostics.

Each file is read as one of:
  RewardBench 2   prompt, chosen: [texts], rejected: [texts], subset (id, num_correct for Ties): one chosen
                  against all its rejected; a prompt counts when chosen beats every one (rewardbench.py)
  pairs           every shape training reads (prompt/chosen/rejected, HH full texts, messages), with an
                  optional `subset` column; RewardBench v1 files (all subsets RewardBench's) also get
                  the leaderboard's section weighting
Pairs are tokenized exactly as training tokenized them (objectives/pair_rows.PairReader: same template,
truncation and EOS, same drops, counted by reason; the column names and shape from EvalOptions);
RewardBench 2's completions as rm-score tokenizes a (prompt, response). chat="auto" renders
RewardBench's plain prompts through the chat template when the model's tokenizer has one (as
RewardBench does), else as plain text.

All sequences are scored in one length-sorted token-budget pass (model.score_sequences, as score_texts):
results do not depend on max_batch_tokens or padding_side beyond fp32 rounding. `write` puts
metrics.json, report.md, scores.jsonl (every reward) and the PNGs (report.py) into the output folder.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rm_trainer.config import DataConfig
from rm_trainer.data import read
from rm_trainer.data.formats import is_jsonl, jsonl_lines, load_source
from rm_trainer.data.tokenize import encode_item, special_prefix
from rm_trainer.errors import DataError, UserError
from rm_trainer.eval import diagnostics, report, rewardbench
from rm_trainer.model.scoring import score_sequences
from rm_trainer.model.sharing import scoring_rule
from rm_trainer.objectives.base import single_view
from rm_trainer.objectives.pair_rows import DROP_REASONS, PairKeys, PairReader
from rm_trainer.use.score import row_where


@dataclass
class EvalOptions:
    """How rm-eval reads and batches its files."""

    keys: PairKeys = field(default_factory=PairKeys)  # column names of pair files (margin unused)
    format: str = "auto"  # the pair files' shape: auto, hh, prompt or conversational
    chat: str = "auto"  # render plain RewardBench prompts with the chat template: auto (if there is one), on, off
    on_error: str = "error"  # or "skip": a malformed row is counted and left out
    max_batch_tokens: int = 16384
    padding_side: str = "right"
    # single: each response scored on its own (the reward function: score_texts, rm-score, rm-serve);
    # pair: as the training loss saw the pair (a prompt too long for the longer side cut for both), with
    # training's drops (empty responses, identical pairs)
    truncation: str = "single"


def _v2_rows(path: str, on_error: str):
    """The file's rows if it is a RewardBench 2 file (list-valued chosen), else None."""
    kind = read.table_kind(path)
    if kind is None:
        return None
    read.check_file(path, "--data")
    ds = read.try_datasets(path, kind, None)
    if ds is None and kind == "json":  # read here; a pair file is left to load_source (its own row rule)
        parsed = read.json_records(path)
        if not _v2_like([obj for _, obj in parsed[0][:1] if isinstance(obj, dict)]):
            return None
        return read.from_records(path, _v2_problem, on_error, parsed)
    if ds is None or not {"prompt", "chosen", "rejected"} <= set(ds.column_names) or not len(ds):
        return None
    if not _v2_like([ds[0]]):
        return None
    return ds, 0


def _v2_like(first: list[dict]) -> bool:
    c = first[0].get("chosen") if first else None
    return isinstance(c, list) and all(isinstance(x, str) for x in c)


def _pairs_file(path: str, tok, max_len: int, chat: bool, opts: EvalOptions, sid: int):
    """(chosen ids, rejected ids, subset per pair, dropped counts) as training would tokenize the file."""
    keys = opts.keys
    d = DataConfig(prompt_key=keys.prompt, chosen_key=keys.chosen, rejected_key=keys.rejected, tie_key=keys.tie,
                   max_len=max_len, on_error=opts.on_error, num_proc=1)
    reader = PairReader(tok, d)
    ds, fmt, pre_bad = load_source(path, opts.format, reader.layout, opts.on_error)
    if chat and fmt == "prompt":  # RewardBench style: a plain user prompt, rendered as the model's chat
        ds = ds.map(lambda r: {keys.chosen: [{"role": "assistant", "content": r[keys.chosen]}],
                               keys.rejected: [{"role": "assistant", "content": r[keys.rejected]}]})
        fmt = "conversational"
    subsets = ds["subset"] if "subset" in ds.column_names else [Path(path).name] * len(ds)
    tokd = reader.tokenize(ds, fmt, sid, path)
    status = tokd["status"]
    drops = DROP_REASONS if opts.truncation == "pair" else ("malformed",)
    keep = [i for i, s in enumerate(status) if s not in drops]
    dropped = Counter(s for s in status if s in drops) + Counter({"malformed": pre_bad} if pre_bad else {})
    ids = tokd["ids"]
    if opts.truncation == "single":  # each response as it is encoded on its own
        ids = [single_view(single, row) for single, row in zip(tokd["single"], ids, strict=True)]
    c_ids, r_ids = [r[0] if r else [] for r in ids], [r[1] if r else [] for r in ids]
    tie = tokd["tie"]
    return ([c_ids[i] for i in keep], [r_ids[i] for i in keep], [str(subsets[i]) for i in keep],
            row_ids(ds, path, keep, exact_lines=not pre_bad), dropped, [bool(tie[i]) for i in keep])


def row_ids(ds, path: str, keep: list[int], exact_lines: bool) -> list:
    """Each kept row's `id` column, else its place: 'file:line' (JSON lines) or 'file row i'."""
    if "id" in ds.column_names:
        col = ds["id"]
        return [col[i] for i in keep]
    lines = jsonl_lines(path) if exact_lines and is_jsonl(path) else None
    return [f"{path}:{lines[i]}" if lines and i < len(lines) else f"{path} row {i}" for i in keep]


def _v2_problem(row: dict) -> str | None:
    for name in ("chosen", "rejected"):
        v = row.get(name)
        if not isinstance(v, list) or not v or not all(isinstance(x, str) for x in v):
            return f"field {name!r}: expected a non-empty list of texts"
    if not isinstance(row.get("prompt"), str) or not isinstance(row.get("subset"), str):
        return "fields 'prompt' and 'subset' must be text"
    return None


def _v2_file(path: str, ds, tok, max_len: int, chat: bool, on_error: str, dropped: Counter):
    """Per prompt: its completions' ids (chosen first) and metadata."""
    prefix, prompts = special_prefix(tok), []
    for i, row in enumerate(ds):
        problem = _v2_problem(row)
        if problem and on_error == "error":
            raise DataError(f"{row_where(path, i)}: {problem} (or pass --on_error skip to count and leave it out)")
        if problem:
            dropped["malformed"] += 1
            continue
        responses = row["chosen"] + row["rejected"]
        items = ([([{"role": "user", "content": row["prompt"]}], [{"role": "assistant", "content": r}])
                  for r in responses] if chat else [(row["prompt"], r) for r in responses])
        prompts.append({"subset": row["subset"], "id": row.get("id", i), "num_correct": len(row["chosen"]),
                        "seqs": [encode_item(tok, it, max_len, prefix) for it in items]})
    return prompts


def _read(files: list[str], tok, max_len: int, use_chat: bool, opts: EvalOptions) -> dict:
    """Every file's sequences: pairs (chosen ids, rejected ids, subset) and RewardBench 2 prompts."""
    got = {"c": [], "r": [], "groups": [], "ids": [], "tie": [], "v2": [], "v1_subsets": set(), "dropped": Counter()}
    for sid, path in enumerate(files):
        v2 = _v2_rows(path, opts.on_error)
        if v2 is not None:
            got["dropped"]["malformed"] += v2[1]
            got["v2"] += _v2_file(path, v2[0], tok, max_len, use_chat, opts.on_error, got["dropped"])
            continue
        c, r, g, ids, d, tie = _pairs_file(path, tok, max_len, use_chat, opts, sid)
        if rewardbench.is_v1(set(g)):
            got["v1_subsets"] |= set(g)
        got["ids"] += ids
        got["tie"] += tie
        got["c"] += c
        got["r"] += r
        got["groups"] += g
        got["dropped"].update(d)
    return got


def evaluate(model, files: list[str], opts: EvalOptions | None = None
             ) -> tuple[dict, list[dict], torch.Tensor, torch.Tensor]:
    """(result, per-sequence score rows, chosen rewards, rejected rewards of every pair)."""
    opts = opts or EvalOptions()
    tok = model.tokenizer
    use_chat = bool(getattr(tok, "chat_template", None)) if opts.chat == "auto" else opts.chat == "on"
    got = _read(files, tok, model.max_len, use_chat, opts)
    pairs_c, pairs_r, groups, v2 = got["c"], got["r"], got["groups"], got["v2"]
    seqs = pairs_c + pairs_r + [s for p in v2 for s in p["seqs"]]
    if not seqs:
        raise UserError(f"--data {' '.join(files)}: no usable pairs (dropped: {dict(got['dropped'])})")
    rewards = score_sequences(model, seqs, opts.max_batch_tokens, padding_side=opts.padding_side,
                              share=scoring_rule(model))  # a pair's prompt once, as score_texts shares it
    n = len(pairs_c)
    r_c, r_r = rewards[:n], rewards[n:2 * n]
    strict = [j for j in range(n) if not got["tie"][j]]  # tied pairs (--tie_key) have no preferred side
    # per-pair view of every strict pair (a v2 prompt contributes chosen[0] against each rejected)
    lens = [diagnostics.response_lengths(pairs_c[j], pairs_r[j]) for j in strict]
    all_c, all_r, all_g = [float(r_c[j]) for j in strict], [float(r_r[j]) for j in strict], [groups[j] for j in strict]
    k = 2 * n
    for p in v2:
        p["scores"] = rewards[k:k + len(p["seqs"])].tolist()
        k += len(p["seqs"])
        for j in range(p["num_correct"], len(p["seqs"])):
            all_c.append(p["scores"][0])
            all_r.append(p["scores"][j])
            all_g.append(p["subset"])
            lens.append(diagnostics.response_lengths(p["seqs"][0], p["seqs"][j]))
    if not all_c:
        raise UserError(f"--data {' '.join(files)}: every usable pair is tied; accuracy needs strict pairs")
    tc, tr = torch.tensor(all_c), torch.tensor(all_r)
    lc, lr = torch.tensor([a for a, _ in lens]), torch.tensor([b for _, b in lens])
    result = {"files": files, "dropped": dict(got["dropped"]), "chat_template": use_chat, "truncation": opts.truncation,
              "diagnostics": diagnostics.diagnose(tc, tr, lc, lr, all_g)}
    result |= tie_summary(r_c, r_r, got["tie"], getattr(model, "tie_model", None))
    subset_acc = {g: v["acc"] for g, v in result["diagnostics"]["groups"].items()}
    if got["v1_subsets"]:
        result["rewardbench"] = rewardbench.v1_sections({g: subset_acc[g] for g in got["v1_subsets"]})
    if v2:
        result["rewardbench2"] = rewardbench.v2_scores(v2)
    rows = ([{"kind": "pair", "id": i, "subset": g, "chosen": a, "rejected": b} | ({"tie": True} if t else {})
             for i, g, a, b, t in zip(got["ids"], groups, r_c.tolist(), r_r.tolist(), got["tie"], strict=True)]
            + [{"kind": "v2", "subset": p["subset"], "id": p["id"], "num_correct": p["num_correct"],
                "scores": p["scores"]} for p in v2])
    return result, rows, tc, tr


def tie_summary(r_c: torch.Tensor, r_r: torch.Tensor, tie: list[bool], tie_model: dict | None) -> dict:
    """{"ties": {...}} for the tied pairs (--tie_key): how many, their mean and median |r_1 - r_2|, and with
    a Davidson model (reward.pt's tie_model) its mean P(tie) on them and on the strict pairs; {} without."""
    if not any(tie):
        return {}
    t = torch.tensor(tie)
    gap = (r_c.double() - r_r.double()).abs()
    out = {"pairs": int(t.sum()), "tie_gap": float(gap[t].mean()), "tie_gap_median": float(gap[t].median())}
    if tie_model and tie_model.get("nu"):
        nu = float(tie_model["nu"])
        p_tie = nu / (torch.exp(gap / 2) + torch.exp(-gap / 2) + nu)  # the Davidson model's P(tie)
        out |= {"nu": nu, "p_tie_on_tied": float(p_tie[t].mean()),
                "p_tie_on_strict": float(p_tie[~t].mean()) if (~t).any() else None}
    return {"ties": out}


def write(out: Path, result: dict, rows: list[dict], r_c: torch.Tensor, r_r: torch.Tensor) -> dict:
    """metrics.json, report.md, the PNGs and scores.jsonl into `out`; the summary line rm-eval prints."""
    written = report.write(out, result, r_c, r_r)
    with open(out / "scores.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    d = result["diagnostics"]
    return {"pairs": d["pairs"], "acc": d["acc"], "prefer_longer_acc": d["prefer_longer_acc"], "ece": d["ece"],
            "rewardbench": (result.get("rewardbench") or {}).get("score"),
            "rewardbench2": (result.get("rewardbench2") or {}).get("score"), "dropped": result["dropped"]} | written
