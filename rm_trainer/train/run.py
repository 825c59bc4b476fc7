"""The training run, top to bottom: data -> model -> engine -> steps -> end of run. Each concern has an
owner that decides for itself: the data cache (data/cache.py), the step (step.py), evaluation
(evaluator.py), checkpoints and resume (checkpointer.py), logging (logger.py), the artifact
(artifact/consolidate.py). DeepSpeed stays behind engine.py.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from rm_trainer import moe
from rm_trainer.artifact.consolidate import consolidate
from rm_trainer.backbone import build_backbone
from rm_trainer.config import RunConfig
from rm_trainer.data.batching import PairSampler, get_preference_iterator
from rm_trainer.data.cache import load_data
from rm_trainer.data.rankings import collate_rankings
from rm_trainer.data.ratings import collate_ratings
from rm_trainer.data.tokenize import load_tokenizer
from rm_trainer.errors import ConfigError, DataError
from rm_trainer.lora import apply_lora, trainable_summary
from rm_trainer.model import DTYPES, RewardModel, check_packing, disable_dropout, enable_checkpointing
from rm_trainer.objectives import Objective
from rm_trainer.train import engine, long_context, sequence_parallel
from rm_trainer.train.best import read_best
from rm_trainer.train.checkpointer import (
    EXIT_PREEMPTED,
    Checkpointer,
    Preempted,
    check_resume,
    make_probe,
    run_record,
)
from rm_trainer.train.ds_config import fill_scheduler_steps
from rm_trainer.train.elastic import ensure_universal
from rm_trainer.train.evaluator import Evaluator
from rm_trainer.train.logger import MetricsLogger
from rm_trainer.train.optim import build_optimizer, scheduler_factory, warmup_steps
from rm_trainer.train.step import SkipGuard, StopFlag, train_step

# train.objective -> the collate of its rows (pairs: data.batching's own)
ROW_COLLATE = {"ranking": collate_rankings, "regression": collate_ratings, "bt+regression": collate_rankings}

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


def train(plan: Plan) -> dict:
    out = Path(plan.cfg.output.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rt = replace(engine.init_distributed(plan.cfg.train.dist_timeout_s), sp=plan.cfg.train.sequence_parallel)
    plan = engine.broadcast_object(plan)  # rank 0's: the resume target, and grad_accum if it was recomputed
    cfg, t = plan.cfg, plan.cfg.train
    stop = StopFlag().install()
    torch.manual_seed(t.seed)

    # ---- data: rank 0 builds or loads the tokenized cache; the others poll for it (no collective)
    tok = load_tokenizer(cfg)
    train_ds, test_ds, sources = load_data(cfg, tok, rt, out)
    if plan.moved:  # rank 0 converts the checkpoint once (minutes at scale) while the others poll
        ensure_universal(plan.resume_from, rt, cfg.data.prepare_timeout_s, zero_stage(plan.ds_cfg))
    global_batch = t.micro_batch_size * t.grad_accum * rt.dp_world
    total = t.max_steps or t.epochs * (len(train_ds) // global_batch)
    eng, backbone = build_engine(cfg, plan.ds_cfg, rt, total, train_ds, global_batch, test_ds)
    packing = resolve_packing(cfg, eng, backbone.config, rt)  # --packing auto: proven on this live engine
    sampler = make_sampler(cfg, train_ds, rt, packing)
    # packing: each micro step's pair-loss sum x data-parallel groups x accum / global pairs (step.train_step)
    loss_scale = rt.dp_world * t.grad_accum / global_batch if packing else None

    # ---- owners: evaluation, checkpoints (and resume), the non-finite guard, logging
    objective = Objective.of(cfg)  # rankings (each response once per step) and rated rows: their own batches
    evaluator = Evaluator(test_ds, t.eval_every, cfg.eval_batch_size, rt, tok.pad_token_id, sources, objective)
    record = run_record(cfg, backbone, tok, rt.world_size, rt.is_main, zero_stage(plan.ds_cfg))
    probe = make_probe(test_ds if test_ds else train_ds, tok.pad_token_id)
    ckpt = Checkpointer(cfg, rt, tok, record, probe, evaluator.reward_stats)
    ckpt.check_space(eng, 1 + cfg.output.hf_export)  # warns now if the run's files cannot fit
    done = ckpt.resume(eng, plan.resume_from, plan.moved)
    guard = SkipGuard(t.max_consecutive_skips, lambda step: sampler.global_batch_indices(step - 1))
    log = make_logger(plan, rt, record, done, total)

    # ---- the loop: `step` is the number of the optimizer step being taken (1-based)
    try:
        if t.eval_at_start and done == 0 and test_ds is not None:  # e.g. the model this run continues from
            log.eval(0, evaluator.run(eng, 0), evaluator.pairs)
        batches = get_preference_iterator(train_ds, sampler, tok.pad_token_id, done, total, cfg.pack_len,
                                          ROW_COLLATE.get(t.objective))
        for step, micro_batches in batches:
            rec = train_step(eng, step, micro_batches, rt.device, cfg.model.reward_path == "fused", bool(stop),
                             loss_scale, t.center_rewards_coefficient, rt.counts, objective)
            guard.check(rec)
            log.train_step(rec, eng.grad_norm, guard.total)
            evaluated = evaluator.due(step, total)
            if evaluated:
                result = evaluator.run(eng, step, final=step == total)
                log.eval(step, result, evaluator.pairs)
                ckpt.evaluated(step, result)  # keep_best: ranked once this step's checkpoint commits
            ckpt.after_step(eng, rec, total, evaluated)  # saves when due; on an agreed stop, saves and raises
        if test_ds is not None and not evaluator.last:  # resumed at the very end: still report and normalise
            ckpt.evaluated(total, evaluator.run(eng, total, final=True))
        ckpt.save(eng, total)
    finally:
        log.close()
        ckpt.close()
    offload = eng.offload.totals if eng.offload else None  # counts of this rank's hooks
    return finish(cfg, rt, out, total, evaluator, guard.total, log, offload)


def make_sampler(cfg: RunConfig, train_ds, rt: engine.Runtime, packing: bool) -> PairSampler:
    t = cfg.train
    lengths = {}
    names = ("longest", "tokens") if t.objective in ROW_COLLATE else ("chosen_len", "rejected_len")
    if t.batching == "grouped" or packing:  # token counts of every row, read as two arrow columns
        lengths = {k: train_ds.data.column(k).to_numpy() for k in names}
    return PairSampler(len(train_ds), t.micro_batch_size, t.grad_accum, rt.dp_world, rt.dp_rank, t.seed,
                       t.batching, packing, **lengths)


def resolve_packing(cfg: RunConfig, eng, backbone_config, rt: engine.Runtime) -> bool:
    """train.packing on: packed rows must score like padded ones through the live engine (model.check_packing),
    else a config error; auto: packing where that holds and batching is grouped (random asks for the pairs
    as drawn), else grouped batching, said in one line; off: padded. Every rank runs the check (a forward:
    collective under ZeRO-3) and they agree on the outcome before any rank acts on it."""
    mode = cfg.train.packing
    if mode == "off" or (mode == "auto" and cfg.train.batching == "random"):
        return False
    eng.eval()  # the same network for both forwards, dropout or not
    problem = check_packing(eng, backbone_config, rt.device)
    eng.train()
    if engine.host_sum(int(problem is not None)):  # one rank's failure is every rank's
        problem = problem or "another rank's packed and padded rewards differ"
        if mode == "on":
            raise ConfigError([f"train.packing: {problem}"])
        if rt.is_main:
            print(f"[rm_trainer] packing off ({problem}); batching grouped by length instead", flush=True)
        return False
    if rt.is_main and mode == "auto":
        print("[rm_trainer] packing on: packed rows score like padded ones for this model and attention "
              "(--no-packing for padded batches)", flush=True)
    return True


def build_engine(cfg: RunConfig, ds_cfg: dict, rt: engine.Runtime, total: int, train_ds, global_batch: int,
                 test_ds) -> tuple:
    """Backbone + head -> DeepSpeed engine. Under ZeRO-3 `z3` must stay referenced until initialize:
    transformers builds the layers already partitioned while it is alive."""
    t, n_train = cfg.train, len(train_ds)
    if total == 0:
        raise DataError(f"{n_train} training pairs cannot fill one global batch of {global_batch} "
                        "(micro_batch_size x grad_accum x world_size); lower them")
    fill_scheduler_steps(ds_cfg, total, warmup_steps(t, total))
    if rt.is_main:
        (Path(cfg.output.output_dir) / "run_config.json").write_text(json.dumps(
            {"run": cfg.model_dump(mode="json"), "deepspeed": ds_cfg, "world_size": rt.world_size,
             "total_steps": total, "train_pairs": n_train,
             "test_pairs": len(test_ds) if test_ds is not None else 0}, indent=2) + "\n")
    z3 = engine.zero3_context(ds_cfg)
    backbone, head = build_backbone(cfg.model.path, DTYPES[t.dtype], cfg.model.random_init,
                                    cfg.model.attn_implementation)
    tiled = long_context.tile_mlps(backbone) if cfg.model.tiled_mlp else 0
    if cfg.model.tiled_mlp and rt.is_main:
        print(f"[rm_trainer] tiled MLP (DeepSpeed's TiledMLP) in {tiled} layers", flush=True)
    seq = None  # --sequence_parallel N: DeepSpeed's groups, and its Ulysses attention in place of the backbone's
    if rt.sp > 1:
        seq = sequence_parallel.setup(rt.sp, backbone.config, backbone.config._attn_implementation)
    if cfg.model.disable_dropout:
        disable_dropout(backbone)
    if cfg.model.lora_r:  # after disable_dropout: an explicit lora_dropout is kept
        backbone = apply_lora(backbone, cfg.model.model_dump(), t.seed)
    offload = long_context.ActivationOffload() if cfg.model.offload_activations else None
    if cfg.model.gradient_checkpointing:  # --offload_activations: each layer's checkpointed input is marked
        enable_checkpointing(backbone, mark=offload.mark if offload else None)
    model = RewardModel(backbone, cfg.model.head_init_std, seed=t.seed, reward_path=cfg.model.reward_path, head=head,
                        tie_rate=tie_rate(train_ds) if t.tie_loss == "davidson" else None, seq=seq,
                        attributes=cfg.data.attributes if t.objective in ("regression", "bt+regression") else None)
    if model.attributes:  # the scalar reward of the attributes (what PPO reads; reward.pt records it too)
        model.set_reward_weights(cfg.model.reward_weights)
    if moe.routing(backbone.config):  # an MoE backbone: the router's load-balancing loss, and leaf blocks
        model.enable_router_aux(moe.aux_coefficient(backbone.config, cfg.model.router_aux_loss_coef))
        if rt.is_main:
            print(f"[rm_trainer] MoE: {json.dumps(moe.parameter_counts(backbone))}, router aux loss coefficient "
                  f"{model.aux_coef}", flush=True)
    if rt.is_main and head is not None:
        print(f"[rm_trainer] continuing from the reward head of {cfg.model.path}", flush=True)
    if rt.is_main and cfg.model.lora_r:
        print(f"[rm_trainer] LoRA: {json.dumps(trainable_summary(model))}", flush=True)
    optimizer = None if "optimizer" in ds_cfg else build_optimizer(model, t)
    scheduler = None if "scheduler" in ds_cfg else scheduler_factory(t, total)
    eng = engine.initialize(model, ds_cfg, optimizer, scheduler, moe.leaf_module_classes(model), offload)
    del z3
    eng.train()
    return eng, backbone


def tie_rate(train_ds) -> float:
    """The fraction of training pairs that are tied: where the Davidson nu starts (model.DavidsonTie)."""
    return float(train_ds.data.column("tie").to_numpy().mean())


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
           log: MetricsLogger, offload: dict | None = None) -> dict:
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
