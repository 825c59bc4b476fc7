"""Shared-prompt segments (data.segments) from the layout alone: what each sequence's final token sees through
the mask is exactly that sequence at its own positions, whatever the rows, packed or not; and scoring's
groups are a partition that only joins sequences of one key with a common prefix."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rm_trainer.data.batching import Sequences
from rm_trainer.data.segments import ALWAYS, ShareRule, share_groups, shared_prefix
from rm_trainer.model.reward import segment_mask

token = st.integers(4, 9)  # a small alphabet: common prefixes beyond the prompt happen often
seq = st.lists(token, min_size=0, max_size=6)


@st.composite
def rows(draw):
    """Rows of one prompt and K responses, each sequence prompt + response + EOS (3), as the truncation rule
    builds them."""
    out = []
    for _ in range(draw(st.integers(1, 5))):
        prompt = draw(st.lists(token, min_size=0, max_size=8))
        out.append([prompt + draw(seq) + [3] for _ in range(draw(st.integers(1, 4)))])
    return out


def seen(s: Sequences, j: int) -> tuple[list[int], list[int]]:
    """(tokens, positions) that sequence j's final token attends to, in column order, through the mask."""
    row, col = s.last[j].tolist()
    allowed = segment_mask(s.segments, torch.float32)[row, 0, col] == 0
    return s.input_ids[row][allowed].tolist(), s.position_ids[row][allowed].tolist()


@settings(max_examples=200, deadline=None)
@given(rows(), st.booleans(), st.sampled_from([ALWAYS, ShareRule(0.05), ShareRule(1.0)]))
def test_each_final_token_sees_exactly_its_own_sequence_at_its_own_positions(groups, packing, rule):
    flat = [x for g in groups for x in g]
    pack_len = max(sum(map(len, g)) for g in groups) + 3 if packing else None
    s = Sequences.shared(groups, 0, rule, pack_len, packing)
    assert s.lens.tolist() == [len(x) for x in flat]
    for j, x in enumerate(flat):
        assert seen(s, j) == (x, list(range(len(x))))
    # the tokens forwarded: every shared row's prefix once, and no more than the sequences apart
    assert s.tokens <= sum(map(len, flat))
    if rule is ALWAYS and not packing:
        assert s.tokens == sum(sum(map(len, g)) - (len(g) - 1) * shared_prefix(g) for g in groups)
    if packing:
        assert s.input_ids.shape[1] <= pack_len


@settings(max_examples=100, deadline=None)
@given(rows())
def test_member_major_order_puts_every_rows_first_sequence_first(groups):
    from rm_trainer.objectives.base import batch_sequences

    pairs = [g[:2] for g in groups if len(g) >= 2]
    if not pairs:
        return
    s = batch_sequences(pairs, 0, None, False, ALWAYS, member_major=True)
    for j, x in enumerate([p[0] for p in pairs] + [p[1] for p in pairs]):
        assert seen(s, j)[0] == x


def test_the_shared_prefix_leaves_every_sequence_its_final_token():
    assert shared_prefix([[5, 6, 3], [5, 6, 3]]) == 2  # identical: all but the final token
    assert shared_prefix([[5, 6, 7, 3], [5, 6, 3]]) == 2
    assert shared_prefix([[5, 3], [6, 3]]) == 0
    assert shared_prefix([[5, 6, 3]]) == 0


def test_the_rule_shares_only_where_the_segment_costs_less():
    rule = ShareRule(0.01)
    assert rule.shares([170, 170], 130)  # HH-like: a long prompt
    assert not rule.shares([200, 200], 0)  # nothing in common: the segment only adds attention
    assert not ShareRule(1.0).shares([20, 20], 2)  # attention-bound: two short sequences beat one long one
    assert not rule.shares([50], 40)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2) | st.none(), st.lists(token, min_size=1, max_size=10)), min_size=1,
                max_size=12), st.integers(8, 40))
def test_scoring_groups_partition_the_sequences_by_key_with_a_common_prefix(items, cap):
    seqs = [x + [3] for _, x in items]
    keys = [k for k, _ in items]
    groups = share_groups(seqs, keys, ALWAYS, cap)
    assert sorted(i for g in groups for i in g) == list(range(len(seqs)))
    for g in groups:
        if len(g) > 1:
            members = [seqs[i] for i in g]
            s = shared_prefix(members)
            assert keys[g[0]] is not None and {keys[i] for i in g} == {keys[g[0]]}
            assert s > 0 and s + sum(len(m) - s for m in members) <= cap
