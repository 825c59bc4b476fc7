"""Preference pairs: read through `datasets`, validate, tokenize once, and batch deterministically.

Two row shapes:
  * HH-RLHF full text: {"chosen": "<dialogue + good answer>", "rejected": "<dialogue + bad answer>"}
  * explicit:          {"prompt": "...", "chosen": "<response>", "rejected": "<response>"}
Every row is either used or counted under a named reason; a malformed row is an error naming the
file, line and field.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

REASONS = ("empty_response", "identical_raw", "identical_after_truncation")


def _loader_for(path: str) -> str:
    name = path.lower().removesuffix(".gz")
    for suffix, builder in ((".jsonl", "json"), (".json", "json"), (".parquet", "parquet")):
        if name.endswith(suffix):
            return builder
    raise ValueError(f"{path}: unsupported data file type; use .jsonl, .json or .parquet (optionally .gz)")


def _open_text(path: str):
    import gzip

    return gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(path, encoding="utf-8")


def _scan_json_lines(path: str, fields: tuple[str, ...]) -> str | None:
    """datasets' JSON errors name no line (and a type clash surfaces as an Arrow schema error);
    find the first line that Python's json rejects or whose fields are not text."""
    if not path.lower().removesuffix(".gz").endswith(".jsonl"):
        return None
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                return f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})"
            if not isinstance(obj, dict):
                return f"{path}:{lineno}: each line must be a JSON object, got {type(obj).__name__}"
            for field in fields:
                v = obj.get(field)
                if field in obj and not isinstance(v, str) and v is not None:
                    return f"{path}:{lineno}: field {field!r} is a {type(v).__name__}, not text; expected a string"
    return None


def row_location(path: str, row: int) -> str:
    """'file:line' for JSON-lines files (row i is the i-th non-blank line), 'file row N' otherwise."""
    if path.lower().removesuffix(".gz").endswith(".jsonl"):
        with _open_text(path) as f:
            seen = -1
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    seen += 1
                    if seen == row:
                        return f"{path}:{lineno}"
    return f"{path} row {row}"


def read_pairs(path: str, fmt: str = "auto"):
    """Load a preference file as a `datasets.Dataset` with columns prompt/chosen/rejected (strings)."""
    import datasets

    builder = _loader_for(path)
    if not Path(path).is_file():
        raise ValueError(f"{path}: file not found")
    if Path(path).stat().st_size == 0:
        raise ValueError(f"{path}: file is empty")
    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as e:  # datasets wraps parse errors in several exception types
        where = _scan_json_lines(path, ("prompt", "chosen", "rejected")) if builder == "json" else None
        raise ValueError(where or f"{path}: cannot be read as {builder}: {e}") from None
    if len(ds) == 0:
        raise ValueError(f"{path}: contains no rows")
    cols = set(ds.column_names)
    if fmt == "auto":
        fmt = "prompt" if "prompt" in cols else "hh"
    need = ["chosen", "rejected"] + (["prompt"] if fmt == "prompt" else [])
    missing = [c for c in need if c not in cols]
    if missing:
        where = _scan_json_lines(path, tuple(need)) if builder == "json" else None
        raise ValueError(where or f"{path}: no {', '.join(repr(m) for m in missing)} field in any row "
                         f"(found fields: {', '.join(sorted(cols))}); expected {need}")
    for col in need:
        values = ds[col]
        for i, v in enumerate(values):
            if not isinstance(v, str):
                what = "missing" if v is None else f"a {type(v).__name__}, not text"
                raise ValueError(f"{row_location(path, i)}: field {col!r} is {what}; expected a string")
    if fmt == "hh":
        ds = ds.add_column("prompt", [""] * len(ds))
    return ds.select_columns(["prompt", "chosen", "rejected"])


def encode(tokenizer, text: str, max_len: int) -> tuple[list[int], bool]:
    """Token ids ending in EOS, at most max_len long. The reward is read at the final EOS, so a
    truncated sequence keeps it (cut the tail, re-append EOS). Returns (ids, was_truncated)."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    eos = tokenizer.eos_token_id
    if not ids or ids[-1] != eos:
        ids = ids + [eos]
    if len(ids) > max_len:
        return ids[: max_len - 1] + [eos], True
    return ids, False


def tokenize_pairs(ds, tokenizer, max_len: int, num_proc: int | None = None):
    """Tokenize once with datasets.map; returns (kept dataset, report dict)."""

    def fn(batch: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {k: [] for k in ("chosen_ids", "rejected_ids", "chosen_len", "rejected_len",
                                                 "drop", "truncated")}
        for p, c, r in zip(batch["prompt"], batch["chosen"], batch["rejected"], strict=False):
            c_ids, c_tr = encode(tokenizer, p + c, max_len)
            r_ids, r_tr = encode(tokenizer, p + r, max_len)
            if not c.strip() or not r.strip():
                drop = "empty_response"
            elif c == r:
                drop = "identical_raw"
            elif c_ids == r_ids:
                drop = "identical_after_truncation"
            else:
                drop = ""
            out["chosen_ids"].append(c_ids)
            out["rejected_ids"].append(r_ids)
            out["chosen_len"].append(len(c_ids))
            out["rejected_len"].append(len(r_ids))
            out["drop"].append(drop)
            out["truncated"].append(c_tr or r_tr)
        return out

    tok = ds.map(fn, batched=True, remove_columns=ds.column_names, num_proc=num_proc,
                 desc="tokenizing pairs")
    drops = Counter(d for d in tok["drop"] if d)
    kept = tok.filter(lambda d: d == "", input_columns="drop")
    report = {"rows": len(ds), "used": len(kept), "dropped": {r: drops.get(r, 0) for r in REASONS},
              "truncated_kept": int(sum(kept["truncated"]))}
    return kept.remove_columns(["drop", "truncated"]).with_format("python"), report


def pad_right(seqs: list[list[int]], pad_id: int, length: int | None = None) -> torch.Tensor:
    T = length or max(len(s) for s in seqs)
    out = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def collate(rows: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad chosen and rejected to one common length so they can be concatenated into 2B rows."""
    T = max(max(r["chosen_len"], r["rejected_len"]) for r in rows)
    return {
        "chosen_ids": pad_right([r["chosen_ids"] for r in rows], pad_id, T),
        "rejected_ids": pad_right([r["rejected_ids"] for r in rows], pad_id, T),
        "chosen_len": torch.tensor([r["chosen_len"] for r in rows], dtype=torch.long),
        "rejected_len": torch.tensor([r["rejected_len"] for r in rows], dtype=torch.long),
    }


