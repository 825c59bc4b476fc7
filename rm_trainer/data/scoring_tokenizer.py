"""The tokenizer that ships with a trained model produces training's sequence by itself.

Training reads the reward at an EOS it appends (tokenize.encode), so a consumer that tokenizes raw text
with the backbone's own tokenizer (a transformers pipeline, RewardBench's scripts, vLLM or SGLang's classify
endpoints) would read it one token early, at the text's last token. scoring_tokenizer() changes a tokenizer
in place so that, with its usual call, it gives exactly training's ids:

- its post-processor adds the special prefix (BOS where the backbone's tokenizer adds one) and EOS:
  `tok(text)` = prefix + ids(text) + [EOS], the sequence score_texts scores;
- its chat template, where it wrote the prefix itself ({{ bos_token }}) or ended the conversation on EOS,
  no longer does: `tok(tok.apply_chat_template(conversation, tokenize=False))` then gives the ids of
  score_texts(conversation), not a doubled BOS or EOS.

Both changes are verified on probe texts against tokenize.encode_item; what could not be arranged is
returned (the model card says it). Applying it twice changes nothing more.
"""

from __future__ import annotations

from rm_trainer.data.tokenize import encode_item, lead_text, special_prefix

PROBE_TEXT = "Human: is this scored as in training? Assistant: yes"
PROBE_CHAT = [{"role": "user", "content": "first question"}, {"role": "assistant", "content": "first answer"},
              {"role": "user", "content": "second question"}, {"role": "assistant", "content": "second answer"}]
# The template is rendered into a variable, then written out without a trailing EOS (a conversation that is
# scored, not one a generation continues); `bos_token` is emptied first where the template wrote it.
NO_BOS = "{% set bos_token = '' %}"
# (`+%}` and `{%+` keep the environment's trim_blocks/lstrip_blocks off the template's own first and last
# whitespace.)
WRAP = ("{% set rm_rendered +%}TEMPLATE{%+ endset %}{% if not add_generation_prompt and "
        "rm_rendered.endswith(eos_token) %}{{ rm_rendered[:rm_rendered|length - eos_token|length] }}"
        "{% else %}{{ rm_rendered }}{% endif %}")


def _set_post_processor(tok, prefix: list[int]) -> str | None:
    """prefix + $A + EOS, through transformers' own add_bos_token/add_eos_token where the prefix is BOS
    or nothing (so a reload rebuilds the same processor), else a TemplateProcessing of the prefix."""
    if not hasattr(tok, "_tokenizer"):
        return ("the tokenizer is not a fast (tokenizers) one, so EOS cannot be added by the tokenizer: append "
                f"{tok.eos_token!r} to each text yourself")
    if prefix in ([], [tok.bos_token_id]):
        tok.add_bos_token, tok.add_eos_token = bool(prefix), True
        tok.init_kwargs.update(add_bos_token=bool(prefix), add_eos_token=True)
        return None
    from tokenizers.processors import TemplateProcessing

    names = tok.convert_ids_to_tokens(prefix)
    head = " ".join(f"{n}:0" for n in names)
    specials = sorted({*zip(names, prefix, strict=True), (tok.eos_token, tok.eos_token_id)})
    tok._tokenizer.post_processor = TemplateProcessing(
        single=f"{head} $A:0 {tok.eos_token}:0", pair=f"{head} $A:0 {tok.eos_token}:0 $B:1 {tok.eos_token}:1",
        special_tokens=specials)
    return None


def _render(tok, template: str, messages: list[dict]) -> str:
    return tok.apply_chat_template(messages, tokenize=False, chat_template=template)


def _adapt_template(tok, lead: str) -> str | None:
    """Rewrite tok.chat_template so that it no longer writes `lead` first or EOS last (see WRAP)."""
    template = tok.chat_template
    if not isinstance(template, str):
        return None if not template else "a tokenizer with several named chat templates is left as it is"
    try:
        text = _render(tok, template, PROBE_CHAT)
    except Exception as e:  # noqa: BLE001 - a template's own raise_exception, or any Jinja error
        return (f"the chat template could not render a probe conversation ({type(e).__name__}: {e}), so it is left "
                "as it is: tokenize its output with add_special_tokens=False and append EOS yourself")
    strip_lead, strip_eos = bool(lead) and text.startswith(lead), text.endswith(tok.eos_token)
    if not (strip_lead or strip_eos):
        return None
    new = (NO_BOS if strip_lead else "") + WRAP.replace("TEMPLATE", template)
    want = text[len(lead) if strip_lead else 0:len(text) - (len(tok.eos_token) if strip_eos else 0)]
    if _render(tok, new, PROBE_CHAT) != want:
        return ("the chat template writes BOS or a final EOS in a way that cannot be taken out (e.g. as literal "
                "text): tokenize its output with add_special_tokens=False and append EOS yourself")
    tok.chat_template = new
    return None


def scoring_tokenizer(tok) -> list[str]:
    """Make `tok` produce training's scoring sequence by itself (in place; see the module docstring).
    Returns the problems found: each one says what a consumer must do instead."""
    prefix = special_prefix(tok)
    post = _set_post_processor(tok, prefix)
    if post:
        return [post]
    problems = [p for p in [_adapt_template(tok, lead_text(tok, prefix))] if p]
    big = 1 << 30
    if tok(PROBE_TEXT)["input_ids"] != encode_item(tok, PROBE_TEXT, big, prefix):
        problems.append("tok(text) does not reproduce training's ids for a plain text")
    if tok.chat_template and isinstance(tok.chat_template, str) and not problems:
        rendered = tok.apply_chat_template(PROBE_CHAT, tokenize=False)
        if tok(rendered)["input_ids"] != encode_item(tok, PROBE_CHAT, big, prefix):
            problems.append("tok(apply_chat_template(conversation, tokenize=False)) does not reproduce training's "
                            "ids: score conversations with rm_trainer (score_texts, rm-score, rm-serve)")
    return problems
