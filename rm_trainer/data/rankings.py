"""K-wise ranking rows (`--objective ranking`): one prompt, K >= 2 responses, a rating for each.

Two layouts are read, decided once per source from its first row:

- `ranking`: {"prompt": ..., "responses": [text, ...], "scores": [number, ...]} (higher is better), or
  "ranks" in place of "scores" (1 is best; equal ranks tie). The prompt is text or {role, content}
  messages.
- `ultrafeedback`: UltraFeedback's own rows, {"instruction": text, "completions": [{"response": text,
  "overall_score": number, "fine-grained_score": number, ...}, ...]}, rated by one of the completions'
  score fields (`overall_score` by default).

Each response is encoded on its own, exactly as score_texts encodes (prompt, response) for scoring
(tokenize.encode): the reward the ranking loss trains is the one every scoring path reads. A row is
kept as K sequences that each run through the backbone once per step, with the row's scores.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch

from rm_trainer.data import read
from rm_trainer.data.batching import pack_sequences, pad_right
from rm_trainer.data.formats import row_location, skip_hint
from rm_trainer.data.schema import features, tokenize_map
from rm_trainer.data.tokenize import encode_item, special_prefix
from rm_trainer.errors import DataError

UF_SCORES = ("overall_score", "fine-grained_score")


@dataclass(frozen=True)
class RankingKeys:
    prompt: str = "prompt"
    responses: str = "responses"
    scores: str = "scores"
    ranks: str = "ranks"
    uf_score: str = "overall_score"  # which score of an UltraFeedback completion rates it


def detect_ranking_format(row: Any, keys: RankingKeys) -> str:
    """ultrafeedback when the row has UltraFeedback's completions; ranking otherwise."""
    if isinstance(row, dict) and "completions" in row and keys.responses not in row:
        return "ultrafeedback"
    return "ranking"


class RankingLayout:
    """formats.load_source's view of ranking sources (formats.PairLayout is the pairs' one)."""

    def __init__(self, keys: RankingKeys) -> None:
        self.keys = keys

    def decide(self, first_rows: list[Any], fmt: str) -> str:
        if fmt in LAYOUTS:
            return fmt
        return detect_ranking_format(next((r for r in first_rows if isinstance(r, dict)), None), self.keys)

    def problem(self, row: Any, fmt: str) -> str | None:
        return ranking_problem(row, fmt, self.keys)

    def check_columns(self, ds, path: str) -> None:
        cols = set(ds.column_names)
        if self.keys.responses in cols or "completions" in cols:
            return
        held = "preference pairs (chosen/rejected)" if {"chosen", "rejected"} <= cols else "no rankings"
        raise DataError(f"{path}: holds {held}: no {self.keys.responses!r} or 'completions' field (found fields: "
                        f"{', '.join(sorted(cols))}); train.objective ranking reads rows of a prompt, K responses "
                        "and their scores (docs/objectives.md); pairs train with --objective pairs")


LAYOUTS = ("ranking", "ultrafeedback")


def kind_of(v: Any) -> str:
    """How a problem names a value of the wrong type: 'missing', or 'a list'."""
    return "missing" if v is None else f"a {type(v).__name__}"


def _number_problem(v: Any, field: str) -> str | None:
    if read.finite_number(v):
        return None
    what = repr(v) if isinstance(v, float | str) else kind_of(v)
    return f"field {field} is {what}; expected a finite number"


def prompt_problem(p: Any, field: str) -> str | None:
    if isinstance(p, str):
        return None
    if isinstance(p, list) and p and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                         and isinstance(m.get("content"), str) for m in p):
        return None
    return f"field {field!r} is {kind_of(p)}; expected text or a list of {{role, content}} messages"


