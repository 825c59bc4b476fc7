"""Rated responses (`--objective regression`): one prompt, one response, K attribute ratings (HelpSteer-style).

A row is {"prompt": text or {role, content} messages, "response": text, <attribute>: number, ...}, with
one column per attribute named in data.attributes (`--attributes helpfulness,correctness`). A missing
value (absent, or null) is a bad row naming its field, unless data.missing_attributes is `mask`: then it
is left out of the loss and the metrics for that attribute only. A row with no value at all teaches
nothing and is dropped as `no_ratings`.

The response is encoded as score_texts encodes (prompt, response) (tokenize.encode_item), so the
attributes the loss trains are the ones every scoring path reads. Each row is one sequence.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch

from rm_trainer.data import read
from rm_trainer.data.batching import pack_sequences, pad_right
from rm_trainer.data.formats import row_location, skip_hint
from rm_trainer.data.rankings import encode_ranking, kind_of, prompt_problem
from rm_trainer.data.schema import features, tokenize_map
from rm_trainer.data.tokenize import special_prefix
from rm_trainer.errors import DataError

RATING_COLUMNS = ("ids", "targets", "status", "source", "tokens", "longest")
DROP_REASONS = ("malformed", "empty_response", "no_ratings")


@dataclass(frozen=True)
class RatingKeys:
    attributes: tuple[str, ...]
    prompt: str = "prompt"
    response: str = "response"
    mask_missing: bool = False  # data.missing_attributes mask: a missing value is left out, not an error


class RatingLayout:
    """formats.load_source's view of rating sources (formats.PairLayout is the pairs' one)."""

    def __init__(self, keys: RatingKeys) -> None:
        self.keys = keys

    def decide(self, first_rows: list[Any], fmt: str) -> str:
        return "rating"

    def problem(self, row: Any, fmt: str) -> str | None:
        return rating_problem(row, self.keys)

    def check_columns(self, ds, path: str) -> None:
        cols = set(ds.column_names)
        absent = [a for a in self.keys.attributes if a not in cols]
        if self.keys.response in cols and (not absent or self.keys.mask_missing and len(absent) < len(
                self.keys.attributes)):
            return
        what = (f"no {self.keys.response!r} field" if self.keys.response not in cols
                else f"no column for the attribute{'s' if len(absent) > 1 else ''} {', '.join(absent)}")
        raise DataError(f"{path}: {what} (found fields: {', '.join(sorted(cols))}); train.objective regression "
                        "reads rows of a prompt, a response and a number per attribute (data.attributes, "
                        "docs/objectives.md)")


def rating_problem(row: Any, keys: RatingKeys) -> str | None:
    """What is wrong with one row, naming the field; None if it is usable."""
    if not isinstance(row, dict):
        return f"each row must be a JSON object, got {type(row).__name__}"
    problem = prompt_problem(row.get(keys.prompt), keys.prompt)
    if problem:
        return problem
    if not isinstance(row.get(keys.response), str):
        return f"field {keys.response!r} is {kind_of(row.get(keys.response))}; expected the response text"
    for a in keys.attributes:
        v = row.get(a)
        if v is None and keys.mask_missing:
            continue
        if v is None:
            return (f"field {a!r} is missing; give a number, or set data.missing_attributes mask "
                    "(--missing_attributes mask) to leave missing ratings out of the loss")
        if not read.finite_number(v):
            return f"field {a!r} is {repr(v) if isinstance(v, float | str) else kind_of(v)}; expected a finite number"
    return None


def rating_targets(row: dict, keys: RatingKeys) -> list[float]:
    """The row's K ratings, NaN where missing (a row without a rating_problem)."""
    return [float("nan") if row.get(a) is None else float(row[a]) for a in keys.attributes]


