"""The rows rm-score and rm-serve's /score take, and the items of each row to score.

A row holds `text`, or `prompt` + `response`, or `prompt` + `responses` (a list: best-of-n), or
`messages` (a conversation whose last message is the assistant's response). The shape is decided once
per file from its columns (RowKeys names them). Each item is one of data.tokenize.encode_item's forms, so
it is tokenized exactly as training tokenized its sequences.
"""

from __future__ import annotations

from dataclasses import dataclass

from rm_trainer.errors import DataError


@dataclass
class RowKeys:
    text: str = "text"
    prompt: str = "prompt"
    response: str = "response"
    responses: str = "responses"
    messages: str = "messages"


def detect_row_format(columns: list[str], keys: RowKeys, where: str) -> str:
    """Once per file, from its columns (most specific first)."""
    if keys.messages in columns:
        return "messages"
    if keys.prompt in columns and keys.responses in columns:
        return "responses"
    if keys.prompt in columns and keys.response in columns:
        return "response"
    if keys.text in columns:
        return "text"
    raise DataError(f"{where}: columns {columns} hold none of: {keys.text!r}; {keys.prompt!r} + {keys.response!r}; "
                    f"{keys.prompt!r} + {keys.responses!r}; {keys.messages!r}. Name yours with --text_key, "
                    "--prompt_key, --response_key, --responses_key or --messages_key")


def row_problem(row: dict, fmt: str, keys: RowKeys) -> str | None:
    """What is wrong with one row, naming the field; None if it can be scored. Any text is a response,
    the empty one included: a policy can emit it, and it is scored as the prompt followed by EOS."""
    def text(field: str) -> str | None:
        v = row.get(field)
        return None if isinstance(v, str) else f"field {field!r}: expected text, got {_show(v)}"

    if fmt == "text":
        return text(keys.text)
    if fmt == "response":
        return text(keys.prompt) or text(keys.response)
    if fmt == "responses":
        rs = row.get(keys.responses)
        if not isinstance(rs, list) or not rs or not all(isinstance(r, str) for r in rs):
            return text(keys.prompt) or f"field {keys.responses!r}: expected a non-empty list of texts, got {_show(rs)}"
        return text(keys.prompt)
    msgs = row.get(keys.messages)
    if (not isinstance(msgs, list) or not msgs
            or not all(isinstance(m, dict) and isinstance(m.get("content"), str) and isinstance(m.get("role"), str)
                       for m in msgs)):
        return f"field {keys.messages!r}: expected a list of {{role, content}} messages, got {_show(msgs)}"
    if msgs[-1]["role"] != "assistant":
        return (f"field {keys.messages!r}: the last message must be the assistant's response "
                f"(it is {msgs[-1]['role']!r})")
    return None


def row_items(row: dict, fmt: str, keys: RowKeys, where: str) -> list:
    """The items to score of one row (data.encode_item's forms), or DataError naming the row and field."""
    problem = row_problem(row, fmt, keys)
    if problem:
        raise DataError(f"{where}: {problem}")
    if fmt == "text":
        return [row[keys.text]]
    if fmt == "response":
        return [(row[keys.prompt], row[keys.response])]
    if fmt == "responses":
        return [(row[keys.prompt], r) for r in row[keys.responses]]
    return [row[keys.messages]]


def _show(v) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."

