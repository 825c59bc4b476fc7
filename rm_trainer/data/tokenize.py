"""Tokenization exactly as training does it, for training (tokenize_source: a whole source in one batched
datasets.map, every row given a status) and for scoring (encode_item: one text, pair or conversation).

A sequence is the tokenizer's own special prefix (BOS for Llama-like tokenizers, nothing for GPT-2 or
Qwen-like ones) once, then the prompt and the response, truncated by the policy in truncation.py, then EOS:
the reward is read at that final EOS. A text that already starts with the prefix written out (a chat
template's `{{ bos_token }}`, a policy's decoded BOS) gets it once, not twice; a response that already
ends in EOS gets one EOS. scoring_tokenizer() makes a tokenizer produce this very sequence by itself, for
the consumers of the exported model that tokenize raw text.
"""

from __future__ import annotations

import os
from pathlib import Path

from rm_trainer.config import DataConfig
from rm_trainer.data.formats import (
    PairKeys,
    is_tie,
    render_conversation,
    row_location,
    row_problem,
    skip_hint,
    split_hh,
)
from rm_trainer.data.read import read_text
from rm_trainer.data.schema import features, tokenize_map
from rm_trainer.data.truncation import truncate_pair
from rm_trainer.errors import DataError

DROP_REASONS = ("malformed", "empty_response", "identical_raw", "identical_after_truncation")
KEPT_NOTES = ("prompt_truncated", "response_truncated", "hh_no_common_prompt")


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
    return truncate_pair(p, r, r, tok.eos_token_id, max_len, keep_prefix=len(prefix))


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


def _texts(row: dict, fmt: str, keys: PairKeys, tok) -> tuple[str, str, str, str]:
    """(prompt, chosen response, rejected response, note) of a row of format `fmt`."""
    c, r = row[keys.chosen], row[keys.rejected]
    if fmt == "conversational":
        return (*render_conversation(tok, row.get(keys.prompt), c, r, None), "")
    if fmt == "prompt":
        return row[keys.prompt], c, r, ""
    split = split_hh(c, r)
    if split is None:
        return "", c, r, "hh_no_common_prompt"
    return (*split, "")


COLUMNS = ("chosen_ids", "rejected_ids", "chosen_len", "rejected_len", "margin", "tie", "source", "status",
           "prompt_tokens", "chosen_tokens", "rejected_tokens", "chosen_single_ids", "rejected_single_ids")
# chosen_single_ids / rejected_single_ids: each side as score_texts(prompt, response) encodes it on its
# own (the single-sequence policy), [] where that equals the pair's ids (no truncation, or the same cut).
# The reward of a response is a function of (prompt, response) alone; the pair policy is the loss's.
SINGLE = ("chosen_single_ids", "rejected_single_ids")


def pair_features():
    """The declared arrow schema of COLUMNS (schema.py says why it is declared)."""
    return features(chosen_ids="ids", rejected_ids="ids", chosen_len="int", rejected_len="int", margin="float",
                    tie="bool", source="int", status="str", prompt_tokens="int", chosen_tokens="int",
                    rejected_tokens="int", chosen_single_ids="ids", rejected_single_ids="ids")


def single_ids(p_ids: list[int], r_ids: list[int], eos: int, max_len: int, keep: int, pair_ids: list[int]) -> list[int]:
    """One side encoded alone (score_texts' policy); [] when that is the pair's own sequence."""
    ids = truncate_pair(p_ids, r_ids, r_ids, eos, max_len, keep_prefix=keep).chosen
    return [] if ids == pair_ids else ids


