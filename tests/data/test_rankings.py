"""K-wise ranking rows (objectives/ranking_rows.py): any row is read or refused naming its field (hypothesis), both
layouts (scores or ranks; UltraFeedback's completions) give the same ranking, each response is encoded
exactly as score_texts encodes it, bad rows stop with file:line and field or are counted, and a batch
holds every response once, padded or packed."""

from __future__ import annotations

import json
import math

import datasets
import pytest
from helpers import objective, tokenize_rows
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from rm_trainer.data.tokenize import encode_item, special_prefix
from rm_trainer.demo import HARMFUL, HELPFUL
from rm_trainer.errors import DataError
from rm_trainer.objectives.ranking_rows import (
    RankingKeys,
    RankingReader,
    detect_ranking_format,
    ranking_problem,
    ranking_texts,
)


def tokenize_rankings(ds, fmt, tok, max_len, on_error, keys=RankingKeys(), source_id=0, path=""):
    return tokenize_rows(RankingReader, ds, fmt, tok, max_len, on_error, keys, source_id, path)


collate_rankings = objective(train={"objective": "ranking"}).collate

KEYS = RankingKeys()
ROW = {"prompt": "Human: hi Assistant:", "responses": [" a", " b", " c"], "scores": [3, 1, 2]}
UF = {"instruction": "hi", "completions": [{"response": " a", "overall_score": 7.5, "fine-grained_score": 4.0},
                                           {"response": " b", "overall_score": 2, "fine-grained_score": 4.5}]}
JSON = st.recursive(st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats() | st.text(max_size=4),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
                    max_leaves=8)


def usable(row, fmt) -> bool:
    problem = ranking_problem(row, fmt, KEYS)
    if problem is None:
        prompt, responses, scores = ranking_texts(row, fmt, KEYS)
        assert len(responses) == len(scores) >= 2 and all(math.isfinite(s) for s in scores)
        assert all(isinstance(r, str) for r in responses)
    else:
        assert isinstance(problem, str) and problem
    return problem is None


@settings(max_examples=300, deadline=None)
@given(row=JSON, fmt=st.sampled_from(["ranking", "ultrafeedback"]))
def test_any_json_value_is_read_or_refused_without_crashing(row, fmt):
    usable(row, fmt)


@settings(max_examples=400, deadline=None)
@given(field=st.sampled_from(["prompt", "responses", "scores"]), value=JSON, index=st.integers(0, 2),
       whole=st.booleans())
def test_a_mutated_field_is_named_in_the_problem(field, value, index, whole):
    row = json.loads(json.dumps(ROW))
    if whole or field == "prompt":
        row[field] = value
    else:
        row[field][index] = value
    if not usable(row, "ranking"):
        problem = ranking_problem(row, "ranking", KEYS)
        assert problem.startswith((f"field {field}", f"field '{field}'")) or (
            field == "responses" and "response" in problem), problem


@settings(max_examples=300, deadline=None)
@given(index=st.integers(0, 1), key=st.sampled_from(["response", "overall_score"]), value=JSON)
def test_a_mutated_ultrafeedback_completion_is_named(index, key, value):
    row = json.loads(json.dumps(UF))
    row["completions"][index][key] = value
    if not usable(row, "ultrafeedback"):
        assert f"completions[{index}].{key}" in ranking_problem(row, "ultrafeedback", KEYS)


def test_named_problems():
    cases = {
        "field 'scores' has 2 values for 3 responses": ROW | {"scores": [1, 2]},
        "field scores[1] is 'good'; expected a finite number": ROW | {"scores": [1, "good", 2]},
        "field scores[0] is nan; expected a finite number": ROW | {"scores": [float("nan"), 1, 2]},
        "field responses[2] is a int; expected text": ROW | {"responses": [" a", " b", 3]},
        "fields 'scores' and 'ranks' are both missing": {k: v for k, v in ROW.items() if k != "scores"},
        "1 response; a ranking needs at least 2": ROW | {"responses": [" a"], "scores": [1]},
        "field 'prompt' is missing": {k: v for k, v in ROW.items() if k != "prompt"},
    }
    for needle, row in cases.items():
        assert needle in ranking_problem(row, "ranking", KEYS), (needle, ranking_problem(row, "ranking", KEYS))
    bad_uf = json.loads(json.dumps(UF))
    del bad_uf["completions"][1]["overall_score"]
    assert ranking_problem(bad_uf, "ultrafeedback", KEYS) == (
        "field completions[1].overall_score is missing; expected a finite number")


