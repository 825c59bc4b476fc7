"""The only module that imports deepspeed and torch.distributed: the process group, ZeRO-3 construction,
and the engine the loop's owners drive (`Engine`: forward, backward, step, lr, skipped, grad_norm, save,
load). deepspeed itself is imported on first use, so importing the step, the evaluator, the logger or
the checkpointer (which reach DeepSpeed only through an Engine) loads no deepspeed.

Keeping it here means the config, data, loss, model and artifact code can be imported and tested without
DeepSpeed, and a future FSDP2 engine would replace this file alone.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from rm_trainer import disk
from rm_trainer.errors import UserError

# DeepSpeed 0.19 still calls the torch.distributed names torch 2.13 deprecates; one warning per call
# site per rank would bury the training log.
warnings.filterwarnings("ignore", message=r".*torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)")


def world_size_from_env() -> int:
    # Launchers (deepspeed, torchrun, our slurm script) export WORLD_SIZE before the process starts,
    # so the DeepSpeed JSON can be checked against the run config before any process group exists.
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    sp: int = 1  # train.sequence_parallel: consecutive ranks form one sequence group sharing each micro-batch

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_world(self) -> int:
        """Data-parallel groups: what the batch is split over (the world without sequence parallelism)."""
        return self.world_size // self.sp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.sp

    @property
    def counts(self) -> bool:
        """Whether this rank's batch statistics count: a sequence group's ranks hold the same rewards, so its
        first rank alone adds them to a sum over the world."""
        return self.rank % self.sp == 0

    # Rank 0 tells the others something through the launcher's key-value store, without a collective:
    # how data preparation (data/cache.py) waits out a long solo job.
    def publish(self, key: str, value: str) -> None:
        publish(key, value)

    def wait_for(self, key: str, timeout_s: float) -> str:
        return wait_for(key, timeout_s)


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
        import deepspeed

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
        import deepspeed

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
        from transformers.integrations import HfDeepSpeedConfig

        return HfDeepSpeedConfig(ds_config)
    return None


class Engine:
    """The DeepSpeed engine behind the few methods the loop's owners call. The step, the evaluator, the
    checkpointer and the logger see only this class: an FSDP2 engine would implement the same methods."""

    def __init__(self, ds_engine, offload=None):  # offload: long_context.ActivationOffload, or None
        self.ds = ds_engine
        self.offload = offload

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        return self.ds(*args, **kwargs)

    def micro_step(self):
        """Around one micro-batch's forward AND backward (--offload_activations: see ActivationOffload)."""
        return contextlib.nullcontext() if self.offload is None else self.offload.micro_step()

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss)  # DeepSpeed scales by 1/grad_accum and reduces across ranks

    def step(self) -> None:
        """At the accumulation boundary DeepSpeed applies the update, unless the all-reduced gradient norm
        is non-finite: then it skips it on every rank together and counts it (`skipped`)."""
        self.ds.step()

    def aux_loss(self) -> torch.Tensor | None:
        """What the last forward left to add to the loss (an MoE router's load-balancing loss), or None."""
        return getattr(self.ds.module, "aux_loss", None)

    def tie_log_nu(self) -> torch.Tensor | None:
        """The Davidson tie parameter theta (fp32, with grad) of the last forward; None without one."""
        return getattr(self.ds.module, "tie_log_nu", None)

    def lr(self) -> float:
        return self.ds.get_lr()[0]

    def skipped(self) -> int:
        """How many updates DeepSpeed has skipped so far (a host counter: reading it waits for nothing)."""
        return self.ds.skipped_steps

    def grad_norm(self) -> float | None:
        g = self.ds.get_global_grad_norm()
        if g is None:
            return None
        return float(g.item() if torch.is_tensor(g) else g)

    def sizes(self) -> tuple[int, int]:
        """(the weights in their dtype, one checkpoint of all ranks together). A checkpoint holds the
        trainable weights (ZeRO-2's model-states file; an upper bound under ZeRO-3) and, per trainable
        parameter, the fp32 partition and Adam's two moments (the optimizer shards): 12 bytes. Frozen
        weights (LoRA's base) are not saved."""
        trainable = weight_bytes = trainable_bytes = 0
        for p in self.ds.module.parameters():
            n = int(getattr(p, "ds_numel", p.numel()))
            weight_bytes += n * p.element_size()
            if p.requires_grad:
                trainable, trainable_bytes = trainable + n, trainable_bytes + n * p.element_size()
        return weight_bytes, trainable_bytes + 12 * trainable

    def train(self) -> None:
        self.ds.train()

    def eval(self) -> None:
        self.ds.eval()

    def save(self, save_dir: str, tag: str) -> BaseException | None:
        """DeepSpeed's files of this rank. Returns the first write the disk refused (disk.py), else None.
        save_checkpoint runs collectives after its writes (ZeRO-3 re-gathers persistent parameters, then
        a barrier): a write that raised would leave this rank out of them and the others waiting until
        the timeout. So its file writes are recorded, not raised, and every rank leaves it together; the
        caller then lets the ranks agree. save_latest=False: DeepSpeed would point `latest` at the
        uncommitted tag; checkpoint_files.commit() writes it after the rename instead."""
        failures: list[BaseException] = []
        with (_recorded(self.ds.checkpoint_engine, "save", failures),
              _recorded(self.ds, "_copy_recovery_script", failures)):
            # exclude_frozen_parameters: a LoRA checkpoint holds the adapters and the head (and their Adam
            # state), not the frozen base weights: those are the run's --model (fingerprinted in the resume
            # keys), read back at resume (they are loaded at start-up) and at consolidation
            self.ds.save_checkpoint(save_dir, tag=tag, save_latest=False, exclude_frozen_parameters=True)
        return failures[0] if failures else None

    def load(self, load_dir: str, tag: str) -> None:
        """Weights, optimizer and LR-scheduler state. Unpickles DeepSpeed files: trusted directories only."""
        frozen = any(not p.requires_grad for p in self.ds.module.parameters())  # LoRA: not in the files
        path, _ = self.ds.load_checkpoint(load_dir, tag=tag, load_optimizer_states=True,
                                          load_lr_scheduler_states=True, load_module_strict=not frozen)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {load_dir}/{tag}")
        # DeepSpeed 0.19.8's ZeRO-3 universal load gives every sub-group the same `step` tensor object;
        # torch's Adam increments it in place, once per sub-group, so with two parameter groups (decay and
        # no-decay) the bias correction would run twice as fast. Each sub-group gets its own copy.
        inner = getattr(self.ds.optimizer, "optimizer", None)
        for state in getattr(inner, "state", {}).values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()


