"""One reading layer for every command that takes files (rm-train and rm-prepare, rm-score, rm-eval):
whatever the bytes, a file is read, or it is refused with a DataError naming the file and, where there
is one, the line. Nothing below raises a decoding or parsing error of its own.

  check_file   the path itself: missing, a symlink loop, a directory, a FIFO or device, unreadable, empty
  read_text    a small text file (a chat template): UTF-8, a BOM accepted
  read_table   a .jsonl / .json (optionally .gz) or .parquet file as a datasets.Dataset

JSON and parquet files are read by `datasets` (pyarrow: fast, memory-mapped). When it cannot read one,
the file is read again here, in Python, line by line, which either reads it or says what is wrong and
where: bytes that are not UTF-8, UTF-16, NUL bytes, a truncated gzip, invalid JSON, JSON nested too deep,
a row that is not an object, a column whose type changes between rows. `check_row` (each reader's own
row rule) decides which rows are usable; with on_error="skip" the others are counted, not fatal.
"""

from __future__ import annotations

import codecs
import errno
import gzip
import json
import logging
import math
import os
import stat
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rm_trainer.errors import DataError

JSON_SUFFIXES = (".jsonl", ".json")
TABLE_SUFFIXES = (".jsonl", ".json", ".parquet")
UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
GZIP_MAGIC = b"\x1f\x8b"
# errors a third-party reader raises on a bad file; the file is then read again here, which names the problem
GZIP_ERRORS = (OSError, EOFError, zlib.error)


def _kind(mode: int) -> str:
    return ("a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file")


def check_file(path: str, what: str, folder_ok: bool = False) -> Path:
    """The path, if it is a readable non-empty regular file (or, with folder_ok, a folder); otherwise a
    DataError that starts with `what` (a flag or config field) and the path."""
    p = Path(path)
    try:
        st = os.stat(p)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise DataError(f"{what} {path}: a symlink loop (the link points back to itself)") from None
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            raise DataError(f"{what} {path}: file not found") from None
        raise DataError(f"{what} {path}: cannot be read ({e.strerror})") from None
    if stat.S_ISDIR(st.st_mode):
        if folder_ok:
            return p
        raise DataError(f"{what} {path}: is a directory; expected a file")
    if not stat.S_ISREG(st.st_mode):
        raise DataError(f"{what} {path}: is {_kind(st.st_mode)}; expected a regular file")
    try:
        with open(p, "rb") as f:
            f.read(1)
    except OSError as e:
        raise DataError(f"{what} {path}: cannot be read ({e.strerror})") from None
    if st.st_size == 0:
        raise DataError(f"{what} {path}: file is empty")
    return p


def read_text(path: str, what: str) -> str:
    """A small text file (a chat template), as UTF-8 with an optional BOM."""
    data = check_file(path, what).read_bytes()
    if data.startswith(UTF16_BOMS):
        raise DataError(f"{what} {path}: is UTF-16; save it as UTF-8 (iconv -f UTF-16 -t UTF-8)")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise DataError(f"{what} {path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x})") from None


def _raw_bytes(path: str) -> bytes:
    """The file's bytes, gunzipped for .gz; a DataError for a corrupt or truncated gzip."""
    data = Path(path).read_bytes()
    if not path.lower().endswith(".gz"):
        return data
    if not data.startswith(GZIP_MAGIC):
        raise DataError(f"{path}: is not gzip data (it ends in .gz but does not start with the gzip magic bytes)")
    try:
        return gzip.decompress(data)
    except GZIP_ERRORS as e:
        raise DataError(f"{path}: a truncated or corrupt gzip file ({e})") from None


def _text(path: str) -> str:
    data = _raw_bytes(path)
    if data.startswith(UTF16_BOMS):
        raise DataError(f"{path}: is UTF-16; save it as UTF-8 (iconv -f UTF-16 -t UTF-8)")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x}); save the file as UTF-8") from None
    nul = text.find("\0")
    if nul >= 0:
        raise DataError(f"{path}:{text.count(chr(10), 0, nul) + 1}: a NUL byte; this is not a text file")
    return text


