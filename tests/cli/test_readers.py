"""Readers that cannot crash, as a property of every command that takes files (rm-prepare = rm-train's
reading, rm-score, rm-eval): whatever the bytes, the command exits 0, or exits 2 with one message that
names the file, no traceback, and nothing written to its output. Hypothesis generates the files: random
bytes, byte mutations of valid files, truncations at random offsets, and a wrong-typed value in one field,
as .jsonl, .json, .jsonl.gz and .parquet, with on_error error and skip. The commands run in this process
(their main(), the same code the console scripts call), so a bug surfaces as the test's own traceback.
"""

from __future__ import annotations

import gzip
import io
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import ROOT, run_env, train_args
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rm_trainer.cli import eval as eval_cli
from rm_trainer.cli import prepare as prepare_cli
from rm_trainer.cli import score as score_cli

SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".parquet")
WRONG = st.one_of(st.integers(-10, 10), st.floats(allow_nan=True, allow_infinity=True), st.none(), st.booleans(),
                  st.lists(st.integers(0, 3), max_size=3),
                  st.dictionaries(st.text(max_size=3), st.integers(), max_size=2), st.text(max_size=8))
SETTINGS = settings(max_examples=100, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large])
TRIED: dict[str, int] = {}


def serialize(rows: list[dict], suffix: str) -> bytes:
    if suffix == ".parquet":
        buf = io.BytesIO()
        try:
            pq.write_table(pa.Table.from_pylist(rows), buf)
        except (pa.ArrowException, TypeError, ValueError, OverflowError):  # mixed types: not a parquet table
            return serialize(rows, ".jsonl")  # a ".parquet" that holds JSON: a foreign file
        return buf.getvalue()
    if suffix == ".json":
        return json.dumps(rows).encode()
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    return gzip.compress(data, mtime=0) if suffix.endswith(".gz") else data


@st.composite
def bad_files(draw, rows: list[dict]) -> tuple[str, bytes, str]:
    """(suffix, bytes, how it was made) of a file that is probably malformed, sometimes still valid."""
    suffix = draw(st.sampled_from(SUFFIXES))
    how = draw(st.sampled_from(("random", "mutated", "truncated", "wrong_type")))
    if how == "random":
        return suffix, draw(st.binary(min_size=1, max_size=3000)), how
    if how == "wrong_type":
        rows = [dict(r) for r in rows]
        i = draw(st.integers(0, len(rows) - 1))
        rows[i][draw(st.sampled_from(sorted(rows[i])))] = draw(WRONG)
        return suffix, serialize(rows, suffix), how
    data = serialize(rows, suffix)
    if how == "truncated":
        return suffix, data[:draw(st.integers(1, len(data) - 1))], how
    data = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        pos, byte = draw(st.integers(0, len(data) - 1)), draw(st.integers(0, 255))
        op = draw(st.sampled_from(("set", "insert", "delete")))
        if op == "set":
            data[pos] = byte
        elif op == "insert":
            data.insert(pos, byte)
        elif len(data) > 1:
            del data[pos]
    return suffix, bytes(data), how


def check_exit(name: str, main, argv: list[str], path: Path, output: Path, capsys) -> int:
    """The property: exit 0, or exit 2 naming the file, with no traceback and nothing under `output`."""
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    TRIED[f"{name} exit {rc}"] = TRIED.get(f"{name} exit {rc}", 0) + 1
    assert rc in (0, 2), err
    if rc == 2:
        assert str(path) in err or path.name in err, err
        assert "Traceback" not in err, err
        assert not output.exists() or not any(output.iterdir()), sorted(output.rglob("*"))
    return rc


def pair_rows(demo_assets) -> list[dict]:
    rows = [json.loads(line) for line in Path(demo_assets["train"]).read_text().splitlines()[:6]]
    return [r | {"margin": 1.0 + i} for i, r in enumerate(rows)]


@pytest.fixture(scope="module")
def reward_pt(run) -> str:
    return str(run("single_z2") / "reward.pt")


@pytest.fixture(scope="module")
def scratch():
    d = Path(tempfile.mkdtemp(prefix="readers-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)
    print(f"\nmalformed inputs tried per reader: {json.dumps(TRIED)}")


def _case(scratch: Path, suffix: str, data: bytes) -> tuple[Path, Path]:
    case = Path(tempfile.mkdtemp(dir=scratch))
    path = case / f"data{suffix}"
    path.write_bytes(data)
    return path, case / "out"


@given(data=st.data())
@settings(SETTINGS, max_examples=150)
def test_rm_prepare_reads_or_refuses_any_file(data, demo_assets, tiny_pretrained, scratch, capsys):
    rows = pair_rows(demo_assets)
    suffix, content, _ = data.draw(bad_files(rows))
    path, out = _case(scratch, suffix, content)
    on_error = data.draw(st.sampled_from(("error", "skip")))
    argv = train_args(tiny_pretrained, path, max_len=64, margin_key="margin", on_error=on_error,
                      max_drop_fraction=1.0, output_dir=out)
    check_exit("rm-prepare", prepare_cli.main, argv, path, out, capsys)


@pytest.mark.slow
@given(data=st.data())
@SETTINGS
def test_rm_score_reads_or_refuses_any_file(data, reward_pt, demo_assets, scratch, capsys):
    rows = [{"prompt": r["prompt"], "response": r["chosen"], "id": i} for i, r in enumerate(pair_rows(demo_assets))]
    suffix, content, _ = data.draw(bad_files(rows))
    path, out = _case(scratch, suffix, content)
    out.mkdir()
    argv = ["--model", reward_pt, "--data", str(path), "--output", str(out / "s.jsonl"),
            "--on_error", data.draw(st.sampled_from(("error", "skip")))]
    if check_exit("rm-score", score_cli.main, argv, path, out, capsys) == 0:
        assert (out / "s.jsonl").is_file() and not (out / "s.jsonl.parts").exists()


@pytest.mark.slow
@given(data=st.data())
@SETTINGS
def test_rm_eval_reads_or_refuses_any_file(data, reward_pt, demo_assets, scratch, capsys):
    suffix, content, _ = data.draw(bad_files(pair_rows(demo_assets)))
    path, out = _case(scratch, suffix, content)
    argv = ["--model", reward_pt, "--data", str(path), "--output_dir", str(out),
            "--on_error", data.draw(st.sampled_from(("error", "skip")))]
    if check_exit("rm-eval", eval_cli.main, argv, path, out, capsys) == 0:
        assert (out / "metrics.json").is_file()


def test_random_bytes_named_jsonl_get_one_message_from_rm_train_dry_run(tmp_path, tiny_pretrained):
    """The reported case, as a user runs it: a real rm-train process on a .jsonl of random bytes."""
    bad = tmp_path / "random.jsonl"
    bad.write_bytes(bytes(range(256)) * 8)
    cmd = [sys.executable, "-m", "rm_trainer.cli.train", *train_args(tiny_pretrained, bad, output_dir=tmp_path / "o"),
           "--dry-run"]
    p = subprocess.run(cmd, cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr[-3000:]
    assert "Traceback" not in p.stderr and f"{bad}:2: not UTF-8 text (byte 0x80)" in p.stderr, p.stderr[-3000:]
    assert not (tmp_path / "o").exists()
