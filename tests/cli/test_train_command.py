"""The entry script as users run it: clear errors, exit 2, no traceback, nothing started."""

import json
import subprocess
import sys

from helpers import ROOT, run_env


def run_cli(args, launcher=(sys.executable, "launch/train_reward.py")):
    return subprocess.run([*launcher, *args], cwd=ROOT, env=run_env(), capture_output=True, text=True,
                          timeout=300)


def test_bad_config_lists_every_problem_and_exits_before_any_process_group(tmp_path):
    p = run_cli(["--model", "/nope", "--data", "/none.jsonl", "--lr", "abc", "--bogus_flag", "1",
                 "--output_dir", str(tmp_path / "o")])
    assert p.returncode == 2
    assert "Traceback" not in p.stderr
    for needle in ("train.lr", "unknown option --bogus_flag", "model.path '/nope'", "data.train_path"):
        assert needle in p.stderr, p.stderr
    assert not (tmp_path / "o").exists()  # nothing was started or written


def test_ds_json_conflict_is_reported_before_start(tmp_path, demo_assets):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_batch_size": 7, "zero_optimization": {"stage": 2}}))
    p = run_cli(["--model", demo_assets["model"], "--data", demo_assets["train"], "--ds_config", str(ds),
                 "--output_dir", str(tmp_path / "o")])
    assert p.returncode == 2 and "train_batch_size=7" in p.stderr and "Traceback" not in p.stderr


def test_dry_run_prints_resolved_configs(tmp_path, demo_assets):
    p = run_cli(["--model", demo_assets["model"], "--data", demo_assets["train"], "--dry-run",
                 "--ds_config", "ds_configs/zero3.json", "--micro_batch_size", "3", "--output_dir", str(tmp_path)])
    assert p.returncode == 0, p.stderr
    out = json.JSONDecoder().raw_decode(p.stdout[p.stdout.index("{"):])[0]
    assert out["deepspeed"]["train_micro_batch_size_per_gpu"] == 3 and out["run"]["train"]["micro_batch_size"] == 3
    assert "train/train: " in p.stdout and "\u27e6" in p.stdout  # the data part of the dry run


def test_malformed_data_file_is_a_clear_error(tmp_path, demo_assets):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"chosen": "a", "rejected": "b"}\n{"chosen": "a", "rejected": \n')
    p = run_cli(["--model", demo_assets["model"], "--random_init", "--data", str(bad), "--test_fraction", "0",
                 "--dtype", "fp32", "--output_dir", str(tmp_path / "o")])
    assert p.returncode == 2, p.stderr[-2000:]
    assert f"{bad}:2: invalid JSON" in p.stderr and "Traceback" not in p.stderr
