"""--packing auto at the seam: run.resolve_packing on a real model (the live engine's stand-in: any callable
with the model's forward), proven packable, a model whose packed sequences see each other, and the modes."""

from __future__ import annotations

import pytest
import torch
from helpers import Live, cfg
from transformers import AutoModel, LlamaConfig

from rm_trainer.errors import ConfigError
from rm_trainer.model.reward import RewardModel
from rm_trainer.train.build import resolve_packing
from rm_trainer.train.engine import Runtime

RT = Runtime(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


@pytest.fixture
def live() -> Live:
    c = LlamaConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    return Live(RewardModel(AutoModel.from_config(c, attn_implementation="sdpa"), seed=1))


def test_auto_packs_a_model_proven_packable_and_says_so(live, capsys):
    assert cfg().train.packing == "auto"
    assert resolve_packing(cfg(), live, live.model.config, RT) is True
    assert "packing on: packed rows score like padded ones" in capsys.readouterr().out
    assert live.model.training  # back in training mode after the check's eval-mode forwards
    assert resolve_packing(cfg(packing="on"), live, live.model.config, RT) is True
    assert resolve_packing(cfg(packing="off"), live, live.model.config, RT) is False
    assert resolve_packing(cfg(batching="random"), live, live.model.config, RT) is False  # as drawn
    assert capsys.readouterr().out == ""


def test_auto_falls_back_to_grouped_with_the_reason_and_on_refuses(live, capsys, monkeypatch):
    # the silent failure the check exists for: without position_ids the packed row is one long sequence
    monkeypatch.setattr(RewardModel, "_inputs",
                        staticmethod(lambda ids, pos, mask=None: {"input_ids": ids, "use_cache": False}))
    assert resolve_packing(cfg(), live, live.model.config, RT) is False
    out = capsys.readouterr().out
    assert "packing off (packed sequences attend to each other" in out and "batching grouped by length" in out
    with pytest.raises(ConfigError, match="train.packing: packed sequences attend to each other"):
        resolve_packing(cfg(packing="on"), live, live.model.config, RT)


def rows(lengths: list[int]):
    """An arrow dataset of pairs whose two sequences (no common prefix) have these lengths."""
    from datasets import Dataset

    ids = [[[5] * n, [6] * n] for n in lengths]
    tokens = [2 * n for n in lengths]
    return Dataset.from_dict({"ids": ids, "single": [[[], []]] * len(ids), "source": [0] * len(ids),
                              "longest": lengths, "tokens": tokens, "segment": tokens})


def test_auto_packs_only_where_packed_micro_batches_cost_less(live, capsys):
    """Skewed lengths (a few long pairs among short ones, like HH): with one micro-batch per step grouping has
    nothing to sort, and padding to the longest pair costs more than packing; with 16 micro-batches per step
    grouping puts the long pairs together and leaves the short ones unpadded, and dense packed rows cost more.
    """
    from helpers import objective

    from rm_trainer.data.segments import ShareRule
    from rm_trainer.train.build import packing_pays

    skewed = rows([60 if i % 8 == 0 else 12 for i in range(256)])
    rule = ShareRule.of(live.model.config)
    one_micro = cfg(micro_batch_size=16, grad_accum=1, pack_len=512)
    many_micro = cfg(micro_batch_size=2, grad_accum=16, pack_len=512)
    pays_one, why = packing_pays(one_micro, skewed, RT, objective(), None, rule, 0)
    assert pays_one and "packed" in why and "grouped" in why
    assert not packing_pays(many_micro, skewed, RT, objective(), None, rule, 0)[0]
    # at the seam: auto asks, on does not
    assert resolve_packing(many_micro, live, live.model.config, RT,
                           lambda: packing_pays(many_micro, skewed, RT, objective(), None, rule, 0)) is False
    assert "packing off: grouped batches cost less here (modelled cost" in capsys.readouterr().out
    on = cfg(micro_batch_size=2, grad_accum=16, pack_len=512, packing="on")
    assert resolve_packing(on, live, live.model.config, RT, lambda: (False, "")) is True
