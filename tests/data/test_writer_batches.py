"""Issue 34: a tokenized column's arrow type never depends on the rows of the first writer batch.

`datasets` writes a map's output 1,000 rows at a time and, without declared features, types each column
by the first batch. A first batch in which a list column is empty in every row (no pair was cut, so no
side has its own encoding; every row was a skipped malformed one) typed it `list<null>`, and the first
later batch with ids failed to cast. Each objective's reader here gets a file that starts with such a
batch and goes on with rows that are cut at max_len, with one and two tokenizing processes; the cached
data must hold, row by row, the ids each row gets when encoded alone.
"""

from __future__ import annotations

import json

import datasets
import pytest

from rm_trainer import objectives
from rm_trainer.cli.train_flags import load_run_config
from rm_trainer.data.cache import load, prepare_or_load
from rm_trainer.data.schema import features, tokenize_map
from rm_trainer.data.tokenize import encode, load_tokenizer, special_prefix
from rm_trainer.data.truncation import truncate
from rm_trainer.errors import DataError

MAX_LEN = 32
FIRST, REST = 1000, 1400  # one whole writer batch of quiet rows, then rows cut at MAX_LEN
WORDS = "tell me about the garden please kind answer careful useful".split()


def words(i: int, n: int) -> str:
    return " ".join(WORDS[(i + k) % len(WORDS)] for k in range(n))


def long_prompt(i: int) -> str:
    return f"Human: {words(i, 40)} Assistant:"


def pair_rows() -> list[dict]:
    short = [{"prompt": "Human: hi Assistant:", "chosen": f" {words(i, 3)}", "rejected": f" {words(i + 1, 2)}"}
             for i in range(FIRST)]
    cut = [{"prompt": long_prompt(i), "chosen": f" {words(i, 6)}", "rejected": f" {words(i + 3, 2)}"}
           for i in range(REST)]
    return short + cut


def ranking_rows() -> list[dict]:
    malformed = [{"prompt": "Human: hi Assistant:", "responses": "not a list", "scores": [1]}] * FIRST
    cut = [{"prompt": long_prompt(i), "responses": [f" {words(i, 6)}", f" {words(i + 1, 2)}", f" {words(i, 40)}"],
            "scores": [3, 1, 2]} for i in range(REST)]
    return malformed + cut


def rating_rows() -> list[dict]:
    malformed = [{"prompt": 7, "response": " kind", "helpfulness": 1, "verbosity": 1}] * FIRST
    cut = [{"prompt": long_prompt(i), "response": f" {words(i, 5 + i % 40)}", "helpfulness": i % 5,
            "verbosity": 1.5} for i in range(REST)]
    return malformed + cut


OBJECTIVES = {
    "pairs": (pair_rows, []),
    "ranking": (ranking_rows, ["--objective", "ranking", "--on_error", "skip"]),
    "regression": (rating_rows, ["--objective", "regression", "--attributes", "helpfulness,verbosity",
                                 "--on_error", "skip"]),
}


def expected(tok, prompt: str, responses: list[str]) -> tuple[list[list[int]], list[list[int]]]:
    """One row encoded alone: its K sequences under the one truncation rule, and each response as
    score_texts encodes it ([] where that is its sequence)."""
    prefix = special_prefix(tok)
    ids = lambda t: tok(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    seqs = truncate(prefix + ids(prompt), [ids(r) for r in responses], tok.eos_token_id, MAX_LEN, len(prefix)).seqs
    alone = [encode(tok, prompt, r, MAX_LEN, prefix).chosen for r in responses]
    return seqs, [[] if a == s else a for a, s in zip(alone, seqs, strict=True)]


@pytest.mark.parametrize("num_proc", [1, 2])
@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_a_quiet_first_writer_batch_then_cut_rows_prepares_row_for_row(demo_assets, tmp_path, objective, num_proc):
    make_rows, flags = OBJECTIVES[objective]
    rows = make_rows()
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg, _ = load_run_config(["--model", demo_assets["model"], "--data", str(path), "--test_data", str(path),
                              "--output_dir", str(tmp_path / "out"), "--max_len", str(MAX_LEN), "--num_proc",
                              str(num_proc), "--max_drop_fraction", "1", *flags])
    tok = load_tokenizer(cfg)
    dest, hit = prepare_or_load(cfg, tok, objectives.build(cfg))
    assert not hit
    train, test, _, report = load(dest)
    kept = rows if objective == "pairs" else rows[FIRST:]
    assert len(train) == len(test) == len(kept), report
    rep = next(v for k, v in report.items() if not k.startswith("_"))["train"]
    texts = [(r["prompt"], [r["chosen"], r["rejected"]] if objective == "pairs" else r.get("responses")
              or [r["response"]]) for r in kept]
    want = [expected(tok, p, rs) for p, rs in texts]
    assert train["ids"] == test["ids"] == [w[0] for w in want]
    assert test["single"] == [w[1] for w in want]  # the held-out split keeps each response's own encoding
    if objective == "pairs":
        assert rep["kept_with_note"]["prompt_truncated"] + rep["kept_with_note"]["response_truncated"] == REST
        # the shorter (rejected) side of a cut pair keeps more of its prompt alone; short pairs are not cut
        assert all(s[1] for s in test["single"][FIRST:]) and not any(s[1] for s in test["single"][:FIRST])
        return
    assert rep["dropped"]["malformed"] == FIRST and rep["fraction_truncated_at_max_len"] == 1.0
    if objective == "ranking":
        assert train["scores"] == [[3.0, 1.0, 2.0]] * REST
    else:
        assert train["targets"] == [[float(r["helpfulness"]), 1.5] for r in kept]


def _bug(batch, indices):
    return {"x": [1 // (i - i) for i in indices]}


def _user_error(batch, indices):
    raise DataError(f"rows.jsonl:{indices[0] + 1}: field 'x' is wrong")


@pytest.mark.parametrize("num_proc", [1, 2])
def test_a_worker_bug_keeps_its_traceback_named_by_source_and_a_user_error_its_message(tmp_path, capsys, num_proc):
    ds = datasets.Dataset.from_list([{"x": i} for i in range(4)])
    schema = features(x="int")
    with pytest.raises(ZeroDivisionError) as e:
        tokenize_map(ds, _bug, schema, path=str(tmp_path / "rows.jsonl"), source_id=3, num_proc=num_proc)
    assert f"while tokenizing source 3 ({tmp_path / 'rows.jsonl'})" in e.value.__notes__
    err = capsys.readouterr().err
    assert f"tokenizing source 3 ({tmp_path / 'rows.jsonl'}) failed with ZeroDivisionError" in err
    with pytest.raises(DataError, match=r"rows.jsonl:1: field 'x' is wrong") as e:
        tokenize_map(ds, _user_error, schema, path="rows.jsonl", source_id=0, num_proc=num_proc)
    assert not getattr(e.value, "__notes__", None) and "failed with" not in capsys.readouterr().err
