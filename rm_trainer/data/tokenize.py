"""Tokenization exactly as training does it: for training (RowEncoder: rows of one prompt and K responses,
in batched tokenizer calls; each objective's reader renders its rows' texts) and for scoring (encode_item:
one text, pair or conversation).

A sequence is the tokenizer's own special prefix (BOS for Llama-like tokenizers, nothing for GPT-2 or
Qwen-like ones) once, then the prompt and the response, truncated by the rule in truncation.py, then EOS:
the reward is read at that final EOS. A text that already starts with the prefix written out (a chat
template's `{{ bos_token }}`, a policy's decoded BOS) gets it once, not twice; a response that already
ends in EOS gets one EOS. scoring_tokenizer() makes a tokenizer produce this very sequence by itself, for
the consumers of the exported model that tokenize raw text.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from rm_trainer.data.formats import render_conversation
from rm_trainer.data.read import read_text
from rm_trainer.data.truncation import Truncated, truncate
from rm_trainer.errors import DataError

CUT_NOTES = ("prompt_truncated", "response_truncated")  # a kept row's note when max_len cut it


def special_prefix(tok) -> list[int]:
    """Leading special tokens the tokenizer adds (e.g. BOS); kept at the front of every sequence."""
    ids = tok("", add_special_tokens=True)["input_ids"]
    return [i for i in ids if i != tok.eos_token_id]


def lead_text(tok, prefix: list[int]) -> str:
    """The special prefix written out as text (e.g. '<s>'), as a chat template or a decode writes it."""
    return "".join(tok.convert_ids_to_tokens(prefix)) if prefix else ""


def drop_lead(prompt: str, responses: tuple[str, ...], lead: str) -> tuple[str, tuple[str, ...]]:
    """The prompt (or, without one, each response) without a leading `lead`: the prefix is added as ids."""
    if not lead:
        return prompt, responses
    if prompt:
        return prompt.removeprefix(lead), responses
    return prompt, tuple(r.removeprefix(lead) for r in responses)


def encode(tok, prompt: str, response: str, max_len: int, prefix: list[int] | None = None):
    """Token ids exactly as in training: the special prefix once + prompt + response, truncated by the
    policy, + EOS (see the module docstring). Returns the Truncated record (ids in .chosen)."""
    prefix = special_prefix(tok) if prefix is None else prefix
    prompt, (response,) = drop_lead(prompt, (response,), lead_text(tok, prefix))
    p = prefix + tok(prompt, add_special_tokens=False)["input_ids"]
    r = tok(response, add_special_tokens=False)["input_ids"]
    return truncate(p, [r], tok.eos_token_id, max_len, keep_prefix=len(prefix))


def split_conversation(messages: list[dict]) -> tuple[list[dict], list[dict]]:
    """(prompt messages, response messages) of one conversation: the response is the trailing run of
    assistant turns, as in training, where the prompt is what chosen and rejected share."""
    k = len(messages)
    while k > 1 and messages[k - 1].get("role") == "assistant":
        k -= 1
    return messages[:k], messages[k:]


def encode_item(tok, item, max_len: int, prefix: list[int]) -> list[int]:
    """One item to score, tokenized exactly as training tokenized its sequences: a full text (str); a
    (prompt, response) pair of strings; a conversation (a list of {role, content}: the trailing assistant
    turns are the response, rendered with the chat template saved with the model); or (prompt,
    response messages) with the prompt as text or messages."""
    if isinstance(item, str):
        return encode(tok, "", item, max_len, prefix=prefix).chosen
    if isinstance(item, list):
        prompt, response = split_conversation(item)
    else:
        prompt, response = item
    if isinstance(response, list):
        if not getattr(tok, "chat_template", None):
            raise DataError("a conversation (messages) needs a chat template, and this model's tokenizer has "
                            "none; send plain text or prompt + response instead")
        p, c, _ = render_conversation(tok, prompt, response, response, None)
        return encode(tok, p, c, max_len, prefix).chosen
    return encode(tok, prompt, response, max_len, prefix=prefix).chosen


def expand_groups(items: list) -> list:
    """score_texts' items with each (prompt, [response, ...]) group as one (prompt, response) item per
    response (a response list of texts, or of message lists); (prompt, response messages) stays one item."""
    out = []
    for it in items:
        if (isinstance(it, tuple) and len(it) == 2 and isinstance(it[1], list) and it[1]
                and all(isinstance(r, str) or (isinstance(r, list) and r and isinstance(r[0], dict)) for r in it[1])):
            out += [(it[0], r) for r in it[1]]
        else:
            out.append(it)
    return out


@dataclass(frozen=True)
class Encoded:
    """One row's token ids by the truncation rule, with what the report counts."""

    cut: Truncated  # .seqs: each response's sequence, the prompt cut once for all of them
    prompt_tokens: int  # before truncation (with the special prefix)
    response_tokens: list[int]  # before truncation (with EOS)
    single: list[list[int]]  # each response encoded on its own (score_texts); [] where that is its sequence

    @property
    def note(self) -> str:
        """A kept row's note (CUT_NOTES) when max_len cut it, else ""."""
        return "response_truncated" if self.cut.response_cut else "prompt_truncated" if self.cut.prompt_cut else ""


