"""Reading preference files in every common shape, with errors that name file, line and field.

Shapes (decided once per source, from its first row, unless data.format says; a row of another shape
in that source is malformed):
  hh             {"chosen": "<dialogue + answer>", "rejected": "<dialogue + answer>"}: the prompt is the
                 longest common prefix that ends at an "Assistant:" turn
  prompt         {"prompt": "...", "chosen": "...", "rejected": "..."}
  conversational {"chosen": [{"role", "content"}, ...], "rejected": [...], "prompt"?: str | messages}
                 (UltraFeedback-binarized style), rendered with the tokenizer's chat template
Files are read through data/read.py (`datasets` first): .jsonl/.json (optionally .gz), .parquet, .arrow, a
`save_to_disk` folder, or a hub dataset name.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rm_trainer.data import read
from rm_trainer.errors import DataError

ASSISTANT = "Assistant:"


@dataclass(frozen=True)
class PairKeys:
    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"
    margin: str | None = None
    tie: str | None = None


def looks_like_hub_name(p: str) -> bool:
    """'org/name' without a file extension: a dataset on the hub rather than a missing local file."""
    return (p.count("/") == 1 and not p.startswith((".", "/", "~"))
            and not any(p.lower().endswith(e) for e in (".json", ".jsonl", ".gz", ".parquet", ".arrow", ".jinja")))


def is_jsonl(path: str) -> bool:
    return read.is_json_lines(path)


def jsonl_lines(path: str) -> list[int]:
    """The line number of every non-blank line of a JSON-lines file: row i is on line jsonl_lines[i]."""
    opener = gzip.open if path.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            return [n for n, line in enumerate(f, 1) if line.strip()]
    except read.GZIP_ERRORS:
        return []


def row_location(path: str, row: int) -> str:
    """'file:line' for JSON-lines files (row i is the i-th non-blank line), 'file row N' otherwise."""
    lines = jsonl_lines(path) if is_jsonl(path) and Path(path).is_file() else []
    return f"{path}:{lines[row]}" if row < len(lines) else f"{path} row {row}"


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
    row's problem, and the columns every source needs. (data.rankings.RankingLayout: the same for rankings.)"""

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


def load_source(path: str, fmt: str, keys: PairKeys, on_error: str, cache_dir: str | None = None,
                what: str = "--data", layout=None):
    """One source as a datasets.Dataset, its format (decided once, from its first rows), and how many
    rows were already found malformed (only when `datasets` cannot read a JSON file and read.py reads it
    instead; every other row is checked during tokenization, against that format). Every file goes
    through data/read.py, so a file of any bytes is read or refused with a DataError naming it. layout:
    PairLayout(keys) unless given (data.rankings.RankingLayout for --objective ranking)."""
    import datasets

    layout = layout or PairLayout(keys)

    if not Path(path).exists() and not Path(path).is_symlink() and looks_like_hub_name(path):
        try:  # a hub dataset, where the network allows
            ds = datasets.load_dataset(path, split="train", cache_dir=cache_dir)
        except (OSError, ValueError, FileNotFoundError) as e:
            raise DataError(f"{what} {path}: no such file, and not a hub dataset that can be loaded ({e})") from None
        return _checked(ds, path, layout), fmt if fmt != "auto" else _first_format(ds, layout), 0
    p = read.check_file(path, what, folder_ok=True)
    if p.is_dir():
        ds = _load_folder(path, what)
    elif path.lower().removesuffix(".gz").endswith(".arrow"):
        ds = _load_arrow(path, what, cache_dir)
    elif read.table_kind(path) is None:
        raise DataError(f"{what} {path}: unsupported data file type; use .jsonl, .json, .parquet, .arrow "
                        "(optionally .gz), a save_to_disk folder or a hub dataset name")
    else:
        ds = read.try_datasets(path, read.table_kind(path), cache_dir)
        if ds is None and read.table_kind(path) == "parquet":
            raise DataError(f"{path}: not a readable parquet file ({read.parquet_problem(path)})")
        if ds is None:
            parsed = read.json_records(path)
            fmt = layout.decide([obj for _, obj in parsed[0][:100]], fmt)
            ds, bad = read.from_records(path, lambda row: layout.problem(row, fmt), on_error, parsed, skip_hint())
            return ds, fmt, bad
    return _checked(ds, path, layout), _first_format(ds, layout) if fmt == "auto" else fmt, 0


def _first_format(ds, layout) -> str:
    return layout.decide(list(ds.select(range(min(100, len(ds))))), "auto")


def _load_folder(path: str, what: str):
    import datasets

    try:
        ds = datasets.load_from_disk(path)
    except (FileNotFoundError, OSError, ValueError) as e:
        raise DataError(f"{what} {path}: is a folder, but not one written by datasets' save_to_disk ({e})") from None
    ds = ds["train"] if isinstance(ds, datasets.DatasetDict) else ds
    problem = read.arrow_problem(ds)
    if problem:
        raise DataError(f"{what} {path}: its arrow data cannot be read ({problem})")
    return ds


def _load_arrow(path: str, what: str, cache_dir: str | None):
    import datasets
    import pyarrow as pa
    from datasets.exceptions import DatasetGenerationError

    try:
        ds = datasets.load_dataset("arrow", data_files=path, split="train", cache_dir=cache_dir)
    except (DatasetGenerationError, pa.ArrowException, OSError, ValueError) as e:
        raise DataError(f"{what} {path}: cannot be read as an arrow file ({str(e).splitlines()[0][:200]})") from None
    problem = read.arrow_problem(ds)
    if problem:
        raise DataError(f"{what} {path}: cannot be read as an arrow file ({problem})")
    return ds


def _checked(ds, path: str, layout):
    if len(ds) == 0:
        raise DataError(f"{path}: contains no rows")
    layout.check_columns(ds, path)
    return ds


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
