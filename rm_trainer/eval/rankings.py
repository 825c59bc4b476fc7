"""rm-eval on K-wise rankings: rows of one prompt, K >= 2 responses and a score (or rank) for each, or
UltraFeedback's own rows (objectives/ranking_rows reads both). Reported as a ranking run's evaluation reports them:
pairwise accuracy over every ordered pair of responses with different scores, the fraction of prompts whose
highest reward is on a best-scored response (top-1; a tie for the highest reward counts as wrong), and the
per-prompt loss of each ranking loss.

A file is a ranking file when its first row has a `responses` list or `completions` and no `chosen`; the
pair, RewardBench and rating files given with it are evaluated as before. Rows are read, checked and
encoded exactly as training reads them (the same file:line:field errors, the same drop reasons); each
response is scored once, as score_texts encodes (prompt, response) (--truncation single, the default), or
as the loss saw it (--truncation pair: the prompt cut once for the whole row). The statistics are the
training evaluation's float64 sums (objectives/ranking_loss.ranking_sums), so the `eval/*` metrics of a
ranking run and `rm-eval --truncation pair` on its held-out file agree (and without a cut prompt, the
default too). An attribute head is ranked by its combined reward.
"""

from __future__ import annotations

from collections import Counter

import torch

from rm_trainer.config import DataConfig
from rm_trainer.data import read
from rm_trainer.errors import UserError
from rm_trainer.model.scoring import score_sequences
from rm_trainer.objectives.base import single_view
from rm_trainer.objectives.ranking_loss import RANKING_FIELDS, ranking_metrics, ranking_sums
from rm_trainer.objectives.ranking_rows import DROP_REASONS, RankingKeys, RankingLayout, RankingReader

LOSSES = ("pairs", "plackett_luce")


def ranked_rows(path: str, keys: RankingKeys, on_error: str):
    """(the file's rows, its layout, rows already refused) if it holds rankings, else None."""
    kind = read.table_kind(path)
    if kind is None:
        return None
    read.check_file(path, "--data")
    layout = RankingLayout(keys)
    ds = read.try_datasets(path, kind, None)
    if ds is None and kind == "json":  # read here, with the ranking rule; another file is left to its reader
        parsed = read.json_records(path)
        first = [obj for _, obj in parsed[0][:1] if isinstance(obj, dict)]
        if not _ranked_like(first, keys):
            return None
        fmt = layout.decide(first, "auto")
        ds, refused = read.from_records(path, lambda row: layout.problem(row, fmt), on_error, parsed)
        return ds, fmt, refused
    if ds is None or not len(ds) or not _ranked_like([ds[0]], keys):
        return None
    return ds, layout.decide([ds[0]], "auto"), 0


def _ranked_like(first: list[dict], keys: RankingKeys) -> bool:
    return bool(first) and (keys.responses in first[0] or "completions" in first[0]) and "chosen" not in first[0]


def evaluate_rankings(model, files: list[tuple[str, object, str, int]], keys: RankingKeys, on_error: str,
                      max_batch_tokens: int, padding_side: str = "right", truncation: str = "single"
                      ) -> tuple[dict, list[dict]]:
    """(result, one score row per ranked prompt) of the ranking files [(path, rows, layout, refused), ...]:
    the metrics of all files together and of each file."""
    seqs, group, scores, where, dropped = [], [], [], [], Counter()
    reader = RankingReader(model.tokenizer, DataConfig(max_len=model.max_len, on_error=on_error, num_proc=1),
                           keys=keys)
    for sid, (path, ds, fmt, refused) in enumerate(files):
        dropped["malformed"] += refused
        tokd = reader.tokenize(ds, fmt, sid, path)
        for i, (status, ids, single, rated) in enumerate(zip(tokd["status"], tokd["ids"], tokd["single"],
                                                             tokd["scores"], strict=True)):
            if status in DROP_REASONS:
                dropped[status] += 1
                continue
            if truncation == "single":  # each response as it is encoded on its own
                ids = single_view(single, ids)
            group += [len(where)] * len(ids)
            seqs += ids
            scores += rated
            where.append((path, i, sid))
    if not seqs:
        raise UserError(f"--data {' '.join(f[0] for f in files)}: no usable ranking rows (dropped: {dict(dropped)})")
    rewards = score_sequences(model, seqs, max_batch_tokens, padding_side=padding_side)  # each response once
    g, s = torch.tensor(group), torch.tensor(scores, dtype=torch.float32)
    starts = [0] + torch.bincount(g, minlength=len(where)).cumsum(0).tolist()
    per_file = {}
    for sid, (path, *_) in enumerate(files):  # a file's prompts are consecutive
        prompts = [k for k, w in enumerate(where) if w[2] == sid]
        if prompts:
            per_file[path] = {loss: _sums(rewards, g, s, starts, prompts[0], prompts[-1] + 1, loss) for loss in LOSSES}
    total = {loss: sum(f[loss] for f in per_file.values()) for loss in LOSSES}
    result = {"files": [f[0] for f in files], "dropped": dict(dropped), **_metrics(total),
              "per_file": {path: _metrics(sums) for path, sums in per_file.items()}}
    rows = [{"kind": "ranking", "file": p, "row": i, "scores": scores[a:b], "rewards": rewards[a:b].tolist()}
            for (p, i, _), a, b in zip(where, starts[:-1], starts[1:], strict=True)]
    return result, rows


def _sums(rewards: torch.Tensor, group: torch.Tensor, scores: torch.Tensor, starts: list[int], lo: int, hi: int,
          loss: str, chunk: int = 256) -> torch.Tensor:
    """ranking_sums over prompts lo..hi-1 (their responses are consecutive: starts[p] is prompt p's first),
    `chunk` prompts at a time: its pair matrices are [responses, responses] of one chunk, never of a file."""
    total = torch.zeros(len(RANKING_FIELDS), dtype=torch.float64)
    for first in range(lo, hi, chunk):
        last = min(first + chunk, hi)
        a, b = starts[first], starts[last]
        total += ranking_sums(rewards[a:b], group[a:b] - first, scores[a:b], last - first, loss)
    return total


def _metrics(sums: dict[str, torch.Tensor]) -> dict:
    m = ranking_metrics(sums["pairs"])
    m["loss"] = {loss: ranking_metrics(sums[loss])["loss"] for loss in LOSSES}
    return m
