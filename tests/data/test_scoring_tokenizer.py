"""The sequence rule (one special prefix, one final EOS) and the tokenizer that reproduces it by itself, for
every tokenizer style real backbones ship with, in plain texts and chat-rendered conversations, including
what a caller may already have written (a BOS, an EOS). Property-based over texts: for any text the shipped
tokenizer's own call equals training's encode_item."""

from __future__ import annotations

import copy

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rm_trainer.data.scoring_tokenizer import scoring_tokenizer
from rm_trainer.data.tokenize import encode_item, lead_text, special_prefix
from rm_trainer.demo import CHAT_TEMPLATES, TOKENIZER_STYLES, tokenizer_variant

TEXTS = ["Human: where is the station? Assistant: left, then right", "the cat sat on the mat", "a b c"] * 30
BIG = 1 << 20


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("toks")
    return {s: tokenizer_variant(TEXTS, root / s, s, vocab_size=300) for s in TOKENIZER_STYLES}


def shipped(tok):
    t = copy.deepcopy(tok)
    assert scoring_tokenizer(t) == []
    return t


@pytest.fixture(scope="module")
def shipped_tokenizers(tokenizers):
    return {s: shipped(t) for s, t in tokenizers.items()}


@pytest.mark.parametrize("style", TOKENIZER_STYLES)
def test_one_prefix_and_one_eos_whatever_the_caller_wrote(tokenizers, style):
    tok = tokenizers[style]
    prefix = special_prefix(tok)
    assert prefix == ([tok.bos_token_id] if style in ("bos", "chat", "chat_eos") else [])
    text = "Human: where is the station? Assistant: left"
    ids = encode_item(tok, text, BIG, prefix)
    assert ids == prefix + tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    written = lead_text(tok, prefix) + text + tok.eos_token + tok.eos_token
    assert encode_item(tok, written, BIG, prefix) == ids  # a BOS and EOS written out count once


@pytest.mark.parametrize("style", ["chat", "chat_eos"])
def test_a_conversation_starts_with_the_prefix_once_and_ends_in_one_eos(tokenizers, style):
    tok = tokenizers[style]
    conv = [{"role": "user", "content": "where is it"}, {"role": "assistant", "content": "left"}]
    ids = encode_item(tok, conv, BIG, special_prefix(tok))
    rendered = tok.apply_chat_template(conv, tokenize=False)
    assert rendered.startswith(tok.bos_token)  # the template writes BOS: training keeps exactly one
    want = tok(rendered, add_special_tokens=False)["input_ids"]
    want = want[:-1] if want[-1] == tok.eos_token_id else want  # chat_eos's turn already ends in EOS
    assert ids == want + [tok.eos_token_id] and ids.count(tok.bos_token_id) == 1


def test_a_template_without_bos_on_a_tokenizer_that_adds_one_gets_it_from_the_tokenizer(tokenizers):
    tok = copy.deepcopy(tokenizers["bos"])
    tok.chat_template = CHAT_TEMPLATES["chat"].removeprefix("{{ bos_token }}")
    conv = [{"role": "user", "content": "where is it"}, {"role": "assistant", "content": "left"}]
    ids = encode_item(tok, conv, BIG, special_prefix(tok))
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1


@pytest.mark.parametrize("style", TOKENIZER_STYLES)
def test_the_shipped_tokenizer_gives_trainings_ids_by_itself_and_survives_a_reload(tokenizers, style, tmp_path):
    from transformers import AutoTokenizer

    tok = shipped(tokenizers[style])
    text = "Human: where is the station? Assistant: left"
    want = encode_item(tokenizers[style], text, BIG, special_prefix(tokenizers[style]))
    tok.save_pretrained(tmp_path / "t")
    for t in (tok, AutoTokenizer.from_pretrained(tmp_path / "t")):
        assert t(text)["input_ids"] == want
        assert encode_item(t, text, BIG, special_prefix(t)) == want  # our own path is unchanged by it
    assert scoring_tokenizer(tok) == [] and tok(text)["input_ids"] == want  # applying it twice changes nothing
    if style.startswith("chat"):
        conv = [{"role": "user", "content": "a b"}, {"role": "assistant", "content": "c"},
                {"role": "user", "content": "the cat"}, {"role": "assistant", "content": "sat"}]
        training = encode_item(tokenizers[style], conv, BIG, special_prefix(tokenizers[style]))
        assert tok(tok.apply_chat_template(conv, tokenize=False))["input_ids"] == training
        assert encode_item(tok, conv, BIG, special_prefix(tok)) == training


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(words=st.lists(st.sampled_from(["the", "cat", "sat", "Human:", "Assistant:", "?", "station", "a", "b c",
                                       "<s>", "</s>", "é", "\n"]), min_size=1, max_size=20),
       style=st.sampled_from(TOKENIZER_STYLES))
def test_any_text_tokenized_by_the_shipped_tokenizer_is_trainings_sequence(tokenizers, shipped_tokenizers, words,
                                                                            style):
    """For any text (special tokens written anywhere included), tok(text) of the shipped tokenizer equals
    training's encode_item, unless the text itself starts with the prefix or ends in EOS written out:
    then training counts them once and the tokenizer, which cannot look at the text, adds its own."""
    text = " ".join(words)
    tok = tokenizers[style]
    lead = lead_text(tok, special_prefix(tok))
    if (lead and text.startswith(lead)) or text.rstrip().endswith(tok.eos_token):
        return
    assert shipped_tokenizers[style](text)["input_ids"] == encode_item(tok, text, BIG, special_prefix(tok))


def test_a_template_that_cannot_render_the_probe_is_left_alone_and_said_so(tokenizers):
    tok = copy.deepcopy(tokenizers["chat"])
    tok.chat_template = "{{ raise_exception('only one turn') if messages|length > 2 }}" + CHAT_TEMPLATES["chat"]
    before = tok.chat_template
    problems = scoring_tokenizer(tok)
    assert tok.chat_template == before and len(problems) == 1 and "could not render" in problems[0]
    text = "Human: hi Assistant: hello"
    assert tok(text)["input_ids"] == encode_item(tok, text, BIG, special_prefix(tok))  # plain text still works
