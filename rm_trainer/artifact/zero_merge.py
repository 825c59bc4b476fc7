"""The offline ZeRO merge: full weights from every rank's ZeRO-2/3 shard files, read as files (no deepspeed
import, no process group), streamed one rank at a time into tensors of the artifact's dtype.

Reads pickled DeepSpeed checkpoint files: only for checkpoint directories you trust.
"""

from __future__ import annotations

import ctypes
import math
import mmap
import re
import sys
from pathlib import Path

import torch

from rm_trainer.errors import CheckpointError


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
                paddings: list | None, partition: list[int]) -> None:
    """Copy rank r's fp32 partition of every parameter into `out`. partition: ZeRO-1/2's partition size
    per group (rank 0's: the last rank's saved partition is shorter when the group was padded)."""
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
    # split in `world` equal contiguous partitions (the group padded to a multiple of 2 x world first, and
    # that padding left out of the last rank's saved partition); rank r holds partition r
    for g, (group, part) in enumerate(zip(shapes, osd["single_partition_of_fp32_groups"], strict=True)):
        lo_r, offset = r * partition[g], 0
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


def universal_state_dict(d: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Full weights of a universal checkpoint (DeepSpeed's ds_to_universal, train/elastic.py): one
    zero/<name>/fp32.pt per parameter (a tensor, or {"param": tensor}), flattened under ZeRO-3, reshaped
    here to the shapes its model-states file records; buffers and tied weights from that file too."""
    model_files = sorted(d.glob("*_model_states.pt"), key=_rank_of)
    if not model_files or not (d / "zero").is_dir():
        raise CheckpointError(f"{d}: not a universal checkpoint (no zero/ folder or *_model_states.pt)")
    ms = _load_ds(model_files[0])
    shapes = {k: v for group in ms["param_shapes"] for k, v in group.items()} | dict(ms.get("frozen_param_shapes")
                                                                                   or {})
    out = {n: (b.to(dtype) if b.is_floating_point() else b).clone()
           for n, b in ms["module"].items() if n in ms["buffer_names"]}
    missing = []
    for name, shape in shapes.items():
        f = d / "zero" / name / "fp32.pt"
        if not f.is_file():
            missing.append(name)
            continue
        t = torch.load(f, map_location="cpu", weights_only=True)  # tensors only
        out[name] = (t["param"] if isinstance(t, dict) else t).reshape(tuple(shape)).to(dtype)
    if missing:
        raise CheckpointError(f"{d}: universal checkpoint lacks zero/<name>/fp32.pt for {missing[:5]}"
                              + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    for name, source in dict(ms["shared_params"]).items():
        out[name] = out[source]
    return out


def consolidated_state_dict(checkpoint_dir: str, tag: str, dtype: torch.dtype = torch.float32
                            ) -> dict[str, torch.Tensor]:
    """Full weights merged from every rank's ZeRO-2/3 shard files, streamed: the files are memory-mapped
    and read one rank at a time, each parameter's slices are copied (and cast to `dtype`) straight into
    its final tensor, and Adam's moments are never touched. Peak host memory: the result plus one rank's
    fp32 partition (DeepSpeed's zero_to_fp32 holds every rank's partition and then a merged copy).
    Equal to zero_to_fp32's result, bit for bit (tested). A universal checkpoint folder is read by
    universal_state_dict.

    Reads pickled DeepSpeed checkpoint files: only for checkpoint directories you trust.
    """
    d = Path(checkpoint_dir) / tag
    model_files = sorted(d.glob("*_model_states.pt"), key=_rank_of)
    optim_files = sorted(d.glob("*_optim_states.pt"), key=_rank_of)
    if not optim_files and (d / "zero").is_dir():
        return universal_state_dict(d, dtype)
    if not model_files or not optim_files:
        raise CheckpointError(f"{d}: no DeepSpeed *_model_states.pt / *_optim_states.pt files")
    osd = _load_ds(optim_files[0])["optimizer_state_dict"]
    stage, world = osd["zero_stage"], osd["partition_count"]
    world = max(world) if isinstance(world, list) else world
    paddings = osd.get("param_alignment_paddings")
    partition = [p.numel() for p in osd.get("single_partition_of_fp32_groups") or []]
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
            _merge_rank(out, f, r, world, stage, shapes, paddings, partition)
    for name, source in shared.items():
        out[name] = out[source]
    return out
