"""Console entry points. A user error (rm_trainer.errors.UserError: a config value, a data row, a damaged
checkpoint) prints one clear message and exits 2, without a traceback. Any other exception is a bug and
keeps its traceback."""

from __future__ import annotations

import json
import sys

from rm_trainer.config import load_run_config
from rm_trainer.errors import UserError


def _fail(msg: str) -> int:
    print(f"rm_trainer: error: {msg}", file=sys.stderr, flush=True)
    return 2


def main_train(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        from rm_trainer.cli_surface import train_help

        print(train_help())
        return 0
    if "--version" in argv:
        from rm_trainer.cli_surface import version

        print(version())
        return 0
    from rm_trainer.trainer import EXIT_PREEMPTED, Preempted, prepare, train

    try:
        cfg, flags = load_run_config(argv)
        if flags.get("prepare_only"):
            return prepare_only(cfg)
        plan = prepare(cfg)
        if flags.get("dry_run"):
            return dry_run(plan.cfg, plan.ds_cfg, flags)
        result = train(plan)
    except UserError as e:
        return _fail(str(e))
    except Preempted as e:
        print(f"rm_trainer: {e}", file=sys.stderr, flush=True)
        return EXIT_PREEMPTED
    if "reward_pt" in result:
        print(json.dumps({"final": result}, indent=2), flush=True)
    return 0


def main_prepare(argv: list[str] | None = None) -> int:
    """rm-prepare: build the tokenized-data cache of a run config in one process (a CPU node), ahead of
    the GPU job that will load it. Takes the same flags as rm-train."""
    return main_train(["--prepare_only", *(sys.argv[1:] if argv is None else argv)])


def prepare_only(cfg) -> int:
    from rm_trainer.data import load_tokenizer
    from rm_trainer.data_cache import prepare_or_load
    from rm_trainer.trainer import resolve_model

    cfg = resolve_model(cfg)
    dest, hit = prepare_or_load(cfg, load_tokenizer(cfg))
    report = json.loads((dest / "report.json").read_text())
    print(json.dumps({"data_cache": str(dest), "already_built": hit, "report": report}, indent=2), flush=True)
    return 0


def dry_run(cfg, ds_cfg: dict, flags: dict) -> int:
    """Resolved configs + memory estimate; starts no process group and loads no weights."""
    from dataclasses import asdict

    from rm_trainer.config import world_size_from_env
    from rm_trainer.data import dry_run_report, load_tokenizer
    from rm_trainer.estimate import estimate, report

    world = flags.get("world_size") or world_size_from_env()
    e = estimate(cfg.model.path, ds_cfg, world, flags.get("gpus_per_node"), cfg.train.micro_batch_size,
                 cfg.data.max_len, cfg.train.dtype, cfg.model.gradient_checkpointing, flags.get("gpu_memory_gb"),
                 cfg.model.model_dump())
    print(json.dumps({"run": cfg.model_dump(mode="json"), "deepspeed": ds_cfg, "estimate": asdict(e)}, indent=2))
    print(report(e), flush=True)
    print(dry_run_report(cfg, load_tokenizer(cfg)), flush=True)
    return 0


def main_consolidate(argv: list[str] | None = None) -> int:
    from rm_trainer.cli_surface import Parser

    p = Parser(prog="rm-consolidate", description="Merge a ZeRO-2/3 checkpoint into a verified reward.pt. "
                                "Reads pickled DeepSpeed files: use only on checkpoints you trust.")
    p.add_argument("checkpoint_dir", help="OUT/checkpoints (the folder holding 'latest' and step_N/)")
    p.add_argument("--out", required=True, help="path of the reward.pt to write")
    p.add_argument("--tag", default=None, help="checkpoint tag (default: the one named in 'latest')")
    p.add_argument("--no_verify", action="store_true", help="skip re-scoring the probe batch")
    p.add_argument("--hf_out", default=None, help="also write the HF folder here (from the same tensors)")
    p.add_argument("--hf_shard_size", default="5GB", help="largest safetensors shard of the HF folder")
    p.add_argument("--lora_out", default=None, help="LoRA runs: also write the unmerged adapters + head here as "
                   "a peft adapter folder")
    args = p.parse_args(argv)
    from rm_trainer.artifact import consolidate

    try:
        report = consolidate(args.checkpoint_dir, args.out, args.tag, verify=not args.no_verify,
                             hf_out=args.hf_out, hf_shard_size=args.hf_shard_size, lora_out=args.lora_out)
    except UserError as e:
        return _fail(str(e))
    print(json.dumps(report, indent=2))
    return 0
