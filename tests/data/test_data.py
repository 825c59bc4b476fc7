"""Tokenization, the truncation policy in practice, accounting, mixtures, and the real HH-RLHF file."""

import json

import pytest
from helpers import SHARED_HH
from helpers import prepare as prepare_sources
from transformers import AutoTokenizer

from rm_trainer import objectives
from rm_trainer.cli.train_flags import load_run_config
from rm_trainer.data.sources import dry_run_report
from rm_trainer.data.tokenize import encode, load_tokenizer
from rm_trainer.errors import DataError


@pytest.fixture(scope="module")
def tok(demo_assets):
    return AutoTokenizer.from_pretrained(demo_assets["model"])


def cfg_for(demo_assets, tmp_path, *args):
    cfg, _ = load_run_config(["--model", demo_assets["model"], "--output_dir", str(tmp_path / "o"), *args])
    return cfg


def write(tmp_path, name, rows):
    p = tmp_path / name
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(p)


def test_encode_ends_in_eos_and_truncation_keeps_it(tok):
    t = encode(tok, "Human: hi Assistant:", " the answer is clear", 64)
    assert t.chosen[-1] == tok.eos_token_id and not t.response_cut and t.prompt_cut == 0
    t = encode(tok, "Human: " + "the " * 40 + "Assistant:", " clear kind", 8)
    assert len(t.chosen) == 8 and t.chosen[-1] == tok.eos_token_id and t.prompt_cut > 0
    assert tok.decode(t.chosen[-3:-1]) == "clear kind"  # the response survived, the prompt's head did not


def test_every_row_is_used_or_counted(tmp_path, demo_assets):
    rows = [{"prompt": "Human: hi Assistant:", "chosen": " clear kind", "rejected": " rude wrong"},
            {"prompt": "Human: hi Assistant:", "chosen": " ", "rejected": " rude"},          # empty_response
            {"prompt": "Human: hi Assistant:", "chosen": " same", "rejected": " same"},      # identical_raw
            {"prompt": "Human: " + "the " * 30, "chosen": " clear " + "a " * 20 + "x",
             "rejected": " clear " + "a " * 20 + "y"},                                     # identical after cut
            {"prompt": "Human: " + "the " * 30 + "Assistant:", "chosen": " kind", "rejected": " rude"}]  # prompt cut
    path = write(tmp_path, "p.jsonl", rows)
    cfg = cfg_for(demo_assets, tmp_path, "--data", path, "--test_fraction", "0", "--max_len", "12",
                  "--max_drop_fraction", "1")
    train, test, report, names = prepare_sources(cfg, AutoTokenizer.from_pretrained(demo_assets["model"]))
    r = report["train"]["train"]
    assert r["rows"] == 5 and r["used"] == 2 and len(train) == 2 and test is None and names == ["train"]
    assert r["dropped"] == {"malformed": 0, "empty_response": 1, "identical_raw": 1, "identical_after_truncation": 1}
    assert r["kept_with_note"]["prompt_truncated"] == 1
    assert all(x["ids"][0][-1] == 3 and len(x["ids"][0]) <= 12 for x in train)  # EOS id 3, within max_len


def test_max_drop_fraction_aborts_with_the_report(tmp_path, demo_assets):
    rows = [{"prompt": "q", "chosen": " same", "rejected": " same"}] * 3
    rows.append({"prompt": "q", "chosen": " a", "rejected": " b"})
    cfg = cfg_for(demo_assets, tmp_path, "--data", write(tmp_path, "d.jsonl", rows), "--test_fraction", "0")
    with pytest.raises(ValueError, match=r"source 'train' \(train\): 75.0% of 4 rows dropped .*identical_raw"):
        prepare_sources(cfg, AutoTokenizer.from_pretrained(demo_assets["model"]))


