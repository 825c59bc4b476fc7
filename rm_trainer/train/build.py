"""Training set-up: the backbone and head as a DeepSpeed engine (LoRA, dropout, activation checkpointing,
the tiled MLP, sequence parallelism, MoE), the packing check that --packing auto relies on, and the
run's sampler.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from rm_trainer.config import RunConfig
from rm_trainer.data.batching import RowSampler, rows_of
from rm_trainer.data.segments import ALWAYS, ShareRule
from rm_trainer.errors import ConfigError, DataError
from rm_trainer.model import moe
from rm_trainer.model.backbone import build_backbone
from rm_trainer.model.lora import apply_lora, trainable_summary
from rm_trainer.model.reward import DTYPES, RewardModel
from rm_trainer.model.sharing import check_sharing
from rm_trainer.objectives import Objective
from rm_trainer.train import engine, long_context, sequence_parallel
from rm_trainer.train.ds_config import fill_scheduler_steps
from rm_trainer.train.optim import build_optimizer, scheduler_factory, warmup_steps


def build_engine(cfg: RunConfig, ds_cfg: dict, rt: engine.Runtime, objective: Objective, total: int, train_ds,
                 test_ds) -> tuple:
    """Backbone + head -> DeepSpeed engine. Under ZeRO-3 `z3` must stay referenced until initialize:
    transformers builds the layers already partitioned while it is alive."""
    t, n_train = cfg.train, len(train_ds)
    global_batch = t.micro_batch_size * t.grad_accum * rt.dp_world
    if total == 0:
        raise DataError(f"{n_train} training {objective.unit} cannot fill one global batch of {global_batch} "
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
                        tie_rate=objective.tie_rate(train_ds), seq=seq, attributes=objective.attributes)
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


def resolve_layout(cfg: RunConfig, eng, backbone_config, rt: engine.Runtime, objective: Objective, train_ds,
                   pad_id: int) -> tuple[bool, ShareRule | None]:
    """(packing, which rows share their prompt): --share_prompt and --packing, each proven on the live engine
    where auto or on asks for it; --packing auto also only where packed micro-batches cost less (packing_pays)."""
    share = resolve_sharing(cfg, eng, backbone_config, rt, objective)
    pays = functools.partial(packing_pays, cfg, train_ds, rt, objective, share, ShareRule.of(backbone_config), pad_id)
    return resolve_packing(cfg, eng, backbone_config, rt, pays), share


def packing_pays(cfg: RunConfig, train_ds, rt: engine.Runtime, objective: Objective, share: ShareRule | None,
                 rule: ShareRule, pad_id: int, steps: int = 4) -> tuple[bool, str]:
    """(whether packed micro-batches cost less than grouped ones, the two costs): the modelled FLOPs
    (ShareRule.batch_cost) of every rank's micro-batches over the first `steps` steps, each way. Packed rows
    are dense (every pair of a row's pack_len tokens), grouped ones padded; grouping wins where a rank has
    several micro-batches per step to sort rows into, packing where it has one (docs/batching.md). The same
    answer on every rank: each computes it for all of them, from the seeded sampler (host work only)."""
    t = cfg.train
    n = min(steps, len(train_ds) // (t.micro_batch_size * t.grad_accum * rt.dp_world))
    cost = {}
    lengths = {k: train_ds.data.column("segment" if share else k).to_numpy() for k in ("longest", "tokens")}
    for packing in (False, True):
        cost[packing] = 0.0
        for rank in range(rt.dp_world):
            s = RowSampler(len(train_ds), t.micro_batch_size, t.grad_accum, rt.dp_world, rank, t.seed, "grouped",
                           packing, **lengths)
            for step in range(n):
                for idx in s.micro_batches(step):
                    seqs = objective.collate(rows_of(train_ds, idx), pad_id, cfg.pack_len, packing, share=share).seqs
                    cost[packing] += rule.batch_cost(*seqs.input_ids.shape, seqs.position_ids is not None)
    why = f"modelled cost of the first {n} steps: packed {cost[True]:.4g}, grouped {cost[False]:.4g}"
    return cost[True] < cost[False], why


def resolve_packing(cfg: RunConfig, eng, backbone_config, rt: engine.Runtime,
                    pays: Callable[[], tuple[bool, str]] | None = None) -> bool:
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
    if mode == "auto" and pays is not None:
        cheaper, why = pays()
        if not cheaper:
            if rt.is_main:
                print(f"[rm_trainer] packing off: grouped batches cost less here ({why}); --packing packs anyway",
                      flush=True)
            return False
    if rt.is_main and mode == "auto":
        print("[rm_trainer] packing on: packed rows score like padded ones for this model and attention "
              "(--no-packing for padded batches)", flush=True)
    return True


def resolve_sharing(cfg: RunConfig, eng, backbone_config, rt: engine.Runtime, objective: Objective
                    ) -> ShareRule | None:
    """train.share_prompt (data.segments): which rows encode their prompt once, None for none. on: every row
    with a common prefix, and shared rows must score like separate ones through the live engine
    (check_sharing), else a config error; auto: the rows where sharing costs less (ShareRule.of the model),
    where the check holds, else off, said in one line. Every rank runs the check and they agree first."""
    mode = cfg.train.share_prompt
    if mode == "off" or not objective.shares_prompts:
        return None
    if rt.sp > 1:  # share_prompt on with sequence parallelism is refused by the config's validation
        if rt.is_main:
            print("[rm_trainer] shared prompts off: not supported with sequence parallelism", flush=True)
        return None
    eng.eval()
    problem = check_sharing(eng, backbone_config, rt.device, cfg.train.dtype)
    eng.train()
    if engine.host_sum(int(problem is not None)):
        problem = problem or "another rank's shared and separate rewards differ"
        if mode == "on":
            raise ConfigError([f"train.share_prompt: {problem}"])
        if rt.is_main:
            print(f"[rm_trainer] shared prompts off ({problem})", flush=True)
        return None
    if rt.is_main:
        print(f"[rm_trainer] shared prompts {'on' if mode == 'on' else 'on where they cost less'}: each row's "
              "prompt encoded once, proven exact for this model and attention (--share_prompt off: each "
              "response its own sequence)", flush=True)
    return ALWAYS if mode == "on" else ShareRule.of(backbone_config)


def make_sampler(cfg: RunConfig, train_ds, rt: engine.Runtime, packing: bool, share: bool = False) -> RowSampler:
    """The run's seeded sampler; grouping and packing read every row's token counts as two arrow columns
    (share: each row's tokens with its prompt once, `segment`)."""
    t = cfg.train
    lengths = {}
    if t.batching == "grouped" or packing:
        lengths = {k: train_ds.data.column("segment" if share else k).to_numpy() for k in ("longest", "tokens")}
    return RowSampler(len(train_ds), t.micro_batch_size, t.grad_accum, rt.dp_world, rt.dp_rank, t.seed,
                      t.batching, packing, **lengths)


PACKABLE = ("sdpa", "eager", "flash_attention_2")


def check_packing(forward, backbone_config, device: torch.device) -> str | None:
    """None if packed rows give the same rewards as separate padded rows through `forward` (the model or
    its engine), else what is wrong. Guards the silent failures: an attention implementation that does
    not split packed rows, or a forgotten cache, lets sequences attend to each other."""
    impl = getattr(backbone_config, "_attn_implementation", None) or "default"
    if impl not in PACKABLE:
        return (f"attention implementation {impl!r} cannot keep packed sequences apart; use sdpa or eager "
                "(or flash_attention_2 with the flash_attn package), or turn packing off")
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randint(1, backbone_config.vocab_size, (n,), generator=g) for n in (5, 7))
    padded = torch.zeros(2, 7, dtype=torch.long)
    padded[0, :5], padded[1] = a, b
    with torch.no_grad():
        want = forward(padded.to(device), torch.tensor([5, 7], device=device))
        got = forward(torch.cat([a, b])[None].to(device), None, torch.cat([torch.arange(5), torch.arange(7)])[None]
                      .to(device), torch.tensor([[0, 4], [0, 11]], device=device))
    err, scale = float((got - want).abs().max()), float(want.abs().max().clamp(min=1e-3))
    if err > 1e-2 * scale:  # a leak between sequences moves rewards by O(1); precision by far less
        return (f"packed sequences attend to each other with attention implementation {impl!r} (packed vs "
                f"padded rewards differ by {err:.3g}); use sdpa or eager, or turn packing off")
    return None


def disable_dropout(module: nn.Module) -> int:
    """p = 0 for every dropout layer and every *dropout* config field; returns how many were non-zero."""
    n = 0
    for m in module.modules():
        if isinstance(m, nn.Dropout) and m.p > 0:
            m.p, n = 0.0, n + 1
    cfg = getattr(module, "config", None)
    for key, value in (vars(cfg).items() if cfg is not None else []):
        # some attention implementations read the probability from the config, not from a module
        if "dropout" in key and isinstance(value, float) and value > 0:
            setattr(cfg, key, 0.0)
            n += 1
    return n


def enable_checkpointing(backbone: nn.Module, use_reentrant: bool = False,
                         mark: Callable[[torch.Tensor], None] | None = None) -> None:
    """Activation checkpointing of every decoder layer (transformers v5 renamed the method). mark: called
    with each layer's input as the checkpoint receives it, after the layer's forward pre-hooks (ZeRO-3's
    replace it), before the checkpoint saves it (the activation offload's hooks look for it there)."""
    kwargs = {"use_reentrant": use_reentrant}
    if hasattr(backbone, "activation_checkpointing_enable"):
        backbone.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if mark is not None:
        for m in backbone.modules():
            if getattr(m, "gradient_checkpointing", False) and hasattr(m, "_gradient_checkpointing_func"):
                m._gradient_checkpointing_func = functools.partial(_marked, m._gradient_checkpointing_func, mark)


def _marked(checkpoint: Callable, mark: Callable, function: Callable, *args, **kwargs):
    if args and torch.is_tensor(args[0]):
        mark(args[0])
    return checkpoint(function, *args, **kwargs)
