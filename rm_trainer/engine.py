"""The only module that imports deepspeed: process group, ZeRO-3 construction, engine, checkpoints.

Keeping it here means the config, data, loss, model and artifact code can be imported and tested
without DeepSpeed, and a future FSDP engine would replace this file alone.
"""

from __future__ import annotations

import os
import socket
import warnings
from dataclasses import dataclass
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from transformers.integrations import HfDeepSpeedConfig

# DeepSpeed 0.19 still calls the torch.distributed names torch 2.13 deprecates; one warning per call
# site per rank would bury the training log.
warnings.filterwarnings("ignore", message=r".*torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)")


@dataclass
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> Runtime:
    """Join the process group the launcher described (deepspeed, torchrun, srun) or make a world of 1.

    nccl on CUDA, gloo on CPU: the same code runs on a laptop, in CI and on a GPU cluster.
    """
    if "RANK" not in os.environ:  # plain `python launch/train_reward.py`: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", auto_mpi_discovery=False,
                                   verbose=False)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return Runtime(dist.get_rank(), dist.get_world_size(), local_rank, device)


def zero3_context(ds_config: dict) -> Any:
    """Under ZeRO-3, keep an HfDeepSpeedConfig alive while the backbone is built: transformers then
    constructs every layer already partitioned (zero.Init), so no rank ever holds the full model.
    The caller must hold the returned object until deepspeed.initialize has run."""
    if int(ds_config.get("zero_optimization", {}).get("stage", 0)) == 3:
        return HfDeepSpeedConfig(ds_config)
    return None


def initialize(model: torch.nn.Module, ds_config: dict, optimizer=None, lr_scheduler=None):
    engine, _, _, _ = deepspeed.initialize(model=model, config=ds_config, optimizer=optimizer,
                                           lr_scheduler=lr_scheduler,
                                           model_parameters=None if optimizer else model.parameters())
    return engine


def grad_norm(engine) -> float | None:
    g = engine.get_global_grad_norm()
    if g is None:
        return None
    return float(g.item() if torch.is_tensor(g) else g)


def save_checkpoint(engine, save_dir: str, tag: str) -> None:
    # save_latest=False: DeepSpeed would point `latest` at the uncommitted tag; checkpoint.commit()
    # writes it after the rename instead.
    engine.save_checkpoint(save_dir, tag=tag, save_latest=False)


def load_checkpoint(engine, load_dir: str, tag: str) -> None:
    """Weights, optimizer and LR-scheduler state. Unpickles DeepSpeed files: trusted directories only."""
    path, _ = engine.load_checkpoint(load_dir, tag=tag, load_optimizer_states=True,
                                     load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {load_dir}/{tag}")


def consolidated_state_dict(checkpoint_dir: str, tag: str | None = None) -> dict[str, torch.Tensor]:
    """fp32 weights merged from every rank's ZeRO-2/3 shard files, by DeepSpeed's own zero_to_fp32.

    Reads pickled DeepSpeed checkpoint files: only for checkpoint directories you trust.
    """
    return get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag=tag)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()



def model_states_memory(stage: int, total_params: int, largest_layer_params: int, gpus_per_node: int,
                        num_nodes: int, offload_optimizer: bool, offload_param: bool) -> tuple[int, int]:
    """(cpu bytes per node, gpu bytes per GPU) from DeepSpeed's own estimators (zero_init=True, the
    way ZeRO-3 backbones are built here). Stages 0/1 have no estimator; they are reported as stage 2."""
    if stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            total_params, largest_layer_params, gpus_per_node, num_nodes, cpu_offload=offload_optimizer,
            cpu_offload_params=offload_param, zero_init=True)
        return int(cpu), int(gpu)
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    cpu, gpu = estimate_zero2_model_states_mem_needs(total_params, gpus_per_node, num_nodes,
                                                     cpu_offload=offload_optimizer)
    return int(cpu), int(gpu)
