"""The sources of a run, read, tokenized, split and mixed: every row ends up either used or counted under
a named reason, per source and split, in the data report (OUT/data_report.json). A source that loses
more than data.max_drop_fraction aborts the run with the report, so a wrong column name or max_len cannot
quietly train on nothing.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from rm_trainer.data.formats import PairKeys, PairLayout, load_source
from rm_trainer.data.tokenize import DROP_REASONS, KEPT_NOTES, SINGLE, tokenize_source
from rm_trainer.errors import DataError


def split_indices(n: int, frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, held-out rows) of a source: a seeded ceil(frac * n) of its rows are held out."""
    n_test = min(n - 1, int(np.ceil(frac * n))) if frac > 0 and n > 1 else 0
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def split_report(tokd, columns: dict[str, np.ndarray], idx: np.ndarray, keys: PairKeys, max_len: int,
                 malformed_before: int = 0, held_out: bool = False):
    """(rows kept for training, their report) of one split (`idx`: its rows of the tokenized source).
    Counts and lengths come from whole columns read once (`columns`), never row by row. Only the
    held-out split keeps each response's own encoding (tokenize.SINGLE), for the end-of-run report."""
    status = columns["status"][idx]
    counts = Counter(status.tolist())
    counts["malformed"] += malformed_before
    real = status != "malformed"
    lengths = {k: columns[k][idx][real] for k in ("prompt_tokens", "chosen_tokens", "rejected_tokens")}
    keep = idx[~np.isin(status, DROP_REASONS)]
    drop = (["status", "prompt_tokens", "chosen_tokens", "rejected_tokens"] + ([] if keys.margin else ["margin"])
            + ([] if keys.tie else ["tie"]) + ([] if held_out else list(SINGLE)))
    rep = _report(len(idx) + malformed_before, counts, lengths, max_len)
    kept = tokd.remove_columns(drop).select(keep)
    if keys.tie:  # tied pairs train with the tie loss: counted among the used ones (decoded values: a
        # source's own "tie" column of mixed JSON types passes its type on to this one)
        rep["ties"] = int(np.count_nonzero(np.asarray(kept["tie"], dtype=bool)))
    return kept, rep


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

    if cfg.train.objective != "pairs":
        return _prepare_rows(cfg, tok, work_dir)
    d = cfg.data
    keys = PairKeys(d.prompt_key, d.chosen_key, d.rejected_key, d.margin_key, d.tie_key)
    trains, tests, report, names = [], [], {}, []
    for i, src in enumerate(d.source_list()):
        name = src.name or Path(src.path).stem
        names.append(name)
        what = f"data.sources[{i}]." if d.sources else "data."
        ds, fmt, bad = load_source(src.path, d.format, keys, d.on_error, work_dir, what + ("path" if d.sources else
                                                                                            "train_path"))
        tokd = tokenize_source(ds, fmt, tok, d, i, src.path, work_dir)
        cols = _columns(tokd)
        frac = d.test_fraction if src.test_fraction is None else src.test_fraction
        train_idx, test_idx = split_indices(len(tokd), 0 if src.test_path else frac, cfg.train.seed + i)
        tr, rep = split_report(tokd, cols, train_idx, keys, d.max_len, bad)
        report[name] = {"path": src.path, "weight": src.weight, "format": fmt, "train": rep}
        trains.append(_mix(tr, src.weight, cfg.train.seed + i) if src.weight != 1 else tr)
        if src.test_path:
            test_ds, test_fmt, test_bad = load_source(src.test_path, d.format, keys, d.on_error, work_dir,
                                                      what + "test_path")
            test_tokd = tokenize_source(test_ds, test_fmt, tok, d, i, src.test_path, work_dir)
            test_cols, test_idx = _columns(test_tokd), np.arange(len(test_tokd))
        elif len(test_idx):
            test_tokd, test_cols, test_bad = tokd, cols, 0
        if src.test_path or len(test_idx):
            te, report[name]["test"] = split_report(test_tokd, test_cols, test_idx, keys, d.max_len,
                                                    test_bad, held_out=True)
            tests.append(te)
    return _combine(trains, tests, report, names, d.max_drop_fraction, "pairs")


