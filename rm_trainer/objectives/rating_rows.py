"""Rated responses (`--objective regression`): one prompt, one response, K attribute ratings (HelpSteer-style).

A row is {"prompt": text or {role, content} messages, "response": text, <attribute>: number, ...}, with
one column per attribute named in data.attributes (`--attributes helpfulness,correctness`). A missing
value (absent, or null) is a bad row naming its field, unless data.missing_attributes is `mask`: then it
is left out of the loss and the metrics for that attribute only. A row with no value at all teaches
nothing and is dropped as `no_ratings`.

The response is encoded as score_texts encodes (prompt, response) (a row of K = 1 under the one
truncation rule), so the attributes the loss trains are the ones every scoring path reads. Each row is one
sequence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from rm_trainer.data import read
from rm_trainer.errors import DataError
from rm_trainer.objectives.base import RowReader
from rm_trainer.objectives.ranking_rows import kind_of, prompt_problem, prompt_text

DROP_REASONS = ("malformed", "empty_response", "no_ratings")


@dataclass(frozen=True)
class RatingKeys:
    attributes: tuple[str, ...]
    prompt: str = "prompt"
    response: str = "response"
    mask_missing: bool = False  # data.missing_attributes mask: a missing value is left out, not an error


class RatingLayout:
    """formats.load_source's view of rating sources (pair_rows.PairLayout is the pairs' one)."""

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


class RatingReader(RowReader):
    """Rated rows for data.sources and rm-eval (base.RowReader): one response, its K targets (NaN: missing)."""

    drop_reasons = DROP_REASONS
    labels = {"targets": "floats"}

    def __init__(self, tok, d, work_dir: str | None = None, keys: RatingKeys | None = None) -> None:
        super().__init__(tok, d, work_dir)
        self.keys = keys or rating_keys(d)
        self.layout = RatingLayout(self.keys)

    def parse(self, row: dict, fmt: str) -> tuple[tuple[str, list[str]], dict[str, Any], str]:
        targets = rating_targets(row, self.keys)
        status = ("empty_response" if not row[self.keys.response].strip()
                  else "no_ratings" if all(math.isnan(t) for t in targets) else "")
        return prompt_text(self.tok, row[self.keys.prompt], [row[self.keys.response]]), {"targets": targets}, status

    def empty_labels(self) -> dict[str, Any]:
        return {"targets": [float("nan")] * len(self.keys.attributes)}

    def label_report(self, kept) -> dict:
        """Per attribute: how many kept rows rate it, and the ratings' mean and range."""
        if not len(kept):
            return {}
        y = np.asarray(kept["targets"], dtype=np.float64).reshape(len(kept), -1)
        return {"attributes": {a: _stats(y[:, k]) for k, a in enumerate(self.keys.attributes)}}


def rating_keys(d) -> RatingKeys:
    """The column names and options of a run's data section."""
    return RatingKeys(tuple(d.attributes), d.prompt_key, d.response_key, d.missing_attributes == "mask")


def _stats(y) -> dict:
    v = y[~np.isnan(y)]
    return {"rated": int(v.size)} | ({"mean": round(float(v.mean()), 4), "min": float(v.min()),
                                     "max": float(v.max())} if v.size else {})