@contextlib.contextmanager
def _recorded(obj, name: str, failures: list[BaseException]):
    """For the duration, obj.<name>(...) records a write the disk refuses into `failures` (and skips the
    writes after it) instead of raising; any other exception still raises."""
    original = getattr(obj, name)
    own = name in vars(obj)

    def guarded(*args, **kwargs):
        if failures:
            return None
        try:
            return original(*args, **kwargs)
        except (OSError, RuntimeError) as e:
            if not disk.is_disk_failure(e):
                raise
            failures.append(e)
            return None

    setattr(obj, name, guarded)
    try:
        yield
    finally:
        if own:
            setattr(obj, name, original)
        else:
            delattr(obj, name)


def initialize(model: torch.nn.Module, ds_config: dict, optimizer=None, lr_scheduler=None,
               leaf_modules: list[type] | None = None, offload=None) -> Engine:
    """leaf_modules (ZeRO-3): module classes whose parameters are gathered all at once on entry, e.g. an
    MoE block, so that ranks whose tokens reach different experts gather the same parameters."""
    import deepspeed

    if leaf_modules and int(ds_config.get("zero_optimization", {}).get("stage", 0)) == 3:
        from deepspeed.utils import set_z3_leaf_modules

        set_z3_leaf_modules(model, leaf_modules)

    engine, _, _, _ = deepspeed.initialize(model=model, config=ds_config, optimizer=optimizer,
                                           lr_scheduler=lr_scheduler,
                                           model_parameters=None if optimizer else
                                           [p for p in model.parameters() if p.requires_grad])
    return Engine(engine, offload)


def to_universal(src: Path, dst: Path, log: Path) -> None:
    """DeepSpeed's own converter (deepspeed.checkpoint.ds_to_universal) of the checkpoint folder src into a
    universal one at dst, in a child process: its worker pools never fork a process that holds the
    process group. Output goes to `log`. A failure raises, OSError(ENOSPC) when the disk was full."""
    workers = max(1, min(8, len(os.sched_getaffinity(0))))
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(src),
           "--output_folder", str(dst), "--num_extract_workers", str(workers),
           "--num_merge_workers", str(max(1, workers // 2)),
           "--inject_missing_state"]  # a plain (non-Megatron) model carries no universal_checkpoint_info
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT,
                            env=os.environ | {"PYTHONUNBUFFERED": "1"}).returncode
    if rc != 0:
        tail = log.read_text(errors="replace")[-2000:]
        if "No space left on device" in tail or "Disk quota exceeded" in tail:
            raise OSError(errno.ENOSPC, f"ds_to_universal ran out of space (log: {log})")
        raise RuntimeError(f"DeepSpeed's ds_to_universal failed (exit {rc}) on {src}; its log is {log}:\n{tail}")


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
