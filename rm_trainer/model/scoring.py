"""The one batched scorer: score_texts, rm-score, rm-serve, rm-eval and the end-of-run report all score
token-id sequences through score_sequences (length-sorted token-budget batches, right or left padding, or
shared-prompt segments where the caller says which sequences belong to one prompt)."""

from __future__ import annotations

import time

import torch

from rm_trainer.data.batching import Sequences, pad_right, token_budget_batches
from rm_trainer.data.segments import ALWAYS, ShareRule, share_groups, shared_prefix


class Forwarded:
    """What scoring's forwards computed (an on_forward callback): sequences, their tokens, and the tokens
    the forwards ran (fewer where prompts were shared)."""

    def __init__(self) -> None:
        self.sequences = self.tokens = self.forwarded = 0

    def add(self, sequences: int, seconds: float, forwarded: int, tokens: int | None = None) -> None:
        self.sequences += sequences
        self.forwarded += forwarded
        self.tokens += forwarded if tokens is None else tokens


@torch.no_grad()
def score_sequences(model, seqs: list[list[int]], max_batch_tokens: int, sort: bool = True,
                    padding_side: str = "right", on_forward=None, attributes: bool = False,
                    share: ShareRule | None = None, keys: list | None = None) -> torch.Tensor:
    """fp32 rewards of token-id sequences, in input order (an attribute head's combined reward; with
    attributes=True its (N, K) attributes). padding_side="left" pads in front, with an attention mask and
    position ids that start at each sequence's first token (what HF pipelines do); the rewards agree with
    right padding to fp32 rounding. on_forward(rows, seconds, tokens[, own tokens]) is told of every forward
    (rm-serve's metrics; tokens: those it computed). share (model.sharing.scoring_rule): sequences that start
    with the same tokens share them where the rule says it costs less (keys: only those of one key; default
    all), decided from the tokens alone, so the same sequences group the same way in every caller."""
    assert padding_side in ("right", "left"), padding_side
    out = torch.empty(len(seqs), *([len(model.attributes)] if attributes else []), dtype=torch.float32)
    if share is not None and padding_side == "right":
        keys = [0] * len(seqs) if keys is None else keys
        return _score_shared(model, seqs, max_batch_tokens, share, keys, out, on_forward, attributes)
    device = model.score.weight.device
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
        r = r if attributes else model.reward_of(r)
        out[torch.tensor(batch)] = r.float().cpu()  # a device-host sync per batch
        if on_forward is not None:
            on_forward(len(batch), time.perf_counter() - started, int(lens.sum()))
    return out


def _score_shared(model, seqs: list[list[int]], max_batch_tokens: int, share: ShareRule, keys: list,
                  out: torch.Tensor, on_forward, attributes: bool) -> torch.Tensor:
    """score_sequences with shared prompts: the groups of data.segments.share_groups, batched by their
    segments' tokens, one segment per batch row."""
    device = model.score.weight.device
    groups = share_groups(seqs, keys, share, max_batch_tokens)
    sizes = []
    for g in groups:
        s = shared_prefix([seqs[i] for i in g])
        sizes.append(s + sum(len(seqs[i]) - s for i in g))
    for batch in token_budget_batches(sizes, max_batch_tokens):
        started = time.perf_counter()
        rows = [[seqs[i] for i in groups[g]] for g in batch]
        laid = Sequences.shared(rows, model.pad_token_id, ALWAYS)
        r = laid.run(model, device)
        r = r if attributes else model.reward_of(r)
        out[torch.tensor([i for g in batch for i in groups[g]])] = r.float().cpu()
        if on_forward is not None:
            on_forward(len(laid.lens), time.perf_counter() - started, laid.tokens, int(laid.lens.sum()))
    return out


def score_with_attributes(model, seqs: list[list[int]], max_batch_tokens: int, **kwargs
                          ) -> tuple[list[float], list[dict[str, float]] | None]:
    """(rewards, each sequence's {attribute: value}) as score_sequences scores them; None in place of the
    attributes for a scalar head. The rewards are the same bits either way (combine: a sum per row)."""
    if not model.attributes:
        return score_sequences(model, seqs, max_batch_tokens, **kwargs).tolist(), None
    out = score_sequences(model, seqs, max_batch_tokens, attributes=True, **kwargs)
    return model.reward_of(out).tolist(), [dict(zip(model.attributes, row, strict=True)) for row in out.tolist()]
