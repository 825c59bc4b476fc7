"""Checkpoints on disk: atomic commit, a manifest with sizes and checksums, rotation that keeps an intact
checkpoint, resume that skips a damaged one. The owner that decides *when* to save is checkpointer.py.

Layout of OUT/checkpoints/:
  step_N/                  a committed checkpoint: DeepSpeed shards of every rank, rm_state_rank{r}.pt
                           (step, RNG states), rm_trainer_meta.json (resolved config, hashes, probe),
                           tokenizer/, and manifest.json, written last: every file with its size and checksum
  step_N.tmp/              being written (or left by a killed run: ignored, then removed)
  latest                   the newest committed tag, replaced atomically (DeepSpeed's own tools read it)

Commit: every rank writes its files into step_N.tmp/ and checksums them (in parallel, while they are
still in the page cache) -> barrier -> rank 0 merges the checksums into the manifest, renames the folder,
then replaces `latest`. Rotation then deletes the oldest committed folders beyond keep_last, but never the
newest intact one.

Checksum: crc32 of the whole file up to 4 MiB; above that, of its first and last MiB and 16 evenly spaced
64 KiB blocks (about 3 MiB read whatever the size, so verifying a 1 TB checkpoint takes seconds). With the
exact size it catches a truncated, missing, swapped or partly overwritten file; it does not prove every
byte of a multi-GB shard.

Loading a DeepSpeed checkpoint unpickles its files: resume only from directories you trust.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rm_trainer.errors import CheckpointError

MANIFEST = "manifest.json"
META_FILE = "rm_trainer_meta.json"
TOKENIZER_DIR = "tokenizer"
LATEST = "latest"
CHECKSUMS = ".checksums_rank{}.json"  # per-rank sidecar inside step_N.tmp/, merged into the manifest
FULL_BELOW = 4 << 20
EDGE, BLOCK, SAMPLES = 1 << 20, 64 << 10, 16


@dataclass
class CheckpointRecord:
    """rm_trainer_meta.json: everything a checkpoint carries besides DeepSpeed's shards, so that
    consolidation needs nothing else, and a resume can tell whether it would be exact."""

    run_config: dict
    backbone_config: dict
    dtype: str
    pad_token_id: int
    eos_token_id: int
    max_len: int
    world_size: int
    resume_keys: dict
    reward_stats: dict = field(default_factory=dict)  # held-out mean/std of the last eval
    step: int = 0
    probe: dict = field(default_factory=dict)  # input_ids, seq_lengths and the live engine's rewards
    tracking: dict = field(default_factory=dict)  # e.g. the wandb run id, continued by a resumed run

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def read(cls, path: Path) -> CheckpointRecord:
        d = json.loads(path.read_text())
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def tag_for(step: int) -> str:
    return f"step_{step}"


def step_of(d: Path) -> int | None:
    m = re.fullmatch(r"step_(\d+)", d.name)
    return int(m.group(1)) if m else None


def committed(root: Path) -> list[tuple[int, Path]]:
    """Committed checkpoints under root (a manifest exists; it may still be damaged), oldest first."""
    out = []
    if root.is_dir():
        for d in root.iterdir():
            step = step_of(d)
            if step is not None and d.is_dir() and (d / MANIFEST).is_file():
                out.append((step, d))
    return sorted(out)


def clean_partial(root: Path) -> list[str]:
    """Move step_*.tmp folders left by a killed run out of the way (rank 0, before training): each is
    renamed to .trash-* at once (a new save of that step can then never collide with it) and deleted
    later by purge_trash. Returns their names."""
    moved = []
    if root.is_dir():
        for d in sorted(root.glob("step_*.tmp")):
            warnings.warn(f"rm_trainer: ignoring and removing the half-written checkpoint {d} (a run was "
                          "killed while saving; it was never committed)", stacklevel=2)
            d.rename(root / f".trash-{d.name}")
            moved.append(d.name)
    return moved


def purge_trash(root: Path) -> None:
    for d in root.glob(".trash-*"):
        shutil.rmtree(d, ignore_errors=True)


# ------------------------------------------------------------------ checksums and the manifest
def file_checksum(path: Path) -> str:
    """'crc32:XXXXXXXX' over the whole file (<= 4 MiB) or 'crc32s:XXXXXXXX' over the sampled blocks."""
    size = path.stat().st_size
    crc = 0
    with open(path, "rb") as f:
        if size <= FULL_BELOW:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                crc = zlib.crc32(chunk, crc)
            return f"crc32:{crc:08x}"
        spans = [(0, EDGE)] + [(int(i * (size - BLOCK) / (SAMPLES - 1)), BLOCK) for i in range(SAMPLES)]
        for offset, n in spans + [(size - EDGE, EDGE)]:
            f.seek(offset)
            crc = zlib.crc32(f.read(n), crc)
    return f"crc32s:{crc:08x}"


def owner_rank(name: str, world_size: int) -> int:
    """Which rank wrote (and checksums) a checkpoint file: the first rank number in its name
    (zero_pp_rank_3_mp_rank_00_optim_states.pt -> 3, rm_state_rank1.pt -> 1), else rank 0."""
    m = re.search(r"rank_?(\d+)", Path(name).name)
    r = int(m.group(1)) if m else 0
    return r if r < world_size else 0


def _files(tag_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(tag_dir)) for p in tag_dir.rglob("*")
                  if p.is_file() and p.name != MANIFEST and not re.fullmatch(r"\.checksums_rank\d+\.json", p.name))


def write_rank_checksums(tag_dir: Path, rank: int, world_size: int) -> None:
    """Every rank, after writing its files and before the commit barrier: checksum the files it owns."""
    sums = {n: file_checksum(tag_dir / n) for n in _files(tag_dir) if owner_rank(n, world_size) == rank}
    (tag_dir / CHECKSUMS.format(rank)).write_text(json.dumps(sums))


def write_manifest(tag_dir: Path, step: int, world_size: int) -> None:
    """Rank 0 at commit: size of every file, checksums from the ranks' sidecars (computed here if missing)."""
    sums: dict[str, str] = {}
    for side in tag_dir.glob(".checksums_rank*.json"):
        sums.update(json.loads(side.read_text()))
        side.unlink()
    files = {n: {"size": (tag_dir / n).stat().st_size, "checksum": sums.get(n) or file_checksum(tag_dir / n)}
             for n in _files(tag_dir)}
    _atomic_write(tag_dir / MANIFEST, json.dumps({"step": step, "world_size": world_size, "files": files},
                                                 indent=1))


