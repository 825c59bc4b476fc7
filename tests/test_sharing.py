"""One prompt, many responses (--share_prompt, data.segments) on real HH-RLHF pairs: a shared micro-batch gives
the rewards and every parameter's gradient of the same rows with each response its own sequence (fp32: 1e-5
relative), for pairs with margins and ties, K = 4 Plackett-Luce rankings and packed rows; in bf16 within the
check's bound; and the check refuses an attention that ignores the mask."""

from __future__ import annotations

import gzip
import json

import pytest
import torch
from helpers import SHARED_HH, made_once, objective
from transformers import AttentionInterface, AutoModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from rm_trainer.data.segments import ALWAYS, ShareRule
from rm_trainer.model.reward import RewardModel
from rm_trainer.model.sharing import SHARE_BOUND, check_sharing
from rm_trainer.objectives.bt_loss import fused_bradley_terry
from rm_trainer.objectives.ranking_loss import fused_ranking_loss

pytestmark = pytest.mark.skipif(not SHARED_HH.is_file(), reason=f"real HH-RLHF pairs not found at {SHARED_HH}")
MAX_LEN = 256


@pytest.fixture(scope="module")
def hh():
    """(tokenizer, the first 64 real pairs' prompts and responses as token ids by the one truncation rule)."""
    from transformers import AutoTokenizer

    from rm_trainer.data.formats import split_hh
    from rm_trainer.data.tokenize import RowEncoder
    from rm_trainer.demo import train_tokenizer

    pairs = [json.loads(line) for line in gzip.open(SHARED_HH, "rt")]

    def build(out):
        train_tokenizer([p["chosen"] for p in pairs] + [p["rejected"] for p in pairs], out, vocab_size=1000,
                        kind="bpe")

    tok = AutoTokenizer.from_pretrained(made_once("hh_bpe_1000", build))
    texts = [split_hh(p["chosen"], p["rejected"]) for p in pairs[:80]]
    texts = [t for t in texts if t is not None][:64]
    enc = RowEncoder(tok, MAX_LEN).encode([(p, [c, r]) for p, c, r in texts])
    responses = [(c, r) for _, c, r in texts]
    return tok, [e.cut.seqs for e in enc], texts, responses


def model(vocab: int, impl: str = "sdpa", dtype=torch.float32) -> RewardModel:
    from rm_trainer.demo import tiny_llama_config

    torch.manual_seed(0)
    return RewardModel(AutoModel.from_config(tiny_llama_config(vocab, hidden=64, layers=2), attn_implementation=impl)
                       .to(dtype), seed=1)


def rewards_and_grads(m: RewardModel, seqs, loss):
    m.zero_grad()
    r = seqs.run(m, torch.device("cpu"))
    loss(r).backward()
    return r.detach().float(), {n: p.grad.detach().float().clone() for n, p in m.named_parameters()}


def assert_close(a, b, tol: float):
    (ra, ga), (rb, gb) = a, b
    assert float((ra - rb).abs().max()) <= tol * float(rb.abs().max())
    scale = max(float(g.abs().max()) for g in gb.values())  # as the packing test: the largest gradient entry
    for n in gb:
        assert float((ga[n] - gb[n]).abs().max()) <= tol * scale, n


@pytest.mark.parametrize("packing", [False, True])
def test_shared_pairs_with_margins_and_ties_train_like_separate_ones(hh, packing):
    tok, seqs, _, _ = hh
    rows = [{"ids": s, "single": [[], []], "source": 0, "margin": 0.1 * (i % 3), "tie": i % 5 == 0}
            for i, s in enumerate(seqs[:16])]
    obj = objective(data={"margin_key": "margin", "tie_key": "tie"})
    plain = obj.collate(rows, tok.pad_token_id, 2 * MAX_LEN, packing)
    shared = obj.collate(rows, tok.pad_token_id, 2 * MAX_LEN, packing, share=ALWAYS)
    assert shared.seqs.tokens < 0.75 * plain.seqs.tokens  # HH: the prompt is most of a pair

    def loss(r):
        return fused_bradley_terry(r, plain.margin, None, 0.01, plain.tie)[0]

    m = model(len(tok))
    assert_close(rewards_and_grads(m, shared.seqs, loss), rewards_and_grads(m, plain.seqs, loss), 1e-5)


