"""What every objective implements, and the row machinery they share.

An objective is one class (objectives/__init__.py lists them by train.objective) that owns everything the
run needs to know about what it trains:

    reader(tok, work_dir)   its rows: the layout load_source checks them with, their tokenization (one
                            datasets.map per source, the one truncation rule), the split and its report
    identity()              the options that shape its tokenized rows (part of the data cache's key)
    collate(rows, ...)      a micro-batch of rows as one typed Batch: the sequences one forward runs
                            (data.batching.Sequences) and the labels its loss reads
    loss(batch, out, ...)   the loss, with its fused closed-form backward, and the float64 sums of its
                            statistics (exact over micro-batches and ranks); sums() for evaluation
    metrics(sums)           the metrics those sums give, and which of them a log line or a source shows
    checkpoint_key()        what a resume must train the same way

Every objective's tokenized rows share one schema (ROW_COLUMNS): `ids`, the K sequences of one prompt's
responses (a pair is K = 2: chosen, rejected; a rated response K = 1), cut by data.truncation's rule, with
`single`, each response encoded on its own where that differs, `status` (a drop reason, a note or ""),
`source`, the token counts before the cut, and `longest`/`tokens`/`segment` for the sampler (`segment`:
the tokens of the row with its shared prompt once, data.segments); then the objective's own labels.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from rm_trainer.data.batching import Sequences
from rm_trainer.data.formats import row_location, skip_hint
from rm_trainer.data.schema import features, tokenize_map
from rm_trainer.data.segments import ShareRule, shared_prefix
from rm_trainer.data.tokenize import CUT_NOTES, Encoded, RowEncoder, default_num_proc
from rm_trainer.errors import DataError

ROW_COLUMNS = {"ids": "ids2", "single": "ids2", "status": "str", "source": "int", "prompt_tokens": "int",
               "response_tokens": "ints", "longest": "int", "tokens": "int", "segment": "int"}
REPORT_ONLY = ("status", "prompt_tokens", "response_tokens")  # read by the split's report, then dropped


@dataclass
class Batch:
    """One micro-batch: the sequences one forward runs, each row's source, and how many rows (a host value:
    the loss's count, read without a device sync)."""

    seqs: Sequences
    source: torch.Tensor
    rows: int


class Objective(ABC):
    """The interface (module docstring). Subclasses set `name` (train.objective) and build themselves from
    the run config's sections."""

    name: ClassVar[str]
    unit: ClassVar[str] = "rows"  # what the data report's totals count
    line_keys: ClassVar[tuple[str, ...]] = ("acc", "reward_mean", "reward_std")  # besides the loss, when finite
    source_keys: ClassVar[tuple[str, ...]] = ("loss", "acc")  # eval/<source>/..., when finite
    row_modules: ClassVar[tuple[str, ...]] = ()  # modules whose source decides the token ids (cache key)
    attributes: list[str] | None = None  # the head's outputs (an attribute head), else one scalar reward
    shares_prompts: ClassVar[bool] = True  # rows of K >= 2 responses to one prompt (--share_prompt)
    pair_report: ClassVar[bool] = False  # evaluation also reports per pair (rewards(): diagnostics, OUT/eval/)
    sums_width: int

    @abstractmethod
    def reader(self, tok, work_dir: str | None = None) -> RowReader: ...

    @abstractmethod
    def identity(self) -> dict[str, Any]: ...

    @abstractmethod
    def collate(self, rows: list[dict], pad_id: int, pack_len: int | None = None, packing: bool = False,
                single: bool = False, share: ShareRule | None = None) -> Batch: ...

    @abstractmethod
    def loss(self, b: Batch, out: torch.Tensor, scale: float | None, log_nu: torch.Tensor | None
             ) -> tuple[torch.Tensor, torch.Tensor]: ...

    @abstractmethod
    def sums(self, b: Batch, out: torch.Tensor, keep: torch.Tensor | None = None,
             log_nu: torch.Tensor | None = None) -> torch.Tensor: ...

    @abstractmethod
    def metrics(self, sums: torch.Tensor) -> dict[str, float]: ...

    @abstractmethod
    def throughput(self, m: dict[str, float], seconds: float) -> dict[str, float]: ...

    @abstractmethod
    def checkpoint_key(self) -> dict[str, Any]: ...

    @abstractmethod
    def describe(self, report: dict) -> str: ...

    def rewards(self, b: Batch, out: torch.Tensor) -> torch.Tensor:
        """(rows, 2): each pair's (chosen, rejected) rewards, where pair_report is set."""
        raise NotImplementedError(f"objective {self.name} has no per-pair view")

    def tie_rate(self, train_ds) -> float | None:
        """The fraction of tied training rows, where a learned tie parameter starts (None: no such parameter)."""
        return None


