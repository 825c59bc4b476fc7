"""Rated responses (data/ratings.py, --objective regression): any row is read or refused naming its field
(hypothesis); a missing rating is an error naming it, or with the mask a NaN target; each response is
encoded exactly as score_texts encodes it; drops are counted by reason; a batch holds each row once, with
its K targets, padded or packed."""

from __future__ import annotations

import json
import math

import datasets
import pytest
import torch
from helpers import objective, tokenize_rows
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from rm_trainer.config import DataConfig
from rm_trainer.data.tokenize import encode_item, special_prefix
from rm_trainer.errors import DataError
from rm_trainer.objectives.rating_rows import RatingKeys, RatingReader, rating_problem, rating_targets


def tokenize_ratings(ds, tok, max_len, on_error, keys, source_id=0, path=""):
    return tokenize_rows(RatingReader, ds, "rating", tok, max_len, on_error, keys, source_id, path)


def split_report(tokd, idx, max_len, attributes):
    keys = RatingKeys(tuple(attributes), mask_missing=True)
    return RatingReader(None, DataConfig(max_len=max_len), keys=keys).split(tokd, idx)


collate_ratings = objective(train={"objective": "regression"},
                            data={"attributes": ["helpfulness", "verbosity"]}).collate

KEYS = RatingKeys(("helpfulness", "verbosity"))
MASKED = RatingKeys(("helpfulness", "verbosity"), mask_missing=True)
ROW = {"prompt": "Human: hi Assistant:", "response": " hello there", "helpfulness": 3, "verbosity": 1.5}
JSON = st.recursive(st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats() | st.text(max_size=4),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
                    max_leaves=8)


def usable(row, keys) -> bool:
    problem = rating_problem(row, keys)
    if problem is None:
        targets = rating_targets(row, keys)
        assert len(targets) == 2 and all(math.isfinite(t) or (keys.mask_missing and math.isnan(t)) for t in targets)
    else:
        assert isinstance(problem, str) and problem
    return problem is None


@settings(max_examples=300, deadline=None)
@given(row=JSON, masked=st.booleans())
def test_any_json_value_is_read_or_refused_without_crashing(row, masked):
    usable(row, MASKED if masked else KEYS)


@settings(max_examples=400, deadline=None)
@given(field=st.sampled_from(["prompt", "response", "helpfulness", "verbosity"]), value=JSON, masked=st.booleans(),
       drop=st.booleans())
def test_a_mutated_field_is_named_in_the_problem(field, value, masked, drop):
    row = dict(ROW)
    if drop:
        del row[field]
    else:
        row[field] = value
    keys = MASKED if masked else KEYS
    if not usable(row, keys):
        assert rating_problem(row, keys).startswith(f"field {field!r}"), rating_problem(row, keys)
    elif field in ("helpfulness", "verbosity") and (drop or value is None):
        assert masked and math.isnan(rating_targets(row, keys)[KEYS.attributes.index(field)])


def test_named_problems():
    cases = {
        "field 'verbosity' is missing; give a number, or set data.missing_attributes mask": ROW | {"verbosity": None},
        "field 'helpfulness' is 'good'; expected a finite number": ROW | {"helpfulness": "good"},
        "field 'helpfulness' is inf; expected a finite number": ROW | {"helpfulness": float("inf")},
        "field 'helpfulness' is a bool; expected a finite number": ROW | {"helpfulness": True},
        "field 'response' is a list; expected the response text": ROW | {"response": ["a"]},
        "field 'prompt' is missing": {k: v for k, v in ROW.items() if k != "prompt"},
    }
    for needle, row in cases.items():
        assert needle in rating_problem(row, KEYS), (needle, rating_problem(row, KEYS))
    assert rating_problem(ROW | {"verbosity": None}, MASKED) is None


def rows_file(tmp_path, rows) -> str:
    path = tmp_path / "ratings.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_each_response_is_encoded_as_score_texts_encodes_it_and_drops_are_counted(tmp_path, demo_assets):
    tok = AutoTokenizer.from_pretrained(demo_assets["model"])
    rows = [ROW | {"prompt": f"Human: question {i} Assistant:", "helpfulness": i} for i in range(4)]
    rows.append(ROW | {"helpfulness": None, "verbosity": None})  # nothing rated: counted, not used
    rows.append(ROW | {"response": "   "})
    rows.append(ROW | {"verbosity": None})  # masked: kept, NaN target
    path = rows_file(tmp_path, rows)
    out = tokenize_ratings(datasets.Dataset.from_list(rows), tok, 32, "error", MASKED, path=path)
    assert out["status"] == ["", "", "", "", "no_ratings", "empty_response", ""]
    prefix = special_prefix(tok)
    for row, ids in zip(rows, out["ids"], strict=True):
        assert ids == [encode_item(tok, (row["prompt"], row["response"]), 32, prefix)]
    assert out["targets"][2] == [2.0, 1.5] and math.isnan(out["targets"][6][1])
    kept, rep = split_report(out, torch.arange(7).numpy(), 32, attributes=MASKED.attributes)
    assert len(kept) == 5 and rep["used"] == 5 and rep["dropped"] == {"malformed": 0, "empty_response": 1,
                                                                       "no_ratings": 1}
    assert rep["attributes"]["helpfulness"]["rated"] == 5 and rep["attributes"]["verbosity"]["rated"] == 4


def test_a_bad_row_stops_with_file_line_and_field_or_is_counted(tmp_path, demo_assets):
    tok = AutoTokenizer.from_pretrained(demo_assets["model"])
    rows = [ROW, ROW | {"verbosity": None}, ROW]
    path = rows_file(tmp_path, rows)
    ds = datasets.Dataset.from_list(rows)
    with pytest.raises(DataError, match=rf"{path}:2: field 'verbosity' is missing"):
        tokenize_ratings(ds, tok, 32, "error", KEYS, path=path)
    skipped = tokenize_ratings(ds, tok, 32, "skip", KEYS, path=path)
    assert skipped["status"] == ["", "malformed", ""]


def test_a_batch_holds_each_row_once_with_its_targets_padded_or_packed(demo_assets):
    rows = [{"ids": [[5, 6, 7]], "targets": [1.0, float("nan")], "source": 0},
            {"ids": [[8, 9]], "targets": [2.0, 3.0], "source": 1}]
    padded = collate_ratings(rows, pad_id=0)
    packed = collate_ratings(rows, pad_id=0, pack_len=16, packing=True)
    assert padded.seqs.input_ids.tolist() == [[5, 6, 7], [8, 9, 0]] and padded.seqs.lens.tolist() == [3, 2]
    assert torch.equal(padded.targets.nan_to_num(-1), torch.tensor([[1.0, -1.0], [2.0, 3.0]]))
    assert padded.rows == 2 and padded.source.tolist() == [0, 1]
    assert packed.seqs.input_ids.tolist() == [[5, 6, 7, 8, 9]] and packed.seqs.last.tolist() == [[0, 2], [0, 4]]
    assert torch.equal(packed.targets.nan_to_num(-1), padded.targets.nan_to_num(-1))