def _loads(s: str) -> Any:
    """json.loads that refuses NaN/Infinity (not JSON) and reports nesting too deep as a ValueError."""
    def constant(name: str):
        raise ValueError(f"{name} is not a JSON number")

    try:
        return json.loads(s, parse_constant=constant)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def json_records(path: str) -> tuple[list[tuple[int, Any]], list[str]]:
    """(line, value) of every row of a JSON-lines file, or of a .json file's array (line 1 for all rows
    when it is one document), and problems as 'file:line: ...'."""
    text = _text(path)
    if not is_json_lines(path):
        try:
            doc = _loads(text)
        except ValueError as e:
            line = getattr(e, "lineno", None)
            return [], [f"{path}{f':{line}' if line else ''}: invalid JSON ({getattr(e, 'msg', e)})"]
        if isinstance(doc, dict) and len(doc) == 1 and isinstance(next(iter(doc.values())), list):
            doc = next(iter(doc.values()))  # {"data": [...]}, as `datasets` reads it
        if not isinstance(doc, list):
            return [], [f"{path}: expected a JSON array of objects (or JSON lines), got a {type(doc).__name__}"]
        return [(1, row) for row in doc], []
    records, problems = [], []
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            records.append((lineno, _loads(line)))
        except ValueError as e:
            msg = f"{e.msg} at column {e.colno}" if isinstance(e, json.JSONDecodeError) else str(e)
            problems.append(f"{path}:{lineno}: invalid JSON ({msg})")
    return records, problems


def is_json_lines(path: str) -> bool:
    return path.lower().removesuffix(".gz").endswith(".jsonl")


def table_kind(path: str) -> str | None:
    """'json' or 'parquet' from the file name (.jsonl/.json, optionally .gz; .parquet), else None."""
    name = path.lower()
    if name.endswith(".parquet"):
        return "parquet"
    return "json" if name.removesuffix(".gz").endswith(JSON_SUFFIXES) else None


def finite_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


RowCheck = Callable[[Any], "str | None"]


def read_table(path: str, what: str = "--data", make_check: Callable[[list], RowCheck] | None = None,
               on_error: str = "error", cache_dir: str | None = None):
    """(datasets.Dataset, rows skipped as unusable) of a JSON(-lines) or parquet file. When `datasets`
    cannot read it, it is read here; then make_check(the first rows) gives the reader's row rule, rows
    it refuses are errors (or, with on_error="skip", counted), and the rest become the dataset. Readers
    check every row again as they use it, so both ways end in the same rule."""
    check_file(path, what)
    kind = table_kind(path)
    if kind is None:
        raise DataError(f"{what} {path}: expected a .jsonl, .json (optionally .gz) or .parquet file")
    ds = try_datasets(path, kind, cache_dir)
    if ds is not None and len(ds) == 0:
        raise DataError(f"{what} {path}: contains no rows")
    if ds is not None:
        return ds, 0
    if kind == "parquet":
        raise DataError(f"{path}: not a readable parquet file ({parquet_problem(path)})")
    parsed = json_records(path)
    first = [obj for _, obj in parsed[0][:100] if isinstance(obj, dict)]
    return from_records(path, make_check(first) if make_check else None, on_error, parsed)


