import json

import pytest

from rm_trainer.cli.train_flags import load_run_config
from rm_trainer.errors import ConfigError
from rm_trainer.train.ds_config import resolve_ds_config


@pytest.fixture
def base(demo_assets):
    return ["--model", demo_assets["model"], "--data", demo_assets["train"], "--output_dir", "/tmp/x"]


def ds_file(tmp_path, data):
    p = tmp_path / "ds.json"
    p.write_text(json.dumps(data))
    return str(p)


def test_shipped_configs_resolve(base):
    for name, stage in (("zero2", 2), ("zero3", 3), ("zero3_offload", 3)):
        cfg, _ = load_run_config(base + ["--ds_config", f"ds_configs/{name}.json", "--micro_batch_size", "3",
                                         "--grad_accum", "2", "--dtype", "bf16", "--max_grad_norm", "0.5"])
        ds, cfg2 = resolve_ds_config(cfg, world_size=4, hidden_size=64)
        assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 2
        assert ds["train_batch_size"] == 3 * 2 * 4
        assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
        assert ds["gradient_clipping"] == 0.5
        assert ds["zero_optimization"]["stage"] == stage
        if stage == 3:
            assert ds["zero_optimization"]["stage3_param_persistence_threshold"] == 640
        if "optimizer" in ds:
            assert ds["optimizer"]["params"]["lr"] == cfg.train.lr
            assert ds["optimizer"]["params"]["torch_adam"] is True  # no CUDA here


def test_explicit_json_values_are_adopted_when_run_config_is_default(tmp_path, base):
    cfg, _ = load_run_config(base + ["--ds_config", ds_file(tmp_path, {
        "train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 2, "train_batch_size": 32,
        "bf16": {"enabled": False}, "zero_optimization": {"stage": 2}})])
    ds, cfg2 = resolve_ds_config(cfg, world_size=2)
    assert cfg2.train.micro_batch_size == 8 and cfg2.train.grad_accum == 2
    assert cfg2.train.dtype == "fp32" and ds["bf16"]["enabled"] is False


def test_conflicts_name_both_sides_and_are_all_reported(tmp_path, base):
    cfg, _ = load_run_config(base + ["--micro_batch_size", "4", "--dtype", "fp32", "--ds_config", ds_file(tmp_path, {
        "train_micro_batch_size_per_gpu": 8, "train_batch_size": 100, "bf16": {"enabled": True},
        "zero_optimization": {"stage": 3, "sub_group_size": "auto"}})])
    with pytest.raises(ConfigError) as e:
        resolve_ds_config(cfg, world_size=2)
    msg = str(e.value)
    assert "train_micro_batch_size_per_gpu=8 contradicts run config train.micro_batch_size=4" in msg
    assert "train_batch_size=100 but micro_batch_size (4) x grad_accum (1) x world_size (2) = 8" in msg
    assert "bf16.enabled=true contradicts run config train.dtype=fp32" in msg
    assert 'zero_optimization.sub_group_size is "auto"' in msg
    assert len(e.value.problems) == 4


def test_invalid_json_names_line(tmp_path, base):
    p = tmp_path / "ds.json"
    p.write_text('{\n "train_batch_size": 4,\n}\n')
    cfg, _ = load_run_config(base + ["--ds_config", str(p)])
    with pytest.raises(ConfigError, match=r"ds\.json: invalid JSON at line 3"):
        resolve_ds_config(cfg, world_size=1)
