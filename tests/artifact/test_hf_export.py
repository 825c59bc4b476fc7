"""The HF folder: sharded safetensors with an index above the shard size, loadable by plain transformers,
scoring like reward.pt."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from rm_trainer import load_reward_model
from rm_trainer.artifact.hf_export import export_hf
from rm_trainer.cli.export_hf import main

pytestmark = pytest.mark.slow


def test_sharded_export_loads_and_scores_like_reward_pt(run, demo_assets, tmp_path):
    reward_pt = run("ds_z2_w2") / "reward.pt"  # 86.8 K fp32 parameters: ~350 KB
    out = export_hf(reward_pt, tmp_path / "hf", shard_size="100KB")
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(shards) >= 3 and sorted(set(index["weight_map"].values())) == shards
    assert not (out / "model.safetensors").exists()
    model, info = AutoModelForSequenceClassification.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert set(index["weight_map"]) == set(model.state_dict()) - {k for k, _ in model.named_buffers()}
    tok = AutoTokenizer.from_pretrained(out)
    rows = [json.loads(line) for line in open(demo_assets["test"])][:4]
    texts = [r["prompt"] + r["chosen"] for r in rows] + [r["prompt"] + r["rejected"] for r in rows]
    want = load_reward_model(reward_pt).score_texts(texts)
    batch = tok(texts, return_tensors="pt", padding=True)  # the tokenizer appends EOS itself
    with torch.no_grad():
        got = model.eval()(**batch).logits[:, 0]
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_export_cli_names_a_file_that_is_not_a_reward_pt(tmp_path, capsys):
    bad = tmp_path / "x.pt"
    torch.save({"format": "something else"}, bad)
    assert main(["--model", str(bad), "--output_dir", str(tmp_path / "hf")]) == 2
    assert "not an rm_trainer reward.pt" in capsys.readouterr().err
