"""Reading preference files in every common shape, with errors that name file, line and field.

Shapes (detected per source unless data.format says otherwise):
  hh             {"chosen": "<dialogue + answer>", "rejected": "<dialogue + answer>"}: the prompt is the
                 longest common prefix that ends at an "Assistant:" turn
  prompt         {"prompt": "...", "chosen": "...", "rejected": "..."}
  conversational {"chosen": [{"role", "content"}, ...], "rejected": [...], "prompt"?: str | messages}
                 (UltraFeedback-binarized style), rendered with the tokenizer's chat template
Everything is read through `datasets`: .jsonl/.json (optionally .gz), .parquet, .arrow, a
`save_to_disk` folder, or a hub dataset name.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ASSISTANT = "Assistant:"


@dataclass(frozen=True)
class Keys:
    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"
    margin: str | None = None


def _open_text(path: str):
    return gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(path, encoding="utf-8")


def is_jsonl(path: str) -> bool:
    return path.lower().removesuffix(".gz").endswith(".jsonl")


def row_location(path: str, row: int) -> str:
    """'file:line' for JSON-lines files (row i is the i-th non-blank line), 'file row N' otherwise."""
    if is_jsonl(path) and Path(path).is_file():
        with _open_text(path) as f:
            seen = -1
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    seen += 1
                    if seen == row:
                        return f"{path}:{lineno}"
    return f"{path} row {row}"


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


def detect_format(row: dict, keys: Keys) -> str:
    if isinstance(row.get(keys.chosen), list):
        return "conversational"
    return "prompt" if row.get(keys.prompt) is not None else "hh"


def row_problem(row: Any, fmt: str, keys: Keys) -> str | None:
    """What is structurally wrong with one row, naming the field; None if it is usable."""
    if not isinstance(row, dict):
        return f"each row must be a JSON object, got {type(row).__name__}"
    f = detect_format(row, keys) if fmt == "auto" else fmt
    for field in (keys.chosen, keys.rejected):
        v = row.get(field)
        if v is None:
            return f"field {field!r} is missing"
        if f == "conversational":
            p = _messages_problem(v, field)
            if p:
                return p
        elif not isinstance(v, str):
            return f"field {field!r} is a {type(v).__name__}, not text; expected a string"
    p = row.get(keys.prompt)
    if f == "prompt" and not isinstance(p, str):
        return f"field {keys.prompt!r} is {'missing' if p is None else 'a ' + type(p).__name__}; expected a string"
    if f == "conversational" and p is not None and not isinstance(p, str):
        problem = _messages_problem(p, keys.prompt)
        if problem:
            return problem
    if keys.margin and row.get(keys.margin) is not None and not isinstance(row[keys.margin], (int, float)):
        return f"field {keys.margin!r} is a {type(row[keys.margin]).__name__}; expected a number"
    return None


def scan_json_lines(path: str, fmt: str, keys: Keys) -> tuple[list[dict], list[str]]:
    """Python parse of a JSON-lines file: (valid rows, problems as 'file:line: ...')."""
    rows, problems = [], []
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                problems.append(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})")
                continue
            p = row_problem(obj, fmt, keys)
            if p:
                problems.append(f"{path}:{lineno}: {p}")
            else:
                rows.append(obj)
    return rows, problems


def load_rows(path: str, fmt: str, keys: Keys, on_error: str) -> tuple[list[dict] | Any, int]:
    """Rows of one source (a datasets.Dataset, or a list when bad rows were skipped) and how many
    malformed rows were skipped. on_error="error" raises on the first malformed row."""
    import datasets

    from rm_trainer.config import looks_like_hub_name

    p = Path(path)
    if not p.exists() and not looks_like_hub_name(path):
        raise ValueError(f"{path}: file not found")
    if p.is_file() and p.stat().st_size == 0:
        raise ValueError(f"{path}: file is empty")
    builder = None
    if p.is_file():
        name = path.lower().removesuffix(".gz")
        builder = next((b for suffix, b in ((".jsonl", "json"), (".json", "json"), (".parquet", "parquet"),
                                             (".arrow", "arrow")) if name.endswith(suffix)), None)
        if builder is None:
            raise ValueError(f"{path}: unsupported data file type; use .jsonl, .json, .parquet, .arrow "
                             "(optionally .gz), a save_to_disk folder or a hub dataset name")
    try:
        if p.is_dir():
            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds["train"]
        elif builder is not None:
            ds = datasets.load_dataset(builder, data_files=str(p), split="train")
        else:
            ds = datasets.load_dataset(path, split="train")  # a hub name, where the network allows
    except Exception:  # datasets wraps JSON and schema errors in several exception types
        ds = None
    if ds is None:
        if not is_jsonl(path):
            raise ValueError(f"{path}: cannot be read as a dataset file")
        rows, problems = scan_json_lines(path, fmt, keys)
        if problems and on_error == "error":
            raise ValueError(problems[0] + _skip_hint())
        if not rows:
            raise ValueError(f"{path}: no usable rows ({len(problems)} malformed; first: {problems[0]})")
        return rows, len(problems)
    if len(ds) == 0:
        raise ValueError(f"{path}: contains no rows")
    for k in (keys.chosen, keys.rejected):
        if k not in ds.column_names:
            raise ValueError(f"{path}: no {k!r} field in any row (found fields: {', '.join(ds.column_names)}); "
                             "set data.chosen_key / data.rejected_key / data.prompt_key to your column names")
    bad = []
    for i, row in enumerate(ds):
        problem = row_problem(row, fmt, keys)
        if problem:
            if on_error == "error":
                raise ValueError(f"{row_location(path, i)}: {problem}" + _skip_hint())
            bad.append(i)
    if bad:
        keep = sorted(set(range(len(ds))) - set(bad))
        ds = ds.select(keep)
    return ds, len(bad)


def _skip_hint() -> str:
    return " (fix the row, or set data.on_error=skip to count and skip malformed rows)"


def split_hh(chosen: str, rejected: str) -> tuple[str, str, str] | None:
    """(prompt, chosen response, rejected response) split at the longest common prefix that ends at an
    'Assistant:' turn; None when the two texts share no such prefix."""
    n = 0
    for a, b in zip(chosen, rejected, strict=False):
        if a != b:
            break
        n += 1
    cut = chosen.rfind(ASSISTANT, 0, n)  # the whole marker inside the common prefix
    if cut < 0:
        return None
    end = cut + len(ASSISTANT)
    return chosen[:end], chosen[end:], rejected[end:]


def render_conversation(tok, prompt: Any, chosen: list[dict], rejected: list[dict],
                        template: str | None) -> tuple[str, str, str]:
    """(prompt text, chosen response text, rejected response text) through the chat template. The
    prompt is the explicit one, else the messages both sides share before they differ."""
    if isinstance(prompt, str):
        prompt_msgs = [{"role": "user", "content": prompt}]
        c_msgs, r_msgs = chosen, rejected
    elif isinstance(prompt, list):
        prompt_msgs, c_msgs, r_msgs = prompt, chosen, rejected
    else:
        k = 0
        while k < min(len(chosen), len(rejected)) - 1 and chosen[k] == rejected[k]:
            k += 1
        prompt_msgs, c_msgs, r_msgs = chosen[:k], chosen[k:], rejected[k:]
    kwargs = {"chat_template": template} if template else {}
    prompt_text = tok.apply_chat_template(prompt_msgs, tokenize=False, add_generation_prompt=True, **kwargs)

    def response(msgs: list[dict]) -> str:
        full = tok.apply_chat_template(prompt_msgs + msgs, tokenize=False, **kwargs)
        if not full.startswith(prompt_text):  # templates that rewrite earlier turns: render the tail alone
            return tok.apply_chat_template(msgs, tokenize=False, **kwargs)
        return full[len(prompt_text):]

    return prompt_text, response(c_msgs), response(r_msgs)
