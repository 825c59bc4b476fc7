"""The training loop, top to bottom: config -> process group -> data -> model -> engine -> steps -> reward.pt."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from rm_trainer import engine
from rm_trainer.checkpoint import consolidate, write_checkpoint_meta
from rm_trainer.config import RunConfig, world_size_from_env
from rm_trainer.data import (
    PairSampler,
    collate,
    eval_batches,
    get_preference_iterator,
    read_pairs,
    tokenize_pairs,
    write_report,
)
from rm_trainer.ds_config import fill_scheduler_steps, resolve_ds_config
from rm_trainer.logger import MetricsLogger
from rm_trainer.loss import bradley_terry_loss, fused_bradley_terry, metrics_from_sums, pair_sums
from rm_trainer.model import DTYPES, RewardModel, build_backbone, disable_dropout, enable_checkpointing
from rm_trainer.optim import build_optimizer, scheduler_factory, warmup_steps

PROBE_PAIRS = 4


def prepare(cfg: RunConfig, dry_run: bool = False) -> tuple[RunConfig, dict]:
    """Everything that can fail on a bad config, before a process group exists."""
    hidden = json.loads((Path(cfg.model.path) / "config.json").read_text()).get("hidden_size")
    ds_cfg, cfg = resolve_ds_config(cfg, world_size_from_env(), hidden, cuda=torch.cuda.is_available())
    return cfg, ds_cfg


def load_tokenizer(cfg: RunConfig):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cfg.model.tokenizer or cfg.model.path)
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer {cfg.model.tokenizer or cfg.model.path} has no eos_token; the reward "
                         "is read at the final EOS, so set eos_token in tokenizer_config.json")
    if tok.pad_token_id is None:  # pad positions are never read (right padding + causal attention)
        tok.pad_token = tok.eos_token
    return tok


def load_data(cfg: RunConfig, tok, out: Path, rt: engine.Runtime):
    """Rank 0 reads and tokenizes once and saves the result; the other ranks load it from disk."""
    import datasets

    cache = out / "data_cache"
    if rt.is_main:
        raw = read_pairs(cfg.data.train_path, cfg.data.format)
        if cfg.data.test_path:
            test_raw = read_pairs(cfg.data.test_path, cfg.data.format)
        elif cfg.data.test_fraction > 0:
            split = raw.train_test_split(test_size=cfg.data.test_fraction, seed=cfg.train.seed)
            raw, test_raw = split["train"], split["test"]
        else:
            test_raw = None
        train, train_report = tokenize_pairs(raw, tok, cfg.data.max_len)
        report = {"train": train_report}
        train.save_to_disk(str(cache / "train"))
        if test_raw is not None:
            test, report["test"] = tokenize_pairs(test_raw, tok, cfg.data.max_len)
            test.save_to_disk(str(cache / "test"))
        write_report(out / "data_report.json", report)
        print(f"[rm_trainer] data: {json.dumps(report)}", flush=True)
    engine.barrier()
    train = datasets.load_from_disk(str(cache / "train")).with_format("python")
    test = datasets.load_from_disk(str(cache / "test")).with_format("python") if (cache / "test").exists() else None
    if len(train) == 0:
        raise ValueError(f"{cfg.data.train_path}: no usable pairs left (see {out / 'data_report.json'})")
    return train, test


def evaluate(eng, test, cfg: RunConfig, rt: engine.Runtime, pad_id: int) -> dict[str, float]:
    """Exact metrics over the whole test set: every pair once, sums all-reduced across ranks."""
    eng.eval()
    sums = torch.zeros(6, dtype=torch.float64)
    with torch.no_grad():
        for idx, w in eval_batches(len(test), rt.world_size, rt.rank, cfg.eval_batch_size):
            b = collate([test[i] for i in idx], pad_id)
            rewards = score_batch(eng, b, rt.device)
            B = len(idx)
            sums += pair_sums(rewards[:B], rewards[B:], torch.tensor(w)).cpu()
    eng.train()
    return metrics_from_sums(engine.all_reduce_sum(sums.to(rt.device)).cpu())


def score_batch(eng, b: dict, device: torch.device) -> torch.Tensor:
    """Rewards (2B,) = [chosen; rejected] from ONE forward: both halves share every ZeRO-3 weight
    gather and kernel launch."""
    ids = torch.cat([b["chosen_ids"], b["rejected_ids"]]).to(device)
    lens = torch.cat([b["chosen_len"], b["rejected_len"]]).to(device)
    return eng(ids, lens)


def loss_fn(rewards: torch.Tensor, fused: bool) -> torch.Tensor:
    if fused:
        return fused_bradley_terry(rewards)[0]
    B = rewards.shape[0] // 2
    return bradley_terry_loss(rewards[:B], rewards[B:])


def save(eng, out: Path, step: int, meta: dict, probe: dict, tok, rt: engine.Runtime) -> str:
    """DeepSpeed shards (all ranks) + our metadata and the probe scored by the live engine (rank 0)."""
    tag = f"step_{step}"
    eng.eval()
    with torch.no_grad():
        rewards = eng(probe["input_ids"].to(rt.device), probe["seq_lengths"].to(rt.device)).cpu()
    eng.train()
    engine.save_checkpoint(eng, str(out / "checkpoints"), tag, {"step": step})
    if rt.is_main:
        probe_json = {k: v.tolist() for k, v in probe.items()} | {"rewards": rewards.tolist()}
        write_checkpoint_meta(out / "checkpoints" / tag, meta | {"step": step, "probe": probe_json}, tok)
    engine.barrier()
    return tag


def make_probe(ds, pad_id: int) -> dict[str, torch.Tensor]:
    b = collate([ds[i] for i in range(min(PROBE_PAIRS, len(ds)))], pad_id)
    return {"input_ids": torch.cat([b["chosen_ids"], b["rejected_ids"]]),
            "seq_lengths": torch.cat([b["chosen_len"], b["rejected_len"]])}


def train(cfg: RunConfig, ds_cfg: dict) -> dict:
    out = Path(cfg.output.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rt = engine.init_distributed()
    torch.manual_seed(cfg.train.seed)

    tok = load_tokenizer(cfg)
    pad_id = tok.pad_token_id
    train_ds, test_ds = load_data(cfg, tok, out, rt)
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
    eng.train()

    meta = {"run_config": cfg.model_dump(mode="json"), "backbone_config": backbone.config.to_diff_dict(),
            "dtype": t.dtype, "pad_token_id": pad_id, "eos_token_id": tok.eos_token_id,
            "max_len": cfg.data.max_len, "world_size": rt.world_size}
    meta["backbone_config"]["model_type"] = backbone.config.model_type
    probe = make_probe(test_ds if test_ds is not None and len(test_ds) else train_ds, pad_id)
    log = MetricsLogger(out, rt.is_main, cfg.output.tensorboard)
    bar = tqdm(total=total_steps, disable=not rt.is_main, desc="train", dynamic_ncols=True)
    last_eval: dict = {}

    for step, micro_batches in get_preference_iterator(train_ds, sampler, pad_id, 0, total_steps):
        t0 = time.perf_counter()
        lr = eng.get_lr()[0]
        sums = torch.zeros(7, dtype=torch.float64)  # 6 pair sums + tokens
        for b in micro_batches:
            rewards = score_batch(eng, b, rt.device)
            loss = loss_fn(rewards, fused=cfg.model.reward_path == "fused")
            eng.backward(loss)  # DeepSpeed scales by 1/grad_accum and reduces across ranks
            eng.step()  # applies the update only at the accumulation boundary
            B = b["chosen_ids"].shape[0]
            sums[:6] += pair_sums(rewards[:B], rewards[B:]).cpu()
            sums[6] += float(b["chosen_len"].sum() + b["rejected_len"].sum())
        sums = engine.all_reduce_sum(sums.to(rt.device)).cpu()
        dt = time.perf_counter() - t0
        m = metrics_from_sums(sums[:6])
        done = step + 1
        if done % cfg.train.log_every == 0 or done == total_steps:
            log.log("train", done, {"loss": m["loss"], "acc": m["acc"], "margin": m["margin"], "lr": lr,
                                    "grad_norm": engine.grad_norm(eng), "pairs_per_s": m["pairs"] / dt,
                                    "tokens_per_s": float(sums[6]) / dt})
        bar.update(1)
        bar.set_postfix(loss=f"{m['loss']:.4f}", acc=f"{m['acc']:.3f}")
        if test_ds is not None and (done == total_steps or (t.eval_every and done % t.eval_every == 0)):
            last_eval = evaluate(eng, test_ds, cfg, rt, pad_id)
            log.log("eval", done, {k: v for k, v in last_eval.items() if k != "pairs"})
        if t.save_every and done % t.save_every == 0 and done != total_steps:
            save(eng, out, done, meta, probe, tok, rt)
    bar.close()

    tag = save(eng, out, total_steps, meta, probe, tok, rt)
    result = {"steps": total_steps, "eval": last_eval}
    if rt.is_main:
        result["reward_pt"] = consolidate(out / "checkpoints", out / "reward.pt", tag,
                                          verify=cfg.output.verify_consolidation)
        (out / "final_metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    engine.barrier()
    log.close()
    return result
