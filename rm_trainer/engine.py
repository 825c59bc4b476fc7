"""The only module that imports deepspeed: process group, ZeRO-3 construction, engine, checkpoints.

Keeping it here means the config, data, loss, model and artifact code can be imported and tested
without DeepSpeed, and a future FSDP engine would replace this file alone.
"""

from __future__ import annotations

import ctypes
import math
import mmap
import os
import re
import socket
import sys
import time
import warnings
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from transformers.integrations import HfDeepSpeedConfig

from rm_trainer.errors import CheckpointError, UserError

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


def init_distributed(timeout_s: float = 1800) -> Runtime:
    """Join the process group the launcher described (deepspeed, torchrun, srun) or make a world of 1.

    nccl on CUDA, gloo on CPU: the same code runs on a laptop, in CI and on a GPU cluster. timeout_s is
    the collective timeout (train.dist_timeout_s); DeepSpeed's own default is 10 minutes.
    """
    if "RANK" not in os.environ:  # plain `python launch/train_reward.py`: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    global _control
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", auto_mpi_discovery=False,
                                   verbose=False, timeout=timedelta(seconds=timeout_s))
        # host-side control messages (stop votes) on CPU tensors: a gloo group beside nccl
        _control = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s)) if cuda else None
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return Runtime(dist.get_rank(), dist.get_world_size(), local_rank, device)


_control = None


