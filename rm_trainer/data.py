"""Preference data: read every source (formats.py), tokenize once with `datasets.map`, truncate by the
policy in truncation.py, account for every row, mix sources by weight, and hand rank-ready datasets to
the trainer. Batching lives in batching.py.

Every row ends up either used or counted under a named reason, per source and split, in
OUT/data_report.json. A source that loses more than data.max_drop_fraction aborts the run with the
report, so a wrong column name or max_len cannot quietly train on nothing.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from rm_trainer.batching import (  # noqa: F401  (re-exported: the seed's names live here)
    PairSampler,
    collate,
    eval_batches,
    get_preference_iterator,
    pad_right,
)
from rm_trainer.errors import DataError
from rm_trainer.formats import Keys, load_source, render_conversation, row_location, row_problem, skip_hint, split_hh
from rm_trainer.truncation import truncate_pair

DROP_REASONS = ("malformed", "empty_response", "identical_raw", "identical_after_truncation")
KEPT_NOTES = ("prompt_truncated", "response_truncated", "hh_no_common_prompt")


def special_prefix(tok) -> list[int]:
    """Leading special tokens the tokenizer adds (e.g. BOS); kept at the front of every sequence."""
    ids = tok("", add_special_tokens=True)["input_ids"]
    return [i for i in ids if i != tok.eos_token_id]


def encode(tok, prompt: str, response: str, max_len: int, chat: bool = False, prefix: list[int] | None = None):
    """Token ids exactly as in training: [BOS] + prompt + response, truncated by the policy, + EOS.
    chat=True: the prompt was rendered by the chat template, which writes its own BOS. Returns the
    Truncated record (ids in .chosen)."""
    prefix = [] if chat else special_prefix(tok) if prefix is None else prefix
    p = prefix + tok(prompt, add_special_tokens=False)["input_ids"]
    r = tok(response, add_special_tokens=False)["input_ids"]
    return truncate_pair(p, r, r, tok.eos_token_id, max_len, keep_prefix=len(prefix))


def split_conversation(messages: list[dict]) -> tuple[list[dict], list[dict]]:
    """(prompt messages, response messages) of one conversation: the response is the trailing run of
    assistant turns, as in training, where the prompt is what chosen and rejected share."""
    k = len(messages)
    while k > 1 and messages[k - 1].get("role") == "assistant":
        k -= 1
    return messages[:k], messages[k:]


def encode_item(tok, item, max_len: int, prefix: list[int]) -> list[int]:
    """One item to score, tokenized exactly as training tokenized its sequences: a full text (str); a
    (prompt, response) pair of strings; a conversation (a list of {role, content}: the trailing assistant
    turns are the response, rendered with the chat template saved with the model); or (prompt,
    response messages) with the prompt as text or messages."""
    if isinstance(item, str):
        return encode(tok, "", item, max_len, prefix=prefix).chosen
    if isinstance(item, list):
        prompt, response = split_conversation(item)
    else:
        prompt, response = item
    if isinstance(response, list):
        if not getattr(tok, "chat_template", None):
            raise DataError("a conversation (messages) needs a chat template, and this model's tokenizer has "
                            "none; send plain text or prompt + response instead")
        p, c, _ = render_conversation(tok, prompt, response, response, None)
        return encode(tok, p, c, max_len, chat=True).chosen
    return encode(tok, prompt, response, max_len, prefix=prefix).chosen


def _texts(row: dict, fmt: str, keys: Keys, tok) -> tuple[str, str, str, bool, str]:
    """(prompt, chosen response, rejected response, chat-rendered?, note) of a row of format `fmt`."""
    c, r = row[keys.chosen], row[keys.rejected]
    if fmt == "conversational":
        p, c, r = render_conversation(tok, row.get(keys.prompt), c, r, None)
        return p, c, r, True, ""
    if fmt == "prompt":
        return row[keys.prompt], c, r, False, ""
    split = split_hh(c, r)
    if split is None:
        return "", c, r, False, "hh_no_common_prompt"
    return (*split, False, "")


COLUMNS = ("chosen_ids", "rejected_ids", "chosen_len", "rejected_len", "margin", "source", "status",
           "prompt_tokens", "chosen_tokens", "rejected_tokens")


def default_num_proc(n_rows: int) -> int:
    """Tokenization processes: the cores this process may use, capped at 16, and one per 10k rows (a
    worker costs a second to start)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, 16, n_rows // 10_000))


