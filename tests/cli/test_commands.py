"""Every command's --help, --version, both flag spellings, and did-you-mean for an unknown flag, run as
the installed console scripts."""

from __future__ import annotations

import subprocess

import pytest
from helpers import BIN, ROOT, run_env

from rm_trainer.config import SECTIONS, RunConfig

COMMANDS = ("rm-train", "rm-prepare", "rm-consolidate", "rm-score", "rm-serve", "rm-eval", "rm-export-hf",
            "rm-estimate")
SIDE = {"rm-consolidate": "consolidate", "rm-score": "score", "rm-serve": "serve", "rm-eval": "eval",
        "rm-export-hf": "export_hf"}


def cli(command: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / command), *args], cwd=ROOT, env=run_env(), capture_output=True, text=True,
                          timeout=120)


def side_parser(command: str):
    """The argparse parser behind a side command, to list the options its --help must name."""
    import importlib

    return importlib.import_module(f"rm_trainer.cli.{SIDE[command]}").parser()


@pytest.mark.parametrize("command", COMMANDS)
def test_help_names_every_option_and_version_prints(command):
    p = cli(command, "--help")
    assert p.returncode == 0, p.stderr
    if command in ("rm-train", "rm-prepare", "rm-estimate"):
        for sec in SECTIONS:
            for name in RunConfig.model_fields[sec].annotation.model_fields:
                assert f"--{name}" in p.stdout or f"--{sec}.{name}" in p.stdout, (sec, name)
        assert "(int, default 512)" in p.stdout and "tokens per sequence" in p.stdout  # type, default, description
    else:
        for action in side_parser(command)._actions:
            for flag in action.option_strings:
                assert flag in p.stdout, flag
    v = cli(command, "--version")
    assert v.returncode == 0 and v.stdout.startswith("rm_trainer ")


@pytest.mark.parametrize("command,args,suggestion", [
    ("rm-train", ["--max_lenn", "5"], "--max_len"),
    ("rm-prepare", ["--micro-batch-sise", "2"], "--micro_batch_size"),
    ("rm-consolidate", ["--checkpoint_dir", "ckpt", "--output", "x", "--hf-outt", "y"], "--hf_output_dir"),
    ("rm-score", ["--model", "m", "--data", "i", "--output", "o", "--max-batch-tokns", "5"], "--max_batch_tokens"),
    ("rm-serve", ["--model", "m", "--max-wait-msec", "5"], "--max_wait_ms"),
    ("rm-eval", ["--model", "m", "--data", "d", "--max_batch_tokns", "5"], "--max_batch_tokens"),
    ("rm-export-hf", ["--model", "a", "--output_dir", "b", "--shard-sise", "1GB"], "--hf_shard_size"),
    ("rm-estimate", ["--model", "m", "--wold_size", "8"], "--world_size"),
])
def test_unknown_flag_exits_2_with_a_suggestion(command, args, suggestion):
    p = cli(command, *args)
    assert p.returncode == 2 and f"did you mean {suggestion}" in p.stderr, p.stderr[-2000:]
    assert "Traceback" not in p.stderr


def test_dashed_and_underscored_spellings_are_the_same_flag(demo_assets, tmp_path):
    from rm_trainer.cli.score import parser
    from rm_trainer.cli.train_flags import load_run_config

    base = ["--model", demo_assets["model"], "--data", demo_assets["train"], "--output-dir", str(tmp_path)]
    cfg, _ = load_run_config(base + ["--max-len", "96", "--train.grad-accum", "2", "--lora-r", "4"])
    assert cfg.data.max_len == 96 and cfg.train.grad_accum == 2 and cfg.model.lora_r == 4
    a = parser().parse_args(["--model", "m", "--data", "i", "--output", "o", "--max-batch-tokens=7", "--on-error",
                             "skip"])
    assert a.max_batch_tokens == 7 and a.on_error == "skip"


# ---------------------------------------------------------------- one vocabulary: the boolean idiom, bad values

def test_rm_train_boolean_idiom_parses_to_the_same_config(demo_assets, tmp_path):
    from rm_trainer.cli.train_flags import load_run_config

    base = ["--model", demo_assets["model"], "--data", demo_assets["train"], "--output_dir", str(tmp_path)]
    for flag in ("packing", "tensorboard", "gradient_checkpointing", "output.verify"):
        (a, fa), (b, _), (c, _) = (load_run_config(base + x) for x in (
            [f"--{flag}", "false"], [f"--no-{flag}"], [f"--no_{flag}"]))
        assert a == b == c and any("deprecated" in n for n in fa["notes"])
        assert load_run_config(base + [f"--{flag}", "true"])[0] == load_run_config(base + [f"--{flag}"])[0]



@pytest.mark.parametrize("command,args,names", [
    ("rm-train", ["--model", "m", "--data", "d", "--output_dir", "o", "--lr", "fast"], "train.lr"),
    ("rm-prepare", ["--max_len", "long"], "data.max_len"),
    ("rm-consolidate", ["--checkpoint_dir", "/no/such/checkpoints", "--output", "r.pt"], "/no/such/checkpoints"),
    ("rm-score", ["--model", "m", "--data", "d", "--output", "o", "--max_batch_tokens", "many"], "--max_batch_tokens"),
    ("rm-serve", ["--model", "/no/such/reward.pt"], "/no/such/reward.pt"),
    ("rm-eval", ["--model", "m", "--data", "d", "--padding_side", "up"], "--padding_side"),
    ("rm-export-hf", ["--model", "/no/such/reward.pt", "--output_dir", "hf"], "/no/such/reward.pt"),
    ("rm-estimate", ["--model", "m", "--world_size", "eight"], "--world_size"),
])
def test_a_bad_value_exits_2_naming_it_without_a_traceback(command, args, names, tmp_path):
    p = subprocess.run([str(BIN / command), *args], cwd=tmp_path, env=run_env(), capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2 and names in p.stderr and f"{command}: error:" in p.stderr, p.stderr[-2000:]
    assert "Traceback" not in p.stderr and not (tmp_path / "r.pt").exists() and not (tmp_path / "hf").exists()


@pytest.mark.parametrize("module", ["train", "prepare", "consolidate", "score", "serve", "eval", "export_hf",
                                    "estimate"])
def test_every_command_runs_as_a_module(module):
    import sys

    p = subprocess.run([sys.executable, "-m", f"rm_trainer.cli.{module}", "--help"], cwd=ROOT, env=run_env(),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "usage: rm-" in p.stdout, p.stderr[-2000:]


def test_the_checked_in_config_reference_is_what_the_generator_prints():
    from rm_trainer.cli.config_doc import markdown

    assert (ROOT / "docs" / "config.md").read_text() == markdown(), \
        "docs/config.md is stale: python -m rm_trainer.cli.config_doc docs/config.md"


def test_the_config_reference_generator_never_writes_a_file_named_like_a_flag(tmp_path, monkeypatch):
    from rm_trainer.cli.config_doc import main

    monkeypatch.chdir(tmp_path)
    assert main(["--help"]) == 0 and main(["--out", "x.md"]) == 2
    assert list(tmp_path.iterdir()) == []  # a stray `--help` file was once committed this way
    assert main(["ref.md"]) == 0 and (tmp_path / "ref.md").read_text().startswith("# Configuration reference")
