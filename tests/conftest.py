from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from rm_trainer import demo  # noqa: E402


@pytest.fixture(scope="session")
def demo_assets(tmp_path_factory) -> dict[str, str]:
    """Synthetic pairs + a word-level tokenizer + a tiny Llama config.json (random-init backbone)."""
    return demo.prepare(tmp_path_factory.mktemp("demo"), n_train=256, n_test=48, seed=0)


@pytest.fixture(scope="session")
def tiny_pretrained(demo_assets, tmp_path_factory) -> str:
    """A tiny Llama backbone saved with save_pretrained, so every run starts from identical weights
    exactly as from a real SFT checkpoint."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    out = tmp_path_factory.mktemp("tiny_sft")
    torch.manual_seed(1234)
    cfg = AutoConfig.from_pretrained(demo_assets["model"])
    AutoModel.from_config(cfg).save_pretrained(out)
    AutoTokenizer.from_pretrained(demo_assets["model"]).save_pretrained(out)
    return str(out)
