"""Console entry points. User errors print one clear message and exit 2, without a traceback."""

from __future__ import annotations

import argparse
import json
import sys

from rm_trainer.config import ConfigError, load_run_config


def _fail(msg: str) -> int:
    print(f"rm_trainer: error: {msg}", file=sys.stderr, flush=True)
    return 2


def main_train(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        from rm_trainer.config import RunConfig

        print(__doc__ or "")
        print(json.dumps(RunConfig.model_json_schema(), indent=1))
        return 0
    try:
        cfg, flags = load_run_config(argv)
        from rm_trainer.trainer import prepare

        cfg, ds_cfg = prepare(cfg)
    except ConfigError as e:
        return _fail(str(e))
    if flags.get("dry_run"):
        return dry_run(cfg, ds_cfg, flags)
    from rm_trainer.trainer import EXIT_PREEMPTED, Preempted, train

    try:
        result = train(cfg, ds_cfg)
    except ValueError as e:  # data and size errors found after start-up; still user errors
        return _fail(str(e))
    except Preempted as e:
        print(f"rm_trainer: {e}", file=sys.stderr, flush=True)
        return EXIT_PREEMPTED
    if "reward_pt" in result:
        print(json.dumps({"final": result}, indent=2), flush=True)
    return 0


def dry_run(cfg, ds_cfg: dict, flags: dict) -> int:
    """Resolved configs + memory estimate; starts no process group and loads no weights."""
    from dataclasses import asdict

    from rm_trainer.config import world_size_from_env
    from rm_trainer.estimate import estimate, report

    world = flags.get("world_size") or world_size_from_env()
    e = estimate(cfg.model.path, ds_cfg, world, flags.get("gpus_per_node"), cfg.train.micro_batch_size,
                 cfg.data.max_len, cfg.train.dtype, cfg.model.gradient_checkpointing, flags.get("gpu_memory_gb"))
    print(json.dumps({"run": cfg.model_dump(mode="json"), "deepspeed": ds_cfg, "estimate": asdict(e)}, indent=2))
    print(report(e), flush=True)
    from rm_trainer.data import dry_run_report, load_tokenizer

    try:
        print(dry_run_report(cfg, load_tokenizer(cfg)), flush=True)
    except ValueError as err:
        return _fail(str(err))
    return 0


def main_consolidate(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Merge a ZeRO-2/3 checkpoint into a verified reward.pt. "
                                "Reads pickled DeepSpeed files: use only on checkpoints you trust.")
    p.add_argument("checkpoint_dir", help="OUT/checkpoints (the folder holding 'latest' and step_N/)")
    p.add_argument("--out", required=True, help="path of the reward.pt to write")
    p.add_argument("--tag", default=None, help="checkpoint tag (default: the one named in 'latest')")
    p.add_argument("--no-verify", action="store_true", help="skip re-scoring the probe batch")
    args = p.parse_args(argv)
    from rm_trainer.artifact import consolidate

    try:
        report = consolidate(args.checkpoint_dir, args.out, args.tag, verify=not args.no_verify)
    except ValueError as e:
        return _fail(str(e))
    print(json.dumps(report, indent=2))
    return 0
