"""Preference pairs as rows (`--objective pairs`): their shapes, each row's problem, and their tokenization.

Shapes (decided once per source, from its first row, unless data.format says; a row of another shape
in that source is malformed):
  hh             {"chosen": "<dialogue + answer>", "rejected": "<dialogue + answer>"}: the prompt is the
                 longest common prefix that ends at an "Assistant:" turn
  prompt         {"prompt": "...", "chosen": "...", "rejected": "..."}
  conversational {"chosen": [{"role", "content"}, ...], "rejected": [...], "prompt"?: str | messages}
                 (UltraFeedback-binarized style), rendered with the tokenizer's chat template
A pair is a row of K = 2 responses, [chosen, rejected], cut by the one truncation rule; its labels are the
margin (--margin_key) and whether it is tied (--tie_key). Dropped: malformed rows, an empty response,
identical texts, and pairs that the cut made identical.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from rm_trainer.data import read
from rm_trainer.data.formats import render_conversation, split_hh
from rm_trainer.data.tokenize import CUT_NOTES, Encoded
from rm_trainer.errors import DataError
from rm_trainer.objectives.base import RowReader

DROP_REASONS = ("malformed", "empty_response", "identical_raw", "identical_after_truncation")
KEPT_NOTES = (*CUT_NOTES, "hh_no_common_prompt")


@dataclass(frozen=True)
class PairKeys:
    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"
    margin: str | None = None
    tie: str | None = None


def _messages_problem(v: Any, field: str) -> str | None:
    if not isinstance(v, list) or not v:
        return f"field {field!r}: expected a non-empty list of {{role, content}} messages"
    for i, m in enumerate(v):
        if not isinstance(m, dict):
            return f"field {field}[{i}]: expected a {{role, content}} object, got {type(m).__name__}"
        if not isinstance(m.get("role"), str):
            what = "missing" if m.get("role") is None else f"a {type(m['role']).__name__}"
            return f"field {field}[{i}].role is {what}; expected a string such as 'user' or 'assistant'"
        if not isinstance(m.get("content"), str):
            what = "missing" if m.get("content") is None else f"a {type(m['content']).__name__}"
            return f"field {field}[{i}].content is {what}; expected a string"
    return None


def detect_pair_format(row: dict, keys: PairKeys) -> str:
    """The shape of one well-formed row: conversational (messages), prompt (explicit prompt) or hh."""
    if isinstance(row.get(keys.chosen), list):
        return "conversational"
    return "prompt" if row.get(keys.prompt) is not None else "hh"


def decide_format(first_rows: list[Any], keys: PairKeys, fmt: str) -> str:
    """The format of a whole source, decided once (data.format=auto) from its first object row. Every row
    must then fit it: a row of another shape is malformed, never quietly read another way."""
    if fmt != "auto":
        return fmt
    row = next((r for r in first_rows if isinstance(r, dict)), None)
    return detect_pair_format(row, keys) if row is not None else "hh"


WHY = {"hh": "HH full texts", "prompt": "explicit prompt/chosen/rejected", "conversational": "messages"}


def row_problem(row: Any, fmt: str, keys: PairKeys) -> str | None:
    """What is wrong with one row of a source whose format is `fmt` (hh, prompt or conversational),
    naming the field; None if it is usable."""
    if not isinstance(row, dict):
        return f"each row must be a JSON object, got {type(row).__name__}"
    for field in (keys.chosen, keys.rejected):
        v = row.get(field)
        if v is None:
            return f"field {field!r} is missing"
        if fmt == "conversational":
            p = _messages_problem(v, field)
            if p:
                return p + f" (this source holds {WHY[fmt]}, decided from its first row)"
        elif not isinstance(v, str):
            return f"field {field!r} is a {type(v).__name__}, not text; expected a string"
    p = row.get(keys.prompt)
    if fmt == "prompt" and not isinstance(p, str):
        return (f"field {keys.prompt!r} is {'missing' if p is None else 'a ' + type(p).__name__}; expected a "
                f"string (this source has explicit prompts, decided from its first row)")
    if fmt == "hh" and p is not None:
        return (f"field {keys.prompt!r} is set, but this source holds {WHY[fmt]} without a prompt field "
                "(decided from its first row); give every row a prompt, or none")
    if fmt == "conversational" and p is not None and not isinstance(p, str):
        problem = _messages_problem(p, keys.prompt)
        if problem:
            return problem
    m = row.get(keys.margin) if keys.margin else None
    if m is not None and not read.finite_number(m):
        what = repr(m) if isinstance(m, float) else f"a {type(m).__name__}"
        return f"field {keys.margin!r} is {what}; expected a finite number"
    t = row.get(keys.tie) if keys.tie else None
    if t is not None and not isinstance(t, bool) and not read.finite_number(t):
        what = repr(t) if isinstance(t, float | str) else f"a {type(t).__name__}"
        return (f"field {keys.tie!r} is {what}; expected true/false, or a preference strength (a finite number, "
                "0 for a tie)")
    return None


def is_tie(row: dict, keys: PairKeys) -> bool:
    """A tied pair: its tie field is true, or a preference strength of 0 (missing or null: not tied)."""
    t = row.get(keys.tie) if keys.tie else None
    return t is True or (t is not None and not isinstance(t, bool) and float(t) == 0.0)


class PairLayout:
    """How load_source reads preference pairs: the source's format, decided once from its first rows, each
    row's problem, and the columns every source needs."""

    def __init__(self, keys: PairKeys) -> None:
        self.keys = keys

    def decide(self, first_rows: list[Any], fmt: str) -> str:
        return decide_format(first_rows, self.keys, fmt)

    def problem(self, row: Any, fmt: str) -> str | None:
        return row_problem(row, fmt, self.keys)

    def check_columns(self, ds, path: str) -> None:
        for k in (self.keys.chosen, self.keys.rejected):
            if k not in ds.column_names:
                raise DataError(f"{path}: no {k!r} field in any row (found fields: {', '.join(ds.column_names)}); "
                                "set data.chosen_key / data.rejected_key / data.prompt_key to your column names")