def host_sum(value: int) -> int:
    """Sum of a small host integer over all ranks, through a gloo group: nothing waits for the GPU."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=_control)
    return int(t[0])


def leave_process_group() -> None:
    """Every rank: wait for the others, then leave the process group. After this no collective is
    pending, so rank 0 can do long solo work (consolidation, export) without any rank timing out."""
    if dist.is_initialized():
        rank = dist.get_rank()
        dist.barrier()
        deepspeed.comm.destroy_process_group()
        _unlink_shm_buffer(rank)


def _unlink_shm_buffer(rank: int) -> None:
    """DeepSpeed's CPU all-reduce maps a 66 MB /dev/shm segment per rank and never unlinks it: every run
    would leave its segments in RAM-backed tmpfs. Once all ranks are past the final barrier each removes
    its own (mappings stay valid until exit). No-op on GPU (nccl) or where the segment does not exist."""
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank}")
    Path("/dev/shm", name).unlink(missing_ok=True)


def _store():
    return dist.distributed_c10d._get_default_store()


def publish(key: str, value: str) -> None:
    """Rank 0: put a value in the process group's key-value store (the launcher's rendezvous store)."""
    _store().set(key, value)


def wait_for(key: str, timeout_s: float, poll_s: float = 1.0) -> str:
    """Other ranks: poll the store for `key`. No collective is pending while they wait, so however long
    rank 0 takes, only timeout_s applies."""
    store, deadline = _store(), time.monotonic() + timeout_s
    while not store.check([key]):
        if time.monotonic() > deadline:
            raise UserError(f"waited {timeout_s:.0f}s for rank 0 ({key}); raise data.prepare_timeout_s, or build "
                            "the data cache ahead of the job with --prepare_only")
        time.sleep(poll_s)
    return store.get(key).decode()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]
    return obj


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
                                           model_parameters=None if optimizer else
                                           [p for p in model.parameters() if p.requires_grad])
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


def _load_ds(path: Path) -> dict:
    """A DeepSpeed checkpoint file, memory-mapped. These are pickles written by DeepSpeed itself
    (weights_only=False is required): load them only from checkpoint directories you trust."""
    # weights_only=False: DeepSpeed's own checkpoint pickles, trusted input only (see the docstring)
    return torch.load(path, map_location="cpu", mmap=True, weights_only=False)


def _rank_of(path: Path) -> int:
    m = re.search(r"rank_(\d+)_", path.name)
    return int(m.group(1)) if m else 0


class _PageRelease:
    """Drops the pages of a memory-mapped checkpoint file that the merge has consumed, so the file's pages
    never pile up in this process's memory (Linux; elsewhere a no-op). Only whole pages inside the file's
    own read-only private mapping are dropped: re-reading them would simply fault them in from the file."""

    def __init__(self, path: Path):
        self.lo = self.hi = 0
        self.libc = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None
        if self.libc is not None:
            target = str(path.resolve())
            spans = [tuple(int(x, 16) for x in line.split()[0].split("-"))
                     for line in open("/proc/self/maps") if line.rstrip("\n").endswith(target)]
            if spans:
                self.lo, self.hi = min(a for a, _ in spans), max(b for _, b in spans)

    def __call__(self, t: torch.Tensor) -> None:
        start = t.data_ptr()
        a = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
        b = (start + t.numel() * t.element_size()) // mmap.PAGESIZE * mmap.PAGESIZE
        if self.libc is not None and self.lo <= a < b <= self.hi:
            self.libc.madvise(ctypes.c_void_p(a), ctypes.c_size_t(b - a), 4)  # MADV_DONTNEED


def _copy_range(dst: torch.Tensor, flats: list[torch.Tensor], start: int, release) -> None:
    """dst.view(-1)[:] = the virtual concatenation of `flats` from element `start` (casting to dst's dtype)."""
    out, done = dst.view(-1), 0
    for f in flats:
        n = f.numel()
        if start >= n:
            start -= n
            continue
        take = min(n - start, out.numel() - done)
        out[done:done + take].copy_(f[start:start + take])
        release(f[start:start + take])
        done, start = done + take, 0
        if done == out.numel():
            return
    raise CheckpointError(f"consolidation ran out of data after {done} of {out.numel()} elements")


def _merge_rank(out: dict[str, torch.Tensor], f: Path, r: int, world: int, stage: int, shapes: list,
                paddings: list | None) -> None:
    """Copy rank r's fp32 partition of every parameter into `out`."""
    osd = _load_ds(f)["optimizer_state_dict"]
    release = _PageRelease(f)
    if stage == 3:
        # every parameter is split in `world` equal parts (the last padded); rank r's flat groups hold
        # part r of each parameter, one after another
        flats, offset = osd["fp32_flat_groups"], 0
        for group in shapes:
            for name, shape in group.items():
                n = math.prod(shape)
                part = -(-n // world)
                lo, hi = r * part, min((r + 1) * part, n)
                if hi > lo:
                    _copy_range(out[name].view(-1)[lo:hi], flats, offset, release)
                offset += part
        if offset != sum(x.numel() for x in flats):
            raise CheckpointError(f"{f}: holds {sum(x.numel() for x in flats)} elements, the model needs {offset}")
        return
    # ZeRO-1/2: each parameter group is one flat vector (parameters back to back, optionally padded),
    # split in `world` equal contiguous partitions; rank r holds partition r
    for g, (group, part) in enumerate(zip(shapes, osd["single_partition_of_fp32_groups"], strict=True)):
        lo_r, offset = r * part.numel(), 0
        for i, (name, shape) in enumerate(group.items()):
            n = math.prod(shape)
            a, b = max(offset, lo_r), min(offset + n, lo_r + part.numel())
            if b > a:
                out[name].view(-1)[a - offset:b - offset].copy_(part[a - lo_r:b - lo_r])
                release(part[a - lo_r:b - lo_r])
            offset += n + (paddings[g][i] if paddings is not None else 0)


def _merge_frozen(out: dict[str, torch.Tensor], frozen: dict, model_files: list[Path], stage: int,
                  world: int) -> None:
    """Parameters outside the optimizer (LoRA's frozen base weights), saved in the model-states files in
    the training dtype: whole in rank 0's file under ZeRO-2, one flat padded partition per rank under
    ZeRO-3 (in every rank's file)."""
    files = model_files if stage == 3 else model_files[:1]
    if stage == 3 and len(files) != world:
        raise CheckpointError(f"{files[0].parent}: {len(files)} *_model_states.pt files for a world of {world}")
    for r, f in enumerate(files):
        fragments = _load_ds(f)["frozen_param_fragments"]
        release = _PageRelease(f)
        for name, shape in frozen.items():
            frag, dst = fragments[name], out[name].view(-1)
            if stage != 3:
                dst.copy_(frag.reshape(-1))
                continue
            n = math.prod(shape)
            part = -(-n // world)
            lo, hi = r * part, min((r + 1) * part, n)
            if hi > lo:
                dst[lo:hi].copy_(frag.reshape(-1)[:hi - lo])
                release(frag)
        del fragments


def consolidated_state_dict(checkpoint_dir: str, tag: str, dtype: torch.dtype = torch.float32
                            ) -> dict[str, torch.Tensor]:
    """Full weights merged from every rank's ZeRO-2/3 shard files, streamed: the files are memory-mapped
    and read one rank at a time, each parameter's slices are copied (and cast to `dtype`) straight into
    its final tensor, and Adam's moments are never touched. Peak host memory: the result plus one rank's
    fp32 partition (DeepSpeed's zero_to_fp32 holds every rank's partition and then a merged copy).
    Equal to zero_to_fp32's result, bit for bit (tested).

    Reads pickled DeepSpeed checkpoint files: only for checkpoint directories you trust.
    """
    d = Path(checkpoint_dir) / tag
    model_files = sorted(d.glob("*_model_states.pt"), key=_rank_of)
    optim_files = sorted(d.glob("*_optim_states.pt"), key=_rank_of)
    if not model_files or not optim_files:
        raise CheckpointError(f"{d}: no DeepSpeed *_model_states.pt / *_optim_states.pt files")
    osd = _load_ds(optim_files[0])["optimizer_state_dict"]
    stage, world = osd["zero_stage"], osd["partition_count"]
    world = max(world) if isinstance(world, list) else world
    paddings = osd.get("param_alignment_paddings")
    del osd
    if world != len(optim_files):
        raise CheckpointError(f"{d}: {len(optim_files)} *_optim_states.pt files for a world of {world}")
    ms = _load_ds(model_files[0])
    shapes = ms["param_shapes"]
    frozen = dict(ms.get("frozen_param_shapes") or {})  # not in the optimizer: e.g. the base weights under LoRA
    out: dict[str, torch.Tensor] = {}
    for name in ms["buffer_names"]:
        buf = ms["module"][name]
        out[name] = buf.to(dtype).clone() if buf.is_floating_point() else buf.clone()
    for group in [*shapes, frozen]:
        for name, shape in group.items():
            out[name] = torch.empty(tuple(shape), dtype=dtype)
    shared = dict(ms["shared_params"])
    del ms  # unmaps the file: a ZeRO-2 model-states file holds every weight in the training dtype

    # no_grad: the fp32 partitions are saved as leaves that require grad, and a recorded copy_ would keep
    # every rank's mapping alive through the autograd graph
    with torch.no_grad():
        if frozen:
            _merge_frozen(out, frozen, model_files, stage, world)
        for r, f in enumerate(optim_files):  # one rank's file mapped at a time: it is unmapped on return
            _merge_rank(out, f, r, world, stage, shapes, paddings)
    for name, source in shared.items():
        out[name] = out[source]
    return out


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