def verify_manifest(tag_dir: Path, checksums: bool = True) -> dict:
    """Raise CheckpointError naming every missing, truncated or damaged file; return the manifest."""
    manifest_path = tag_dir / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{tag_dir}: no {MANIFEST}: the checkpoint was never committed (or predates it)")
    try:
        manifest = json.loads(manifest_path.read_text())
        listed = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{manifest_path}: unreadable manifest ({e})") from None
    problems = []
    for name, entry in listed.items():
        size, want = (entry, None) if isinstance(entry, int) else (entry["size"], entry.get("checksum"))
        f = tag_dir / name
        if not f.is_file():
            problems.append(f"missing {name}")
        elif f.stat().st_size != size:
            problems.append(f"{name} has {f.stat().st_size} bytes, manifest says {size} (truncated or replaced)")
        elif checksums and want and file_checksum(f) != want:
            problems.append(f"{name} does not match its checksum (damaged or overwritten)")
    if problems:
        raise CheckpointError(f"{tag_dir}: checkpoint is damaged: {'; '.join(problems)}")
    return manifest


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".writing")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def commit(root: Path, step: int, world_size: int) -> Path:
    """Rank 0, after every rank has written and checksummed step_N.tmp/: manifest, rename, latest."""
    tmp, final = root / (tag_for(step) + ".tmp"), root / tag_for(step)
    write_manifest(tmp, step, world_size)
    if final.exists():  # re-saving the same step after a resume: replace the old commit
        shutil.rmtree(final)
    os.replace(tmp, final)
    _atomic_write(root / LATEST, final.name)
    return final


