"""rm-eval on rated responses, for an attribute head (--objective regression): each attribute's RMSE and
Pearson r over the rows that rate it.

A file is a rating file when its first row has the response column (data.response_key, `response`) and
no `chosen`; pair files given with it are evaluated as pairs, with the combined reward. Rows are read,
checked and encoded exactly as training reads them (objectives/rating_rows: the same file:line:field
errors, the same drop reasons, the same ids as score_texts). A missing or null rating is left out of that
attribute's metrics (it is not an error here: every attribute reports how many rows rate it). The
statistics are the training evaluation's float64 sums (objectives/regression_loss.regression_sums), so
`eval/rmse/*` and `eval/pearson/*` of a run and rm-eval on its held-out file agree.
"""

from __future__ import annotations

from collections import Counter

import torch

from rm_trainer.config import DataConfig
from rm_trainer.data import read
from rm_trainer.errors import UserError
from rm_trainer.model.scoring import score_with_attributes
from rm_trainer.objectives.rating_rows import DROP_REASONS, RatingKeys, RatingReader, rating_problem
from rm_trainer.objectives.regression_loss import regression_metrics, regression_sums


def rated_rows(path: str, keys: RatingKeys, on_error: str):
    """(the file's rows, rows already refused) if it holds rated responses, else None (a pair file)."""
    kind = read.table_kind(path)
    if kind is None:
        return None
    read.check_file(path, "--data")
    ds = read.try_datasets(path, kind, None)
    if ds is None and kind == "json":  # read here, with the rating rule; a pair file is left to its reader
        parsed = read.json_records(path)
        if not _rated_like([obj for _, obj in parsed[0][:1] if isinstance(obj, dict)], keys):
            return None
        return read.from_records(path, lambda row: rating_problem(row, keys), on_error, parsed)
    if ds is None or not len(ds) or not _rated_like([ds[0]], keys):
        return None
    return ds, 0


def _rated_like(first: list[dict], keys: RatingKeys) -> bool:
    return bool(first) and keys.response in first[0] and "chosen" not in first[0]


def evaluate_ratings(model, files: list[tuple[str, object, int]], keys: RatingKeys, on_error: str,
                     max_batch_tokens: int, padding_side: str = "right") -> tuple[dict, list[dict]]:
    """(result, one score row per rated response) of the rating files [(path, rows, refused), ...]."""
    seqs, targets, where, dropped = [], [], [], Counter()
    reader = RatingReader(model.tokenizer, DataConfig(max_len=model.max_len, on_error=on_error, num_proc=1),
                          keys=keys)
    for sid, (path, ds, refused) in enumerate(files):
        dropped["malformed"] += refused
        tokd = reader.tokenize(ds, "rating", sid, path)
        for i, (status, ids, y) in enumerate(zip(tokd["status"], tokd["ids"], tokd["targets"], strict=True)):
            if status in DROP_REASONS:
                dropped[status] += 1
                continue
            seqs.append(ids[0])
            targets.append(y)
            where.append((path, i))
    if not seqs:
        raise UserError(f"--data {' '.join(p for p, _, _ in files)}: no usable rated rows (dropped: {dict(dropped)})")
    rewards, attrs = score_with_attributes(model, seqs, max_batch_tokens, padding_side=padding_side)
    names = list(model.attributes)
    preds = torch.tensor([[a[n] for n in names] for a in attrs])
    y = torch.tensor(targets, dtype=torch.float32).reshape(len(seqs), len(names))
    m = regression_metrics(regression_sums(preds, y), names)
    rated = torch.isfinite(y).sum(0).tolist()
    result = {"files": [p for p, _, _ in files], "rows": len(seqs), "dropped": dict(dropped),
              "attributes": {n: {"rated": int(rated[k]), "rmse": m[f"rmse/{n}"], "pearson": m[f"pearson/{n}"]}
                             for k, n in enumerate(names)}}
    rows = [{"kind": "rated", "file": p, "row": i, "reward": r, "attributes": a,
             "ratings": {n: (None if v != v else v) for n, v in zip(names, t, strict=True)}}
            for (p, i), r, a, t in zip(where, rewards, attrs, targets, strict=True)]
    return result, rows
