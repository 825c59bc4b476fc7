"""rm-score: score a file of texts with a trained reward model, for best-of-n, rejection sampling and data
filtering (rows: see use/rows.py). The output has the same rows in the same order plus `reward` (or
`rewards` and `best_index`); an attribute head's rows also get `attributes` ({name: value}, a list of them
for `responses`), and its `reward` is the combined reward.

Fast: sequences are sorted by length into batches of at most max_batch_tokens padded tokens
(model.score_sequences, the same code as score_texts and rm-serve), and the rewards go back to input
order. The rows are cut into fixed chunks of chunk_rows; with several ranks (torchrun / deepspeed set RANK
and WORLD_SIZE) each takes a contiguous run of chunks. A finished chunk is written to OUTPUT.parts/ and
renamed into place, so a killed run continues where it stopped; rank 0 merges the chunks in order once
they all exist. No process group is needed: ranks share only files.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from rm_trainer import disk
from rm_trainer.artifact.load import ModelOptions
from rm_trainer.data.formats import is_jsonl, row_location
from rm_trainer.data.read import read_table
from rm_trainer.data.tokenize import encode_item, special_prefix
from rm_trainer.errors import DataError, UserError
from rm_trainer.model.scoring import Forwarded, score_with_attributes
from rm_trainer.model.sharing import scoring_rule
from rm_trainer.use.rows import RowKeys, detect_row_format, row_items, row_problem


@dataclass
class ScoreOptions:
    """What rm-score does with a loaded model: which file, which columns, how it batches and resumes."""

    data: str
    output: str
    keys: RowKeys = field(default_factory=RowKeys)
    max_batch_tokens: int = 16384
    chunk_rows: int = 2048
    on_error: str = "error"  # or "skip": a malformed row is counted and left out
    wait_timeout_s: float = 86400  # rank 0's wait for the other ranks' chunks
    share_prompt: str = "auto"  # responses to one prompt share it (model.sharing.scoring_rule); or on / off


def read_rows(path: str, keys: RowKeys, on_error: str = "error", what: str = "--data"):
    """(dataset, row format, malformed rows left out of the dataset) of a .jsonl / .json / .parquet file
    (data/read.py: any size, memory-mapped; any bytes, read or refused naming the file). Every row is
    checked before anything is scored or written: with on_error="error" the first bad row stops the run
    with nothing written."""
    ds, skipped = read_table(path, what, lambda first: _check(first, keys, path), on_error)
    fmt = detect_row_format(ds.column_names, keys, path)
    if on_error == "error":
        for start in range(0, len(ds), 1000):
            for i, row in enumerate(_rows(ds[start:start + 1000]), start):
                problem = row_problem(row, fmt, keys)
                if problem:
                    raise DataError(f"{row_where(path, i)}: {problem} (or pass --on_error skip to count and "
                                    "leave it out)")
    return ds, fmt, skipped


def _check(first: list[dict], keys: RowKeys, path: str):
    fmt = detect_row_format(list(dict.fromkeys(k for row in first for k in row)), keys, path)
    return lambda row: row_problem(row, fmt, keys)


def _rows(batch: dict[str, list]) -> list[dict]:
    return [dict(zip(batch, vals, strict=True)) for vals in zip(*batch.values(), strict=True)]


def row_where(path: str, i: int) -> str:
    """Row i's place: 'file:line' for JSON lines (read.py keeps their order), else 'file row i'."""
    return row_location(path, i) if is_jsonl(path) else f"{path} row {i}"