def single_view(single: list[list[int]], ids: list[list[int]]) -> list[list[int]]:
    """A row's responses each as it is encoded on its own (as score_texts encodes it): its `single` sequence
    where truncation made the row's differ (a row keeps `single` empty where they are the same), else `ids`."""
    return [s or i for s, i in zip(single, ids, strict=True)]


def batch_sequences(views: list[list[list[int]]], pad_id: int, pack_len: int | None, packing: bool,
                    share: ShareRule | None, member_major: bool = False) -> Sequences:
    """Rows' sequences (`views`: each row's, as the batch reads them) as one forward: each row's shared
    prompt once where `share` says so (data.segments), else right-padded or packed. The outputs come row
    by row, or member_major (rows of K = 2: every row's first, then every row's second)."""
    if share is None:
        flat = [v[k] for k in range(2) for v in views] if member_major else [s for v in views for s in v]
        return Sequences.of(flat, pad_id, pack_len, packing)
    order = torch.arange(2 * len(views)).view(-1, 2).T.flatten().tolist() if member_major else None
    return Sequences.shared(views, pad_id, share, pack_len, packing, order)


def sequences_of(rows: list[dict], single: bool = False) -> list[list[int]]:
    """Every row's sequences, row by row (single: each response as it is encoded on its own)."""
    return [s for r in rows for s in (single_view(r["single"], r["ids"]) if single else r["ids"])]


def source_of(rows: list[dict]) -> torch.Tensor:
    return torch.tensor([r.get("source", 0) for r in rows], dtype=torch.long)