def default_num_proc(n_rows: int) -> int:
    """Tokenization processes: the cores this process may use, capped at 16, and one per 10k rows (a
    worker costs a second to start)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, 16, n_rows // 10_000))


def _status(chosen: str, rejected: str, cut, note: str) -> str:
    """A drop reason (DROP_REASONS), a note (KEPT_NOTES) or "" for a pair that is used as it is."""
    if not chosen.strip() or not rejected.strip():
        return "empty_response"
    if chosen == rejected:
        return "identical_raw"
    if cut.identical:
        return "identical_after_truncation"
    return note or ("response_truncated" if cut.response_cut else "prompt_truncated" if cut.prompt_cut else "")


def _labels(out: dict[str, list], row: dict, keys: PairKeys, ok: bool, source_id: int) -> None:
    """The pair's margin (--margin_key; 0 without), whether it is tied (--tie_key) and its source."""
    out["margin"].append(float(row.get(keys.margin) or 0.0) if keys.margin and ok else 0.0)
    out["tie"].append(ok and is_tie(row, keys))
    out["source"].append(source_id)


def tokenize_source(ds, fmt: str, tok, d: DataConfig, source_id: int = 0, path: str = "",
                    work_dir: str | None = None):
    """One batched datasets.map over a whole source: check each row against the source's format, render,
    tokenize (one batched call per field), truncate. Every row gets a status (a drop reason, a note, or
    ""), so nothing is lost uncounted. A malformed row raises DataError naming file:line and field, unless
    data.on_error=skip, which counts it. work_dir: where the result's arrow files go (default: beside the
    source's own)."""
    keys = PairKeys(d.prompt_key, d.chosen_key, d.rejected_key, d.margin_key, d.tie_key)
    prefix = special_prefix(tok)
    lead, eos = lead_text(tok, prefix), tok.eos_token_id
    if fmt == "conversational" and not tok.chat_template:
        raise DataError(f"{path}: holds conversations (messages), but the tokenizer has no chat template; "
                        "pass --chat_template FILE (a Jinja template)")

    def fn(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        out: dict[str, list] = {k: [] for k in COLUMNS}
        rows = [dict(zip(batch, vals, strict=True)) for vals in zip(*batch.values(), strict=True)]
        texts = []
        for i, row in zip(indices, rows, strict=True):
            problem = row_problem(row, fmt, keys)
            if problem and d.on_error == "error":
                raise DataError(f"{row_location(path, i)}: {problem}" + skip_hint())
            if problem:
                texts.append(None)
                continue
            prompt, c, r, note = _texts(row, fmt, keys, tok)
            prompt, (c, r) = drop_lead(prompt, (c, r), lead)  # the prefix is added as ids, once
            texts.append((prompt, c, r, note))
        ok = [t for t in texts if t is not None]
        enc = [tok([t[j] for t in ok], add_special_tokens=False)["input_ids"] if ok else [] for j in range(3)]
        k = 0
        for row, t in zip(rows, texts, strict=True):
            if t is None:
                p_ids, c_ids, r_ids, status, cut = [], [], [], "malformed", None
            else:
                p, c, r, note = t
                p_ids, c_ids, r_ids = prefix + enc[0][k], enc[1][k], enc[2][k]
                k += 1
                cut = truncate_pair(p_ids, c_ids, r_ids, eos, d.max_len, keep_prefix=len(prefix))
                status = _status(c, r, cut, note)
            out["chosen_ids"].append(cut.chosen if cut else [])
            out["rejected_ids"].append(cut.rejected if cut else [])
            out["chosen_len"].append(len(cut.chosen) if cut else 0)
            out["rejected_len"].append(len(cut.rejected) if cut else 0)
            _labels(out, row, keys, cut is not None, source_id)
            out["status"].append(status)
            out["prompt_tokens"].append(len(p_ids))
            out["chosen_tokens"].append(len(c_ids) + 1)
            out["rejected_tokens"].append(len(r_ids) + 1)
            for name, side, key in ((SINGLE[0], c_ids, "chosen_ids"), (SINGLE[1], r_ids, "rejected_ids")):
                out[name].append(single_ids(p_ids, side, eos, d.max_len, len(prefix), out[key][-1]) if cut else [])
        return out

    num_proc = d.num_proc or default_num_proc(len(ds))
    cache = str(Path(work_dir) / f"tokenized-{source_id}-{Path(path).name or 'pairs'}.arrow") if work_dir else None
    return tokenize_map(ds, fn, pair_features(), path=path, source_id=source_id, num_proc=num_proc,
                        cache_file_name=cache)


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
