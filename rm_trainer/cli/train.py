"""rm-train: train a reward model (also `python -m rm_trainer.cli.train`, and launch/train_reward.py,
under deepspeed, torchrun, srun or plain python). `--dry-run` prints the resolved configs, the memory
estimate and the data report and starts nothing; `--prepare_only` is rm-prepare."""

from __future__ import annotations

import atexit
import json
import os
import sys
import time

from rm_trainer.cli.parser import note, run, version
from rm_trainer.cli.train_flags import load_run_config, train_help

PROG = "rm-train"


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(train_help(prog))
        return 0
    if "--version" in argv:
        print(version())
        return 0
    return run(prog, lambda: _train(argv, prog))


def entry(argv: list[str] | None = None) -> None:
    """The rm-train process (the console script, launch/train_reward.py): main(), then an exit that skips the
    interpreter's final teardown. torch's gloo process groups keep their C++ worker threads after
    destroy_process_group, and tearing those down while the interpreter finalizes can abort a rank that has
    finished ("terminate called without an active exception", SIGABRT; once in a CI run of about 300
    multi-rank runs; see pytorch/pytorch#179291). The launcher then reports the whole run as failed. By the
    time main() returns every file of the run is written and closed, so the process runs Python's exit
    handlers itself, flushes, and ends. An exception (a bug) still propagates with its traceback."""
    code = main(argv)
    atexit._run_exitfuncs()  # what a normal exit would run: logging, wandb, temporary files
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _train(argv: list[str], prog: str) -> int:
    started = time.perf_counter()
    cfg, flags = load_run_config(argv)
    for n in flags.pop("notes", []):
        note(prog, n)
    if flags.get("prepare_only"):
        return prepare_only(cfg)
    from rm_trainer.train.run import EXIT_PREEMPTED, Preempted, prepare, train  # torch, deepspeed: from here on

    plan = prepare(cfg, flags.get("world_size") if flags.get("dry_run") else None)
    if flags.get("dry_run"):
        return dry_run(plan.cfg, plan.ds_cfg, flags)
    try:
        result = train(plan, started)
    except Preempted as e:
        print(f"{prog}: {e}", file=sys.stderr, flush=True)
        return EXIT_PREEMPTED
    if "reward_pt" in result:
        print(json.dumps({"final": result}, indent=2), flush=True)
    return 0


def prepare_only(cfg) -> int:
    """Build (or find) the tokenized-data cache of the run config in this one process, and say where."""
    from rm_trainer import objectives
    from rm_trainer.data.cache import prepare_or_load
    from rm_trainer.data.tokenize import load_tokenizer
    from rm_trainer.train.run import resolve_model

    cfg = resolve_model(cfg)
    dest, hit = prepare_or_load(cfg, load_tokenizer(cfg), objectives.build(cfg))
    report = json.loads((dest / "report.json").read_text())
    print(json.dumps({"data_cache": str(dest), "already_built": hit, "report": report}, indent=2), flush=True)
    return 0


def dry_run(cfg, ds_cfg: dict, flags: dict) -> int:
    """Resolved configs + memory estimate + data report; starts no process group and loads no weights."""
    from dataclasses import asdict

    from rm_trainer import objectives
    from rm_trainer.data.sources import dry_run_report
    from rm_trainer.data.tokenize import load_tokenizer
    from rm_trainer.train.estimate import estimate_run, report

    e = estimate_run(cfg, ds_cfg, flags)
    print(json.dumps({"run": cfg.model_dump(mode="json"), "deepspeed": ds_cfg, "estimate": asdict(e)}, indent=2))
    print(report(e), flush=True)
    print(dry_run_report(cfg, load_tokenizer(cfg), objectives.build(cfg)), flush=True)
    return 0


if __name__ == "__main__":
    entry()