def try_datasets(path: str, kind: str, cache_dir: str | None):
    """The file through `datasets`, or None when it cannot read it (the caller then finds out why)."""
    import datasets
    import pyarrow as pa
    from datasets.exceptions import DatasetGenerationError

    if kind == "json" and not _clean_utf8(path):  # pyarrow keeps invalid UTF-8 and fails when it is read
        return None
    log = logging.getLogger("datasets")
    level = log.level
    log.setLevel(logging.CRITICAL)  # its own "Failed to load JSON" line: the reading here says what is wrong
    try:
        ds = datasets.load_dataset(kind, data_files=str(path), split="train", cache_dir=cache_dir)
    except (DatasetGenerationError, pa.ArrowException, ValueError, TypeError, RecursionError, *GZIP_ERRORS):
        return None
    finally:
        log.setLevel(level)
    return ds if arrow_problem(ds) is None else None


def arrow_problem(ds) -> str | None:
    """What makes a loaded dataset unreadable row by row (pyarrow checks UTF-8 only when a value is read,
    e.g. a damaged parquet page), else None: one full validation pass, in C++."""
    import pyarrow as pa

    try:
        ds.data.table.validate(full=True)
    except pa.ArrowException as e:
        return str(e).splitlines()[0][:200]
    return None


def _clean_utf8(path: str) -> bool:
    """Whether the (gunzipped) file is UTF-8 without NUL bytes or a UTF-16 BOM: streamed, 4 MB at a time."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    opener = gzip.open if path.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            head = f.read(2)
            if head in UTF16_BOMS:
                return False
            f.seek(0)
            for chunk in iter(lambda: f.read(1 << 22), b""):
                if b"\0" in chunk:
                    return False
                decoder.decode(chunk)
            decoder.decode(b"", final=True)
    except (UnicodeDecodeError, *GZIP_ERRORS):
        return False
    return True


def parquet_problem(path: str) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pq.read_table(path).validate(full=True)
    except (pa.ArrowException, OSError) as e:
        return str(e).splitlines()[0][:200]
    return "datasets cannot read its column types"


SKIP_HINT = " (fix the row, or pass --on_error skip to count and skip malformed rows)"


def from_records(path: str, check_row: RowCheck | None, on_error: str, parsed=None, hint: str = SKIP_HINT):
    """A JSON(-lines) file read here: (Dataset of the usable rows, how many were skipped). The first
    problem is raised unless on_error is "skip"; a file with no usable row is always an error.
    parsed: json_records(path), when the caller has already read it."""
    import datasets
    import pyarrow as pa

    records, problems = parsed or json_records(path)
    problems = list(problems)
    rows, lines = [], []
    for lineno, obj in records:
        problem = (f"each row must be a JSON object, got {type(obj).__name__}" if not isinstance(obj, dict)
                   else check_row and check_row(obj))
        if problem:
            problems.append(f"{path}:{lineno}: {problem}")
        else:
            rows.append(obj)
            lines.append(lineno)
    problems.sort(key=_line_of)
    if problems and on_error == "error":
        raise DataError(problems[0] + hint)
    if not rows:
        first = f"; first: {problems[0]}" if problems else ""
        raise DataError(f"{path}: no usable rows ({len(problems)} malformed{first})")
    try:
        return datasets.Dataset.from_list(rows), len(problems)
    except (pa.ArrowException, TypeError, ValueError, OverflowError) as e:
        raise DataError(f"{path}: {_type_conflict(rows, lines) or f'rows do not share one schema ({e})'}") from None


def _line_of(problem: str) -> int:
    head = problem.split(": ", 1)[0]
    tail = head.rsplit(":", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def _type_conflict(rows: list[dict], lines: list[int]) -> str | None:
    """'field X is a str on line 1 but an int on line 3' for the first field whose type changes."""
    seen: dict[str, tuple[str, int]] = {}
    for row, line in zip(rows, lines, strict=True):
        for k, v in row.items():
            if v is None:
                continue
            t = "number" if isinstance(v, (int, float)) and not isinstance(v, bool) else type(v).__name__
            if k in seen and seen[k][0] != t:
                return (f"field {k!r} is a {seen[k][0]} on line {seen[k][1]} but a {t} on line {line}; a field "
                        "must have one type in every row")
            seen.setdefault(k, (t, line))
    return None
