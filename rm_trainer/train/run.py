"""The training run, top to bottom: data -> model -> engine -> steps -> end of run. Each concern has an
owner that decides for itself: the data cache (data/cache.py), the step (step.py), evaluation
(evaluator.py), checkpoints and resume (checkpointer.py), logging (logger.py), the artifact
(artifact/consolidate.py). DeepSpeed stays behind engine.py.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from rm_trainer import objectives
from rm_trainer.artifact.consolidate import consolidate
from rm_trainer.config import RunConfig
from rm_trainer.data.batching import get_preference_iterator
from rm_trainer.data.cache import load_data
from rm_trainer.data.tokenize import load_tokenizer
from rm_trainer.train import engine, sequence_parallel
from rm_trainer.train.best import read_best
from rm_trainer.train.build import build_engine, make_sampler, resolve_layout
from rm_trainer.train.checkpointer import EXIT_PREEMPTED, Checkpointer, Preempted, check_resume
from rm_trainer.train.clock import Clock
from rm_trainer.train.elastic import ensure_universal
from rm_trainer.train.evaluator import Evaluator
from rm_trainer.train.logger import MetricsLogger
from rm_trainer.train.step import SkipGuard, StepOptions, StopFlag, train_step

__all__ = ["EXIT_PREEMPTED", "Plan", "Preempted", "prepare", "train"]


@dataclass
class Plan:
    cfg: RunConfig
    ds_cfg: dict
    resume_from: Path | None  # decided by rank 0; the other ranks get rank 0's whole plan at start-up
    moved: dict | None = None  # world size / ZeRO stage changes since the checkpoint (elastic resume)


def prepare(cfg: RunConfig, world: int | None = None) -> Plan:
    """Everything that can fail on a bad config, before a process group exists. world: the launcher's
    (WORLD_SIZE) unless given (--dry-run --world_size)."""
    cfg = resolve_model(cfg)
    backbone = json.loads((Path(cfg.model.path) / "config.json").read_text())
    world = world or engine.world_size_from_env()
    # --sequence_parallel N checked; DeepSpeed's batch arithmetic over the data-parallel groups: world / N
    ds_cfg, cfg = sequence_parallel.resolve(cfg, world, backbone, cuda=torch.cuda.is_available())
    if os.environ.get("RANK", "0") != "0":
        return Plan(cfg, ds_cfg, None)
    # one rank checks (the launcher stops the others if it fails); train() gives them its plan
    stage = zero_stage(ds_cfg)
    resume_from, resumed_cfg, moved = check_resume(cfg, world, stage)
    if resumed_cfg is not cfg:  # elastic: grad_accum recomputed to keep the checkpoint's global batch
        ds_cfg, cfg = sequence_parallel.resolve(resumed_cfg, world, backbone, cuda=torch.cuda.is_available())
    if moved:
        ds_cfg["checkpoint"] = ds_cfg.get("checkpoint", {}) | {"load_universal": True}
    return Plan(cfg, ds_cfg, resume_from, moved)


def zero_stage(ds_cfg: dict) -> int:
    return int(ds_cfg.get("zero_optimization", {}).get("stage", 0))


def resolve_model(cfg: RunConfig) -> RunConfig:
    """--model reward.pt continues from that reward model through its HF export (see hf_export.hf_folder_for)."""
    if not cfg.model.path.endswith(".pt"):
        return cfg
    from rm_trainer.artifact.hf_export import hf_folder_for

    folder = hf_folder_for(cfg.model.path, cfg.output.output_dir, cfg.data.prepare_timeout_s)
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"path": str(folder)})})


def train(plan: Plan, started: float | None = None) -> dict:
    """A Plan run to its verified reward.pt. started: the process's start (perf_counter; clock.py)."""
    clock = Clock(started)  # where the wall time goes, phase by phase (rank 0's in final_metrics.json)
    (out := Path(plan.cfg.output.output_dir)).mkdir(parents=True, exist_ok=True)
    rt = replace(engine.init_distributed(plan.cfg.train.dist_timeout_s), sp=plan.cfg.train.sequence_parallel)
    plan = engine.broadcast_object(plan)  # rank 0's: the resume target, and grad_accum if it was recomputed
    clock.lap("process_group")
    cfg, t = plan.cfg, plan.cfg.train
    objective = objectives.build(cfg)  # what the run trains: its rows, batches, loss and metrics
    torch.manual_seed(t.seed)

    # ---- data: rank 0 builds or loads the tokenized cache; the others poll for it (no collective)
    tok = load_tokenizer(cfg)
    train_ds, test_ds, sources = data(plan, tok, objective, rt, out)
    global_rows = t.micro_batch_size * t.grad_accum * rt.dp_world
    total = t.max_steps or t.epochs * (len(train_ds) // global_rows)
    clock.lap("data")
    eng, backbone = build_engine(cfg, plan.ds_cfg, rt, objective, total, train_ds, test_ds)
    clock.lap("engine")
    packing, share = resolve_layout(cfg, eng, backbone.config, rt, objective, train_ds, tok.pad_token_id)
    clock.lap("packing_check")
    sampler = make_sampler(cfg, train_ds, rt, packing, share is not None)
    # packing: each micro step's loss sum x data-parallel groups x accum / global rows (step.train_step)
    step_opts = StepOptions(objective, rt.device, rt.dp_world * t.grad_accum / global_rows if packing else None,
                            rt.counts, StopFlag().install())

    # ---- owners: evaluation, checkpoints (and resume), the non-finite guard, logging
    evaluator = Evaluator(cfg, objective, test_ds, rt, tok.pad_token_id, sources)
    ckpt = Checkpointer(cfg, rt, tok, objective=objective, backbone=backbone.config, rows=test_ds or train_ds,
                        zero_stage=zero_stage(plan.ds_cfg), reward_stats=evaluator.reward_stats)
    ckpt.check_space(eng, 1 + cfg.output.hf_export)  # warns now if the run's files cannot fit
    done = ckpt.resume(eng, plan.resume_from, plan.moved)
    guard = SkipGuard(t.max_consecutive_skips, lambda step: sampler.global_batch_indices(step - 1))
    log = make_logger(plan, rt, ckpt.record, done, total)
    clock.lap("setup")

    # ---- the loop: `step` is the number of the optimizer step being taken (1-based)
    try:
        if t.eval_at_start and done == 0 and test_ds is not None:  # e.g. the model this run continues from
            log.eval(0, evaluator.run(eng, 0), evaluator.pairs)
        collate = functools.partial(objective.collate, pad_id=tok.pad_token_id, pack_len=cfg.pack_len, share=share)
        for step, micro_batches in get_preference_iterator(train_ds, sampler, collate, done, total):
            rec = train_step(eng, step, micro_batches, step_opts)
            guard.check(rec)
            log.train_step(rec, eng.grad_norm, guard.total)
            clock.lap("steps")
            evaluated = evaluator.due(step, total)
            if evaluated:
                result = evaluator.run(eng, step, final=step == total)
                log.eval(step, result, evaluator.pairs)
                ckpt.evaluated(step, result)  # keep_best: ranked once this step's checkpoint commits
                clock.lap("eval")
            ckpt.after_step(eng, rec, total, evaluated)  # saves when due; on an agreed stop, saves and raises
            clock.lap("checkpoints")
        last_evaluation_and_save(eng, evaluator, ckpt, total, clock)
    finally:
        log.close()
        ckpt.close()
    return finish(cfg, rt, out, total, evaluator, guard.total, log, eng.offload.totals if eng.offload else None,
                  clock)


def data(plan: Plan, tok, objective, rt: engine.Runtime, out: Path) -> tuple:
    """(train rows, test rows, source names) on every rank (data.cache.load_data). An elastic resume's
    checkpoint is converted by rank 0 meanwhile (minutes at scale), while the others poll."""
    rows = load_data(plan.cfg, tok, objective, rt, out)
    if plan.moved:
        ensure_universal(plan.resume_from, rt, plan.cfg.data.prepare_timeout_s, zero_stage(plan.ds_cfg))
    return rows


def last_evaluation_and_save(eng, evaluator: Evaluator, ckpt: Checkpointer, total: int, clock: Clock) -> None:
    """After the loop: the final evaluation if the loop had none (a run resumed at its very end still reports
    and normalises), then the final checkpoint."""
    if evaluator.test is not None and not evaluator.last:
        ckpt.evaluated(total, evaluator.run(eng, total, final=True))
        clock.lap("eval")
    ckpt.save(eng, total)
    clock.lap("checkpoints")


def make_logger(plan: Plan, rt: engine.Runtime, record, done: int, total: int) -> MetricsLogger:
    """Metrics sinks (rank 0 writes): metrics.jsonl always, then what output.report_to names. A resumed run
    continues the wandb run whose id its checkpoint recorded; the id goes into every later checkpoint."""
    o, cfg = plan.cfg.output, plan.cfg
    wandb = {"config": {"run": cfg.model_dump(mode="json"), "deepspeed": plan.ds_cfg, "world_size": rt.world_size},
             "run_id": record.tracking.get("wandb_run_id"), "project": o.wandb_project} \
        if "wandb" in o.report_to and rt.is_main else None
    log = MetricsLogger(Path(o.output_dir), rt.is_main, o.tensorboard and "tensorboard" in o.report_to, done, total,
                        cfg.train.log_every, wandb)
    if log.wandb_run_id:
        record.tracking["wandb_run_id"] = log.wandb_run_id
    return log


def finish(cfg: RunConfig, rt: engine.Runtime, out: Path, total: int, evaluator: Evaluator, skipped: int,
           log: MetricsLogger, offload: dict | None = None, clock: Clock | None = None) -> dict:
    """End of run. Every rank leaves the process group first; then rank 0 alone writes the held-out
    evaluation's report (OUT/eval/), consolidates, verifies and exports (minutes for a big model) with no
    collective pending, so no rank can time out waiting."""
    engine.leave_process_group()
    sequence_parallel.teardown()  # --sequence_parallel: transformers' attention back for scoring alone
    result = {"steps": total, "eval": evaluator.last, "skipped_steps": skipped}
    if offload is not None:  # --offload_activations, this process's micro steps (rank 0's)
        result["activation_offload"] = offload
        if rt.is_main:
            print(f"[rm_trainer] activation offload on rank 0: {offload['inputs']} checkpointed layer inputs, "
                  f"{offload['offloaded']} of them moved to CPU ({offload['offloaded_bytes'] / 2**30:.3f} GiB), "
                  f"{offload['kept']} kept on the device (the last layer's, or tensors already on the CPU)",
                  flush=True)
    if rt.is_main and evaluator.report is not None:  # each response scored on its own, as rm-eval does
        from rm_trainer.eval import report

        (r_c, r_r), diag = evaluator.report
        report.write(out / "eval", {"model": f"{out.name} at step {evaluator.last_step} (held-out set)",
                                    "files": [cfg.data.test_path or "held-out split"], "truncation": "single",
                                    "diagnostics": diag}, r_c, r_r)
    log.close_tracking(total, out / "eval" if evaluator.report is not None else None)
    clock = clock or Clock()
    clock.lap("report")
    if rt.is_main:
        hf_out = (cfg.output.hf_output_dir or out / "hf") if cfg.output.hf_export else None
        result["reward_pt"] = consolidate(out / "checkpoints", out / "reward.pt", f"step_{total}",
                                          verify=cfg.output.verify, hf_out=hf_out,
                                          hf_shard_size=cfg.output.hf_shard_size,
                                          lora_out=out / "lora_adapter" if cfg.output.lora_export else None)
        if hf_out is not None:
            result["hf"] = result["reward_pt"].pop("hf")
        if cfg.train.keep_best:
            result["best"] = export_best(cfg, out)
        clock.lap("consolidate")
        result["seconds"] = clock.summary()
        print(clock.line(), flush=True)
        (out / "final_metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def export_best(cfg: RunConfig, out: Path) -> dict | None:
    """Rank 0, at the end: the best checkpoint of best.json consolidated, verified and exported as OUT/best/."""
    best = read_best(out / "checkpoints")
    if best is None:
        print(f"[rm_trainer] keep_best: no evaluation ranked a checkpoint by {cfg.train.best_metric}", flush=True)
        return None
    (out / "best").mkdir(exist_ok=True)
    report = consolidate(out / "checkpoints", out / "best" / "reward.pt", best["tag"], verify=cfg.output.verify,
                         hf_out=out / "best" / "hf" if cfg.output.hf_export else None,
                         hf_shard_size=cfg.output.hf_shard_size)
    print(f"[rm_trainer] best checkpoint by {cfg.train.best_metric}: {best['tag']} ({best['value']:.6g}) -> "
          f"{out / 'best'}", flush=True)
    return {"metric": cfg.train.best_metric, "step": best["step"], "value": best["value"], "reward_pt": report}