def chunk_ranges(n: int, chunk_rows: int, rank: int, world: int) -> list[tuple[int, int]]:
    """Rank `rank`'s contiguous run of the fixed chunks [k * chunk_rows, ...): the chunks, and so every
    batch and every bit of every reward, are the same for any number of ranks."""
    chunks = [(lo, min(lo + chunk_rows, n)) for lo in range(0, n, chunk_rows)]
    per = -(-len(chunks) // world) if chunks else 0
    return chunks[rank * per:(rank + 1) * per]


def part_path(parts: Path, lo: int, hi: int) -> Path:
    return parts / f"{lo:012d}-{hi:012d}.jsonl"


def score_chunk(model, ds, lo: int, hi: int, fmt: str, opts: ScoreOptions, forwarded: Forwarded | None = None
                ) -> tuple[list[dict], Counter]:
    """Rows lo..hi-1 scored (each with its reward, or rewards and best_index), and the malformed ones
    counted; forwarded counts what the forwards computed."""
    forwarded = forwarded or Forwarded()
    prefix = special_prefix(model.tokenizer)
    rows, owners, seqs, dropped = [], [], [], Counter()
    for i in range(lo, hi):
        row = ds[i]
        if row_problem(row, fmt, opts.keys):  # read_rows has raised already unless on_error is skip
            dropped["malformed"] += 1
            continue
        items = row_items(row, fmt, opts.keys, opts.data)
        for item in items:
            owners.append(len(rows))
            seqs.append(encode_item(model.tokenizer, item, model.max_len, prefix))
        rows.append(row)
    share = scoring_rule(model, opts.share_prompt)  # a chunk's sequences of one prompt share it
    rewards, attributes = score_with_attributes(model, seqs, opts.max_batch_tokens, share=share,
                                                on_forward=forwarded.add) if seqs else ([], None)
    per_row: list[list[float]] = [[] for _ in rows]
    per_row_attrs: list[list[dict]] = [[] for _ in rows]
    for j, (owner, r) in enumerate(zip(owners, rewards, strict=True)):
        per_row[owner].append(r)
        if attributes is not None:  # an attribute head: each response's attributes beside its reward
            per_row_attrs[owner].append(attributes[j])
    for row, rs, attrs in zip(rows, per_row, per_row_attrs, strict=True):
        if fmt == "responses":
            row["rewards"], row["best_index"] = rs, max(range(len(rs)), key=rs.__getitem__)
        else:
            row["reward"] = rs[0]
        if attrs:
            row["attributes"] = attrs if fmt == "responses" else attrs[0]
    return rows, dropped


def write_part(path: Path, rows: list[dict], dropped: Counter) -> None:
    """A chunk is either complete or absent: a killed run, or one stopped by a full disk, redoes only the
    unfinished ones when rerun."""
    def write(tmp: Path) -> None:
        with open(tmp, "w") as f:
            f.write(json.dumps({"__dropped__": dict(dropped)}) + "\n")
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")

    try:
        disk.write_atomically("writing the scored chunk", path, write)
    except disk.DiskFullError as e:
        raise disk.DiskFullError(f"{e}; the finished chunks in {path.parent} are kept") from None


def merge(parts: list[Path], parts_dir: Path, output: Path) -> Counter:
    """The chunks, in order, into the output (jsonl: streamed; parquet: through an arrow cache)."""
    dropped: Counter = Counter()
    tmp = output.with_name(output.name + ".tmp.jsonl")
    with open(tmp, "w") as out:
        for p in parts:
            with open(p) as f:
                dropped.update(json.loads(f.readline())["__dropped__"])
                shutil.copyfileobj(f, out)
    if output.suffix == ".parquet":
        from datasets import Dataset

        # the arrow cache goes beside the parts (deleted with them), not into the home directory
        tmp_parquet = output.with_name(output.name + ".tmp.parquet")
        Dataset.from_json(str(tmp), cache_dir=str(parts_dir / "arrow")).to_parquet(str(tmp_parquet))
        tmp_parquet.replace(output)
        tmp.unlink()
    else:
        tmp.replace(output)
    return dropped


def run(model_opts: ModelOptions, opts: ScoreOptions) -> dict:
    """Score opts.data into opts.output. The model is loaded only if this rank has chunks left to score
    (a resumed run whose chunks all exist loads nothing)."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    ds, fmt, left_out = read_rows(opts.data, opts.keys, opts.on_error)
    output = Path(opts.output)
    parts = Path(str(output) + ".parts")
    mine = chunk_ranges(len(ds), opts.chunk_rows, rank, world)
    todo = [(lo, hi) for lo, hi in mine if not part_path(parts, lo, hi).is_file()]
    started, forwarded = time.perf_counter(), Forwarded()
    if todo:
        model = model_opts.load()  # before anything is written: a model that cannot load leaves nothing
        parts.mkdir(parents=True, exist_ok=True)
        bar = tqdm(total=sum(hi - lo for lo, hi in todo), unit="row", desc=f"score rank {rank}",
                   disable=rank != 0 and world > 1, dynamic_ncols=True)
        for lo, hi in todo:
            rows, dropped = score_chunk(model, ds, lo, hi, fmt, opts, forwarded)
            write_part(part_path(parts, lo, hi), rows, dropped)
            bar.update(hi - lo)
        bar.close()
    report = {"rows": len(ds) + left_out, "format": fmt, "scored_here": sum(hi - lo for lo, hi in todo),
              "resumed_chunks": len(mine) - len(todo), "seconds": round(time.perf_counter() - started, 3),
              "sequences": forwarded.sequences, "tokens": forwarded.tokens, "tokens_forwarded": forwarded.forwarded}
    if rank != 0:
        return report
    report |= _merge_all(len(ds), world, parts, output, opts, left_out)
    Path(str(output) + ".report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _merge_all(n: int, world: int, parts: Path, output: Path, opts: ScoreOptions, left_out: int) -> dict:
    """Rank 0: merge once every rank's chunks exist (ranks share files, not a process group). left_out:
    malformed rows that never became rows of the dataset (read.py's own reading, on_error=skip)."""
    every = [part_path(parts, lo, hi) for r in range(world) for lo, hi in chunk_ranges(n, opts.chunk_rows, r, world)]
    deadline = time.monotonic() + opts.wait_timeout_s
    while not all(p.is_file() for p in every):
        if time.monotonic() > deadline:
            missing = [p.name for p in every if not p.is_file()]
            raise UserError(f"waited {opts.wait_timeout_s:.0f}s for the other ranks' chunks {missing[:3]}...; "
                            "rerun to continue (finished chunks are kept)")
        time.sleep(0.5)
    try:
        dropped = merge(every, parts, output) + Counter({"malformed": left_out})
    except (OSError, RuntimeError) as e:
        for suffix in (".tmp.jsonl", ".tmp.parquet"):  # no partial output file
            disk.remove(output.with_name(output.name + suffix))
        if not disk.is_disk_failure(e):
            raise
        raise disk.DiskFullError(disk.message("writing", output, e, sum(p.stat().st_size for p in every))
                                 + f"; the scored chunks in {parts} are kept: free space and rerun to merge") from None
    shutil.rmtree(parts, ignore_errors=True)
    return {"output": str(output), "written": n - sum(dropped.values()), "dropped": dict(dropped)}