def tokenize_source(ds, fmt: str, tok, cfg, source_id: int = 0, path: str = "", work_dir: str | None = None):
    """One batched datasets.map over a whole source: check each row against the source's format, render,
    tokenize (one batched call per field), truncate. Every row gets a status (a drop reason, a note, or
    ""), so nothing is lost uncounted. A malformed row raises DataError naming file:line and field,
    unless data.on_error=skip, which counts it. work_dir: where the result's arrow files go (default:
    beside the source's own, which for a save_to_disk folder is the user's folder)."""
    d = cfg.data
    keys = Keys(d.prompt_key, d.chosen_key, d.rejected_key, d.margin_key)
    prefix = special_prefix(tok)
    eos = tok.eos_token_id
    if fmt == "conversational" and not tok.chat_template:
        raise DataError(f"{path}: holds conversations (messages), but the tokenizer has no chat template; "
                        "pass --chat_template FILE (a Jinja template)")

    def fn(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        out: dict[str, list] = {k: [] for k in COLUMNS}
        rows = [dict(zip(batch, vals, strict=True)) for vals in zip(*batch.values(), strict=True)]
        texts = []
        for i, row in zip(indices, rows, strict=True):
            problem = row_problem(row, fmt, keys)
            if problem and d.on_error == "error":
                raise DataError(f"{row_location(path, i)}: {problem}" + skip_hint())
            texts.append(None if problem else _texts(row, fmt, keys, tok))
        ok = [t for t in texts if t is not None]
        enc = [tok([t[j] for t in ok], add_special_tokens=False)["input_ids"] if ok else [] for j in range(3)]
        k = 0
        for row, t in zip(rows, texts, strict=True):
            if t is None:
                p_ids, c_ids, r_ids, status, cut = [], [], [], "malformed", None
            else:
                p, c, r, chat, note = t
                pre = [] if chat else prefix
                p_ids, c_ids, r_ids = pre + enc[0][k], enc[1][k], enc[2][k]
                k += 1
                cut = truncate_pair(p_ids, c_ids, r_ids, eos, d.max_len, keep_prefix=len(pre))
                if not c.strip() or not r.strip():
                    status = "empty_response"
                elif c == r:
                    status = "identical_raw"
                elif cut.identical:
                    status = "identical_after_truncation"
                else:
                    status = note or ("response_truncated" if cut.response_cut else
                                      "prompt_truncated" if cut.prompt_cut else "")
            out["chosen_ids"].append(cut.chosen if cut else [])
            out["rejected_ids"].append(cut.rejected if cut else [])
            out["chosen_len"].append(len(cut.chosen) if cut else 0)
            out["rejected_len"].append(len(cut.rejected) if cut else 0)
            out["margin"].append(float(row.get(keys.margin) or 0.0) if keys.margin and cut else 0.0)
            out["source"].append(source_id)
            out["status"].append(status)
            out["prompt_tokens"].append(len(p_ids))
            out["chosen_tokens"].append(len(c_ids) + 1)
            out["rejected_tokens"].append(len(r_ids) + 1)
        return out

    num_proc = d.num_proc or default_num_proc(len(ds))
    name = Path(path).name or "pairs"
    cache = str(Path(work_dir) / f"tokenized-{source_id}-{name}.arrow") if work_dir else None
    return ds.map(fn, batched=True, batch_size=1000, with_indices=True, remove_columns=ds.column_names,
                  num_proc=num_proc if num_proc > 1 else None, desc=f"tokenizing {name}", cache_file_name=cache,
                  load_from_cache_file=False)  # reuse is data_cache's job, by content key, never implicit


def split_indices(n: int, frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, held-out rows) of a source: a seeded ceil(frac * n) of its rows are held out."""
    n_test = min(n - 1, int(np.ceil(frac * n))) if frac > 0 and n > 1 else 0
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def split_report(tokd, columns: dict[str, np.ndarray], idx: np.ndarray, margin: bool, max_len: int,
                 malformed_before: int = 0):
    """(rows kept for training, their report) of one split (`idx`: its rows of the tokenized source).
    Counts and lengths come from whole columns read once (`columns`), never row by row."""
    status = columns["status"][idx]
    counts = Counter(status.tolist())
    counts["malformed"] += malformed_before
    real = status != "malformed"
    lengths = {k: columns[k][idx][real] for k in ("prompt_tokens", "chosen_tokens", "rejected_tokens")}
    keep = idx[~np.isin(status, DROP_REASONS)]
    drop = ["status", "prompt_tokens", "chosen_tokens", "rejected_tokens"] + ([] if margin else ["margin"])
    return tokd.remove_columns(drop).select(keep), _report(len(idx) + malformed_before, counts, lengths, max_len)


def _columns(tokd) -> dict[str, np.ndarray]:
    return {k: np.asarray(tokd.data.column(k).to_numpy(zero_copy_only=False))
            for k in ("status", "prompt_tokens", "chosen_tokens", "rejected_tokens")}


def _report(n_rows: int, counts: Counter, lengths: dict, max_len: int) -> dict:
    rep = {"rows": n_rows, "used": sum(v for k, v in counts.items() if k not in DROP_REASONS),
           "dropped": {r: counts.get(r, 0) for r in DROP_REASONS},
           "kept_with_note": {k: counts.get(k, 0) for k in KEPT_NOTES}}
    if len(lengths["prompt_tokens"]):
        rep["token_length_percentiles"] = {
            k.removesuffix("_tokens"): {f"p{q}": int(np.percentile(v, q)) for q in (50, 90, 99)} | {"max": int(v.max())}
            for k, v in lengths.items()}
        full = lengths["prompt_tokens"] + np.maximum(lengths["chosen_tokens"], lengths["rejected_tokens"])
        rep["fraction_truncated_at_max_len"] = round(float((full > max_len).mean()), 4)
    return rep


def _mix(ds, weight: float, seed: int):
    """weight 0.5: a seeded half; 2: every row twice; 1.5: once plus a seeded half."""
    import datasets

    whole, frac = int(weight), weight - int(weight)
    parts = [ds] * whole
    if frac > 0:
        rng = np.random.default_rng(seed)
        parts.append(ds.select(sorted(rng.choice(len(ds), round(frac * len(ds)), replace=False).tolist())))
    return datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]


def prepare_sources(cfg, tok, work_dir: str | None = None) -> tuple[Any, Any, dict, list[str]]:
    """(train dataset, test dataset or None, report, source names). One process, no process group.
    work_dir: where `datasets` may write its intermediate arrow files (default: its home cache)."""
    import datasets

    d = cfg.data
    keys = Keys(d.prompt_key, d.chosen_key, d.rejected_key, d.margin_key)
    trains, tests, report, names = [], [], {}, []
    for i, src in enumerate(d.source_list()):
        name = src.name or Path(src.path).stem
        names.append(name)
        ds, fmt, bad = load_source(src.path, d.format, keys, d.on_error, work_dir)
        tokd = tokenize_source(ds, fmt, tok, cfg, i, src.path, work_dir)
        cols = _columns(tokd)
        frac = d.test_fraction if src.test_fraction is None else src.test_fraction
        train_idx, test_idx = split_indices(len(tokd), 0 if src.test_path else frac, cfg.train.seed + i)
        tr, rep = split_report(tokd, cols, train_idx, bool(keys.margin), d.max_len, bad)
        report[name] = {"path": src.path, "weight": src.weight, "format": fmt, "train": rep}
        trains.append(_mix(tr, src.weight, cfg.train.seed + i) if src.weight != 1 else tr)
        if src.test_path:
            test_ds, test_fmt, test_bad = load_source(src.test_path, d.format, keys, d.on_error, work_dir)
            test_tokd = tokenize_source(test_ds, test_fmt, tok, cfg, i, src.test_path, work_dir)
            test_cols, test_idx = _columns(test_tokd), np.arange(len(test_tokd))
        elif len(test_idx):
            test_tokd, test_cols, test_bad = tokd, cols, 0
        if src.test_path or len(test_idx):
            te, report[name]["test"] = split_report(test_tokd, test_cols, test_idx, bool(keys.margin), d.max_len,
                                                    test_bad)
            tests.append(te)
    _check_drops(report, d.max_drop_fraction)
    train = datasets.concatenate_datasets(trains) if len(trains) > 1 else trains[0]
    test = (datasets.concatenate_datasets(tests) if len(tests) > 1 else tests[0]) if tests else None
    if len(train) == 0:
        raise DataError(f"no usable training pairs in any source: {json.dumps(report)}")
    report["_total"] = {"train_pairs": len(train), "test_pairs": len(test) if test is not None else 0}
    return train, test, report, names


def _check_drops(report: dict, limit: float) -> None:
    problems = []
    for name, rep in report.items():
        for split in ("train", "test"):
            r = rep.get(split)
            if r and r["rows"] and sum(r["dropped"].values()) / r["rows"] > limit:
                frac = sum(r["dropped"].values()) / r["rows"]
                problems.append(f"source {name!r} ({split}): {frac:.1%} of {r['rows']} rows dropped "
                                f"{ {k: v for k, v in r['dropped'].items() if v} }")
    if problems:
        raise DataError("too many rows dropped (data.max_drop_fraction = "
                         f"{limit:g}): " + "; ".join(problems) + ". Check the column names (data.chosen_key, "
                         "data.rejected_key, data.prompt_key), max_len and data.on_error; the full report: "
                         + json.dumps(report))


def write_report(path: Path, report: dict) -> None:
    path.write_text(json.dumps(report, indent=2) + "\n")


def load_tokenizer(cfg):
    """The tokenizer, with --chat_template attached: it is saved into every checkpoint and reward.pt, so
    scoring renders conversations exactly as training did."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cfg.model.tokenizer or cfg.model.path)
    if tok.eos_token_id is None:
        raise DataError(f"tokenizer {cfg.model.tokenizer or cfg.model.path} has no eos_token; the reward "
                        "is read at the final EOS, so set eos_token in tokenizer_config.json")
    if tok.pad_token_id is None:  # pad positions are never read (right padding + causal attention)
        tok.pad_token = tok.eos_token
    if cfg.data.chat_template:
        tok.chat_template = Path(cfg.data.chat_template).read_text()
    return tok


def dry_run_report(cfg, tok) -> str:
    """Per-source counts and drops, token-length percentiles, the truncated fraction, and one rendered
    example with the scoring token marked. No process group, no model, nothing left on disk."""
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        train, _, report, _ = prepare_sources(cfg, tok, work_dir=scratch)
        ex = train[0]
    lines = []
    for name, rep in report.items():
        if name.startswith("_"):
            continue
        for split in ("train", "test"):
            r = rep.get(split)
            if not r:
                continue
            lines.append(f"{name}/{split}: {r['rows']} rows, {r['used']} used, dropped "
                         f"{ {k: v for k, v in r['dropped'].items() if v} or 0}, kept with note "
                         f"{ {k: v for k, v in r['kept_with_note'].items() if v} or 0}")
            if "token_length_percentiles" in r:
                lines.append(f"  token lengths {r['token_length_percentiles']}; "
                             f"{r['fraction_truncated_at_max_len']:.1%} of pairs exceed max_len={cfg.data.max_len}")
    ids = ex["chosen_ids"]
    lines.append("example (chosen), the reward is read at the marked token:")
    lines.append("  " + tok.decode(ids[:-1]) + " \u27e6" + tok.decode(ids[-1:]) + "\u27e7")
    return "\n".join(lines)
