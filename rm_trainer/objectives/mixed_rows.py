"""Pair sources and rating sources in one run (`--objective bt+regression`, HelpSteer2-Preference style).

Each source is decided from its first row: rated responses (the response column, no `chosen`; rating_rows)
or preference pairs (every shape pair_rows reads). Each is read, checked, tokenized, split and counted by
its own reader, exactly as under --objective regression or pairs. Kept rows then take one shape, a ranking
row's with each sequence's ratings, so that any batch may hold both kinds:

    ids      a pair's [chosen, rejected] ids, or a rated row's [response] ids
    scores   [1, 0] for a pair (chosen above rejected), [0] for a rated row (no pair)
    targets  per sequence its K ratings; NaN for a pair's sequences (no rating)
    source, tokens, longest, segment
"""

from __future__ import annotations

from typing import Any

import numpy as np

from rm_trainer.data.schema import features
from rm_trainer.objectives.pair_rows import PairLayout, PairReader
from rm_trainer.objectives.rating_rows import RatingLayout, RatingReader, rating_keys


class MixedLayout:
    """formats.load_source's view of a bt+regression source: a rating source or a pair source."""

    def __init__(self, pairs: PairLayout, ratings: RatingLayout) -> None:
        self.pairs, self.ratings = pairs, ratings

    def decide(self, first_rows: list[Any], fmt: str) -> str:
        first = next((r for r in first_rows if isinstance(r, dict)), None)
        if first is not None and self.ratings.keys.response in first and self.pairs.keys.chosen not in first:
            return "rating"
        return self.pairs.decide(first_rows, fmt)

    def problem(self, row: Any, fmt: str) -> str | None:
        return (self.ratings if fmt == "rating" else self.pairs).problem(row, fmt)

    def check_columns(self, ds, path: str) -> None:
        cols = set(ds.column_names)
        (self.ratings if self.ratings.keys.response in cols and self.pairs.keys.chosen not in cols
         else self.pairs).check_columns(ds, path)


class MixedReader:
    """data.sources' reader of a bt+regression run: each source read, tokenized, split and counted by the
    pair or the rating reader, as its first row decides; the kept rows then as mixed rows."""

    def __init__(self, tok, d, work_dir: str | None = None) -> None:
        self.pairs = PairReader(tok, d.model_copy(update={"margin_key": None, "tie_key": None}), work_dir)
        self.ratings = RatingReader(tok, d, work_dir, rating_keys(d))
        self.k = len(d.attributes)
        self.layout = MixedLayout(self.pairs.layout, self.ratings.layout)
        self._made_by: dict[int, object] = {}  # id of a tokenized source -> the reader that made it

    def tokenize(self, ds, fmt: str, source_id: int, path: str):
        reader = self.ratings if fmt == "rating" else self.pairs
        tokd = reader.tokenize(ds, fmt, source_id, path)
        self._made_by[id(tokd)] = reader
        return tokd

    def split(self, tokd, idx: np.ndarray, malformed_before: int = 0, held_out: bool = False):
        reader = self._made_by[id(tokd)]
        kept, rep = reader.split(tokd, idx, malformed_before, held_out=False)
        return (unify_ratings(kept) if reader is self.ratings else unify_pairs(kept, self.k)), rep


def unify_pairs(ds, k: int):
    """Kept pair rows (pair_rows' columns) as mixed rows."""
    nan = [float("nan")] * k

    def fn(b: dict[str, list]) -> dict[str, list]:
        n = len(b["ids"])
        return {"ids": b["ids"], "scores": [[1.0, 0.0]] * n, "targets": [[nan, nan]] * n, "source": b["source"],
                "tokens": b["tokens"], "longest": b["longest"], "segment": b["segment"]}

    return ds.map(fn, batched=True, batch_size=1000, remove_columns=ds.column_names, desc="pairs as mixed rows",
                  load_from_cache_file=False, features=_features())


def unify_ratings(ds):
    """Kept rated rows (rating_rows' columns) as mixed rows."""

    def fn(b: dict[str, list]) -> dict[str, list]:
        return {"ids": b["ids"], "scores": [[0.0]] * len(b["ids"]), "targets": [[t] for t in b["targets"]],
                "source": b["source"], "tokens": b["tokens"], "longest": b["longest"], "segment": b["segment"]}

    return ds.map(fn, batched=True, batch_size=1000, remove_columns=ds.column_names, desc="ratings as mixed rows",
                  load_from_cache_file=False, features=_features())


def _features():
    """One arrow schema for both kinds, so that their datasets concatenate."""
    return features(ids="ids2", scores="floats", targets="floats2", source="int", tokens="int", longest="int",
                    segment="int")