class PairSampler:
    """Seeded, rank-sharded sampling that is a pure function of the step.

    Global batch g at step s is perm_e[s' * G : (s'+1) * G] (e = epoch, s' = step within it), the same
    permutation on every rank. Micro step a of rank r takes slice (a * W + r) of it. So any world size
    or accumulation split with the same global batch sees the same pairs per optimizer step, and a
    resumed run can jump to any step without replaying the data.
    """

    def __init__(self, n: int, micro: int, accum: int, world: int, rank: int, seed: int):
        self.n, self.micro, self.accum, self.world, self.rank, self.seed = n, micro, accum, world, rank, seed
        self.global_batch = micro * accum * world
        self.steps_per_epoch = n // self.global_batch
        self._perm: tuple[int, torch.Tensor] | None = None

    def permutation(self, epoch: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perm = (epoch, torch.randperm(self.n, generator=g))
        return self._perm[1]

    def global_batch_indices(self, step: int) -> list[int]:
        """Every pair of step's global batch (all ranks, all micro steps)."""
        epoch, within = divmod(step, self.steps_per_epoch)
        base = within * self.global_batch
        return self.permutation(epoch)[base:base + self.global_batch].tolist()

    def micro_batches(self, step: int) -> list[list[int]]:
        assert self.steps_per_epoch > 0
        epoch, within = divmod(step, self.steps_per_epoch)
        perm = self.permutation(epoch)
        base = within * self.global_batch
        return [perm[base + (a * self.world + self.rank) * self.micro:][: self.micro].tolist()
                for a in range(self.accum)]


def get_preference_iterator(dataset, sampler: PairSampler, pad_id: int, start_step: int,
                            total_steps: int) -> Iterator[tuple[int, list[dict[str, torch.Tensor]]]]:
    """Yield (step, [micro-batch, ...]) for steps start_step..total_steps-1, right-padded."""
    for step in range(start_step, total_steps):
        yield step, [collate(_rows(dataset, idx), pad_id) for idx in sampler.micro_batches(step)]


def _rows(dataset, idx: list[int]) -> list[dict[str, Any]]:
    cols = dataset[idx]  # column-major dict of lists
    return [dict(zip(cols, vals, strict=False)) for vals in zip(*cols.values(), strict=False)]


def eval_batches(n: int, world: int, rank: int, batch_size: int) -> list[tuple[list[int], list[float]]]:
    """Every test pair exactly once across ranks: rank r takes r, r+W, ... Ranks with fewer pairs get
    zero-weight filler so all ranks run the same number of forwards (ZeRO-3 gathers are collective)."""
    mine = list(range(rank, n, world))
    per_rank = -(-n // world)
    n_batches = max(1, -(-per_rank // batch_size))
    out = []
    for b in range(n_batches):
        idx = mine[b * batch_size:(b + 1) * batch_size]
        w = [1.0] * len(idx)
        if not idx:
            idx, w = [0], [0.0]
        out.append((idx, w))
    return out


def write_report(path: Path, report: dict) -> None:
    path.write_text(json.dumps(report, indent=2) + "\n")


def load_tokenizer(cfg):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cfg.model.tokenizer or cfg.model.path)
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer {cfg.model.tokenizer or cfg.model.path} has no eos_token; the reward "
                         "is read at the final EOS, so set eos_token in tokenizer_config.json")
    if tok.pad_token_id is None:  # pad positions are never read (right padding + causal attention)
        tok.pad_token = tok.eos_token
    return tok


def load_data(cfg, tok, out: Path, is_main: bool, barrier: Callable[[], None]):
    """Rank 0 reads and tokenizes once and saves the result; the other ranks load it from disk."""
    import datasets

    cache = out / "data_cache"
    if is_main:
        raw = read_pairs(cfg.data.train_path, cfg.data.format)
        if cfg.data.test_path:
            test_raw = read_pairs(cfg.data.test_path, cfg.data.format)
        elif cfg.data.test_fraction > 0:
            split = raw.train_test_split(test_size=cfg.data.test_fraction, seed=cfg.train.seed)
            raw, test_raw = split["train"], split["test"]
        else:
            test_raw = None
        train, train_report = tokenize_pairs(raw, tok, cfg.data.max_len)
        report = {"train": train_report}
        train.save_to_disk(str(cache / "train"))
        if test_raw is not None:
            test, report["test"] = tokenize_pairs(test_raw, tok, cfg.data.max_len)
            test.save_to_disk(str(cache / "test"))
        write_report(out / "data_report.json", report)
        print(f"[rm_trainer] data: {json.dumps(report)}", flush=True)
    barrier()
    train = datasets.load_from_disk(str(cache / "train")).with_format("python")
    test = datasets.load_from_disk(str(cache / "test")).with_format("python") if (cache / "test").exists() else None
    if len(train) == 0:
        raise ValueError(f"{cfg.data.train_path}: no usable pairs left (see {out / 'data_report.json'})")
    return train, test
