"""Every command's --help, --version, both flag spellings, and did-you-mean for an unknown flag, run as
the installed console scripts."""

from __future__ import annotations

import subprocess

import pytest
from helpers import BIN, ROOT, run_env

from rm_trainer.config import SECTIONS, RunConfig

COMMANDS = ("rm-train", "rm-prepare", "rm-consolidate", "rm-score", "rm-serve", "rm-eval", "rm-export-hf",
            "rm-estimate")


def cli(command: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / command), *args], cwd=ROOT, env=run_env(), capture_output=True, text=True,
                          timeout=120)


def side_parser(command: str):
    """The argparse parser behind a side command, to list the options its --help must name."""
    import rm_trainer.cli as c
    import rm_trainer.estimate as e
    import rm_trainer.hf_export as h
    import rm_trainer.rm_eval as ev
    import rm_trainer.scoring as s
    import rm_trainer.serve as sv

    captured = {}

    def grab(self, args=None, namespace=None):
        captured["parser"] = self
        raise SystemExit(0)

    from rm_trainer.cli_surface import Parser

    original = Parser.parse_args
    Parser.parse_args = grab
    try:
        with pytest.raises(SystemExit):
            {"rm-consolidate": c.main_consolidate, "rm-score": s.main, "rm-serve": sv.main, "rm-eval": ev.main,
             "rm-export-hf": h.main, "rm-estimate": e.main}[command]([])
    finally:
        Parser.parse_args = original
    return captured["parser"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_names_every_option_and_version_prints(command):
    p = cli(command, "--help")
    assert p.returncode == 0, p.stderr
    if command in ("rm-train", "rm-prepare"):
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
    ("rm-consolidate", ["ckpt", "--out", "x", "--hf-outt", "y"], "--hf_out"),
    ("rm-score", ["--model", "m", "--input", "i", "--output", "o", "--max-batch-tokns", "5"], "--max_batch_tokens"),
    ("rm-serve", ["--model", "m", "--max-wait-msec", "5"], "--max_wait_ms"),
    ("rm-eval", ["--model", "m", "--data", "d", "--max_batch_tokns", "5"], "--max_batch_tokens"),
    ("rm-export-hf", ["a", "b", "--shard-sise", "1GB"], "--shard_size"),
    ("rm-estimate", ["--model", "m", "--wold_size", "8"], "--world_size"),
])
def test_unknown_flag_exits_2_with_a_suggestion(command, args, suggestion):
    p = cli(command, *args)
    assert p.returncode == 2 and f"did you mean {suggestion}" in p.stderr, p.stderr[-2000:]
    assert "Traceback" not in p.stderr


def test_dashed_and_underscored_spellings_are_the_same_flag(demo_assets, tmp_path):
    from rm_trainer.config import load_run_config
    from rm_trainer.scoring import parser

    base = ["--model", demo_assets["model"], "--data", demo_assets["train"], "--output-dir", str(tmp_path)]
    cfg, _ = load_run_config(base + ["--max-len", "96", "--train.grad-accum", "2", "--lora-r", "4"])
    assert cfg.data.max_len == 96 and cfg.train.grad_accum == 2 and cfg.model.lora_r == 4
    a = parser().parse_args(["--model", "m", "--input", "i", "--output", "o", "--max-batch-tokens=7", "--on-error",
                             "skip"])
    assert a.max_batch_tokens == 7 and a.on_error == "skip"
