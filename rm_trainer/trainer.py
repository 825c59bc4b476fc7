"""The training loop, top to bottom: config -> process group -> data -> model -> engine -> steps -> reward.pt."""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import time
from pathlib import Path

import torch
from tqdm import tqdm

from rm_trainer import checkpoint as ckpt
from rm_trainer import engine
from rm_trainer.artifact import consolidate
from rm_trainer.config import ConfigError, RunConfig, world_size_from_env
from rm_trainer.data import PairSampler, collate, eval_batches, get_preference_iterator, load_data, load_tokenizer
from rm_trainer.ds_config import fill_scheduler_steps, resolve_ds_config
from rm_trainer.logger import MetricsLogger
from rm_trainer.loss import N_SUMS, bradley_terry_loss, fused_bradley_terry, metrics_from_sums, pair_sums
from rm_trainer.model import DTYPES, RewardModel, build_backbone, disable_dropout, enable_checkpointing
from rm_trainer.optim import build_optimizer, scheduler_factory, warmup_steps

# Test hooks (read only when set; documented in tests/test_checkpoint.py):
#   RM_TRAINER_TEST_NAN="STEP:RANK"        poison that rank's loss at that (1-based) step
#   RM_TRAINER_TEST_PAUSE_AT="STEP.MICRO"  every rank writes OUT/.paused_rank{r} and sleeps there, so a
#                                          test can SIGKILL the job at an exact point (mid-accumulation)
TEST_NAN = os.environ.get("RM_TRAINER_TEST_NAN")
TEST_PAUSE = os.environ.get("RM_TRAINER_TEST_PAUSE_AT")
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped cleanly at a committed checkpoint; rerun to resume


class Preempted(Exception):
    """Raised on every rank after the preemption checkpoint is committed."""

    def __init__(self, step: int, tag: str):
        super().__init__(f"preempted: checkpoint {tag} committed at step {step}; rerun to resume")
        self.step, self.tag = step, tag


_stop_signal: list[str] = []


def _on_stop_signal(signum, _frame) -> None:
    # Only a flag: saving inside a signal handler could interleave with a collective in flight.
    _stop_signal.append(signal.Signals(signum).name)


def install_stop_handlers() -> None:
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, _on_stop_signal)

PROBE_PAIRS = 4


def prepare(cfg: RunConfig) -> tuple[RunConfig, dict]:
    """Everything that can fail on a bad config, before a process group exists."""
    hidden = json.loads((Path(cfg.model.path) / "config.json").read_text()).get("hidden_size")
    world = world_size_from_env()
    ds_cfg, cfg = resolve_ds_config(cfg, world, hidden, cuda=torch.cuda.is_available())
    if os.environ.get("RANK", "0") == "0":  # one rank checks; the launcher stops the others if it fails
        check_resume(cfg, world)
    return cfg, ds_cfg


def resume_keys(cfg: RunConfig, world: int) -> dict:
    """What must match for a resume to continue exactly where the checkpoint left off."""
    t = cfg.train
    model_id = hashlib.sha256((Path(cfg.model.path) / "config.json").read_bytes()).hexdigest()[:16]
    return {
        "world_size": world,
        "data_and_tokenizer_sha256": ckpt.fingerprint(
            [p for s in cfg.data.source_list() for p in (s.path, s.test_path)] + [cfg.data.chat_template],
            cfg.model.tokenizer or cfg.model.path),
        "model_config_sha256": model_id + ("+random_init" if cfg.model.random_init else ""),
        "max_len": cfg.data.max_len,
        "seed": t.seed,
        "global_batch": t.micro_batch_size * t.grad_accum * world,
        # options that change which pairs exist or their order (file contents are in the hash above)
        "data_options": {k: v for k, v in cfg.data.model_dump(mode="json").items()
                         if k not in ("train_path", "test_path", "sources", "chat_template", "num_proc", "max_len")}
        | {"sources": [[s.name, s.weight, s.test_fraction] for s in cfg.data.sources or []]},
    }


def check_resume(cfg: RunConfig, world: int) -> Path | None:
    root = Path(cfg.output.output_dir) / "checkpoints"
    try:
        target = ckpt.resume_target(root, cfg.train.resume)
    except ValueError as e:
        raise ConfigError([str(e)]) from None
    if target is None:
        return None
    diffs = ckpt.resume_differences(target, resume_keys(cfg, world))
    if any(d.startswith("world_size") for d in diffs):
        raise ConfigError([f"cannot resume {target} exactly: " + "; ".join(diffs) + ". ZeRO shards are "
                           "per rank: relaunch with the same number of ranks, or start a new run from its "
                           "reward.pt (launch/consolidate.py), or pass --resume never"])
    if diffs and not cfg.train.resume_force:
        raise ConfigError([f"cannot resume {target} exactly: " + "; ".join(diffs) +
                           ". Pass --resume_force to continue anyway (not bit-exact), or --resume never "
                           "to start over"])
    return target


