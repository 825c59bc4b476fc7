"""The reading layer (data/read.py) on each kind of bad file the issue lists, through the two readers
built on it: load_source (rm-train, rm-prepare, rm-eval's pair files) and rm-score's read_rows. Each is
read, or refused with a DataError naming the file (and the line, where there is one)."""

from __future__ import annotations

import gzip
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import load_pairs as load_source

from rm_trainer.errors import DataError
from rm_trainer.objectives.pair_rows import PairKeys
from rm_trainer.use.rows import RowKeys
from rm_trainer.use.score import read_rows

ROW = {"prompt": "Human: hi Assistant:", "chosen": " a", "rejected": " b", "margin": 1.0}
LINE = json.dumps(ROW).encode() + b"\n"
KEYS = PairKeys(margin="margin")


def pairs(path, on_error="error"):
    return load_source(str(path), "auto", KEYS, on_error)


def scored(path):
    return read_rows(str(path), RowKeys(response="chosen"))


def write(tmp_path, name: str, data: bytes):
    p = tmp_path / name
    p.write_bytes(data)
    return p


BAD_BYTES = [  # (file name, bytes, expected message after the path)
    ("latin1.jsonl", LINE + b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n',
     r":2: not UTF-8 text \(byte 0xe9\)"),
    ("utf16.jsonl", LINE.decode().encode("utf-16"), r": is UTF-16; save it as UTF-8"),
    ("nul.jsonl", LINE + LINE.replace(b" a", b" \0a"), r":2: a NUL byte"),
    ("cut.jsonl.gz", gzip.compress(LINE * 50)[:-9], r": a truncated or corrupt gzip file"),
    ("plain.jsonl.gz", LINE, r": is not gzip data"),
    ("deep.jsonl", LINE + b"[" * 10_000 + b"]" * 10_000 + b"\n", r":2: invalid JSON \(JSON nested too deeply\)"),
    ("json.parquet", LINE, r": not a readable parquet file"),
]


@pytest.mark.parametrize("name,data,expected", BAD_BYTES, ids=[c[0] for c in BAD_BYTES])
def test_bad_bytes_are_named_by_file_and_line_in_every_reader(tmp_path, name, data, expected):
    p = write(tmp_path, name, data)
    for reader in (pairs, scored):
        with pytest.raises(DataError, match=f"{p}{expected}"):
            reader(p)


def test_a_bad_line_is_skipped_and_counted_with_on_error_skip(tmp_path):
    p = write(tmp_path, "mixed.jsonl", LINE + b'{"prompt": "caf\xe9"}\n' + LINE)
    with pytest.raises(DataError, match=f"{p}:2: not UTF-8"):
        pairs(p, "skip")  # a decoding failure is the file's, not a row's: nothing after it can be trusted
    p = write(tmp_path, "cut.jsonl", LINE + b'{"prompt": "q", "chosen": \n' + LINE)
    ds, _, bad = pairs(p, "skip")
    assert len(ds) == 2 and bad == 1


@pytest.mark.parametrize("number", [b"NaN", b"Infinity", b"-Infinity"])
def test_nan_and_infinity_where_a_margin_is_read(tmp_path, number):
    """pyarrow reads the non-JSON constants as floats; the margin's row check refuses them. Where this
    file is read by the Python reader instead (another line stops pyarrow), they are invalid JSON."""
    from rm_trainer.objectives.pair_rows import row_problem

    text = LINE.replace(b"1.0", number)
    ds, fmt, _ = pairs(write(tmp_path, "m.jsonl", LINE + text))
    assert row_problem(ds[1], fmt, KEYS) == f"field 'margin' is {float(number)!r}; expected a finite number"
    p = write(tmp_path, "m2.jsonl", LINE + text + b"[1]\n")
    with pytest.raises(DataError, match=f"{p}:2: invalid JSON \\({number.decode()} is not a JSON number\\)"):
        pairs(p)
    assert len(scored(write(tmp_path, "m3.jsonl", LINE + text))[0]) == 2  # rm-score reads no margin


def test_a_utf8_bom_and_a_50_mb_line_are_read(tmp_path):
    ds, fmt, bad = pairs(write(tmp_path, "bom.jsonl", b"\xef\xbb\xbf" + LINE * 3))
    assert (len(ds), fmt, bad) == (3, "prompt", 0) and ds[0]["prompt"] == ROW["prompt"]
    big = json.dumps(ROW | {"chosen": "x" * (50 << 20)}).encode() + b"\n"
    ds, _, _ = pairs(write(tmp_path, "big.jsonl", LINE + big))
    assert len(ds) == 2 and len(ds[1]["chosen"]) == 50 << 20


def test_parquet_with_wrong_column_types_names_the_field(tmp_path):
    p = tmp_path / "typed.parquet"
    pq.write_table(pa.table({"prompt": ["q", "r"], "chosen": [1, 2], "rejected": ["a", "b"]}), p)
    ds, fmt, _ = pairs(p)  # read; each row is checked against the format where it is tokenized
    from rm_trainer.objectives.pair_rows import row_problem

    assert row_problem(ds[0], fmt, KEYS) == "field 'chosen' is a int, not text; expected a string"
    with pytest.raises(DataError, match=f"{p} row 0: field 'chosen': expected text, got 1"):
        scored(p)
    pq.write_table(pa.table({"prompt": ["q"], "chosen": ["a"], "rejected": ["b"], "margin": [float("nan")]}), p)
    ds, fmt, _ = pairs(p)
    assert row_problem(ds[0], fmt, KEYS) == "field 'margin' is nan; expected a finite number"


def test_paths_that_are_not_readable_files(tmp_path):
    folder = tmp_path / "folder.jsonl"
    folder.mkdir()
    fifo = tmp_path / "fifo.jsonl"
    os.mkfifo(fifo)
    loop = tmp_path / "loop.jsonl"
    loop.symlink_to(loop)
    cases = [(folder, "is a folder, but not one written by datasets' save_to_disk", "is a directory; expected a file"),
             (fifo, "is a FIFO; expected a regular file", "is a FIFO; expected a regular file"),
             (loop, "a symlink loop", "a symlink loop"),
             (tmp_path / "missing.jsonl", "file not found", "file not found"),
             (write(tmp_path, "empty.jsonl", b""), "file is empty", "file is empty")]
    for path, for_pairs, for_scores in cases:
        with pytest.raises(DataError, match=f"{path}: {for_pairs}"):
            pairs(path)
        with pytest.raises(DataError, match=f"{path}: {for_scores}"):
            scored(path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file whatever its mode bits")
def test_an_unreadable_file(tmp_path):
    p = write(tmp_path, "secret.jsonl", LINE)
    p.chmod(0)
    for reader in (pairs, scored):
        with pytest.raises(DataError, match=f"{p}: cannot be read \\(Permission denied\\)"):
            reader(p)


def test_a_parquet_page_with_invalid_utf8_is_refused_when_read(tmp_path):
    """pyarrow checks UTF-8 only when a value is read: a damaged page would fail mid-tokenization."""
    import io

    buf = io.BytesIO()
    pq.write_table(pa.table({"prompt": ["hello there"] * 3, "chosen": ["a"] * 3, "rejected": ["b"] * 3}), buf,
                   compression="NONE")
    data = bytearray(buf.getvalue())
    data[data.find(b"hello")] = 0x80
    p = write(tmp_path, "damaged.parquet", bytes(data))
    for reader in (pairs, scored):
        with pytest.raises(DataError, match=f"{p}: not a readable parquet file \\(.*Invalid UTF8"):
            reader(p)
