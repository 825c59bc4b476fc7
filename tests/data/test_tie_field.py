"""Tied pairs (--tie_key): the field's values (true/false, or a preference strength where 0 is a tie),
refused with file:line and field when they are anything else, carried as a `tie` column, and counted in
the data report."""

from __future__ import annotations

import json
import math

import pytest
from helpers import load_pairs as load_source
from helpers import prepare as prepare_sources
from helpers import tokenize_pairs as tokenize_source
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from rm_trainer.cli.train_flags import load_run_config
from rm_trainer.demo import HARMFUL, HELPFUL
from rm_trainer.errors import DataError
from rm_trainer.objectives.pair_rows import PairKeys, is_tie, row_problem

KEYS = PairKeys(tie="tie")
ROW = {"prompt": "Human: hi Assistant:", "chosen": " a", "rejected": " b"}
JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats() | st.text(max_size=5),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner,
                                                                                       max_size=2), max_leaves=5)


@settings(max_examples=300, deadline=None)
@given(JSON_VALUES)
def test_any_tie_value_is_read_or_refused_naming_the_field(value):
    row = ROW | {"tie": value}
    problem = row_problem(row, "prompt", KEYS)
    ok = value is None or isinstance(value, bool) or (isinstance(value, int | float) and math.isfinite(value))
    assert (problem is None) == ok, (value, problem)
    if ok:
        assert is_tie(row, KEYS) == (value is True or (value is not None and not isinstance(value, bool)
                                                        and value == 0))
    else:
        assert problem.startswith("field 'tie' is") and "0 for a tie" in problem


def test_without_tie_key_nothing_is_a_tie():
    assert not is_tie(ROW | {"tie": True}, PairKeys())


def flags(path, model, *extra, tie_key="tie"):
    return ["--model", model, "--output_dir", "/tmp/unused", "--data", str(path), *extra] + (
        ["--tie_key", tie_key] if tie_key else [])


def test_the_tie_column_and_the_report(tmp_path, demo_assets):
    tok = AutoTokenizer.from_pretrained(demo_assets["model"])
    values = [True, False, 0, 0.0, 2.5, -1, None, "missing"]
    rows = [ROW | {"chosen": f" {HELPFUL[i]}", "rejected": f" {HARMFUL[i]}"} | ({} if v == "missing" else {"tie": v})
            for i, v in enumerate(values)]
    path = tmp_path / "ties.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg, _ = load_run_config(flags(path, demo_assets["model"], "--test_fraction", "0"))
    ds, fmt, _ = load_source(str(path), "auto", KEYS, "error")
    assert tokenize_source(ds, fmt, tok, cfg.data, 0, str(path))["tie"] == [True, False, True, True, False, False,
                                                                          False, False]
    train, _, report, _ = prepare_sources(cfg, tok)
    assert report["train"]["train"]["ties"] == 3 and train["tie"] == tokenize_source(ds, fmt, tok, cfg.data)["tie"]
    cfg, _ = load_run_config(flags(path, demo_assets["model"], "--test_fraction", "0", tie_key=None))
    train, _, report, _ = prepare_sources(cfg, tok)
    assert "tie" not in train.column_names and "ties" not in report["train"]["train"]


def test_a_bad_tie_value_names_file_line_and_field(tmp_path, demo_assets):
    tok = AutoTokenizer.from_pretrained(demo_assets["model"])
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ROW | {"tie": True}) + "\n" + json.dumps(ROW | {"tie": "yes"}) + "\n")
    cfg, _ = load_run_config(flags(path, demo_assets["model"]))
    ds, fmt, _ = load_source(str(path), "auto", KEYS, "error")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: field 'tie' is 'yes'; expected true/false"):
        tokenize_source(ds, fmt, tok, cfg.data, 0, str(path))