def evaluate(eng, test, cfg: RunConfig, rt: engine.Runtime, pad_id: int,
             sources: list[str]) -> dict[str, float]:
    """Exact metrics over the whole test set: every pair once, sums all-reduced across ranks, overall
    and per source. Also the mean/std of the held-out rewards (normalisation statistics: never
    computed on training data)."""
    eng.eval()
    sums = torch.zeros(len(sources), N_SUMS, dtype=torch.float64)
    with torch.no_grad():
        for idx, w in eval_batches(len(test), rt.world_size, rt.rank, cfg.eval_batch_size):
            b = collate([test[i] for i in idx], pad_id)
            rewards = score_batch(eng, b, rt.device).cpu()
            B = len(idx)
            for s in b["source"].unique().tolist():
                mask = (b["source"] == s).double() * torch.tensor(w, dtype=torch.float64)
                sums[s] += pair_sums(rewards[:B], rewards[B:], mask)
    eng.train()
    sums = engine.all_reduce_sum(sums.to(rt.device)).cpu()
    result = metrics_from_sums(sums.sum(0))
    if len(sources) > 1:
        for s, name in enumerate(sources):
            if sums[s, 0] > 0:
                m = metrics_from_sums(sums[s])
                result |= {f"{name}/{k}": m[k] for k in ("loss", "acc", "margin")}
    return result


def score_batch(eng, b: dict, device: torch.device) -> torch.Tensor:
    """Rewards (2B,) = [chosen; rejected] from ONE forward: both halves share every ZeRO-3 weight
    gather and kernel launch."""
    ids = torch.cat([b["chosen_ids"], b["rejected_ids"]]).to(device)
    lens = torch.cat([b["chosen_len"], b["rejected_len"]]).to(device)
    return eng(ids, lens)


def loss_fn(rewards: torch.Tensor, fused: bool, margin: torch.Tensor | None = None) -> torch.Tensor:
    if fused:
        return fused_bradley_terry(rewards, margin)[0]
    B = rewards.shape[0] // 2
    return bradley_terry_loss(rewards[:B], rewards[B:], margin)


def make_probe(ds, pad_id: int) -> dict[str, torch.Tensor]:
    b = collate([ds[i] for i in range(min(PROBE_PAIRS, len(ds)))], pad_id)
    return {"input_ids": torch.cat([b["chosen_ids"], b["rejected_ids"]]),
            "seq_lengths": torch.cat([b["chosen_len"], b["rejected_len"]])}


def save(eng, out: Path, step: int, meta: dict, probe: dict, tok, rt: engine.Runtime) -> str:
    """Atomic checkpoint (see checkpoint.py): all ranks write step_N.tmp/, rank 0 commits it."""
    root = out / "checkpoints"
    tag = ckpt.tag_for(step)
    t0 = time.perf_counter()
    eng.eval()
    with torch.no_grad():  # the probe the consolidated weights must reproduce
        rewards = eng(probe["input_ids"].to(rt.device), probe["seq_lengths"].to(rt.device)).cpu()
    eng.train()
    tmp = root / (tag + ".tmp")
    engine.save_checkpoint(eng, str(root), tmp.name)
    torch.save(ckpt.rank_state(step), tmp / f"rm_state_rank{rt.rank}.pt")
    if rt.is_main:
        tok.save_pretrained(tmp / ckpt.TOKENIZER_DIR)
        probe_json = {k: v.tolist() for k, v in probe.items()} | {"rewards": rewards.tolist()}
        (tmp / ckpt.META_FILE).write_text(json.dumps(meta | {"step": step, "probe": probe_json}, indent=1))
    engine.barrier()  # every rank's files are on disk before the commit
    if rt.is_main:
        rotated = ckpt.commit(root, step, rt.world_size, meta["keep_last"])
        print(f"[rm_trainer] committed {tag} in {time.perf_counter() - t0:.2f}s"
              + (f"; rotated out {', '.join(rotated)}" if rotated else ""), flush=True)
    engine.barrier()
    return tag


