"""Reading every shape, and a malformed-input suite: each error names file:line (or row) and field.

A source's format is decided once, from its first row; rows are checked against it while they are
tokenized (or, for JSON-lines `datasets` cannot parse, by the Python fallback), so the suite runs the
whole read path: load_source + tokenize_source.
"""

import json
from collections import Counter

import pytest
from helpers import load_pairs as load_source
from helpers import tokenize_pairs as tokenize_source
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from rm_trainer.cli.train_flags import load_run_config
from rm_trainer.data.formats import common_prefix_len, render_conversation, split_hh
from rm_trainer.errors import DataError
from rm_trainer.objectives.pair_rows import PairKeys as Keys

K = Keys()


@pytest.fixture(scope="module")
def tok(demo_assets):
    t = AutoTokenizer.from_pretrained(demo_assets["model"])
    t.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}"
    return t


def read(path, fmt, keys, on_error, demo_assets, tok):
    """(status counts of the tokenized rows, format) of one source, as training reads it."""
    flags = ["--model", demo_assets["model"], "--output_dir", "/tmp/unused", "--data", path, "--format", fmt,
             "--on_error", on_error, "--prompt_key", keys.prompt, "--chosen_key", keys.chosen,
             "--rejected_key", keys.rejected] + (["--margin_key", keys.margin] if keys.margin else [])
    cfg, _ = load_run_config(flags)
    ds, fmt, bad = load_source(path, fmt, keys, on_error)
    counts = Counter(tokenize_source(ds, fmt, tok, cfg.data, 0, path)["status"])
    counts["malformed"] += bad
    return counts, fmt


def jsonl(tmp_path, lines, name="bad.jsonl"):
    p = tmp_path / name
    p.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return str(p)


OK = {"chosen": "Human: hi Assistant: a", "rejected": "Human: hi Assistant: b"}
MSG = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}]

# (rows written to the file, format, expected message: file:LINE: field ...)
MALFORMED = [
    ([OK, '{"chosen": "a", "rejected": '], "auto", r":2: invalid JSON"),
    ([OK, "[1, 2]"], "auto", r":2: each row must be a JSON object, got list"),
    ([OK, {"rejected": "b"}], "auto", r":2: field 'chosen' is missing"),
    ([OK, {"chosen": "a"}], "auto", r":2: field 'rejected' is missing"),
    ([OK, "", {"chosen": 3, "rejected": "b"}], "auto", r":3: field 'chosen' is a int, not text"),
    ([OK, {"chosen": "a", "rejected": None}], "auto", r":2: field 'rejected' is missing"),
    ([OK, {"chosen": "a", "rejected": {"x": 1}}], "auto", r":2: field 'rejected' is a dict, not text"),
    ([OK, {"chosen": "a", "rejected": True}], "auto", r":2: field 'rejected' is a bool, not text"),
    ([{"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": 5, "chosen": "a", "rejected": "b"}], "prompt",
     r":2: field 'prompt' is a int; expected a string"),
    ([{"prompt": "q", "chosen": "a", "rejected": "b"}, {"chosen": "a", "rejected": "b"}], "prompt",
     r":2: field 'prompt' is missing"),
    ([{"chosen": MSG, "rejected": MSG}, {"chosen": [{"content": "hi"}], "rejected": MSG}], "auto",
     r":2: field chosen\[0\].role is missing"),
    ([{"chosen": MSG, "rejected": MSG}, {"chosen": MSG, "rejected": [{"role": "user"}]}], "auto",
     r":2: field rejected\[0\].content is missing"),
    ([{"chosen": MSG, "rejected": MSG}, {"chosen": [{"role": "user", "content": 7}], "rejected": MSG}], "auto",
     r":2: field chosen\[0\].content is a int"),
    ([{"chosen": MSG, "rejected": MSG}, {"chosen": ["hi"], "rejected": MSG}], "auto",
     r":2: field chosen\[0\]: expected a \{role, content\} object, got str"),
    ([{"chosen": MSG, "rejected": MSG}, {"chosen": [{"role": 1, "content": "x"}], "rejected": MSG}], "auto",
     r":2: field chosen\[0\].role is a int"),
    ([{"chosen": MSG, "rejected": MSG}, {"chosen": [], "rejected": MSG}], "conversational",
     r":2: field 'chosen': expected a non-empty list"),
    ([{"chosen": MSG, "rejected": MSG, "prompt": [{"role": "user"}]}], "conversational",
     r":1: field prompt\[0\].content is missing"),
    ([{"chosen": "a", "rejected": "b", "m": "big"}], "auto", r":1: field 'm' is a str; expected a finite number"),
]


@pytest.mark.parametrize("rows,fmt,expected", MALFORMED, ids=[f"case{i}" for i in range(len(MALFORMED))])
def test_malformed_rows_name_file_line_and_field(tmp_path, rows, fmt, expected, demo_assets, tok):
    path = jsonl(tmp_path, rows)
    keys = Keys(margin="m") if "'m'" in expected else K
    with pytest.raises(DataError, match=r"bad\.jsonl" + expected) as e:
        read(path, fmt, keys, "error", demo_assets, tok)
    assert "data.on_error=skip" in str(e.value)  # says what to do


