import json

import pytest

from rm_trainer.cli.train_flags import load_run_config, parse_cli
from rm_trainer.errors import ConfigError


@pytest.fixture
def paths(demo_assets):
    return ["--model", demo_assets["model"], "--data", demo_assets["train"], "--output_dir", "/tmp/x"]


def test_short_and_dotted_overrides_and_float_parsing(paths):
    cfg, flags = load_run_config(paths + ["--lr", "1e-5", "--max_len", "768", "--train.grad_accum", "4",
                                          "--gradient_checkpointing", "--micro_batch_size=2"])
    assert cfg.train.lr == 1e-5 and isinstance(cfg.train.lr, float)
    assert cfg.data.max_len == 768
    assert cfg.train.grad_accum == 4 and cfg.train.micro_batch_size == 2
    assert cfg.model.gradient_checkpointing is True
    assert flags == {}


def test_deepspeed_local_rank_flag_is_accepted(paths):
    cfg, _ = load_run_config(["--local_rank=1"] + paths + ["--local_rank", "0"])
    assert cfg.data.train_path is not None


def test_yaml_file_then_cli_override(tmp_path, paths):
    f = tmp_path / "run.yaml"
    f.write_text("train:\n  lr: 1e-5\n  epochs: 3\ndata:\n  max_len: 256\n")
    cfg, _ = load_run_config(["--config", str(f)] + paths + ["--epochs", "2"])
    assert cfg.train.lr == 1e-5  # YAML 1.1 reads 1e-5 as a string; it must still be a float
    assert cfg.train.epochs == 2 and cfg.data.max_len == 256


def test_every_problem_reported_at_once(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("train:\n  lr: -1\n  bogus: 3\nmodel:\n  path: /nope\n")
    with pytest.raises(ConfigError) as e:
        load_run_config(["--config", str(f), "--max_len", "abc", "--micro_batch_sise", "2",
                         "--data", "/no/such.jsonl", "--output_dir", "/tmp/o"])
    msg = str(e.value)
    for needle in ("train.lr", "train.bogus: unknown field", "data.max_len",
                   "unknown option --micro_batch_sise (did you mean --micro_batch_size?)"):
        assert needle in msg, msg
    assert len(e.value.problems) >= 4


def test_missing_paths_named(demo_assets):
    with pytest.raises(ConfigError) as e:
        load_run_config(["--model", "/nope", "--data", "/no/such.jsonl", "--output_dir", "/tmp/o"])
    msg = str(e.value)
    assert "model.path '/nope'" in msg and "data.train_path /no/such.jsonl: file not found" in msg


def test_required_fields_listed_together():
    with pytest.raises(ConfigError) as e:
        load_run_config([])
    assert {"model.path", "data.train_path", "output.output_dir"} <= {
        p.split(" ")[0] for p in e.value.problems}


def test_json_config_and_dry_run_flag(tmp_path, paths):
    f = tmp_path / "run.json"
    f.write_text(json.dumps({"train": {"adam_betas": [0.9, 0.99]}}))
    cfg, flags = load_run_config(["--config", str(f), "--dry-run"] + paths)
    assert cfg.train.adam_betas == (0.9, 0.99) and flags == {"dry_run": True}


def test_negative_number_value_is_not_a_flag():
    over, problems, _ = parse_cli(["--seed", "-3"])
    assert over == {"train": {"seed": "-3"}} and not problems


def test_lora_and_centering_flags_and_their_checks(paths, tmp_path):
    cfg, _ = load_run_config(paths + ["--lora_r", "8", "--lora_target", "q_proj,v_proj", "--lora_export",
                                      "--center_rewards_coefficient", "0.01", "--eval_at_start"])
    assert cfg.model.lora_r == 8 and cfg.model.lora_target == ["q_proj", "v_proj"] and cfg.output.lora_export
    assert cfg.train.center_rewards_coefficient == 0.01 and cfg.train.eval_at_start
    pt = tmp_path / "reward.pt"  # not there
    with pytest.raises(ConfigError) as e:
        load_run_config(["--model", str(pt), "--data", paths[3], "--output_dir", "/tmp/o", "--lora_export"])
    msg = str(e.value)
    for needle in ("output.lora_export needs LoRA", f"model.path '{pt}': file not found (a reward.pt"):
        assert needle in msg, msg


def test_the_davidson_tie_loss_needs_a_tie_column(paths):
    cfg, _ = load_run_config(paths + ["--tie_key", "tie", "--tie_loss", "davidson"])
    assert (cfg.data.tie_key, cfg.train.tie_loss) == ("tie", "davidson")
    with pytest.raises(ConfigError, match=r"train.tie_loss davidson models tied pairs: name their column with "
                                          r"data.tie_key \(--tie_key tie\)"):
        load_run_config(paths + ["--tie_loss", "davidson"])
    with pytest.raises(ConfigError, match="tie_loss"):
        load_run_config(paths + ["--tie_key", "tie", "--tie_loss", "bradley"])


def test_regression_flags_parse_and_every_attribute_problem_is_named(paths):
    reg = paths + ["--objective", "regression", "--attributes", "helpfulness,verbosity"]
    cfg, _ = load_run_config(reg + ["--reward_weights", "helpfulness=1,verbosity=-0.3", "--attribute_weights",
                                    "verbosity=0.5", "--missing_attributes", "mask"])
    assert cfg.data.attributes == ["helpfulness", "verbosity"] and cfg.data.missing_attributes == "mask"
    assert cfg.model.reward_weights == {"helpfulness": 1.0, "verbosity": -0.3}
    assert cfg.train.attribute_weights == {"verbosity": 0.5}
    cfg, _ = load_run_config(paths + ["--objective", "bt+regression", "--attributes", "h", "--bt_weight", "0.5"])
    assert (cfg.train.objective, cfg.train.bt_weight) == ("bt+regression", 0.5)
    cases = {
        r"train.objective regression needs data.attributes": paths + ["--objective", "regression"],
        r"data.attributes: rated attributes are read by --objective regression": paths + ["--attributes", "a"],
        r"train.attribute_weights names length, not among data.attributes \(helpfulness, verbosity\)":
            reg + ["--attribute_weights", "length=1"],
        r"'helpfulness' is not name=number": reg + ["--reward_weights", "helpfulness"],
        r"model.reward_weights are all 0": reg + ["--reward_weights", "helpfulness=0"],
        r"must be >= 0, with at least one attribute above 0": reg + ["--attribute_weights", "verbosity=-1"],
        r"data.attributes names an attribute twice": paths + ["--objective", "regression", "--attributes", "a,a"],
        r"data.tie_key apply to pairs": reg + ["--tie_key", "tie"],
        r"data.format rating holds rated responses .* set --objective regression": paths + ["--format", "rating"],
        r"train.objective bt\+regression needs data.attributes": paths + ["--objective", "bt+regression"],
        r"bt\+regression reads pair sources and rating sources, each decided from its first row: leave "
        r"data.format auto": reg[:-4] + ["--objective", "bt+regression", "--attributes", "a", "--format", "rating"],
    }
    for needle, argv in cases.items():
        with pytest.raises(ConfigError, match=needle):
            load_run_config(argv)


def test_activation_offload_needs_checkpointing(paths):
    cfg, _ = load_run_config(paths + ["--gradient_checkpointing", "--offload_activations"])
    assert cfg.model.offload_activations and cfg.model.gradient_checkpointing
    with pytest.raises(ConfigError, match=r"model.offload_activations moves the checkpointed layer inputs to CPU: "
                                          r"it needs model.gradient_checkpointing \(--gradient_checkpointing\)"):
        load_run_config(paths + ["--offload_activations"])