def test_pause(step: int, micro: int, out: Path, rank: int) -> None:
    if TEST_PAUSE == f"{step}.{micro}":
        (out / f".paused_rank{rank}").write_text(str(os.getpid()))
        time.sleep(3600)


def train(cfg: RunConfig, ds_cfg: dict) -> dict:
    out = Path(cfg.output.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rt = engine.init_distributed()
    install_stop_handlers()
    torch.manual_seed(cfg.train.seed)
    root = out / "checkpoints"
    if rt.is_main:
        ckpt.clean_partial(root)
    # Which checkpoint: cheap, the same answer on every rank. Whether it may be resumed exactly was
    # checked by rank 0 in prepare(), before the process group existed.
    resume_from = ckpt.resume_target(root, cfg.train.resume)

    tok = load_tokenizer(cfg)
    pad_id = tok.pad_token_id
    train_ds, test_ds, sources = load_data(cfg, tok, out, rt.is_main, engine.barrier)
    t = cfg.train
    sampler = PairSampler(len(train_ds), t.micro_batch_size, t.grad_accum, rt.world_size, rt.rank, t.seed)
    if sampler.steps_per_epoch == 0:
        raise ValueError(f"{len(train_ds)} training pairs cannot fill one global batch of "
                         f"{sampler.global_batch} (micro_batch_size x grad_accum x world_size); lower them")
    total_steps = t.max_steps or t.epochs * sampler.steps_per_epoch
    fill_scheduler_steps(ds_cfg, total_steps, warmup_steps(t, total_steps))
    if rt.is_main:
        (out / "run_config.json").write_text(json.dumps(
            {"run": cfg.model_dump(mode="json"), "deepspeed": ds_cfg, "world_size": rt.world_size,
             "total_steps": total_steps, "train_pairs": len(train_ds),
             "test_pairs": len(test_ds) if test_ds is not None else 0}, indent=2) + "\n")

    # Model. Under ZeRO-3 `z3` must stay referenced until deepspeed.initialize: transformers builds the
    # layers already partitioned while it is alive.
    dtype = DTYPES[t.dtype]
    z3 = engine.zero3_context(ds_cfg)
    backbone = build_backbone(cfg.model.path, dtype, cfg.model.random_init, cfg.model.attn_implementation)
    if cfg.model.disable_dropout:
        disable_dropout(backbone)
    if cfg.model.gradient_checkpointing:
        enable_checkpointing(backbone)
    model = RewardModel(backbone, cfg.model.head_init_std, seed=t.seed, reward_path=cfg.model.reward_path)
    optimizer = None if "optimizer" in ds_cfg else build_optimizer(model, t)
    scheduler = None if "scheduler" in ds_cfg else scheduler_factory(t, total_steps)
    eng = engine.initialize(model, ds_cfg, optimizer, scheduler)
    del z3

    start = 0
    if resume_from is not None:  # DeepSpeed restores weights, optimizer and scheduler; we restore the rest
        engine.load_checkpoint(eng, str(resume_from.parent), resume_from.name)
        start = ckpt.restore_rank_state(resume_from / f"rm_state_rank{rt.rank}.pt")
        if rt.is_main:
            print(f"[rm_trainer] resumed from {resume_from} at step {start}", flush=True)
    eng.train()

    meta = {"run_config": cfg.model_dump(mode="json"), "backbone_config": backbone.config.to_diff_dict(),
            "dtype": t.dtype, "pad_token_id": pad_id, "eos_token_id": tok.eos_token_id,
            "max_len": cfg.data.max_len, "world_size": rt.world_size, "keep_last": t.keep_last,
            "resume_keys": resume_keys(cfg, rt.world_size) if rt.is_main else {}}
    meta["backbone_config"]["model_type"] = backbone.config.model_type
    probe = make_probe(test_ds if test_ds is not None and len(test_ds) else train_ds, pad_id)
    log = MetricsLogger(out, rt.is_main, cfg.output.tensorboard, resume_step=start)
    bar = tqdm(total=total_steps, initial=start, disable=not rt.is_main, desc="train", dynamic_ncols=True)
    last_eval: dict = {}
    skipped = consecutive = 0

    for step, micro_batches in get_preference_iterator(train_ds, sampler, pad_id, start, total_steps):
        t0 = time.perf_counter()
        done = step + 1
        lr = eng.get_lr()[0]
        skipped_before = eng.skipped_steps
        sums = torch.zeros(N_SUMS + 2, dtype=torch.float64)  # pair sums, tokens, stop flag
        for micro, b in enumerate(micro_batches):
            if TEST_PAUSE:
                test_pause(done, micro, out, rt.rank)
            rewards = score_batch(eng, b, rt.device)
            margin = b["margin"].to(rt.device) if "margin" in b else None
            loss = loss_fn(rewards, fused=cfg.model.reward_path == "fused", margin=margin)
            if TEST_NAN == f"{done}:{rt.rank}" and micro == 0:
                loss = loss * float("nan")
            eng.backward(loss)  # DeepSpeed scales by 1/grad_accum and reduces across ranks
            # At the accumulation boundary this applies the update, unless the all-reduced gradient norm
            # is non-finite: DeepSpeed then skips it on every rank together (no weight or Adam change).
            eng.step()
            B = b["chosen_ids"].shape[0]
            sums[:N_SUMS] += pair_sums(rewards[:B], rewards[B:]).cpu()
            sums[N_SUMS] += float(b["chosen_len"].sum() + b["rejected_len"].sum())
        sums[N_SUMS + 1] = float(bool(_stop_signal))
        # One all-reduce: a NaN, or a stop signal, seen by any rank reaches every rank at this boundary.
        sums = engine.all_reduce_sum(sums.to(rt.device)).cpu()
        gnorm = engine.grad_norm(eng)
        skip = eng.skipped_steps > skipped_before or not math.isfinite(float(sums[1]))
        skipped += skip
        consecutive = consecutive + 1 if skip else 0
        if consecutive >= t.max_consecutive_skips:
            raise RuntimeError(
                f"step {done}: {consecutive} consecutive steps with a non-finite loss or gradient norm; the "
                f"last global batch held training pairs {sorted(sampler.global_batch_indices(step))}")
        dt = time.perf_counter() - t0
        m = metrics_from_sums(sums[:N_SUMS]) if not skip else {"loss": float(sums[1]), "acc": None, "margin": None,
                                                              "pairs": int(sums[0])}
        if done % cfg.train.log_every == 0 or done == total_steps or skip:
            log.log("train", done, {"loss": m["loss"], "acc": m["acc"], "margin": m["margin"], "lr": lr,
                                    "grad_norm": gnorm if gnorm is None or math.isfinite(gnorm) else None,
                                    "pairs_per_s": m["pairs"] / dt, "tokens_per_s": float(sums[N_SUMS]) / dt,
                                    "skipped_steps": skipped})
        bar.update(1)
        bar.set_postfix(loss=f"{m['loss']:.4f}", skipped=skipped)
        if test_ds is not None and (done == total_steps or (t.eval_every and done % t.eval_every == 0)):
            last_eval = evaluate(eng, test_ds, cfg, rt, pad_id, sources)
            log.log("eval", done, {k: v for k, v in last_eval.items() if k != "pairs"})
            meta["reward_stats"] = {"mean": last_eval["reward_mean"], "std": last_eval["reward_std"],
                                    "pairs": last_eval["pairs"], "step": done}
        saved = bool(t.save_every and done % t.save_every == 0 and done != total_steps)
        if saved:
            save(eng, out, done, meta, probe, tok, rt)
        if sums[N_SUMS + 1] > 0 and done != total_steps:  # preemption: every rank agrees, saves, stops
            tag = ckpt.tag_for(done) if saved else save(eng, out, done, meta, probe, tok, rt)
            if rt.is_main:
                marker = Path(os.environ.get("RM_TRAINER_PREEMPT_FILE") or out / "preempted.json")
                marker.write_text(json.dumps({"step": done, "tag": tag,
                                              "ranks_signalled": int(sums[N_SUMS + 1])}) + "\n")
            bar.close()
            log.close()
            engine.barrier()
            raise Preempted(done, tag)
    bar.close()
    if test_ds is not None and not last_eval:  # resumed at the very end: still report and normalise
        last_eval = evaluate(eng, test_ds, cfg, rt, pad_id, sources)
        meta["reward_stats"] = {"mean": last_eval["reward_mean"], "std": last_eval["reward_std"],
                                "pairs": last_eval["pairs"], "step": total_steps}

    tag = save(eng, out, total_steps, meta, probe, tok, rt)
    result = {"steps": total_steps, "eval": last_eval, "skipped_steps": skipped}
    if rt.is_main:
        result["reward_pt"] = consolidate(root, out / "reward.pt", tag, verify=cfg.output.verify_consolidation)
        if cfg.output.hf_export:
            from rm_trainer.hf_export import export_hf

            result["hf"] = str(export_hf(out / "reward.pt", cfg.output.hf_out or out / "hf"))
        (out / "final_metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    engine.barrier()
    log.close()
    return result