def test_skip_counts_malformed_rows_instead(tmp_path, demo_assets, tok):
    path = jsonl(tmp_path, [OK, '{"chosen": ', OK, {"chosen": 3, "rejected": "b"}, [1]])
    counts, _ = read(path, "auto", K, "skip", demo_assets, tok)
    assert counts["malformed"] == 3 and sum(counts.values()) == 5
    path = jsonl(tmp_path, [OK, {"chosen": "a", "rejected": None}, OK], "ok_json.jsonl")  # datasets reads it
    counts, _ = read(path, "auto", K, "skip", demo_assets, tok)
    assert counts["malformed"] == 1 and sum(counts.values()) == 3


PROMPTED = {"prompt": "Human: hi Assistant:", "chosen": " a", "rejected": " b"}


@pytest.mark.parametrize("rows,expected", [
    ([PROMPTED, PROMPTED | {"prompt": None}], r":2: field 'prompt' is missing; expected a string \(this source "
                                               r"has explicit prompts, decided from its first row\)"),
    ([OK, OK | {"prompt": "Human: hi Assistant:"}], r":2: field 'prompt' is set, but this source holds HH full "
                                                    r"texts"),
], ids=["null_prompt_in_prompt_file", "prompt_in_hh_file"])
def test_format_is_decided_once_per_source(tmp_path, rows, expected, demo_assets, tok):
    """A row that does not fit its source's format is malformed, never quietly read another way (a
    `"prompt": null` row used to become an HH row)."""
    path = jsonl(tmp_path, rows)
    with pytest.raises(DataError, match=r"bad\.jsonl" + expected):
        read(path, "auto", K, "error", demo_assets, tok)
    counts, fmt = read(path, "auto", K, "skip", demo_assets, tok)
    assert counts["malformed"] == 1 and fmt == ("prompt" if "prompt" in rows[0] else "hh")


@pytest.mark.parametrize("setup,expected", [
    (lambda t: str(t / "missing.jsonl"), "missing.jsonl: file not found"),
    (lambda t: (t / "e.jsonl").write_text("") and None or str(t / "e.jsonl"), "e.jsonl: file is empty"),
    (lambda t: (t / "x.csv").write_text("a,b\n") and None or str(t / "x.csv"), "unsupported data file type"),
    (lambda t: jsonl(t, [{"answer": "a", "rejected": "b"}], "cols.jsonl"), "no 'chosen' field in any row"),
])
def test_file_level_errors(tmp_path, setup, expected):
    with pytest.raises(DataError, match=expected):
        load_source(setup(tmp_path), "auto", K, on_error="error")


def test_configurable_column_names(tmp_path):
    path = jsonl(tmp_path, [{"q": "p", "good": "a", "bad": "b"}])
    ds, fmt, bad = load_source(path, "auto", Keys("q", "good", "bad"), "error")
    assert ds[0]["good"] == "a" and fmt == "prompt" and bad == 0


def test_all_file_kinds_load(tmp_path):
    import datasets

    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"}] * 3
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "x.parquet"))
    (tmp_path / "x.json").write_text(json.dumps(rows))
    ds.save_to_disk(str(tmp_path / "saved"))
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    for p in ("x.parquet", "x.json", "saved", str(arrow.relative_to(tmp_path))):
        loaded, fmt, bad = load_source(str(tmp_path / p), "auto", K, "error")
        assert len(loaded) == 3 and bad == 0 and fmt == "prompt", p


def test_hh_split_at_last_common_assistant_turn():
    c = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: help me\n\nAssistant: Sure, here is how."
    r = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: help me\n\nAssistant: No."
    p, cr, rr = split_hh(c, r)
    assert p.endswith("Human: help me\n\nAssistant:") and cr == " Sure, here is how." and rr == " No."
    # responses that start alike still split at the turn, not inside the answer
    p2, cr2, rr2 = split_hh("Human: q Assistant: Sure, yes", "Human: q Assistant: Sure, no")
    assert p2 == "Human: q Assistant:" and cr2 == " Sure, yes" and rr2 == " Sure, no"
    assert split_hh("no turns here", "no turns there") is None


def test_render_conversation_with_template(tmp_path, demo_assets):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_assets["model"])
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} {% endfor %}" \
               "{% if add_generation_prompt %}[assistant] {% endif %}"
    chosen = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "clear kind"}]
    rejected = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "rude"}]
    p, c, r = render_conversation(tok, None, chosen, rejected, template)
    assert p == "[user] hi [assistant] " and c == "clear kind " and r == "rude "
    p, c, r = render_conversation(tok, "hi", chosen[1:], rejected[1:], template)
    assert p == "[user] hi [assistant] " and c == "clear kind "


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="ab\u00e9", max_size=40), st.text(alphabet="ab\u00e9", max_size=40))
def test_common_prefix_len_equals_the_character_loop(a, b):
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    assert common_prefix_len(a, b) == n
