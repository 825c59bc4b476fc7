"""Reading a source of rows, with errors that name file, line and field, and the text shapes every
objective shares: HH full texts split at their last common "Assistant:" turn, conversations rendered
through the chat template.

Files are read through data/read.py (`datasets` first): .jsonl/.json (optionally .gz), .parquet, .arrow, a
`save_to_disk` folder, or a hub dataset name. Which rows a source holds, and what makes one malformed, is
its objective's layout (objectives/*_rows.py), decided once per source from its first rows.
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

from rm_trainer.data import read
from rm_trainer.errors import DataError

ASSISTANT = "Assistant:"


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


def load_source(path: str, fmt: str, layout, on_error: str, cache_dir: str | None = None, what: str = "--data"):
    """One source as a datasets.Dataset, its format (decided once, from its first rows), and how many
    rows were already found malformed (only when `datasets` cannot read a JSON file and read.py reads it
    instead; every other row is checked during tokenization, against that format). Every file goes
    through data/read.py, so a file of any bytes is read or refused with a DataError naming it. layout:
    the objective's view of its rows (decide, problem, check_columns; objectives/pair_rows.PairLayout)."""
    import datasets

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
        prompt = [{"role": "user", "content": prompt}]
    elif not isinstance(prompt, list):
        k = 0
        while k < min(len(chosen), len(rejected)) - 1 and chosen[k] == rejected[k]:
            k += 1
        prompt, chosen, rejected = chosen[:k], chosen[k:], rejected[k:]
    prompt_text, (c, r) = render_messages(tok, prompt, [chosen, rejected], template)
    return prompt_text, c, r


def render_messages(tok, prompt: list[dict], responses: list[list[dict]], template: str | None = None
                    ) -> tuple[str, list[str]]:
    """(prompt text, each response's text) through the chat template: the prompt messages with the
    generation prompt, and each response as what its messages add to them."""
    kwargs = {"chat_template": template} if template else {}
    prompt_text = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True, **kwargs)

    def response(msgs: list[dict]) -> str:
        full = tok.apply_chat_template(prompt + msgs, tokenize=False, **kwargs)
        if not full.startswith(prompt_text):  # templates that rewrite earlier turns: render the tail alone
            return tok.apply_chat_template(msgs, tokenize=False, **kwargs)
        return full[len(prompt_text):]

    return prompt_text, [response(m) for m in responses]