class RowEncoder:
    """Rows of one prompt and K responses, given as texts (a conversation already rendered), to token ids:
    the special prefix once, the prompt and each response tokenized in one batched tokenizer call per
    batch of rows, then truncation.truncate's rule, one prompt cut for the whole row."""

    def __init__(self, tok, max_len: int) -> None:
        self.tok, self.max_len, self.eos = tok, max_len, tok.eos_token_id
        self.prefix = special_prefix(tok)
        self.lead = lead_text(tok, self.prefix)

    def encode(self, rows: list[tuple[str, list[str]] | None]) -> list[Encoded | None]:
        """Each row (prompt text, response texts) encoded; None stays None (a malformed row)."""
        texts = [drop_lead(p, tuple(rs), self.lead) for p, rs in (r for r in rows if r is not None)]
        ids = (lambda x: self.tok(x, add_special_tokens=False)["input_ids"] if x else [])  # noqa: E731
        prompts = ids([p for p, _ in texts])
        flat = iter(ids([r for _, rs in texts for r in rs]))
        out, k = [], 0
        for row in rows:
            if row is None:
                out.append(None)
                continue
            p = self.prefix + prompts[k]
            responses = [next(flat) for _ in texts[k][1]]
            k += 1
            out.append(self._encode(p, responses))
        return out

    def _encode(self, p: list[int], responses: list[list[int]]) -> Encoded:
        cut = truncate(p, responses, self.eos, self.max_len, keep_prefix=len(self.prefix))
        alone = [truncate(p, [r], self.eos, self.max_len, len(self.prefix)).seqs[0] if len(responses) > 1
                 else seq for r, seq in zip(responses, cut.seqs, strict=True)]
        return Encoded(cut, len(p), [len(r) + 1 for r in responses],
                       [[] if a == seq else a for a, seq in zip(alone, cut.seqs, strict=True)])


def default_num_proc(n_rows: int) -> int:
    """Tokenization processes: the cores this process may use, capped at 16, and one per 10k rows (a
    worker costs a second to start)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, 16, n_rows // 10_000))


def load_tokenizer(cfg):
    """The tokenizer, with --chat_template attached: it is saved into every checkpoint and reward.pt, so
    scoring renders conversations exactly as training did."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cfg.model.tokenizer or cfg.model.path)
    if tok.eos_token_id is None:
        raise DataError(f"tokenizer {cfg.model.tokenizer or cfg.model.path} has no eos_token; the reward "
                        "is read at the final EOS, so set eos_token in tokenizer_config.json")
    if tok.pad_token_id is None:  # pad positions are never read (right padding + causal attention)
        tok.pad_token = tok.eos_token
    if cfg.data.chat_template:
        tok.chat_template = read_text(cfg.data.chat_template, "data.chat_template")
    return tok
