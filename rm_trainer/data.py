"""Preference data: read every source (formats.py), tokenize once with `datasets.map`, truncate by the
policy in truncation.py, account for every row, mix sources by weight, and hand rank-ready datasets to
the trainer. Batching lives in batching.py.

Every row ends up either used or counted under a named reason, per source and split, in
OUT/data_report.json. A source that loses more than data.max_drop_fraction aborts the run with the
report, so a wrong column name or max_len cannot quietly train on nothing.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
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
from rm_trainer.formats import Keys, detect_format, load_rows, render_conversation, split_hh
from rm_trainer.truncation import truncate_pair

DROP_REASONS = ("malformed", "empty_response", "identical_raw", "identical_after_truncation")
KEPT_NOTES = ("prompt_truncated", "response_truncated", "hh_no_common_prompt")


def special_prefix(tok) -> list[int]:
    """Leading special tokens the tokenizer adds (e.g. BOS); kept at the front of every sequence."""
    ids = tok("", add_special_tokens=True)["input_ids"]
    return [i for i in ids if i != tok.eos_token_id]


def encode(tok, prompt: str, response: str, max_len: int, chat: bool = False):
    """Token ids exactly as in training: [BOS] + prompt + response, truncated by the policy, + EOS.
    Returns the Truncated record (ids in .chosen)."""
    prefix = [] if chat else special_prefix(tok)
    p = prefix + tok(prompt, add_special_tokens=False)["input_ids"]
    r = tok(response, add_special_tokens=False)["input_ids"]
    return truncate_pair(p, r, r, tok.eos_token_id, max_len, keep_prefix=len(prefix))


def _texts(row: dict, fmt: str, keys: Keys, tok, template: str | None) -> tuple[str, str, str, bool, str]:
    """(prompt, chosen response, rejected response, chat-rendered?, note)."""
    c, r = row[keys.chosen], row[keys.rejected]
    f = detect_format(row, keys) if fmt == "auto" else fmt
    if f == "conversational":
        p, c, r = render_conversation(tok, row.get(keys.prompt), c, r, template)
        return p, c, r, True, ""
    if f == "prompt":
        return row[keys.prompt], c, r, False, ""
    split = split_hh(c, r)
    if split is None:
        return "", c, r, False, "hh_no_common_prompt"
    return (*split, False, "")


def tokenize_source(ds, tok, cfg, source_id: int = 0):
    """datasets.map over one source -> (kept rows with ids, counts by reason, length arrays)."""
    d = cfg.data
    keys = Keys(d.prompt_key, d.chosen_key, d.rejected_key, d.margin_key)
    template = Path(d.chat_template).read_text() if d.chat_template else None
    prefix = special_prefix(tok)
    eos = tok.eos_token_id

    def fn(batch: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {k: [] for k in ("chosen_ids", "rejected_ids", "chosen_len", "rejected_len",
                                                 "margin", "source", "status", "prompt_tokens",
                                                 "chosen_tokens", "rejected_tokens")}
        rows = [dict(zip(batch, vals, strict=True)) for vals in zip(*batch.values(), strict=True)]
        for row in rows:
            try:
                p, c, r, chat, note = _texts(row, d.format, keys, tok, template)
            except ValueError as e:  # e.g. no chat template for conversational rows
                raise ValueError(f"cannot render a conversational row: {e}; pass --chat_template FILE") from None
            pre = [] if chat else prefix
            p_ids = pre + tok(p, add_special_tokens=False)["input_ids"]
            c_ids = tok(c, add_special_tokens=False)["input_ids"]
            r_ids = tok(r, add_special_tokens=False)["input_ids"]
            t = truncate_pair(p_ids, c_ids, r_ids, eos, d.max_len, keep_prefix=len(pre))
            if not c.strip() or not r.strip():
                status = "empty_response"
            elif c == r:
                status = "identical_raw"
            elif t.identical:
                status = "identical_after_truncation"
            else:
                status = note or ("response_truncated" if t.response_cut else
                                  "prompt_truncated" if t.prompt_cut else "")
            out["chosen_ids"].append(t.chosen)
            out["rejected_ids"].append(t.rejected)
            out["chosen_len"].append(len(t.chosen))
            out["rejected_len"].append(len(t.rejected))
            out["margin"].append(float(row.get(keys.margin) or 0.0) if keys.margin else 0.0)
            out["source"].append(source_id)
            out["status"].append(status)
            out["prompt_tokens"].append(len(p_ids))
            out["chosen_tokens"].append(len(c_ids) + 1)
            out["rejected_tokens"].append(len(r_ids) + 1)
        return out

    cols = ds.column_names
    tokd = ds.map(fn, batched=True, batch_size=256, remove_columns=cols, num_proc=d.num_proc,
                  desc="tokenizing pairs")
    status = tokd["status"]
    counts = Counter(status)
    lengths = {k: np.asarray(tokd[k]) for k in ("prompt_tokens", "chosen_tokens", "rejected_tokens")}
    kept = tokd.filter(lambda s: s not in DROP_REASONS, input_columns="status")
    drop = ["status", "prompt_tokens", "chosen_tokens", "rejected_tokens"] + ([] if keys.margin else ["margin"])
    return kept.remove_columns(drop), counts, lengths


def _as_dataset(rows):
    import datasets

    return rows if isinstance(rows, datasets.Dataset) else datasets.Dataset.from_list(rows)


def _report(n_rows: int, malformed: int, counts: Counter, lengths: dict, max_len: int) -> dict:
    rep = {"rows": n_rows, "used": sum(v for k, v in counts.items() if k not in DROP_REASONS),
           "dropped": {r: (malformed if r == "malformed" else counts.get(r, 0)) for r in DROP_REASONS},
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


def prepare_sources(cfg, tok) -> tuple[Any, Any, dict, list[str]]:
    """(train dataset, test dataset or None, report, source names). Pure: no process group."""
    import datasets

    d = cfg.data
    keys = Keys(d.prompt_key, d.chosen_key, d.rejected_key, d.margin_key)
    trains, tests, report, names = [], [], {}, []
    for i, src in enumerate(d.source_list()):
        name = src.name or Path(src.path).stem
        names.append(name)
        rows, bad = load_rows(src.path, d.format, keys, d.on_error)
        ds = _as_dataset(rows)
        frac = d.test_fraction if src.test_fraction is None else src.test_fraction
        test_ds, test_bad = None, 0
        if src.test_path:
            test_rows, test_bad = load_rows(src.test_path, d.format, keys, d.on_error)
            test_ds = _as_dataset(test_rows)
        elif frac > 0 and len(ds) > 1:
            split = ds.train_test_split(test_size=frac, seed=cfg.train.seed)
            ds, test_ds = split["train"], split["test"]
        tr, counts, lengths = tokenize_source(ds, tok, cfg, i)
        report[name] = {"path": src.path, "weight": src.weight,
                        "train": _report(len(ds) + bad, bad, counts, lengths, d.max_len)}
        trains.append(_mix(tr, src.weight, cfg.train.seed + i) if src.weight != 1 else tr)
        if test_ds is not None:
            te, tcounts, tlengths = tokenize_source(test_ds, tok, cfg, i)
            report[name]["test"] = _report(len(test_ds) + test_bad, test_bad, tcounts, tlengths, d.max_len)
            tests.append(te)
    _check_drops(report, d.max_drop_fraction)
    train = datasets.concatenate_datasets(trains) if len(trains) > 1 else trains[0]
    test = (datasets.concatenate_datasets(tests) if len(tests) > 1 else tests[0]) if tests else None
    if len(train) == 0:
        raise ValueError(f"no usable training pairs in any source: {json.dumps(report)}")
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
        raise ValueError("too many rows dropped (data.max_drop_fraction = "
                         f"{limit:g}): " + "; ".join(problems) + ". Check the column names (data.chosen_key, "
                         "data.rejected_key, data.prompt_key), max_len and data.on_error; the full report: "
                         + json.dumps(report))


def write_report(path: Path, report: dict) -> None:
    path.write_text(json.dumps(report, indent=2) + "\n")


def load_tokenizer(cfg):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cfg.model.tokenizer or cfg.model.path)
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer {cfg.model.tokenizer or cfg.model.path} has no eos_token; the reward "
                         "is read at the final EOS, so set eos_token in tokenizer_config.json")
    if tok.pad_token_id is None:  # pad positions are never read (right padding + causal attention)
        tok.pad_token = tok.eos_token
    return tok


def load_data(cfg, tok, out: Path, is_main: bool, barrier: Callable[[], None]):
    """Rank 0 reads and tokenizes once and saves the result; the other ranks load it from disk."""
    import datasets

    cache = out / "data_cache"
    names_file = cache / "sources.json"
    if is_main:
        train, test, report, names = prepare_sources(cfg, tok)
        train.save_to_disk(str(cache / "train"))
        if test is not None:
            test.save_to_disk(str(cache / "test"))
        elif (cache / "test").exists():
            import shutil

            shutil.rmtree(cache / "test")
        names_file.write_text(json.dumps(names))
        write_report(out / "data_report.json", report)
        print(f"[rm_trainer] data: {json.dumps(report)}", flush=True)
    barrier()
    train = datasets.load_from_disk(str(cache / "train")).with_format("python")
    test = datasets.load_from_disk(str(cache / "test")).with_format("python") if (cache / "test").exists() else None
    return train, test, json.loads(names_file.read_text())


def dry_run_report(cfg, tok) -> str:
    """Per-source counts and drops, token-length percentiles, the truncated fraction, and one rendered
    example with the scoring token marked. No process group, no model."""
    train, _, report, _ = prepare_sources(cfg, tok)
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
    ex = train[0]
    ids = ex["chosen_ids"]
    lines.append("example (chosen), the reward is read at the marked token:")
    lines.append("  " + tok.decode(ids[:-1]) + " \u27e6" + tok.decode(ids[-1:]) + "\u27e7")
    return "\n".join(lines)