def pair_keys(d) -> PairKeys:
    """The column names of a run's (or rm-eval's) data section."""
    return PairKeys(d.prompt_key, d.chosen_key, d.rejected_key, d.margin_key, d.tie_key)


def pair_texts(row: dict, fmt: str, keys: PairKeys, tok) -> tuple[str, str, str, str]:
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


class PairReader(RowReader):
    """Pairs for data.sources and rm-eval (base.RowReader): margin and tie labels, the pair drop reasons."""

    drop_reasons = DROP_REASONS
    notes = KEPT_NOTES
    labels = {"margin": "float", "tie": "bool"}

    def __init__(self, tok, d, work_dir: str | None = None) -> None:
        super().__init__(tok, d, work_dir)
        self.keys = pair_keys(d)
        self.layout = PairLayout(self.keys)

    def check_format(self, fmt: str, path: str) -> None:
        if fmt == "conversational" and not self.tok.chat_template:
            raise DataError(f"{path}: holds conversations (messages), but the tokenizer has no chat template; "
                            "pass --chat_template FILE (a Jinja template)")

    def parse(self, row: dict, fmt: str) -> tuple[tuple[str, list[str]], dict[str, Any], str]:
        prompt, c, r, note = pair_texts(row, fmt, self.keys, self.tok)
        keys = self.keys
        labels = {"margin": float(row.get(keys.margin) or 0.0) if keys.margin else 0.0, "tie": is_tie(row, keys)}
        before = ("empty_response" if not c.strip() or not r.strip() else "identical_raw" if c == r else note)
        return (prompt, [c, r]), labels, before

    def status(self, enc: Encoded, texts: tuple[str, list[str]], before: str) -> str:
        if before in DROP_REASONS:
            return before
        return "identical_after_truncation" if enc.cut.identical else before or enc.note

    def empty_labels(self) -> dict[str, Any]:
        return {"margin": 0.0, "tie": False}

    def unused_labels(self) -> list[str]:
        return ([] if self.keys.margin else ["margin"]) + ([] if self.keys.tie else ["tie"])

    def label_report(self, kept) -> dict:
        if not self.keys.tie:  # tied pairs train with the tie loss: counted among the used ones
            return {}
        return {"ties": int(np.count_nonzero(np.asarray(kept["tie"], dtype=bool)))}
