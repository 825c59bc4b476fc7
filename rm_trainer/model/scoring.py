"""The one batched scorer: score_texts, rm-score, rm-serve, rm-eval and the end-of-run report all score
token-id sequences through score_sequences (length-sorted token-budget batches, right or left padding)."""

from __future__ import annotations

import time

import torch

from rm_trainer.data.batching import pad_right, token_budget_batches


@torch.no_grad()
def score_sequences(model, seqs: list[list[int]], max_batch_tokens: int, sort: bool = True,
                    padding_side: str = "right", on_forward=None, attributes: bool = False) -> torch.Tensor:
    """fp32 rewards of token-id sequences, in input order (an attribute head's combined reward; with
    attributes=True its (N, K) attributes). padding_side="left" pads in front, with an
    attention mask and position ids that start at each sequence's first token (what HF pipelines do);
    the rewards agree with right padding to fp32 rounding. on_forward(rows, seconds) is told of every
    forward (rm-serve's metrics)."""
    assert padding_side in ("right", "left"), padding_side
    device = model.score.weight.device
    out = torch.empty(len(seqs), *([len(model.attributes)] if attributes else []), dtype=torch.float32)
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
            on_forward(len(batch), time.perf_counter() - started)
    return out


def score_with_attributes(model, seqs: list[list[int]], max_batch_tokens: int, **kwargs
                          ) -> tuple[list[float], list[dict[str, float]] | None]:
    """(rewards, each sequence's {attribute: value}) as score_sequences scores them; None in place of the
    attributes for a scalar head. The rewards are the same bits either way (combine: a sum per row)."""
    if not model.attributes:
        return score_sequences(model, seqs, max_batch_tokens, **kwargs).tolist(), None
    out = score_sequences(model, seqs, max_batch_tokens, attributes=True, **kwargs)
    return model.reward_of(out).tolist(), [dict(zip(model.attributes, row, strict=True)) for row in out.tolist()]
