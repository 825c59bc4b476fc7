"""The sources of a run, read, tokenized, split and mixed: every row ends up either used or counted under
a named reason, per source and split, in the data report (OUT/data_report.json). A source that loses
more than data.max_drop_fraction aborts the run with the report, so a wrong column name or max_len cannot
quietly train on nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from rm_trainer.data.formats import load_source
from rm_trainer.errors import DataError


def split_indices(n: int, frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, held-out rows) of a source: a seeded ceil(frac * n) of its rows are held out."""
    n_test = min(n - 1, int(np.ceil(frac * n))) if frac > 0 and n > 1 else 0
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def _mix(ds, weight: float, seed: int):
    """weight 0.5: a seeded half; 2: every row twice; 1.5: once plus a seeded half."""
    import datasets

    whole, frac = int(weight), weight - int(weight)
    parts = [ds] * whole
    if frac > 0:
        rng = np.random.default_rng(seed)
        parts.append(ds.select(sorted(rng.choice(len(ds), round(frac * len(ds)), replace=False).tolist())))
    return datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]


def prepare_sources(cfg, tok, objective, work_dir: str | None = None) -> tuple[Any, Any, dict, list[str]]:
    """(train dataset, test dataset or None, report, source names), one source at a time through the
    objective's reader (objectives/base.RowReader: its layout, tokenization and split). One process, no
    process group. work_dir: where `datasets` may write its intermediate arrow files (default: its home
    cache)."""
    d = cfg.data
    reader = objective.reader(tok, work_dir)
    trains, tests, report, names = [], [], {}, []

    def read(path: str, field: str, i: int):
        ds, fmt, bad = load_source(path, d.format, reader.layout, d.on_error, work_dir, field)
        return reader.tokenize(ds, fmt, i, path), fmt, bad

    for i, src in enumerate(d.source_list()):
        name = src.name or Path(src.path).stem
        names.append(name)
        what = f"data.sources[{i}]." if d.sources else "data."
        tokd, fmt, bad = read(src.path, what + ("path" if d.sources else "train_path"), i)
        frac = d.test_fraction if src.test_fraction is None else src.test_fraction
        train_idx, test_idx = split_indices(len(tokd), 0 if src.test_path else frac, cfg.train.seed + i)
        tr, rep = reader.split(tokd, train_idx, bad)
        report[name] = {"path": src.path, "weight": src.weight, "format": fmt, "train": rep}
        trains.append(_mix(tr, src.weight, cfg.train.seed + i) if src.weight != 1 else tr)
        test_tokd, test_bad = tokd, 0
        if src.test_path:
            test_tokd, _, test_bad = read(src.test_path, what + "test_path", i)
            test_idx = np.arange(len(test_tokd))
        if len(test_idx):
            te, report[name]["test"] = reader.split(test_tokd, test_idx, test_bad, held_out=True)
            tests.append(te)
    return _combine(trains, tests, report, names, d.max_drop_fraction, objective.unit)


def _combine(trains: list, tests: list, report: dict, names: list[str], max_drop: float, unit: str):
    """The sources' splits as one train and one test dataset, after the drop check; report["_total"] counts
    their `unit` (pairs, or rows)."""
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


def dry_run_report(cfg, tok, objective) -> str:
    """Per-source counts and drops, token-length percentiles, the truncated fraction, and one rendered
    example with the scoring token marked. No process group, no model, nothing left on disk."""
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        train, _, report, _ = prepare_sources(cfg, tok, objective, work_dir=scratch)
        ids = train[0]["ids"][0]
        tokens, segment = (int(train.data.column(k).to_numpy().sum()) for k in ("tokens", "segment"))
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
                             f"{r['fraction_truncated_at_max_len']:.1%} of rows exceed max_len={cfg.data.max_len}")
    lines.append(objective.describe(report))
    if objective.shares_prompts and cfg.train.share_prompt != "off" and tokens:
        lines.append(f"shared prompts (--share_prompt {cfg.train.share_prompt}): {segment:,} tokens per epoch instead "
                     f"of {tokens:,} ({1 - segment / tokens:.1%} saved) where every row with a common prefix "
                     "shares it (on; auto: the rows where it costs less for the model, after the start-up check)")
    lines.append("example (the first training row's first sequence), the reward is read at the marked token:")
    lines.append("  " + tok.decode(ids[:-1]) + " \u27e6" + tok.decode(ids[-1:]) + "\u27e7")
    return "\n".join(lines)
