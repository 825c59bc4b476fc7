"""Reading preference files in every common shape, with errors that name file, line and field.

Shapes (decided once per source, from its first row, unless data.format says; a row of another shape
in that source is malformed):
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

from rm_trainer.errors import DataError

ASSISTANT = "Assistant:"


@dataclass(frozen=True)
class PairKeys:
    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"
    margin: str | None = None


def looks_like_hub_name(p: str) -> bool:
    """'org/name' without a file extension: a dataset on the hub rather than a missing local file."""
    return (p.count("/") == 1 and not p.startswith((".", "/", "~"))
            and not any(p.lower().endswith(e) for e in (".json", ".jsonl", ".gz", ".parquet", ".arrow", ".jinja")))


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
    if keys.margin and row.get(keys.margin) is not None and not isinstance(row[keys.margin], (int, float)):
        return f"field {keys.margin!r} is a {type(row[keys.margin]).__name__}; expected a number"
    return None


def scan_json_lines(path: str, fmt: str, keys: PairKeys) -> tuple[list[dict], list[str], str]:
    """Python parse of a JSON-lines file that `datasets` cannot read: (valid rows, problems as
    'file:line: ...', the source's format)."""
    parsed, problems = [], []
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                parsed.append((lineno, json.loads(line)))
            except json.JSONDecodeError as e:
                problems.append(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})")
    fmt = decide_format([obj for _, obj in parsed[:100]], keys, fmt)
    rows = []
    for lineno, obj in parsed:
        p = row_problem(obj, fmt, keys)
        if p:
            problems.append(f"{path}:{lineno}: {p}")
        else:
            rows.append(obj)
    problems.sort(key=lambda s: int(s[len(path) + 1:].split(":", 1)[0]))  # file order
    return rows, problems, fmt


BUILDERS = ((".jsonl", "json"), (".json", "json"), (".parquet", "parquet"), (".arrow", "arrow"))


def load_source(path: str, fmt: str, keys: PairKeys, on_error: str, cache_dir: str | None = None):
    """One source as a datasets.Dataset, its format (decided once, from its first rows), and how many
    rows were already found malformed (only by the Python fallback for JSON-lines that `datasets`
    cannot parse; every other row is checked during tokenization, against that format)."""
    import datasets

    p = Path(path)
    if not p.exists() and not looks_like_hub_name(path):
        raise DataError(f"{path}: file not found")
    if p.is_file() and p.stat().st_size == 0:
        raise DataError(f"{path}: file is empty")
    builder = None
    if p.is_file():
        name = path.lower().removesuffix(".gz")
        builder = next((b for suffix, b in BUILDERS if name.endswith(suffix)), None)
        if builder is None:
            raise DataError(f"{path}: unsupported data file type; use .jsonl, .json, .parquet, .arrow "
                            "(optionally .gz), a save_to_disk folder or a hub dataset name")
    try:
        if p.is_dir():
            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds["train"]
        elif builder is not None:
            ds = datasets.load_dataset(builder, data_files=str(p), split="train", cache_dir=cache_dir)
        else:
            ds = datasets.load_dataset(path, split="train", cache_dir=cache_dir)  # hub, where the network allows
    except Exception:  # datasets wraps JSON and schema errors in several exception types
        ds = None
    if ds is None:
        if not is_jsonl(path):
            raise DataError(f"{path}: cannot be read as a dataset file")
        rows, problems, fmt = scan_json_lines(path, fmt, keys)
        if problems and on_error == "error":
            raise DataError(problems[0] + skip_hint())
        if not rows:
            raise DataError(f"{path}: no usable rows ({len(problems)} malformed; first: {problems[0]})")
        return datasets.Dataset.from_list(rows), fmt, len(problems)
    if len(ds) == 0:
        raise DataError(f"{path}: contains no rows")
    for k in (keys.chosen, keys.rejected):
        if k not in ds.column_names:
            raise DataError(f"{path}: no {k!r} field in any row (found fields: {', '.join(ds.column_names)}); "
                            "set data.chosen_key / data.rejected_key / data.prompt_key to your column names")
    return ds, decide_format(list(ds.select(range(min(100, len(ds))))), keys, fmt), 0


def skip_hint() -> str:
    return " (fix the row, or set data.on_error=skip to count and skip malformed rows)"


def common_prefix_len(a: str, b: str) -> int:
    """Length of the longest common prefix: a binary search of C-speed slice comparisons (a character
    loop in Python took a tenth of the tokenization time on HH-RLHF)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def split_hh(chosen: str, rejected: str) -> tuple[str, str, str] | None:
    """(prompt, chosen response, rejected response) split at the longest common prefix that ends at an
    'Assistant:' turn; None when the two texts share no such prefix."""
    n = common_prefix_len(chosen, rejected)
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
