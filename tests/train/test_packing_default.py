"""--packing auto at the seam: run.resolve_packing on a real model (the live engine's stand-in: any callable
with the model's forward), proven packable, a model whose packed sequences see each other, and the modes."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModel, LlamaConfig

from rm_trainer.config import RunConfig
from rm_trainer.errors import ConfigError
from rm_trainer.model.reward import RewardModel
from rm_trainer.train.build import resolve_packing
from rm_trainer.train.engine import Runtime

RT = Runtime(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


class Live:
    """The few Engine methods resolve_packing uses, over a real RewardModel."""

    def __init__(self, model: RewardModel):
        self.model = model

    def __call__(self, *args):
        return self.model(*args)

    def eval(self):
        self.model.eval()

    def train(self):
        self.model.train()


def cfg(**train) -> RunConfig:
    return RunConfig(model={"path": "m"}, data={"train_path": "d"}, output={"output_dir": "o"}, train=train)


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
