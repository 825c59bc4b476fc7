"""Resume on a different number of ranks, or under a different ZeRO stage (elastic resume).

ZeRO shards are per rank: a checkpoint written by 2 ranks cannot be loaded by 1 or 4 as it is. DeepSpeed's
own universal-checkpoint converter (`ds_to_universal`) rewrites it once into one file per parameter (fp32
weights and both Adam moments), which any world size and any ZeRO stage loads (`load_universal`). Here:

  keep_global_batch  the checkpoint's global batch (micro x accum x data-parallel world) is kept: grad_accum
                     is recomputed for the new world, or the run is refused naming the world sizes that fit.
                     The global batch is a pure function of (seed, step) (data/batching.py), so the same
                     pairs train at every step on any world size.
  ensure_universal   rank 0 converts step_N/ into step_N/universal/ (in a child process, never inside a
                     collective wait) while the other ranks poll the store; a converted folder carries its
                     own manifest (sizes, checksums, and what was converted) and is reused by later resumes.

Converting unpickles DeepSpeed files: like any resume, trusted checkpoints only.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch

from rm_trainer import disk
from rm_trainer.artifact import checkpoint_files as ckpt
from rm_trainer.config import RunConfig
from rm_trainer.errors import CheckpointError, ConfigError
from rm_trainer.train import engine

UNIVERSAL = "universal"
CONVERSION = "conversion.json"
ELASTIC_KEYS = ("world_size", "zero_stage")  # what a universal checkpoint lets change


def keep_global_batch(cfg: RunConfig, world: int, then: dict, target: Path) -> RunConfig:
    """cfg with grad_accum set so that micro x accum x world equals the checkpoint's global batch."""
    g, m = int(then["global_batch"]), cfg.train.micro_batch_size
    if g % (m * world) == 0:
        accum = g // (m * world)
        if accum != cfg.train.grad_accum:
            print(f"[rm_trainer] elastic resume of {target.name}: global batch {g} kept, grad_accum "
                  f"{cfg.train.grad_accum} -> {accum} (micro_batch_size {m} x {world} ranks)", flush=True)
        return cfg.model_copy(update={"train": cfg.train.model_copy(update={"grad_accum": accum})})
    fits = [w for w in range(1, g // m + 1) if g % (m * w) == 0] if g % m == 0 else []
    closest = sorted(fits, key=lambda w: (abs(w - world), w))[:3]
    micros = [d for d in range(1, g // world + 1) if g % (d * world) == 0]
    raise ConfigError([
        f"cannot resume {target} on {world} ranks: its global batch of {g} pairs (micro_batch_size x grad_accum "
        f"x world_size, kept so that every step trains the same pairs) is not micro_batch_size {m} x an integer "
        f"grad_accum x {world} ranks. "
        + (f"World sizes that fit with micro_batch_size {m}: {fits} (closest: {closest}). " if fits else "")
        + (f"On {world} ranks, micro_batch_size one of {micros}. " if micros else
           f"No micro_batch_size splits {g} pairs over {world} ranks. ")
        + "Or pass --resume never to start a new run"])


def _verified(folder: Path) -> dict | None:
    """The conversion record of an intact universal folder, else None (absent or damaged)."""
    try:
        ckpt.verify_manifest(folder)
        return json.loads((folder / CONVERSION).read_text())
    except (CheckpointError, OSError, ValueError):
        return None


def ensure_universal(target: Path, rt: engine.Runtime, timeout_s: float, stage: int) -> Path:
    """Every rank: target/universal/, converted by rank 0 unless an intact one that this ZeRO stage can load
    exists; the others poll."""
    folder = target / UNIVERSAL
    key = f"rm_trainer/universal/{target.name}"
    if not rt.is_main:
        engine.wait_for(key, timeout_s)
        return folder
    info = _verified(folder)
    if info is None or (stage < 3 and not info.get("loads_under_zero12")):
        convert(target, folder, zero12=stage < 3)
    engine.publish(key, "ready")
    return folder


def _for_every_stage(folder: Path, zero12: bool) -> bool:
    """The converter writes what the saving stage's loader reads; make the folder load under ZeRO-3, and
    under ZeRO-1/2 if `zero12`. Returns whether ZeRO-1/2 can load it.
    - The model-states file (only metadata is read from it: step counts, LR schedule) is found by the
      loading stage's name: ZeRO-3 looks for zero_pp_rank_0_mp_rank_*, ZeRO-1/2 for mp_rank_*. A hard
      link gives it the other name (no extra bytes).
    - ZeRO-3 reads Adam's step from zero/optimizer_state.pt, ZeRO-1/2 from zero/<param>/step.pt; ZeRO-1/2
      also needs each state as {"param": tensor} in the parameter's shape, where a ZeRO-3 conversion
      wrote flat tensors. Both are added where missing: a ZeRO-3 checkpoint's states are rewritten, once,
      only when a ZeRO-1/2 run loads it (that pass reads and writes every byte again).
    - ZeRO-3's zero/optimizer_state.pt is cut to what a loader reads.
    Unpickles DeepSpeed files (trusted checkpoints only)."""
    z3, z2 = "zero_pp_rank_0_mp_rank_00_model_states.pt", "mp_rank_00_model_states.pt"
    have = [n for n in (z3, z2) if (folder / n).is_file()]
    if len(have) == 1:
        os.link(folder / have[0], folder / (z2 if have[0] == z3 else z3))
    zero, opt = folder / "zero", folder / "zero" / "optimizer_state.pt"
    sd = torch.load(opt, map_location="cpu", weights_only=False)  # DeepSpeed's pickle: trusted input
    states = sd.get("optimizer_state_dict", {}).get("state", {})
    if states:  # a ZeRO-3 conversion: the step is here, the tensors flat
        step = next(iter(states.values()))["step"]
        ms = torch.load(folder / have[0], map_location="cpu", weights_only=False)  # trusted DeepSpeed file
        shapes = {k: v for group in ms["param_shapes"] for k, v in group.items()}
        for name, shape in shapes.items() if zero12 else ():
            for key in ("fp32", "exp_avg", "exp_avg_sq"):
                f = zero / name / f"{key}.pt"
                t = torch.load(f, map_location="cpu", weights_only=True)
                if not isinstance(t, dict):
                    torch.save({"param": t.reshape(tuple(shape))}, f)
            if not (zero / name / "step.pt").is_file():
                torch.save(torch.as_tensor(step), zero / name / "step.pt")
        sd.setdefault("ds_version", ms["ds_version"])  # ZeRO-1/2's loader refuses a global state without it
        # the converter copies rank 0's whole optimizer file here (its fp32 partition and moments: a third
        # of a ZeRO-3 checkpoint's bytes at 2 ranks); the loaders read the step and the global state only
        sd.pop("fp32_flat_groups", None)
        sd["optimizer_state_dict"]["state"] = {k: {"step": v["step"]} for k, v in states.items()}
        torch.save(sd, opt)
        return zero12
    step = torch.load(next(zero.glob("*/step.pt")), map_location="cpu", weights_only=True)
    sd["optimizer_state_dict"] = {"state": {0: {"step": step}}, "param_groups": sd["param_groups"]}
    torch.save(sd, opt)
    return True


def convert(target: Path, folder: Path, zero12: bool = False) -> dict:
    """Rank 0: DeepSpeed's converter into folder.tmp/, the record and a manifest, then an atomic rename.
    A refused write (disk full) removes the half-written folder and raises DiskFullError."""
    tmp = folder.with_name(folder.name + ".tmp")
    disk.remove(tmp)
    if folder.exists():
        print(f"[rm_trainer] {folder} is damaged or incomplete: converting again", flush=True)
        disk.remove(folder)
    record = ckpt.CheckpointRecord.read(target / ckpt.META_FILE)
    t0 = time.perf_counter()
    print(f"[rm_trainer] converting {target.name} ({record.world_size} ranks) to a universal checkpoint in "
          f"{folder}", flush=True)
    try:
        engine.to_universal(target, tmp, log=target.parent / f".{target.name}.universal.log")
        zero12 = _for_every_stage(tmp, zero12)
        # self-contained: rm-consolidate --tag step_N/universal needs the record and the tokenizer
        shutil.copy2(target / ckpt.META_FILE, tmp / ckpt.META_FILE)
        shutil.copytree(target / ckpt.TOKENIZER_DIR, tmp / ckpt.TOKENIZER_DIR)
        info = {"converted_from": target.name, "step": record.step, "world_size": record.world_size,
                "zero_stage": record.resume_keys.get("zero_stage"), "loads_under_zero12": zero12,
                "seconds": round(time.perf_counter() - t0, 3)}
        (tmp / CONVERSION).write_text(json.dumps(info, indent=1) + "\n")
        ckpt.write_manifest(tmp, record.step, record.world_size)
        tmp.rename(folder)
    except (OSError, RuntimeError) as e:
        disk.remove(tmp)
        if disk.is_disk_failure(e):
            raise disk.DiskFullError(disk.message(f"converting {target.name} to a universal checkpoint in",
                                                  folder.parent, e, disk.tree_bytes(target))) from None
        raise
    info["bytes"] = disk.tree_bytes(folder)
    sharded = disk.tree_bytes(target) - info["bytes"]
    print(f"[rm_trainer] universal checkpoint ready in {info['seconds']:.1f}s: {disk.human(info['bytes'])} "
          f"(the sharded checkpoint: {disk.human(sharded)})", flush=True)
    return info