def _row_kind(cfg, tok, work_dir: str | None = None):
    """(layout, tokenize(ds, fmt, i, path), split_report(tokd, idx, malformed_before)) of the rows of
    --objective ranking (data.rankings) or regression (data.ratings)."""
    from rm_trainer.data import rankings, ratings

    d = cfg.data
    if cfg.train.objective == "ranking":
        keys = rankings.RankingKeys(prompt=d.prompt_key, uf_score=d.ranking_score)
        return (rankings.RankingLayout(keys),
                lambda ds, fmt, i, path: rankings.tokenize_rankings(ds, fmt, tok, d.max_len, d.on_error, keys, i, path,
                                                                    d.num_proc),
                lambda tokd, idx, bad: rankings.split_report(tokd, idx, d.max_len, bad))
    keys = ratings.RatingKeys(tuple(d.attributes), d.prompt_key, d.response_key, d.missing_attributes == "mask")
    rate = lambda ds, i, path: ratings.tokenize_ratings(ds, tok, d.max_len, d.on_error, keys, i, path,  # noqa: E731
                                                        d.num_proc)
    rate_report = lambda tokd, idx, bad: ratings.split_report(tokd, idx, d.max_len, bad, keys.attributes)  # noqa: E731
    if cfg.train.objective == "regression":
        return ratings.RatingLayout(keys), lambda ds, fmt, i, path: rate(ds, i, path), rate_report
    return _mixed_kind(cfg, tok, work_dir, keys, rate, rate_report)


def _mixed_kind(cfg, tok, work_dir: str | None, keys, rate, rate_report):
    """_row_kind of --objective bt+regression: each source rated responses or pairs (data.mixed), read and
    counted by its own reader, then kept as mixed rows."""
    from rm_trainer.data import mixed, ratings

    d = cfg.data
    pair_keys = PairKeys(d.prompt_key, d.chosen_key, d.rejected_key)
    layout = mixed.MixedLayout(PairLayout(pair_keys), ratings.RatingLayout(keys))

    def tokenize(ds, fmt: str, i: int, path: str):
        return rate(ds, i, path) if fmt == "rating" else tokenize_source(ds, fmt, tok, d, i, path, work_dir)

    def report(tokd, idx, bad):
        if "targets" in tokd.column_names:
            kept, rep = rate_report(tokd, idx, bad)
            return mixed.unify_ratings(kept), rep
        kept, rep = split_report(tokd, _columns(tokd), idx, pair_keys, d.max_len, bad)
        return mixed.unify_pairs(kept, len(keys.attributes)), rep

    return layout, tokenize, report


def _prepare_rows(cfg, tok, work_dir: str | None) -> tuple[Any, Any, dict, list[str]]:
    """prepare_sources for --objective ranking or regression: the same sources, splits, mixture and drop
    accounting, over ranking rows (data.rankings) or rated responses (data.ratings)."""
    d = cfg.data
    layout, tokenize, rows_report = _row_kind(cfg, tok, work_dir)
    trains, tests, report, names = [], [], {}, []

    def read(path: str, field: str, i: int):
        ds, fmt, bad = load_source(path, d.format, None, d.on_error, work_dir, field, layout=layout)
        return tokenize(ds, fmt, i, path), fmt, bad

    for i, src in enumerate(d.source_list()):
        name = src.name or Path(src.path).stem
        names.append(name)
        what = f"data.sources[{i}]." if d.sources else "data."
        tokd, fmt, bad = read(src.path, what + ("path" if d.sources else "train_path"), i)
        frac = d.test_fraction if src.test_fraction is None else src.test_fraction
        train_idx, test_idx = split_indices(len(tokd), 0 if src.test_path else frac, cfg.train.seed + i)
        tr, rep = rows_report(tokd, train_idx, bad)
        report[name] = {"path": src.path, "weight": src.weight, "format": fmt, "train": rep}
        trains.append(_mix(tr, src.weight, cfg.train.seed + i) if src.weight != 1 else tr)
        test_tokd, test_bad = tokd, 0
        if src.test_path:
            test_tokd, _, test_bad = read(src.test_path, what + "test_path", i)
            test_idx = np.arange(len(test_tokd))
        if len(test_idx):
            te, report[name]["test"] = rows_report(test_tokd, test_idx, test_bad)
            tests.append(te)
    return _combine(trains, tests, report, names, d.max_drop_fraction, "rows")


