"""Property tests of the truncation policy (hypothesis): the scoring token always survives."""

from hypothesis import given, settings
from hypothesis import strategies as st

from rm_trainer.data.truncation import truncate_pair

EOS, BOS = 2, 1
tokens = st.lists(st.integers(min_value=3, max_value=50), max_size=80)


@settings(max_examples=400, deadline=None)
@given(prompt=tokens, chosen=tokens, rejected=tokens, max_len=st.integers(min_value=3, max_value=120),
       bos=st.booleans())
def test_scoring_token_survives_and_length_is_bounded(prompt, chosen, rejected, max_len, bos):
    p = ([BOS] if bos else []) + prompt
    t = truncate_pair(p, chosen, rejected, EOS, max_len, keep_prefix=int(bos))
    for seq, resp in ((t.chosen, chosen), (t.rejected, rejected)):
        assert len(seq) <= max_len
        assert seq[-1] == EOS and EOS not in seq[:-1]  # exactly one scoring token, at the end
        if bos:
            assert seq[0] == BOS  # the special prefix stays
        body = seq[t.prompt_len:-1]
        assert body == resp[:len(body)]  # responses lose only their tail
    # both sides share one prompt: its most recent tokens (cut from the left)
    assert t.chosen[:t.prompt_len] == t.rejected[:t.prompt_len]
    kept_body = t.chosen[int(bos):t.prompt_len]
    assert kept_body == prompt[len(prompt) - len(kept_body):]
    assert t.prompt_cut == len(prompt) - len(kept_body)
    # identical-after-truncation is detected exactly
    assert t.identical == (t.chosen == t.rejected)
    if chosen != rejected and not t.response_cut:
        assert not t.identical


@settings(max_examples=200, deadline=None)
@given(prompt=tokens, chosen=tokens, rejected=tokens)
def test_no_truncation_when_it_fits(prompt, chosen, rejected):
    max_len = len(prompt) + max(len(chosen), len(rejected)) + 1
    t = truncate_pair(prompt, chosen, rejected, EOS, max_len)
    assert t.chosen == prompt + chosen + [EOS] and t.rejected == prompt + rejected + [EOS]
    assert t.prompt_cut == 0 and not t.response_cut


def test_prompt_is_cut_before_responses():
    t = truncate_pair([1, 10, 11, 12, 13], [20, 21], [30], EOS, max_len=6, keep_prefix=1)
    assert t.chosen == [1, 12, 13, 20, 21, EOS] and t.rejected == [1, 12, 13, 30, EOS]
    assert t.prompt_cut == 2 and not t.response_cut


def test_identical_after_truncation_is_flagged():
    t = truncate_pair([1, 5], [7, 7, 7, 8], [7, 7, 7, 9], EOS, max_len=5, keep_prefix=1)
    assert t.response_cut and t.identical and t.chosen == [1, 7, 7, 7, EOS]
