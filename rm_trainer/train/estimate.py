"""Will it fit? Parameter count, per-rank model-state memory (DeepSpeed's own formulas) and an
activation estimate for the checkpointed 2B forward, without starting training or touching a GPU.

    rm-estimate --model /ckpt/llama3-8b-sft --ds_config ds_configs/zero3.json \
        --world_size 8 --micro_batch_size 4 --max_len 2048 --gradient_checkpointing --gpu_memory_gb 80

The same report is printed by `rm-train ... --dry-run`; both read the run config (estimate_run).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rm_trainer import objectives
from rm_trainer.config import RunConfig
from rm_trainer.model import moe
from rm_trainer.model.lora import apply_lora

GiB = 1024**3
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass
class Estimate:
    params: int
    largest_layer_params: int
    largest_layer: str
    zero_stage: int
    world_size: int
    gpus_per_node: int
    offload_optimizer: bool
    offload_param: bool
    model_states_gpu_gib: float
    model_states_cpu_gib: float  # per node
    activations_gpu_gib: float | None
    total_gpu_gib: float | None
    gpu_memory_gb: float | None
    fits: bool | None
    trainable_params: int | None = None  # LoRA: adapters + head (None: every parameter trains)
    full_model_states_gpu_gib: float | None = None  # LoRA: what full fine-tuning would need
    active_params: int | None = None  # MoE: the parameters one token goes through
    sequence_parallel: int = 1  # each rank's activations are those of T / N tokens
    activations_cpu_gib: float | None = None  # --offload_activations: pinned host memory per GPU
    share_mask_gib: float | None = None  # --share_prompt: the dense attention mask of one micro-batch


def count_params(model_path: str, lora: dict | None = None) -> tuple[int, int, str, dict]:
    """(total, largest single module's own params, its name, config dict) built on the meta device:
    no memory, no weights read. Includes the H-parameter score head. With `lora` (the model config section
    as a dict) the adapters are counted too, and the config dict gets `trainable_params`."""
    from transformers import AutoConfig, AutoModel

    cfg = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        model = AutoModel.from_config(cfg)
    seen: dict[int, int] = {}
    for p in model.parameters():
        seen[id(p)] = p.numel()
    total = sum(seen.values()) + cfg.hidden_size  # + score head
    largest, name = 0, ""
    for mod_name, m in model.named_modules():
        n = sum(p.numel() for p in m.parameters(recurse=False))
        if n > largest:
            largest, name = n, mod_name
    extra = {}
    if moe.routing(cfg):  # one token uses top_k of the experts' weights
        extra["active_params"] = moe.parameter_counts(model)["active_params"] + cfg.hidden_size
    if lora and lora.get("lora_r"):
        with torch.device("meta"):
            adapted = apply_lora(model, lora, seed=0)
        extra["trainable_params"] = cfg.hidden_size + sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    return total, largest, name, cfg.to_dict() | extra


def activation_bytes(cfg: dict, micro_pairs: int, seq_len: int, dtype: str, checkpointing: bool,
                     tiled_mlp: bool = False, offload: bool = False) -> tuple[int, int]:
    """The 2B concatenated forward. With checkpointing: one saved layer input per layer
    (L * 2B * T * H * bytes) plus one layer's full activations while it is recomputed. Without: all
    layers' activations. Per token, a Llama-style layer keeps ~(8H + 4*kv + 4I) values in the compute
    dtype (norm outputs, q/k/v, rotated q/k, attention output, gate/up/act/product) plus two fp32 norm
    copies (8H bytes); sdpa/flash attention keep no T x T scores. An MoE layer keeps its top-k experts'
    MLP activations instead (see below). tiled_mlp (dense): the MLP's 4*I values exist for one shard of
    ~H tokens at a time instead of every token. offload (with checkpointing): the saved layer inputs wait
    in host memory, except the last layer's and up to two whose copies are in flight (DeepSpeed's keep-last
    1 and stash 2). Returns (device bytes, host bytes). An approximation, not DeepSpeed's."""
    b = DTYPE_BYTES[dtype]
    H = cfg.get("hidden_size") or cfg.get("n_embd")
    L = cfg.get("num_hidden_layers") or cfg.get("n_layer")
    I = cfg.get("intermediate_size") or cfg.get("n_inner") or 4 * H  # noqa: E741
    heads = cfg.get("num_attention_heads") or cfg.get("n_head")
    kv = (cfg.get("num_key_value_heads") or heads) * (cfg.get("head_dim") or H // heads)
    tokens = 2 * micro_pairs * seq_len
    per_layer_token = b * (8 * H + 4 * kv + 4 * I) + 8 * H
    experts = cfg.get("num_local_experts") or cfg.get("num_experts")
    if experts and cfg.get("num_experts_per_tok"):
        # MoE: the gate/up/act/product of top_k experts of their own width, the token's copy into each
        # and each expert's output (2 k H), and the router's logits and fp32 softmax (E)
        k, width = cfg["num_experts_per_tok"], cfg.get("moe_intermediate_size") or I
        per_layer_token = b * (8 * H + 4 * kv + 4 * k * width + 2 * k * H + experts) + 8 * H + 4 * experts
    mlp_shard = 0
    if tiled_mlp and not experts:
        per_layer_token -= b * 4 * I
        mlp_shard = b * 4 * I * min(H, tokens)
    if not checkpointing:
        return L * (tokens * per_layer_token + mlp_shard), 0
    on_device = min(L, 3) if offload else L
    return on_device * tokens * H * b + tokens * per_layer_token + mlp_shard, (L - on_device) * tokens * H * b


def estimate(model_path: str, ds_cfg: dict, world_size: int, gpus_per_node: int | None = None,
             micro_pairs: int | None = None, seq_len: int | None = None, dtype: str = "bf16",
             checkpointing: bool = False, gpu_memory_gb: float | None = None, lora: dict | None = None,
             sequence_parallel: int = 1, tiled_mlp: bool = False, offload_activations: bool = False) -> Estimate:
    """lora: the model config section (a dict with lora_r ...): model states are then DeepSpeed's figure for
    the trainable parameters plus the frozen weights in the training dtype (sharded under ZeRO-3).
    sequence_parallel N: a rank holds T / N tokens of every row (Ulysses' all-to-all trades them for
    H / N heads over all T inside attention: the same size), so its activations are those at T / N; the
    model states are sharded over the whole world as without it."""
    from rm_trainer.train.engine import model_states_memory

    total, largest, name, cfg = count_params(model_path, lora)
    gpn = gpus_per_node or min(world_size, 8)
    nodes = max(1, world_size // gpn)
    zo = ds_cfg.get("zero_optimization", {})
    stage = int(zo.get("stage", 0))
    off_opt = (zo.get("offload_optimizer") or {}).get("device", "none") in ("cpu", "nvme")
    off_par = (zo.get("offload_param") or {}).get("device", "none") in ("cpu", "nvme")
    cpu, gpu = model_states_memory(stage, total, largest, gpn, nodes, off_opt, off_par)
    trainable, full_gpu = cfg.get("trainable_params"), None
    if trainable is not None:
        full_gpu = round(gpu / GiB, 2)
        frozen = (total - cfg["hidden_size"]) * DTYPE_BYTES[dtype]  # every base weight, in the training dtype
        cpu, gpu = model_states_memory(stage, trainable, largest, gpn, nodes, off_opt, off_par)
        gpu += frozen // world_size if stage == 3 and not off_par else frozen
    act = host = None
    if micro_pairs and seq_len:
        act, host = activation_bytes(cfg, micro_pairs, -(-seq_len // sequence_parallel), dtype, checkpointing,
                                     tiled_mlp, offload_activations)
    total_gpu = (gpu + act) if act is not None else None
    fits = None if gpu_memory_gb is None or total_gpu is None else total_gpu / GiB <= gpu_memory_gb
    return Estimate(total, largest, name, stage, world_size, gpn, off_opt, off_par, round(gpu / GiB, 2),
                    round(cpu / GiB, 2), None if act is None else round(act / GiB, 2),
                    None if total_gpu is None else round(total_gpu / GiB, 2), gpu_memory_gb, fits, trainable, full_gpu,
                    cfg.get("active_params"), sequence_parallel, round(host / GiB, 2) if host else None)


def estimate_run(cfg: RunConfig, ds_cfg: dict, flags: dict) -> Estimate:
    """The estimate of a resolved run config; flags: the report options (world_size, gpus_per_node,
    gpu_memory_gb). The world size defaults to the launcher's WORLD_SIZE."""
    from rm_trainer.train.engine import world_size_from_env

    world = flags.get("world_size") or world_size_from_env()
    e = estimate(cfg.model.path, ds_cfg, world, flags.get("gpus_per_node"), cfg.train.micro_batch_size,
                 cfg.data.max_len, cfg.train.dtype, cfg.model.gradient_checkpointing, flags.get("gpu_memory_gb"),
                 cfg.model.model_dump(), cfg.train.sequence_parallel, cfg.model.tiled_mlp,
                 cfg.model.offload_activations)
    if cfg.train.share_prompt != "off" and cfg.train.sequence_parallel == 1 and objectives.build(cfg).shares_prompts:
        # a shared row is one segment of at most 2 max_len tokens (a pair; K responses: K max_len), its mask
        # L^2 elements of the dtype, built once per forward and read by every layer
        L = 2 * cfg.data.max_len
        e.share_mask_gib = round(cfg.train.micro_batch_size * L * L * DTYPE_BYTES[cfg.train.dtype] / GiB, 3)
    return e


def _count(n: int) -> str:
    return f"{n / 1e9:.3f} B" if n >= 1e8 else f"{n / 1e6:.1f} M" if n >= 1e5 else f"{n / 1e3:.1f} K"


def report(e: Estimate) -> str:
    lines = [
        f"parameters: {_count(e.params)} (largest layer {e.largest_layer or '?'}: {_count(e.largest_layer_params)})",
        f"ZeRO-{e.zero_stage} on {e.world_size} GPUs ({e.gpus_per_node} per node), offload optimizer="
        f"{e.offload_optimizer}, param={e.offload_param}:",
        f"  model states per GPU: {e.model_states_gpu_gib:.2f} GiB; CPU per node: {e.model_states_cpu_gib:.2f} GiB",
    ]
    if e.active_params is not None:
        lines.append(f"  MoE: {_count(e.active_params)} active parameters per token of {_count(e.params)} "
                     f"({e.active_params / e.params:.1%}); every expert's weights count in the model states, "
                     "sharded with the rest under ZeRO-3")
    if e.trainable_params is not None:
        lines.append(f"  LoRA: {_count(e.trainable_params)} trainable ({e.trainable_params / e.params:.2%}); full "
                     f"fine-tuning would need {e.full_model_states_gpu_gib:.2f} GiB of model states per GPU (LoRA "
                     f"saves {e.full_model_states_gpu_gib - e.model_states_gpu_gib:.2f} GiB)")
    if e.activations_gpu_gib is not None:
        sp = f", 1/{e.sequence_parallel} of each row per rank" if e.sequence_parallel > 1 else ""
        lines.append(f"  activations (2B forward{sp}): {e.activations_gpu_gib:.2f} GiB; total per GPU "
                     f"{e.total_gpu_gib:.2f} GiB (+ framework buffers and fragmentation)")
    if e.activations_cpu_gib is not None:
        lines.append(f"  offloaded layer inputs: {e.activations_cpu_gib:.2f} GiB of pinned CPU memory per GPU "
                     f"({e.activations_cpu_gib * e.gpus_per_node:.2f} GiB per node), copied on a side stream")
    if e.share_mask_gib is not None:
        lines.append(f"  shared prompts: each pair's prompt once, so its activations are at most the figure above "
                     "(a pair of prompt P and responses R keeps P + 2R tokens instead of 2P + 2R: 0.62x at HH's 76 % "
                     f"prompt share); the attention mask of a micro-batch adds up to {e.share_mask_gib:.3f} GiB")
    if e.fits is not None:
        verdict = "FITS" if e.fits else "DOES NOT FIT"
        lines.append(f"  {verdict} in {e.gpu_memory_gb:g} GB per GPU")
    return "\n".join(lines)