def tokenize_ratings(ds, tok, max_len: int, on_error: str, keys: RatingKeys, source_id: int = 0,
                     path: str = "", num_proc: int | None = None):
    """One datasets.map over a rating source: each row checked (a malformed one raises DataError naming
    file:line and field, unless on_error is skip, which counts it as "malformed"), then encoded. Every row
    gets a status (a drop reason or ""). Columns: ids (one id list), targets (K, NaN missing), status,
    source, and tokens = longest (its length, for the batch sampler)."""
    prefix = special_prefix(tok)

    def fn(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        out: dict[str, list] = {k: [] for k in RATING_COLUMNS}
        for i, vals in zip(indices, zip(*batch.values(), strict=True), strict=True):
            row = dict(zip(batch, vals, strict=True))
            problem = rating_problem(row, keys)
            if problem and on_error == "error":
                raise DataError(f"{row_location(path, i)}: {problem}" + skip_hint())
            ids, targets, status = [], [float("nan")] * len(keys.attributes), "malformed"
            if not problem:
                targets = rating_targets(row, keys)
                status = ("empty_response" if not row[keys.response].strip()
                          else "no_ratings" if all(math.isnan(t) for t in targets) else "")
                ids = encode_ranking(tok, row[keys.prompt], [row[keys.response]], max_len, prefix)[0]
            for k, v in zip(RATING_COLUMNS, (ids, targets, status, source_id, len(ids), len(ids)), strict=True):
                out[k].append(v)
        return out

    schema = features(ids="ids", targets="floats", status="str", source="int", tokens="int", longest="int")
    return tokenize_map(ds, fn, schema, path=path, source_id=source_id, num_proc=num_proc)


def split_report(tokd, idx, max_len: int, malformed_before: int = 0, attributes: tuple[str, ...] = ()):
    """(rows kept, their report) of one split: counts by status, the token lengths, and per attribute how
    many kept rows rate it and the ratings' mean and range."""
    import numpy as np

    status = np.asarray(tokd.data.column("status").to_numpy(zero_copy_only=False))[idx]
    counts = Counter(status.tolist())
    counts["malformed"] += malformed_before
    keep = idx[~np.isin(status, DROP_REASONS)]
    rep = {"rows": len(idx) + malformed_before, "used": len(keep),
           "dropped": {r: counts.get(r, 0) for r in DROP_REASONS}, "kept_with_note": {}}
    if len(keep):
        lengths = np.asarray(tokd.data.column("tokens").to_numpy())[keep]
        rep["token_length_percentiles"] = {"response": {f"p{q}": int(np.percentile(lengths, q))
                                                        for q in (50, 90, 99)} | {"max": int(lengths.max())}}
        rep["fraction_truncated_at_max_len"] = round(float((lengths >= max_len).mean()), 4)
        y = np.asarray(tokd.select(keep)["targets"], dtype=np.float64).reshape(len(keep), -1)
        rep["attributes"] = {a: _stats(y[:, k]) for k, a in enumerate(attributes)}
    return tokd.remove_columns(["status"]).select(keep), rep


def _stats(y) -> dict:
    import numpy as np

    v = y[~np.isnan(y)]
    return {"rated": int(v.size)} | ({"mean": round(float(v.mean()), 4), "min": float(v.min()),
                                     "max": float(v.max())} if v.size else {})


def collate_ratings(rows: list[dict[str, Any]], pad_id: int, pack_len: int | None = None,
                    packing: bool = False) -> dict[str, torch.Tensor]:
    """A micro-batch of rated rows ({"ids", "targets"}) as one forward, each row one sequence: padded
    (`input_ids` (N, T), `lens`) or packed (as data.batching.pack_sequences), with `targets` (N, K; NaN
    where missing), `prompts` (N, on the host: the loss's count) and each row's `source`."""
    seqs = [r["ids"] for r in rows]
    fields = {"lens": torch.tensor([len(s) for s in seqs], dtype=torch.long),
              "targets": torch.tensor([r["targets"] for r in rows], dtype=torch.float32),
              "prompts": torch.tensor(len(rows))}
    if "source" in rows[0]:
        fields["source"] = torch.tensor([r["source"] for r in rows], dtype=torch.long)
    if packing:
        return pack_sequences(seqs, pad_id, pack_len) | fields
    return {"input_ids": pad_right(seqs, pad_id)} | fields