def _combine(trains: list, tests: list, report: dict, names: list[str], max_drop: float, unit: str):
    """The sources' splits as one train and one test dataset, after the drop check; report["_total"] counts
    their `unit` (pairs, or ranking rows)."""
    import datasets

    _check_drops(report, max_drop)
    train = datasets.concatenate_datasets(trains) if len(trains) > 1 else trains[0]
    test = (datasets.concatenate_datasets(tests) if len(tests) > 1 else tests[0]) if tests else None
    if len(train) == 0:
        raise DataError(f"no usable training {unit} in any source: {json.dumps(report)}")
    report["_total"] = {f"train_{unit}": len(train), f"test_{unit}": len(test) if test is not None else 0}
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


def objective_line(cfg, report: dict) -> str:
    """The objective, and the sequences one micro-batch's forward runs (per rank, per micro step)."""
    t = cfg.train
    if t.objective == "pairs":
        return (f"objective pairs (Bradley-Terry): each forward runs {2 * t.micro_batch_size} sequences "
                f"(chosen and rejected of {t.micro_batch_size} pairs), {t.grad_accum} per step and rank")
    if t.objective == "bt+regression":
        return (f"objective bt+regression (BT x{t.bt_weight:g} on the combined reward of pairs, MSE on "
                f"{', '.join(cfg.data.attributes)} of rated rows): each forward runs 2 sequences per pair and 1 "
                f"per rated row, {t.micro_batch_size} rows, {t.grad_accum} per step and rank")
    if t.objective == "regression":
        w = t.attribute_weights or {}
        return (f"objective regression (MSE on {len(cfg.data.attributes)} attributes: "
                f"{', '.join(f'{a} x{w.get(a, 1.0):g}' for a in cfg.data.attributes)}; missing values "
                f"{'masked' if cfg.data.missing_attributes == 'mask' else 'refused'}): each forward runs "
                f"{t.micro_batch_size} sequences, one per rated response, {t.grad_accum} per step and rank")
    k = [r["train"]["responses_per_row"]["mean"] for n, r in report.items()
         if not n.startswith("_") and "responses_per_row" in r["train"]]
    k_mean = sum(k) / len(k) if k else 2.0
    return (f"objective ranking ({t.ranking_loss} loss): each response one sequence, each forward about "
            f"{t.micro_batch_size * k_mean:.1f} sequences ({t.micro_batch_size} rows of {k_mean:.2f} responses), "
            f"{t.grad_accum} per step and rank; splitting the rows into pairs would run "
            f"{t.micro_batch_size * k_mean * (k_mean - 1):.1f}")


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
    lines.append(objective_line(cfg, report))
    ids = (ex["ids"] if "targets" in ex and not isinstance(ex["ids"][0], list) else ex["ids"][0]) if "ids" in ex \
        else ex["chosen_ids"]
    nested = "ids" in ex and isinstance(ex["ids"][0], list)  # rankings and bt+regression's mixed rows
    which = "first sequence" if nested else "rated response" if "targets" in ex else "chosen"
    lines.append(f"example ({which}), the reward is read at the marked token:")
    lines.append("  " + tok.decode(ids[:-1]) + " \u27e6" + tok.decode(ids[-1:]) + "\u27e7")
    return "\n".join(lines)