def test_mixture_weights_and_per_source_splits(tmp_path, demo_assets):
    a = write(tmp_path, "a.jsonl", [{"prompt": "q", "chosen": f" clear {i}", "rejected": " rude"} for i in range(10)])
    b = write(tmp_path, "b.jsonl", [{"chosen": f"Human: q Assistant: kind {i}", "rejected": "Human: q Assistant: no"}
                                    for i in range(8)])
    cfg_file = tmp_path / "mix.yaml"
    cfg_file.write_text(f"data:\n  sources:\n    - {{path: {a}, weight: 2}}\n"
                        f"    - {{path: {b}, name: hh, weight: 0.5, test_fraction: 0.25}}\n  test_fraction: 0\n")
    cfg = cfg_for(demo_assets, tmp_path, "--config", str(cfg_file))
    train, test, report, names = prepare_sources(cfg, AutoTokenizer.from_pretrained(demo_assets["model"]))
    assert names == ["a", "hh"]
    assert report["a"]["train"]["rows"] == 10 and "test" not in report["a"]
    assert report["hh"]["train"]["rows"] == 6 and report["hh"]["test"]["rows"] == 2
    assert len(train) == 2 * 10 + 3  # every a-row twice, half of hh's 6
    assert sorted(set(train["source"])) == [0, 1] and set(test["source"]) == {1}


def test_conversational_rows_with_a_chat_template_file(tmp_path, demo_assets):
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}"
                        "{% if add_generation_prompt %}assistant: {% endif %}")
    msgs = lambda answer: [{"role": "user", "content": "tell me"}, {"role": "assistant", "content": answer}]  # noqa: E731
    path = write(tmp_path, "conv.jsonl", [{"chosen": msgs("clear kind"), "rejected": msgs("rude wrong")}] * 4)
    cfg = cfg_for(demo_assets, tmp_path, "--data", path, "--chat_template", str(template), "--test_fraction", "0")
    tok = load_tokenizer(cfg)  # attaches the template: it is saved with every checkpoint and reward.pt
    assert tok.chat_template == template.read_text()
    train, _, report, _ = prepare_sources(cfg, tok)
    assert report["train"]["train"]["used"] == 4
    text = tok.decode(train[0]["ids"][0])
    assert "tell me" in text and "clear kind" in text  # rendered through the template
    assert train[0]["ids"][0][-1] == tok.eos_token_id
    cfg = cfg_for(demo_assets, tmp_path, "--data", path, "--test_fraction", "0")  # no template anywhere
    with pytest.raises(DataError, match=r"conv.jsonl: holds conversations .* no chat template; pass --chat_template"):
        prepare_sources(cfg, load_tokenizer(cfg))


def test_dry_run_report_shows_lengths_and_the_scoring_token(tmp_path, demo_assets, tok):
    cfg = cfg_for(demo_assets, tmp_path, "--data", demo_assets["train"], "--test_data", demo_assets["test"],
                  "--max_len", "16")
    text = dry_run_report(cfg, tok, objectives.build(cfg))
    assert "train/train: 256 rows" in text and "train/test: 48 rows" in text
    assert "token lengths" in text and "exceed max_len=16" in text
    assert "\u27e6</s>\u27e7" in text  # the scoring token, marked


@pytest.mark.skipif(not SHARED_HH.is_file(), reason=f"real HH-RLHF pairs not found at {SHARED_HH}")
@pytest.mark.parametrize("max_len", [256, 512])
def test_real_hh_rlhf_prompt_split_and_drop_counts(tmp_path, demo_assets, max_len):
    import gzip

    from rm_trainer.data.formats import split_hh
    from rm_trainer.demo import train_tokenizer

    rows = [json.loads(line) for line in gzip.open(SHARED_HH, "rt")]
    tok_dir = tmp_path / "tok"
    tok = train_tokenizer([r["chosen"] for r in rows[:800]] + [r["rejected"] for r in rows[:800]], tok_dir,
                          vocab_size=1000, kind="bpe")
    splits = [split_hh(r["chosen"], r["rejected"]) for r in rows]
    for r, s in zip(rows, splits, strict=True):
        if s is not None:  # the same prompt for both sides, and the texts rebuild exactly
            assert r["chosen"] == s[0] + s[1] and r["rejected"] == s[0] + s[2] and s[0].endswith("Assistant:")
    cfg, _ = load_run_config(["--model", demo_assets["model"], "--tokenizer", str(tok_dir), "--data", str(SHARED_HH),
                              "--test_fraction", "0", "--max_len", str(max_len), "--output_dir", str(tmp_path / "o"),
                              "--max_drop_fraction", "0.5"])
    train, _, report, _ = prepare_sources(cfg, tok)
    r = report["train"]["train"]
    print(f"HH-RLHF max_len={max_len}: {json.dumps(r)}")
    assert r["rows"] == 2312 and r["used"] + sum(r["dropped"].values()) == 2312
    assert r["kept_with_note"]["hh_no_common_prompt"] == sum(s is None for s in splits)
    assert all(len(x[0]) <= max_len for x in train["ids"])
