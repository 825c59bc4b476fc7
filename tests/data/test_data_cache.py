"""The tokenized-data cache: its key covers everything that decides the content (and nothing else), a
second start loads it without tokenizing, --prepare_only builds it ahead, and the other ranks wait for
rank 0 without a pending collective."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import ROOT, run_env, train, train_args
from helpers import prepare as prepare_sources

from rm_trainer import objectives
from rm_trainer.cli.train_flags import load_run_config
from rm_trainer.data import cache as data_mod
from rm_trainer.data.cache import load
from rm_trainer.data.tokenize import load_tokenizer


def cache_dir(cfg):
    return data_mod.cache_dir(cfg, objectives.build(cfg))


def prepare_or_load(cfg, tok):
    return data_mod.prepare_or_load(cfg, tok, objectives.build(cfg))


def cfg_of(assets, out, *extra):
    cfg, _ = load_run_config(["--model", assets["model"], "--data", assets["train"], "--test_data", assets["test"],
                              "--output_dir", str(out), "--max_len", "32", *extra])
    return cfg


@pytest.fixture
def assets(demo_assets, tmp_path):
    """Private copies of the demo files: these tests modify them."""
    import shutil

    out = {}
    for k in ("model", "train", "test"):
        src = demo_assets[k]
        dst = tmp_path / "assets" / (k if k == "model" else f"{k}.jsonl")
        dst.parent.mkdir(exist_ok=True)
        (shutil.copytree if k == "model" else shutil.copy)(src, dst)
        out[k] = str(dst)
    data_mod._fingerprint.cache_clear()  # hashed once per process; these tests change files under one path
    yield out
    data_mod._fingerprint.cache_clear()


def test_cache_key_covers_what_decides_the_content_and_nothing_else(assets, tmp_path):
    out = tmp_path / "o"
    base = cache_dir(cfg_of(assets, out))
    assert base.parent == out / "data_cache"
    for extra in (["--max_len", "48"], ["--seed", "1"], ["--test_fraction", "0.1"], ["--prompt_key", "q"],
                  ["--format", "hh"], ["--on_error", "skip"]):
        assert cache_dir(cfg_of(assets, out, *extra)) != base, extra
    for extra in (["--num_proc", "2"], ["--lr", "1"], ["--dist_timeout_s", "5"], ["--max_drop_fraction", "0.5"]):
        assert cache_dir(cfg_of(assets, out, *extra)) == base, extra
    shared = tmp_path / "shared_cache"
    a = cache_dir(cfg_of(assets, tmp_path / "run_a", "--cache_dir", str(shared)))
    assert a == cache_dir(cfg_of(assets, tmp_path / "run_b", "--cache_dir", str(shared))) and a.parent == shared
    template = tmp_path / "t.jinja"
    template.write_text("{{ messages }}")
    assert cache_dir(cfg_of(assets, out, "--chat_template", str(template))) != base
    with open(assets["train"], "a") as f:  # one more row: other bytes, other key
        f.write(json.dumps({"prompt": "Human: q Assistant:", "chosen": " kind", "rejected": " rude"}) + "\n")
    data_mod._fingerprint.cache_clear()
    changed_data = cache_dir(cfg_of(assets, out))
    tok_file = next(p for p in (tmp_path / "assets" / "model").iterdir() if p.name == "tokenizer_config.json")
    tok_file.write_text(tok_file.read_text().replace("}", ', "model_max_length": 77}', 1))
    data_mod._fingerprint.cache_clear()
    assert len({base, changed_data, cache_dir(cfg_of(assets, out))}) == 3


def test_second_start_loads_the_cache_without_tokenizing(assets, tmp_path, monkeypatch):
    cfg = cfg_of(assets, tmp_path / "o")
    tok = load_tokenizer(cfg)
    dest, hit = prepare_or_load(cfg, tok)
    assert not hit and (dest / "identity.json").is_file() and not list(dest.parent.glob("*.tmp-*"))
    assert not (dest / "scratch").exists()  # datasets' intermediate files were removed

    def fail(*_a, **_k):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(data_mod, "prepare_sources", fail)
    again, hit = prepare_or_load(cfg, tok)
    assert hit and again == dest
    train_ds, test_ds, names, report = load(dest)
    monkeypatch.undo()
    fresh_train, fresh_test, fresh_report, _ = prepare_sources(cfg, tok)
    assert train_ds.to_dict() == fresh_train.to_dict() and test_ds.to_dict() == fresh_test.to_dict()
    assert names == ["train"] and report["train"]["train"] == fresh_report["train"]["train"]


def test_parallel_tokenization_equals_one_process(assets, tmp_path):
    tok = load_tokenizer(cfg_of(assets, tmp_path))
    one = prepare_sources(cfg_of(assets, tmp_path, "--num_proc", "1"), tok)
    two = prepare_sources(cfg_of(assets, tmp_path, "--num_proc", "2"), tok)
    assert one[0].to_dict() == two[0].to_dict() and one[1].to_dict() == two[1].to_dict() and one[2] == two[2]


@pytest.mark.slow
def test_prepare_only_builds_the_cache_the_training_run_then_loads(assets, tiny_pretrained, tmp_path):
    out = tmp_path / "run"
    args = train_args(tiny_pretrained, assets["train"], assets["test"], "zero3", dtype="fp32", max_steps=2,
                      max_len=32, micro_batch_size=2)
    p = subprocess.run([sys.executable, "launch/train_reward.py", "--prepare_only", *args, "--output_dir", str(out)],
                       cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    built = json.loads(p.stdout[p.stdout.index("{"):])
    assert not built["already_built"] and built["report"]["_total"]["train_pairs"] == 256
    assert not (out / "checkpoints").exists()  # nothing but the data was prepared
    p = train(out, args)
    assert f"loaded the cached tokenized dataset {built['data_cache']}" in p.stdout
    assert json.loads((out / "data_report.json").read_text()) == built["report"]


@pytest.mark.slow
def test_slow_data_preparation_does_not_time_out_the_waiting_ranks(assets, tiny_pretrained, tmp_path):
    """Rank 0 prepares for 20 s while the collective timeout is 8 s: the other rank polls the store (no
    collective is pending), so nothing times out."""
    out = tmp_path / "slow"
    args = train_args(tiny_pretrained, assets["train"], assets["test"], dtype="fp32", max_steps=2, max_len=32,
                      micro_batch_size=2, dist_timeout_s=8)
    p = train(out, args, env={"RM_FAULT_SLOW_PREPARE": "20"})
    assert "prepared the tokenized dataset" in p.stdout and (out / "reward.pt").is_file()
