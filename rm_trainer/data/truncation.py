"""The truncation rule, one for every objective: the scoring token (the final EOS, where the reward is
read) always survives.

Given token ids of a row's prompt (with the tokenizer's leading special tokens, e.g. BOS) and of its K
responses (without EOS; a pair is K = 2, a rated response K = 1), build `prompt + response + [EOS]` for
each response within max_len:
  1. if the longest response does not fit, cut the prompt from the LEFT (keeping the most recent turns
     and the leading special tokens) - one cut for the whole row, so its responses keep sharing one
     prompt;
  2. if a response still does not fit with the special prefix alone, cut it from the RIGHT;
  3. re-append EOS.
A response scored on its own (score_texts, rm-score, rm-serve) is the row of that one response (K = 1).
A pair whose two sequences are then identical carries no preference signal and is dropped
("identical_after_truncation") by the pair objective.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Truncated:
    seqs: list[list[int]]  # prompt + response + EOS of each response, in order
    prompt_len: int  # prompt tokens kept (shared by every response)
    prompt_cut: int  # prompt tokens removed from the left
    response_cut: bool  # a response lost its tail

    @property
    def chosen(self) -> list[int]:  # a pair's two sequences (K = 2), or the one of a single response
        return self.seqs[0]

    @property
    def rejected(self) -> list[int]:
        return self.seqs[1]

    @property
    def identical(self) -> bool:  # a pair that the cut made identical
        return len(self.seqs) == 2 and self.seqs[0] == self.seqs[1]


def truncate(prompt: list[int], responses: list[list[int]], eos: int, max_len: int,
             keep_prefix: int = 0) -> Truncated:
    """The rule (module docstring) for one row. keep_prefix: how many leading prompt tokens are special
    (BOS) and must stay."""
    assert max_len >= keep_prefix + 1, "max_len too small for the special prefix + EOS"
    responses = [_strip_eos(r, eos) for r in responses]
    longest = max(map(len, responses), default=0) + 1  # + EOS
    prefix, body = prompt[:keep_prefix], prompt[keep_prefix:]
    room = max_len - longest - len(prefix)  # prompt-body tokens that still fit
    cut = 0
    if room < len(body):
        keep = max(room, 0)
        cut = len(body) - keep
        body = body[len(body) - keep:] if keep else []
    p = prefix + body
    room_resp = max_len - len(p) - 1
    return Truncated([p + r[:room_resp] + [eos] for r in responses], len(p), cut,
                     any(len(r) > room_resp for r in responses))


def truncate_pair(prompt: list[int], chosen: list[int], rejected: list[int], eos: int, max_len: int,
                  keep_prefix: int = 0) -> Truncated:
    """The rule for a pair (K = 2): .chosen, .rejected and .identical."""
    return truncate(prompt, [chosen, rejected], eos, max_len, keep_prefix)


def _strip_eos(ids: list[int], eos: int) -> list[int]:
    while ids and ids[-1] == eos:
        ids = ids[:-1]
    return ids
