"""rm-estimate: will a run fit? Parameters (LoRA adapters counted), per-GPU model states from DeepSpeed's
own formulas, and the activations of the 2B forward, for a run config. Reads the model's config.json
only: no weights, no GPU, no process group.

    rm-estimate --model /ckpt/llama3-8b-sft --ds_config ds_configs/zero3.json --world_size 8 \
        --micro_batch_size 4 --max_len 2048 --gradient_checkpointing --gpu_memory_gb 80 [--json]
    rm-estimate --config run.yaml --world_size 64 --gpus_per_node 8

Takes rm-train's flags (and --config files) plus --world_size, --gpus_per_node, --gpu_memory_gb and
--json; data and output folder are not needed.
"""

from __future__ import annotations

import json
import sys

from rm_trainer.cli.parser import note, run, version
from rm_trainer.cli.train_flags import load_run_config, train_help

PROG = "rm-estimate"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(train_help(PROG, model_only=True) + "\n\n  --json, --no-json  print the estimate as JSON")
        return 0
    if "--version" in argv:
        print(version())
        return 0
    as_json = "--json" in argv
    argv = [a for a in argv if a not in ("--json", "--no-json", "--no_json")]
    return run(PROG, lambda: _estimate(argv, as_json))


def _estimate(argv: list[str], as_json: bool) -> int:
    from dataclasses import asdict
    from pathlib import Path

    cfg, flags = load_run_config(argv, model_only=True)  # a config error is reported before torch loads
    for n in flags.pop("notes", []):
        note(PROG, n)
    from rm_trainer.train.engine import world_size_from_env
    from rm_trainer.train.estimate import estimate_run, report
    from rm_trainer.train.sequence_parallel import resolve

    world = flags.setdefault("world_size", world_size_from_env())
    backbone = json.loads((Path(cfg.model.path) / "config.json").read_text())
    ds_cfg, cfg = resolve(cfg, world, backbone)  # as rm-train resolves it; --sequence_parallel N checked
    e = estimate_run(cfg, ds_cfg, flags)
    print(json.dumps(asdict(e), indent=2) if as_json else report(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