def test_scores_ranks_and_ultrafeedback_give_the_same_ranking():
    assert detect_ranking_format(ROW, KEYS) == "ranking" and detect_ranking_format(UF, KEYS) == "ultrafeedback"
    by_ranks = {k: v for k, v in ROW.items() if k != "scores"} | {"ranks": [1, 3, 2]}  # 1 is best
    _, _, scores = ranking_texts(ROW, "ranking", KEYS)
    _, _, from_ranks = ranking_texts(by_ranks, "ranking", KEYS)
    assert sorted(range(3), key=lambda i: -scores[i]) == sorted(range(3), key=lambda i: -from_ranks[i]) == [0, 2, 1]
    assert ranking_texts(UF, "ultrafeedback", KEYS) == ("hi", [" a", " b"], [7.5, 2.0])
    fine = RankingKeys(uf_score="fine-grained_score")
    assert ranking_texts(UF, "ultrafeedback", fine)[2] == [4.0, 4.5]


def rows_file(tmp_path, rows) -> str:
    path = tmp_path / "rankings.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_each_response_is_encoded_as_score_texts_encodes_it(tmp_path, demo_assets):
    tok = AutoTokenizer.from_pretrained(demo_assets["model"])
    rows = [{"prompt": f"Human: question {i} Assistant:", "responses": [f" {HELPFUL[i]}", f" {HARMFUL[i]}",
                                                                        f" {HELPFUL[i + 1]}"], "scores": [2, 0, 1]}
            for i in range(4)]
    rows.append(ROW | {"scores": [1, 1, 1]})  # all tied: kept as a row, counted as a drop reason
    rows.append(ROW | {"responses": [" a", "   "]} | {"scores": [1, 0]})
    path = rows_file(tmp_path, rows)
    out = tokenize_rankings(datasets.Dataset.from_list(rows), "ranking", tok, 32, "error", path=path)
    assert out["status"] == ["", "", "", "", "all_responses_tied", "empty_response"]
    prefix = special_prefix(tok)
    for row, ids, scores in zip(rows, out["ids"], out["scores"], strict=True):
        assert ids == [encode_item(tok, (row["prompt"], r), 32, prefix) for r in row["responses"]]
        assert scores == [float(s) for s in row["scores"]]
    assert out["tokens"] == [sum(map(len, ids)) for ids in out["ids"]]


def test_a_bad_row_stops_with_file_line_and_field_or_is_counted(tmp_path, demo_assets):
    tok = AutoTokenizer.from_pretrained(demo_assets["model"])
    # ratings written as strings (an Arrow column holds one type, so every row has them): not numbers
    rows = [ROW | {"scores": [str(s) for s in ROW["scores"]]}] * 3
    path = rows_file(tmp_path, rows)
    ds = datasets.Dataset.from_list(rows)
    with pytest.raises(DataError, match=rf"{path}:1: field scores\[0\] is '3'; expected a finite number"):
        tokenize_rankings(ds, "ranking", tok, 32, "error", path=path)
    skipped = tokenize_rankings(ds, "ranking", tok, 32, "skip", path=path)
    assert skipped["status"] == ["malformed"] * 3 and skipped["ids"] == [[]] * 3


def test_a_batch_holds_every_response_once_padded_or_packed():
    rows = [{"ids": [[5, 6, 7], [5, 8]], "scores": [1.0, 0.0]},
            {"ids": [[9], [9, 10, 11, 12], [9, 13]], "scores": [0.0, 2.0, 1.0]}]
    seqs = [s for r in rows for s in r["ids"]]
    padded = collate_rankings(rows, pad_id=0)
    packed = collate_rankings(rows, pad_id=0, pack_len=6, packing=True)
    for b in (padded, packed):
        assert b.group.tolist() == [0, 0, 1, 1, 1] and b.scores.tolist() == [1.0, 0.0, 0.0, 2.0, 1.0]
        assert b.seqs.lens.tolist() == [len(s) for s in seqs]
    padded, packed = padded.seqs, packed.seqs
    assert [padded.input_ids[i, :n].tolist() for i, n in enumerate(padded.lens.tolist())] == seqs
    assert packed.input_ids.shape[1] <= 6
    for i, (row, col) in enumerate(packed.last.tolist()):
        n = len(seqs[i])
        assert packed.input_ids[row, col - n + 1:col + 1].tolist() == seqs[i]
        assert packed.position_ids[row, col - n + 1:col + 1].tolist() == list(range(n))