def _ranking_problem(row: dict, keys: RankingKeys) -> str | None:
    responses = row.get(keys.responses)
    if not isinstance(responses, list):
        return f"field {keys.responses!r} is {kind_of(responses)}; expected a list of response texts"
    for i, r in enumerate(responses):
        if not isinstance(r, str):
            return f"field {keys.responses}[{i}] is {kind_of(r)}; expected text"
    field = keys.scores if keys.scores in row else keys.ranks if keys.ranks in row else None
    if field is None:
        return f"fields {keys.scores!r} and {keys.ranks!r} are both missing; give one number per response"
    values = row[field]
    if not isinstance(values, list):
        return f"field {field!r} is a {type(values).__name__}; expected a list of numbers, one per response"
    if len(values) != len(responses):
        return f"field {field!r} has {len(values)} values for {len(responses)} responses; give one per response"
    for i, v in enumerate(values):
        if (p := _number_problem(v, f"{field}[{i}]")) is not None:
            return p
    return None


def _ultrafeedback_problem(row: dict, keys: RankingKeys) -> str | None:
    completions = row.get("completions")
    if not isinstance(completions, list):
        return f"field 'completions' is {kind_of(completions)}; expected UltraFeedback's list of completions"
    for i, c in enumerate(completions):
        if not isinstance(c, dict):
            return f"field completions[{i}] is a {type(c).__name__}; expected an object with a response and scores"
        if not isinstance(c.get("response"), str):
            return f"field completions[{i}].response is {kind_of(c.get('response'))}; expected text"
        if (p := _number_problem(c.get(keys.uf_score), f"completions[{i}].{keys.uf_score}")) is not None:
            return p
    return None


def ranking_problem(row: Any, fmt: str, keys: RankingKeys) -> str | None:
    """What is wrong with one row of a `fmt` source, naming the field; None if it is usable."""
    if not isinstance(row, dict):
        return f"each row must be a JSON object, got {type(row).__name__}"
    prompt_field = "instruction" if fmt == "ultrafeedback" else keys.prompt
    problem = prompt_problem(row.get(prompt_field), prompt_field)
    problem = problem or (_ultrafeedback_problem(row, keys) if fmt == "ultrafeedback" else _ranking_problem(row, keys))
    if problem is None and len(ranking_texts(row, fmt, keys)[1]) < 2:
        n = len(ranking_texts(row, fmt, keys)[1])
        problem = f"{n} response{'s' if n != 1 else ''}; a ranking needs at least 2"
    return problem


def ranking_texts(row: dict, fmt: str, keys: RankingKeys) -> tuple[Any, list[str], list[float]]:
    """(prompt, responses, scores; higher is better) of a row without a ranking_problem."""
    if fmt == "ultrafeedback":
        completions = row["completions"]
        return (row["instruction"], [c["response"] for c in completions],
                [float(c[keys.uf_score]) for c in completions])
    if keys.scores in row:
        return row[keys.prompt], list(row[keys.responses]), [float(v) for v in row[keys.scores]]
    return row[keys.prompt], list(row[keys.responses]), [-float(v) for v in row[keys.ranks]]


def ranking_status(responses: list[str], scores: list[float]) -> str:
    """A drop reason for a well-formed row that teaches nothing, or "" for a row that is used."""
    if any(not r.strip() for r in responses):
        return "empty_response"
    if len(set(scores)) == 1:
        return "all_responses_tied"
    return ""


RANKING_COLUMNS = ("ids", "scores", "status", "source", "tokens", "longest")
DROP_REASONS = ("malformed", "empty_response", "all_responses_tied")


def encode_ranking(tok, prompt: Any, responses: list[str], max_len: int, prefix: list[int]) -> list[list[int]]:
    """Each response as score_texts encodes (prompt, response): a messages prompt takes the response as the
    assistant's turn, rendered with the chat template."""
    if isinstance(prompt, str):
        return [encode_item(tok, (prompt, r), max_len, prefix) for r in responses]
    return [encode_item(tok, (prompt, [{"role": "assistant", "content": r}]), max_len, prefix) for r in responses]


