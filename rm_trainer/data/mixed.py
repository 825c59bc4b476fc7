"""Pair sources and rating sources in one run (`--objective bt+regression`, HelpSteer2-Preference style).

Each source is decided from its first row: rated responses (the response column, no `chosen`; data.ratings)
or preference pairs (every shape formats.py reads). Each is read, checked, tokenized, split and counted by
its own reader, exactly as under --objective regression or pairs. Kept rows then take one shape, that of a
ranking row (data.rankings), so that any batch may hold both kinds:

    ids      a pair's [chosen, rejected] ids, or a rated row's [response] ids
    scores   [1, 0] for a pair (chosen above rejected), [0] for a rated row (no pair)
    targets  per sequence its K ratings; NaN for a pair's sequences (no rating)
    source, tokens, longest

and data.rankings.collate_rankings batches them (each sequence once, with its row's group).
"""

from __future__ import annotations

from typing import Any

from rm_trainer.data.formats import PairLayout
from rm_trainer.data.ratings import RatingLayout
from rm_trainer.data.schema import features

MIXED_COLUMNS = ("ids", "scores", "targets", "source", "tokens", "longest")


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


def unify_pairs(ds, k: int):
    """Kept pair rows (tokenize.tokenize_source's columns) as mixed rows."""
    nan = [float("nan")] * k

    def fn(b: dict[str, list]) -> dict[str, list]:
        n = len(b["chosen_ids"])
        return {"ids": [[c, r] for c, r in zip(b["chosen_ids"], b["rejected_ids"], strict=True)],
                "scores": [[1.0, 0.0]] * n, "targets": [[nan, nan]] * n, "source": b["source"],
                "tokens": [c + r for c, r in zip(b["chosen_len"], b["rejected_len"], strict=True)],
                "longest": [max(c, r) for c, r in zip(b["chosen_len"], b["rejected_len"], strict=True)]}

    return ds.map(fn, batched=True, batch_size=1000, remove_columns=ds.column_names, desc="pairs as mixed rows",
                  load_from_cache_file=False, features=_features())


def unify_ratings(ds):
    """Kept rated rows (ratings.tokenize_ratings' columns) as mixed rows."""

    def fn(b: dict[str, list]) -> dict[str, list]:
        return {"ids": [[x] for x in b["ids"]], "scores": [[0.0]] * len(b["ids"]),
                "targets": [[t] for t in b["targets"]], "source": b["source"], "tokens": b["tokens"],
                "longest": b["longest"]}

    return ds.map(fn, batched=True, batch_size=1000, remove_columns=ds.column_names, desc="ratings as mixed rows",
                  load_from_cache_file=False, features=_features())


def _features():
    """One arrow schema for both kinds, so that their datasets concatenate."""
    return features(ids="ids2", scores="floats", targets="floats2", source="int", tokens="int", longest="int")