class RowReader(ABC):
    """One objective's rows from a loaded source (data.sources drives it, source by source): `layout`
    decides the source's format and each row's problem (formats.load_source), `tokenize` encodes a whole
    source in one datasets.map, giving every row a status so nothing is lost uncounted, and `split` keeps
    one split's usable rows with their report."""

    drop_reasons: ClassVar[tuple[str, ...]] = ("malformed", "empty_response")
    notes: ClassVar[tuple[str, ...]] = CUT_NOTES
    labels: ClassVar[dict[str, str]] = {}  # the objective's own columns and their types (schema.features)
    layout: Any

    def __init__(self, tok, d, work_dir: str | None = None) -> None:
        self.tok, self.d, self.work_dir = tok, d, work_dir

    @functools.cached_property
    def enc(self) -> RowEncoder:
        return RowEncoder(self.tok, self.d.max_len)

    @abstractmethod
    def parse(self, row: dict, fmt: str) -> tuple[tuple[str, list[str]], dict[str, Any], str]:
        """(prompt text and response texts, the row's labels, a status before tokenization) of a row
        without a problem; the status is a drop reason, a note, or ""."""

    def status(self, enc: Encoded, texts: tuple[str, list[str]], before: str) -> str:
        """The row's status after tokenization: `before`, else the truncation's note."""
        return before or enc.note

    def empty_labels(self) -> dict[str, Any]:
        """The labels of a malformed row."""
        return {k: ([] if t in ("floats", "floats2", "ids", "ids2", "ints") else 0) for k, t in self.labels.items()}

    def tokenize(self, ds, fmt: str, source_id: int, path: str):
        """One batched datasets.map over a whole source: each row checked against its layout (a malformed
        one raises DataError naming file:line and field, unless data.on_error is skip, which counts it as
        "malformed"), its texts rendered, tokenized in batched calls and cut by the one truncation rule."""
        self.check_format(fmt, path)
        on_error, layout = self.d.on_error, self.layout

        def fn(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
            out: dict[str, list] = {k: [] for k in (*ROW_COLUMNS, *self.labels)}
            parsed = []
            for i, vals in zip(indices, zip(*batch.values(), strict=True), strict=True):
                row = dict(zip(batch, vals, strict=True))
                problem = layout.problem(row, fmt)
                if problem and on_error == "error":
                    raise DataError(f"{row_location(path, i)}: {problem}" + skip_hint())
                try:
                    parsed.append(None if problem else self.parse(row, fmt))
                except DataError as e:  # a row the tokenizer cannot render (messages without a template)
                    raise DataError(f"{row_location(path, i)}: {e}") from None
            for p, enc in zip(parsed, self.enc.encode([p and p[0] for p in parsed]), strict=True):
                self._append(out, p, enc, source_id)
            return out

        schema = features(**ROW_COLUMNS, **self.labels)
        name = f"tokenized-{source_id}-{Path(path).name or 'rows'}.arrow"
        cache = str(Path(self.work_dir) / name) if self.work_dir else None
        return tokenize_map(ds, fn, schema, path=path, source_id=source_id,
                            num_proc=self.d.num_proc or default_num_proc(len(ds)), cache_file_name=cache)

    def check_format(self, fmt: str, path: str) -> None:  # noqa: B027 - most readers read every format they decide
        """A DataError before any row is read, when the source's format cannot be read with this tokenizer."""

    def _append(self, out: dict[str, list], parsed, enc: Encoded | None, source_id: int) -> None:
        if parsed is None:
            values = {"ids": [], "single": [], "status": "malformed", "prompt_tokens": 0, "response_tokens": [],
                      "longest": 0, "tokens": 0, "segment": 0} | self.empty_labels()
        else:
            texts, labels, before = parsed
            seqs = enc.cut.seqs
            values = {"ids": seqs, "single": enc.single, "status": self.status(enc, texts, before),
                      "prompt_tokens": enc.prompt_tokens, "response_tokens": enc.response_tokens,
                      "longest": max(map(len, seqs)), "tokens": sum(map(len, seqs)),
                      "segment": sum(map(len, seqs)) - (len(seqs) - 1) * shared_prefix(seqs)} | labels
        for k, v in values.items():
            out[k].append(v)
        out["source"].append(source_id)

    def split(self, tokd, idx: np.ndarray, malformed_before: int = 0, held_out: bool = False):
        """(rows kept, their report) of one split (`idx`: its rows of the tokenized source). Counts and
        lengths come from whole columns read once, never row by row. Only the held-out split keeps each
        response's own encoding (`single`), for the end-of-run report."""
        cols = self._columns(tokd)
        status = cols["status"][idx]
        rep = count_report(status, malformed_before, self.drop_reasons, self.notes)
        real = status != "malformed"
        if real.any():
            prompt, longest_response = cols["prompt_tokens"][idx][real], cols["longest_response"][idx][real]
            k = cols["responses"][idx][real]
            rep["token_length_percentiles"] = {"prompt": percentiles(prompt), "response": percentiles(longest_response)}
            rep["fraction_truncated_at_max_len"] = round(float((prompt + longest_response > self.d.max_len).mean()), 4)
            if k.min() != k.max() or k.min() > 2:
                rep["responses_per_row"] = {"min": int(k.min()), "mean": round(float(k.mean()), 3), "max": int(k.max())}
        keep = idx[~np.isin(status, self.drop_reasons)]
        drop = [*REPORT_ONLY, *([] if held_out else ["single"]), *self.unused_labels()]
        kept = tokd.remove_columns(drop).select(keep)
        return kept, rep | self.label_report(kept)

    def unused_labels(self) -> list[str]:
        """Label columns this run does not read (left out of the cached rows)."""
        return []

    def label_report(self, kept) -> dict:
        """What the report says of the kept rows' labels."""
        return {}

    def _columns(self, tokd) -> dict[str, np.ndarray]:
        """The report's columns, read once per tokenized source (both of its splits use them)."""
        if getattr(self, "_cols", (None,))[0] is not tokd:
            col = lambda k: np.asarray(tokd.data.column(k).to_numpy(zero_copy_only=False))  # noqa: E731
            lengths = tokd.data.column("response_tokens").combine_chunks()
            offsets = np.asarray(lengths.offsets)
            values = np.asarray(lengths.values) if len(lengths.values) else np.zeros(0, dtype=np.int64)
            n = np.diff(offsets)
            longest = np.zeros(len(n), dtype=np.int64)
            if len(values):
                np.maximum.at(longest, np.repeat(np.arange(len(n)), n), values)
            self._cols = (tokd, {"status": col("status"), "prompt_tokens": col("prompt_tokens"),
                                 "longest_response": longest, "responses": n})
        return self._cols[1]


def count_report(status: np.ndarray, malformed_before: int, drops: tuple[str, ...], notes: tuple[str, ...]) -> dict:
    """rows, used, dropped by reason and kept with a note, from a split's statuses (malformed_before: rows
    refused while the file was read, before tokenization)."""
    counts = Counter(status.tolist())
    counts["malformed"] += malformed_before
    return {"rows": len(status) + malformed_before, "used": sum(v for k, v in counts.items() if k not in drops),
            "dropped": {r: counts.get(r, 0) for r in drops}, "kept_with_note": {k: counts.get(k, 0) for k in notes}}


def percentiles(v: np.ndarray) -> dict[str, int]:
    return {f"p{q}": int(np.percentile(v, q)) for q in (50, 90, 99)} | {"max": int(v.max())}
