"""rm-score: score a file of texts with a trained reward model, for best-of-n, rejection sampling and data
filtering.

    rm-score --model OUT/reward.pt --input samples.jsonl --output scored.jsonl [--max_batch_tokens 16384]
    torchrun --nproc_per_node 8 -m rm_trainer.scoring --model OUT/hf --input s.parquet --output s.scored.parquet

Rows hold `text`, or `prompt` + `response`, or `prompt` + `responses` (a list: best-of-n), or `messages`
(a conversation); the format is decided once from the columns. Every sequence is tokenized exactly as
training did (data.encode_item: same BOS, truncation policy and final EOS, same chat template). The
output has the same rows in the same order plus `reward` (or `rewards` and `best_index`).

Fast: sequences are sorted by length into batches of at most --max_batch_tokens padded tokens, and the
rewards go back to input order. The rows are cut into fixed chunks of --chunk_rows; with several ranks
(torchrun / deepspeed set RANK and WORLD_SIZE) each takes a contiguous run of chunks. A finished chunk is
written to OUTPUT.parts/ and renamed into place, so a killed run continues where it stopped; rank 0
merges the chunks in order once they all exist. No process group is needed: ranks share only files.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from rm_trainer.errors import DataError, UserError

FORMATS = ("text", "response", "responses", "messages")


@dataclass
class Keys:
    text: str = "text"
    prompt: str = "prompt"
    response: str = "response"
    responses: str = "responses"
    messages: str = "messages"


def detect_format(columns: list[str], keys: Keys, where: str) -> str:
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


def row_items(row: dict, fmt: str, keys: Keys, where: str) -> list:
    """The items to score of one row (data.encode_item's forms), or DataError naming the row and field."""
    def text(field: str) -> str:
        v = row.get(field)
        if not isinstance(v, str) or not v.strip():
            raise DataError(f"{where}: field {field!r}: expected non-empty text, got {_show(v)}")
        return v

    if fmt == "text":
        return [text(keys.text)]
    if fmt == "response":
        return [(text(keys.prompt), text(keys.response))]
    if fmt == "responses":
        prompt, rs = text(keys.prompt), row.get(keys.responses)
        if not isinstance(rs, list) or not rs or not all(isinstance(r, str) and r.strip() for r in rs):
            raise DataError(f"{where}: field {keys.responses!r}: expected a non-empty list of non-empty texts, "
                            f"got {_show(rs)}")
        return [(prompt, r) for r in rs]
    msgs = row.get(keys.messages)
    if (not isinstance(msgs, list) or not msgs
            or not all(isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") for m in msgs)):
        raise DataError(f"{where}: field {keys.messages!r}: expected a list of {{role, content}} messages, got "
                        f"{_show(msgs)}")
    if msgs[-1]["role"] != "assistant":
        raise DataError(f"{where}: field {keys.messages!r}: the last message must be the assistant's response "
                        f"(it is {msgs[-1]['role']!r})")
    return [msgs]


def _show(v) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


MIN_FILL = 0.75


def token_budget_batches(lengths: list[int], max_batch_tokens: int, sort: bool = True) -> list[list[int]]:
    """Indices grouped into batches whose padded size (longest x count) stays within max_batch_tokens
    (a sequence longer than the budget gets a batch of its own). sort=True orders by length, longest
    first, and also starts a new batch at a sequence shorter than MIN_FILL of its batch's longest, so at
    most a quarter of any batch is padding (measured on CPU: a mixed-length batch costs up to 2x the
    forwards of its rows one at a time, see bench/serve_speed.py); sort=False keeps input order and
    splits only at the budget (the naive baseline, for comparison)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i]) if sort else list(range(len(lengths)))
    batches: list[list[int]] = []
    cur: list[int] = []
    longest = 0
    for i in order:
        if cur and (max(longest, lengths[i]) * (len(cur) + 1) > max_batch_tokens
                    or (sort and lengths[i] < MIN_FILL * longest)):
            batches.append(cur)
            cur, longest = [], 0
        cur.append(i)
        longest = max(longest, lengths[i])
    if cur:
        batches.append(cur)
    return batches


@torch.no_grad()
def score_sequences(model, seqs: list[list[int]], max_batch_tokens: int, sort: bool = True,
                    padding_side: str = "right", on_forward=None) -> torch.Tensor:
    """fp32 rewards of token-id sequences, in input order. padding_side="left" pads in front, with an
    attention mask and position ids that start at each sequence's first token (what HF pipelines do);
    the rewards agree with right padding to fp32 rounding. on_forward(rows, seconds) is told of every
    forward (rm-serve's metrics)."""
    from rm_trainer.data import pad_right

    assert padding_side in ("right", "left"), padding_side
    device = model.score.weight.device
    out = torch.empty(len(seqs), dtype=torch.float32)
    for batch in token_budget_batches([len(s) for s in seqs], max_batch_tokens, sort):
        started = time.perf_counter()
        lens = torch.tensor([len(seqs[i]) for i in batch])
        if padding_side == "right":
            ids = pad_right([seqs[i] for i in batch], model.pad_token_id).to(device)
            r = model(ids, lens.to(device))
        else:
            T = int(lens.max())
            ids = torch.full((len(batch), T), model.pad_token_id, dtype=torch.long)
            mask = torch.zeros(len(batch), T, dtype=torch.long)
            for row, i in enumerate(batch):
                ids[row, T - len(seqs[i]):] = torch.tensor(seqs[i])
                mask[row, T - len(seqs[i]):] = 1
            pos = (mask.cumsum(1) - 1).clamp(min=0)
            last = torch.stack([torch.arange(len(batch)), torch.full((len(batch),), T - 1)], 1)
            r = model(ids.to(device), None, pos.to(device), last.to(device), mask.to(device))
        out[torch.tensor(batch)] = r.float().cpu()  # a device-host sync per batch
        if on_forward is not None:
            on_forward(len(batch), time.perf_counter() - started)
    return out


def read_rows(path: str):
    """jsonl / json / parquet through `datasets` (any size: memory-mapped arrow)."""
    from datasets import load_dataset

    p = Path(path)
    if not p.is_file():
        raise UserError(f"--input {path}: file not found")
    kind = "parquet" if p.suffix == ".parquet" else "json" if p.suffix in (".json", ".jsonl", ".gz") else None
    if kind is None:
        raise UserError(f"--input {path}: expected .jsonl, .json or .parquet")
    return load_dataset(kind, data_files=str(p), split="train")


def chunk_ranges(n: int, chunk_rows: int, rank: int, world: int) -> list[tuple[int, int]]:
    """Rank `rank`'s contiguous run of the fixed chunks [k * chunk_rows, ...): the chunks, and so every
    batch and every bit of every reward, are the same for any number of ranks."""
    chunks = [(lo, min(lo + chunk_rows, n)) for lo in range(0, n, chunk_rows)]
    per = -(-len(chunks) // world) if chunks else 0
    return chunks[rank * per:(rank + 1) * per]


def part_path(parts: Path, lo: int, hi: int) -> Path:
    return parts / f"{lo:012d}-{hi:012d}.jsonl"


def score_chunk(model, ds, lo: int, hi: int, fmt: str, keys: Keys, args, src: str) -> tuple[list[dict], Counter]:
    from rm_trainer.data import encode_item, special_prefix

    prefix = special_prefix(model.tokenizer)
    rows, owners, seqs, dropped = [], [], [], Counter()
    for i in range(lo, hi):
        row = ds[i]
        where = f"{src}:{i + 1}" if not src.endswith(".parquet") else f"{src} row {i}"
        try:
            items = row_items(row, fmt, keys, where)
        except DataError:
            if args.on_error == "error":
                raise
            dropped["malformed"] += 1
            continue
        for item in items:
            owners.append(len(rows))
            seqs.append(encode_item(model.tokenizer, item, model.max_len, prefix))
        rows.append(row)
    rewards = score_sequences(model, seqs, args.max_batch_tokens).tolist() if seqs else []
    per_row: list[list[float]] = [[] for _ in rows]
    for owner, r in zip(owners, rewards, strict=True):
        per_row[owner].append(r)
    for row, rs in zip(rows, per_row, strict=True):
        if fmt == "responses":
            row["rewards"], row["best_index"] = rs, max(range(len(rs)), key=rs.__getitem__)
        else:
            row["reward"] = rs[0]
    return rows, dropped


def write_part(path: Path, rows: list[dict], dropped: Counter) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps({"__dropped__": dict(dropped)}) + "\n")
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
    tmp.replace(path)  # a chunk is either complete or absent: a killed run redoes only unfinished ones


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
        Dataset.from_json(str(tmp), cache_dir=str(parts_dir / "arrow")).to_parquet(str(output))
        tmp.unlink()
    else:
        tmp.replace(output)
    return dropped


def run(args) -> dict:
    from rm_trainer.artifact import load_reward_model

    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = args.device or (f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    ds = read_rows(args.input)
    keys = Keys(args.text_key, args.prompt_key, args.response_key, args.responses_key, args.messages_key)
    fmt = detect_format(ds.column_names, keys, args.input)
    output = Path(args.output)
    parts = Path(str(output) + ".parts")
    parts.mkdir(parents=True, exist_ok=True)
    mine = chunk_ranges(len(ds), args.chunk_rows, rank, world)
    todo = [(lo, hi) for lo, hi in mine if not part_path(parts, lo, hi).is_file()]
    started = time.perf_counter()
    if todo:
        model = load_reward_model(args.model, device=device, normalize=args.normalize)
        bar = tqdm(total=sum(hi - lo for lo, hi in todo), unit="row", desc=f"score rank {rank}",
                   disable=rank != 0 and world > 1, dynamic_ncols=True)
        for lo, hi in todo:
            rows, dropped = score_chunk(model, ds, lo, hi, fmt, keys, args, args.input)
            write_part(part_path(parts, lo, hi), rows, dropped)
            bar.update(hi - lo)
        bar.close()
    report = {"rows": len(ds), "format": fmt, "scored_here": sum(hi - lo for lo, hi in todo),
              "resumed_chunks": len(mine) - len(todo), "seconds": round(time.perf_counter() - started, 3)}
    if rank != 0:
        return report
    # rank 0 merges once every rank's chunks exist (ranks share files, not a process group)
    every = [part_path(parts, lo, hi) for r in range(world) for lo, hi in chunk_ranges(len(ds), args.chunk_rows, r,
                                                                                      world)]
    deadline = time.monotonic() + args.wait_timeout_s
    while not all(p.is_file() for p in every):
        if time.monotonic() > deadline:
            missing = [p.name for p in every if not p.is_file()]
            raise UserError(f"waited {args.wait_timeout_s:.0f}s for the other ranks' chunks {missing[:3]}...; "
                            "rerun to continue (finished chunks are kept)")
        time.sleep(0.5)
    dropped = merge(every, parts, output)
    shutil.rmtree(parts)
    report |= {"output": str(output), "written": len(ds) - sum(dropped.values()), "dropped": dict(dropped)}
    Path(str(output) + ".report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def parser() -> argparse.ArgumentParser:
    from rm_trainer.cli_surface import Parser

    p = Parser(prog="rm-score", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="reward.pt or the hf/ folder of a run")
    p.add_argument("--input", required=True, help=".jsonl, .json or .parquet")
    p.add_argument("--output", required=True, help=".jsonl or .parquet")
    for name, default in vars(Keys()).items():
        p.add_argument(f"--{name}_key", default=default, help=f"column of the {name} field")
    p.add_argument("--max_batch_tokens", type=int, default=16384, help="padded tokens per forward")
    p.add_argument("--chunk_rows", type=int, default=2048, help="rows per resumable chunk")
    p.add_argument("--normalize", action="store_true", help="(r - mean) / std with the held-out statistics")
    p.add_argument("--on_error", choices=("error", "skip"), default="error",
                   help="a malformed row stops the run (naming file:line:field), or is counted and left out")
    p.add_argument("--device", default=None, help="default: this rank's GPU, else cpu")
    p.add_argument("--wait_timeout_s", type=float, default=86400, help="rank 0's wait for the other ranks")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        report = run(args)
    except UserError as e:
        print(f"rm-score: error: {e}", file=sys.stderr, flush=True)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