def test_k4_plackett_luce_rows_with_tied_scores_train_like_separate_ones(hh):
    tok, _, texts, responses = hh
    from rm_trainer.data.tokenize import RowEncoder

    # K = 4: each prompt's chosen and rejected, and two responses of other conversations; scores with a tie
    k4 = [(p, [c, r, responses[(i + 7) % 64][0], responses[(i + 13) % 64][1]]) for i, (p, c, r) in enumerate(texts)]
    rows = [{"ids": e.cut.seqs, "single": [[]] * 4, "source": 0, "scores": [3.0, 1.0, 2.0, 1.0]}
            for e in RowEncoder(tok, MAX_LEN).encode(k4[:8])]
    obj = objective(train={"objective": "ranking", "ranking_loss": "plackett_luce"}, data={"format": "ranking"})
    plain = obj.collate(rows, tok.pad_token_id)
    shared = obj.collate(rows, tok.pad_token_id, share=ALWAYS)
    assert shared.seqs.tokens < 0.5 * plain.seqs.tokens

    def loss(r):
        return fused_ranking_loss(r, plain.group, plain.scores, plain.rows, "plackett_luce")

    m = model(len(tok))
    assert_close(rewards_and_grads(m, shared.seqs, loss), rewards_and_grads(m, plain.seqs, loss), 1e-5)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_bf16_shared_rewards_stay_within_the_checks_bound(hh, impl):
    tok, seqs, _, _ = hh
    rows = [{"ids": s, "single": [[], []], "source": 0} for s in seqs[:16]]
    obj = objective()
    plain, shared = (obj.collate(rows, tok.pad_token_id, share=share).seqs for share in (None, ALWAYS))
    m = model(len(tok), impl, torch.bfloat16).eval()
    with torch.no_grad():
        a, b = shared.run(m, torch.device("cpu")).float(), plain.run(m, torch.device("cpu")).float()
    # measured here: 4e-3 (sdpa), 5e-3 (eager) relative to the largest reward; the bound is 3e-2
    assert float((a - b).abs().max()) <= SHARE_BOUND["bf16"] * float(b.abs().max())


def _causal_only(module, query, key, value, attention_mask, **kwargs):
    """An attention implementation that ignores the mask it is given (plain causal attention)."""
    return sdpa_attention_forward(module, query, key, value, None, **kwargs)


def test_the_check_refuses_an_attention_that_ignores_the_mask_and_training_falls_back_or_stops(capsys):
    from helpers import Live, cfg

    from rm_trainer.errors import ConfigError
    from rm_trainer.train.build import resolve_sharing
    from rm_trainer.train.engine import Runtime

    rt = Runtime(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    pairs = objective()
    for impl in ("sdpa", "eager"):
        m = model(97, impl).eval()
        assert check_sharing(m, m.config, torch.device("cpu")) is None
    AttentionInterface.register("causal_only", _causal_only)
    live = Live(model(97, "causal_only"))
    problem = check_sharing(live, live.model.config, torch.device("cpu"))
    assert "shared and separate rewards differ" in problem and "'causal_only'" in problem
    assert resolve_sharing(cfg(), live, live.model.config, rt, pairs) is None
    assert "shared prompts off (shared and separate rewards differ" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="train.share_prompt: shared and separate rewards differ"):
        resolve_sharing(cfg(share_prompt="on"), live, live.model.config, rt, pairs)
    live = Live(model(97, "sdpa"))
    assert resolve_sharing(cfg(), live, live.model.config, rt, pairs) == ShareRule.of(live.model.config)
    assert resolve_sharing(cfg(share_prompt="on"), live, live.model.config, rt, pairs) is ALWAYS
    assert resolve_sharing(cfg(share_prompt="off"), live, live.model.config, rt, pairs) is None
    assert resolve_sharing(cfg(), live, live.model.config, rt, objective(train={"objective": "regression"},
                                                                         data={"attributes": ["a"]})) is None


def test_score_texts_of_a_group_equals_each_response_alone_and_forwards_fewer_tokens(hh):
    from rm_trainer.data.tokenize import encode_item, special_prefix
    from rm_trainer.model.scoring import Forwarded, score_sequences

    tok, _, texts, responses = hh
    m = model(len(tok)).eval()
    m.tokenizer, m.max_len, m.pad_token_id = tok, MAX_LEN, tok.pad_token_id
    # best-of-8 on a prompt that max_len does not cut (a cut prompt is cut per response when each is scored
    # alone, as score_texts encodes it, so the eight share only what survived every cut)
    prompt = min((p for p, _, _ in texts), key=lambda p: abs(len(tok(p)["input_ids"]) - 120))
    group = sorted((r for pair in responses for r in pair), key=len)[:8]
    together = m.score_texts([(prompt, group)])
    alone = torch.cat([m.score_texts([(prompt, r)], share_prompt="off") for r in group])
    assert together.shape == (8,)
    assert float((together - alone).abs().max()) <= 1e-5 * float(alone.abs().max())
    seqs = [encode_item(tok, (prompt, r), MAX_LEN, special_prefix(tok)) for r in group]
    count = Forwarded()
    with torch.no_grad():
        score_sequences(m, seqs, 16384, share=ShareRule.of(m.config), keys=[0] * 8, on_forward=count.add)
    assert count.sequences == 8 and count.tokens == sum(map(len, seqs)) and count.forwarded < 0.6 * count.tokens


def test_share_prompt_on_with_sequence_parallelism_is_refused_naming_both():
    from helpers import run_config
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="train.share_prompt on: shared prompts are not supported with "
                                              "sequence parallelism"):
        run_config(train={"share_prompt": "on", "sequence_parallel": 2})
    assert run_config(train={"sequence_parallel": 2}).train.share_prompt == "auto"  # auto: off, said at start
    assert run_config(train={"share_prompt": False}).train.share_prompt == "off"  # a boolean is a switch
