"""The truncation policy: the scoring token (the final EOS, where the reward is read) always survives.

Given token ids of the prompt (with the tokenizer's leading special tokens, e.g. BOS) and of the two
responses (without EOS), build `prompt + response + [EOS]` for each side within max_len:
  1. if the longer side does not fit, cut the prompt from the LEFT (keeping the most recent turns and the
     leading special tokens) - the same cut for both sides, so they keep sharing one prompt;
  2. if a response still does not fit with the special prefix alone, cut it from the RIGHT;
  3. re-append EOS.
A pair whose two sequences are then identical carries no preference signal and is dropped
("identical_after_truncation"), as are pairs with an empty response or identical raw texts.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Truncated:
    chosen: list[int]
    rejected: list[int]
    prompt_len: int  # prompt tokens kept (shared by both sides)
    prompt_cut: int  # prompt tokens removed from the left
    response_cut: bool  # a response lost its tail
    identical: bool


def truncate_pair(prompt: list[int], chosen: list[int], rejected: list[int], eos: int, max_len: int,
                  keep_prefix: int = 0) -> Truncated:
    """keep_prefix: how many leading prompt tokens are special (BOS) and must stay."""
    assert max_len >= keep_prefix + 1, "max_len too small for the special prefix + EOS"
    chosen = _strip_eos(chosen, eos)
    rejected = _strip_eos(rejected, eos)
    longest = max(len(chosen), len(rejected)) + 1  # + EOS
    prefix, body = prompt[:keep_prefix], prompt[keep_prefix:]
    room = max_len - longest - len(prefix)  # prompt-body tokens that still fit
    cut = 0
    if room < len(body):
        keep = max(room, 0)
        cut = len(body) - keep
        body = body[len(body) - keep:] if keep else []
    p = prefix + body
    room_resp = max_len - len(p) - 1
    response_cut = len(chosen) > room_resp or len(rejected) > room_resp
    c = p + chosen[:room_resp] + [eos]
    r = p + rejected[:room_resp] + [eos]
    return Truncated(c, r, len(p), cut, response_cut, c == r)


def _strip_eos(ids: list[int], eos: int) -> list[int]:
    while ids and ids[-1] == eos:
        ids = ids[:-1]
    return ids