def tokenize_rankings(ds, fmt: str, tok, max_len: int, on_error: str, keys: RankingKeys = RankingKeys(),
                      source_id: int = 0, path: str = "", num_proc: int | None = None):
    """One datasets.map over a ranking source: each row checked against the source's layout (a malformed
    one raises DataError naming file:line and field, unless on_error is skip, which counts it as
    "malformed"), then each response encoded. Every row gets a status (a drop reason or ""), so nothing
    is lost uncounted. Columns: ids (K id lists), scores (K), status, source, tokens (all K lengths) and
    longest (the longest response's)."""
    prefix = special_prefix(tok)

    def fn(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        out: dict[str, list] = {k: [] for k in RANKING_COLUMNS}
        for i, vals in zip(indices, zip(*batch.values(), strict=True), strict=True):
            row = dict(zip(batch, vals, strict=True))
            problem = ranking_problem(row, fmt, keys)
            if problem and on_error == "error":
                raise DataError(f"{row_location(path, i)}: {problem}" + skip_hint())
            ids, scores, status = [], [], "malformed"
            if not problem:
                prompt, responses, scores = ranking_texts(row, fmt, keys)
                status = ranking_status(responses, scores)
                ids = encode_ranking(tok, prompt, responses, max_len, prefix)
            values = (ids, scores, status, source_id, sum(map(len, ids)), max(map(len, ids), default=0))
            for k, v in zip(RANKING_COLUMNS, values, strict=True):
                out[k].append(v)
        return out

    schema = features(ids="ids2", scores="floats", status="str", source="int", tokens="int", longest="int")
    return tokenize_map(ds, fn, schema, path=path, source_id=source_id, num_proc=num_proc)


def split_report(tokd, idx, max_len: int, malformed_before: int = 0):
    """(rows kept, their report) of one split (`idx`: its rows of the tokenized source): counts by status,
    responses per row, and the longest response's token lengths, from whole columns read once."""
    import numpy as np

    status = np.asarray(tokd.data.column("status").to_numpy(zero_copy_only=False))[idx]
    counts = Counter(status.tolist())
    counts["malformed"] += malformed_before
    real = idx[status != "malformed"]
    longest = np.asarray(tokd.data.column("longest").to_numpy())[real]
    k = np.asarray([len(x) for x in tokd.select(real)["scores"]]) if len(real) else np.zeros(0)
    rep = {"rows": len(idx) + malformed_before, "used": sum(v for r, v in counts.items() if r not in DROP_REASONS),
           "dropped": {r: counts.get(r, 0) for r in DROP_REASONS}, "kept_with_note": {}}
    if len(real):
        rep["responses_per_row"] = {"min": int(k.min()), "mean": round(float(k.mean()), 3), "max": int(k.max())}
        rep["token_length_percentiles"] = {"longest_response": {f"p{q}": int(np.percentile(longest, q))
                                                                for q in (50, 90, 99)} | {"max": int(longest.max())}}
        rep["fraction_truncated_at_max_len"] = round(float((longest >= max_len).mean()), 4)
    keep = idx[~np.isin(status, DROP_REASONS)]
    return tokd.remove_columns(["status"]).select(keep), rep


def collate_rankings(rows: list[dict[str, Any]], pad_id: int, pack_len: int | None = None,
                     packing: bool = False) -> dict[str, torch.Tensor]:
    """A micro-batch of ranking rows ({"ids": [K lists], "scores": [K]}) as one forward over their S
    responses, each once: padded (`input_ids` (S, T), `lens`) or packed (`input_ids`, `position_ids`,
    `last`, as data.batching.pack_sequences), with `group` (S,) the row of each response (0..B-1),
    `scores` (S,), `prompts` (B, on the host) and each row's `source`."""
    seqs = [ids for r in rows for ids in r["ids"]]
    group = torch.cat([torch.full((len(r["ids"]),), i, dtype=torch.long) for i, r in enumerate(rows)])
    scores = torch.tensor([float(s) for r in rows for s in r["scores"]], dtype=torch.float32)
    fields = {"lens": torch.tensor([len(s) for s in seqs], dtype=torch.long), "group": group, "scores": scores,
              "prompts": torch.tensor(len(rows))}  # a host value: the loss's G, read without a device sync
    if "source" in rows[0]:
        fields["source"] = torch.tensor([r["source"] for r in rows], dtype=torch.long)
    if "targets" in rows[0]:  # bt+regression's mixed rows (data.mixed): each sequence's K ratings, NaN if none
        fields["targets"] = torch.tensor([t for r in rows for t in r["targets"]], dtype=torch.float32)
    if packing:
        return pack_sequences(seqs, pad_id, pack_len) | fields
    return {"input_ids": pad_right(seqs, pad_id)} | fields