def rotation_plan(root: Path, keep_last: int, keep: set[str] = frozenset()) -> list[Path]:
    """Committed folders to delete: all but the newest keep_last and those named in `keep` (the best ones),
    except the newest *intact* one, which is kept however old it is (a damaged newer save must not take the
    last good one with it)."""
    found = [d for _, d in committed(root)]
    doomed = [d for d in (found[:-keep_last] if keep_last else []) if d.name not in keep]
    for d in reversed(found):
        try:
            verify_manifest(d)
        except CheckpointError:
            continue
        return [x for x in doomed if x != d]
    return []  # nothing intact at all: delete nothing


def rotate(root: Path, keep_last: int, keep: set[str] = frozenset()) -> list[str]:
    """Delete what rotation_plan says: each folder is first renamed (atomic), so a crash mid-deletion never
    leaves a half-deleted folder that still looks committed."""
    removed = []
    for d in rotation_plan(root, keep_last, keep):
        d.rename(root / f".trash-{d.name}")
        removed.append(d.name)
    purge_trash(root)
    return removed


# ------------------------------------------------------------------ which checkpoint to resume
def resume_target(root: Path, mode: str) -> Path | None:
    """`never` -> None; `auto` -> the newest intact committed checkpoint (damaged newer ones are skipped
    with a warning naming the bad file; if every one is damaged, an error); PATH -> that checkpoint,
    refused with the bad file named if it is damaged."""
    if mode == "never":
        return None
    if mode == "auto":
        found = committed(root)
        damaged = []
        for _, d in reversed(found):
            try:
                verify_manifest(d)
            except CheckpointError as e:
                warnings.warn(f"rm_trainer: --resume auto skips {e}; trying an older checkpoint", stacklevel=2)
                damaged.append(str(e))
                continue
            return d
        if damaged:
            raise CheckpointError(f"--resume auto: every committed checkpoint in {root} is damaged: "
                                  + " | ".join(damaged) + ". Pass --resume never to start over (the damaged "
                                  "folders are then rotated out), or --resume PATH to pick one")
        return None
    p = Path(mode)
    if not p.exists():
        raise CheckpointError(f"--resume {mode}: no such checkpoint folder")
    if not (p / MANIFEST).is_file() and (p / LATEST).is_file():  # a checkpoints/ root was given
        p = p / (p / LATEST).read_text().strip()
    try:
        verify_manifest(p)
    except CheckpointError as e:
        raise CheckpointError(f"--resume {mode}: refusing to load {e}. Pass another checkpoint, or "
                              "--resume auto to take the newest intact one") from None
    return p


def resume_differences(tag_dir: Path, now: dict[str, Any]) -> list[str]:
    """What would make a resume inexact: each item names the field, the checkpoint's and the current value."""
    then = CheckpointRecord.read(tag_dir / META_FILE).resume_keys
    return [f"{k}: checkpoint has {then.get(k)!r}, this run has {now[k]!r}" for k in now if then.get(k) != now[k]]


# ------------------------------------------------------------------ per-rank state
def rank_state(step: int) -> dict[str, Any]:
    """Per-rank state that DeepSpeed does not keep: the step and every RNG (python, numpy, torch)."""
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "step": step,
        "python_rng": [py[0], list(py[1]), py[2]],
        "numpy_rng": [np_state[0], torch.from_numpy(np_state[1].copy()), int(np_state[2]), int(np_state[3]),
                      float(np_state[4])],
        "torch_rng": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state()
    return state


def restore_rank_state(path: Path) -> int:
    s = torch.load(path, weights_only=True)  # our own file: tensors and plain values only
    random.setstate((s["python_rng"][0], tuple(s["python_rng"][1]), s["python_rng"][2]))
    n = s["numpy_rng"]
    np.random.set_state((n[0], n[1].numpy(), n[2], n[3], n[4]))
    torch.set_rng_state(s["torch_rng"])
    if "cuda_rng" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda_rng"])
    return int(s["step"])
