"""Training checkpoints that can be trusted: atomic commit, rotation, exact resume, refusal when a
resume cannot be exact.

Layout of OUT/checkpoints/:
  step_N/                  a committed checkpoint: DeepSpeed shards of every rank, rm_state_rank{r}.pt
                           (step, RNG states), rm_trainer_meta.json (resolved config, hashes, probe),
                           tokenizer/, and manifest.json, written last, listing every file and its size
  step_N.tmp/              being written (or left by a killed run: ignored, then removed)
  latest                   the newest committed tag, replaced atomically (DeepSpeed's own tools read it)

Commit: every rank writes into step_N.tmp/ -> barrier -> rank 0 writes the manifest, renames the folder,
then replaces `latest` -> rotation deletes the oldest committed folders beyond keep_last.
Loading a DeepSpeed checkpoint unpickles its files: resume only from directories you trust.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

MANIFEST = "manifest.json"
META_FILE = "rm_trainer_meta.json"
TOKENIZER_DIR = "tokenizer"
LATEST = "latest"


def tag_for(step: int) -> str:
    return f"step_{step}"


def committed(root: Path) -> list[tuple[int, Path]]:
    """Committed checkpoints under root, oldest first."""
    out = []
    if root.is_dir():
        for d in root.iterdir():
            if d.is_dir() and not d.name.endswith(".tmp") and (d / MANIFEST).is_file():
                out.append((json.loads((d / MANIFEST).read_text())["step"], d))
    return sorted(out)


def clean_partial(root: Path) -> list[str]:
    """Remove step_*.tmp folders left by a killed run (rank 0, before training). Returns their names."""
    removed = []
    if root.is_dir():
        for d in sorted(root.glob("*.tmp")):
            warnings.warn(f"rm_trainer: ignoring and removing the half-written checkpoint {d} (a run was "
                          "killed while saving; it was never committed)", stacklevel=2)
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d.name)
    return removed


def verify_manifest(tag_dir: Path) -> dict:
    """Raise if any file listed in the manifest is missing or has another size (e.g. a lost rank)."""
    manifest_path = tag_dir / MANIFEST
    if not manifest_path.is_file():
        raise ValueError(f"{tag_dir}: no {MANIFEST}: the checkpoint was never committed (or predates it)")
    manifest = json.loads(manifest_path.read_text())
    problems = []
    for name, size in manifest["files"].items():
        f = tag_dir / name
        if not f.is_file():
            problems.append(f"missing {name}")
        elif f.stat().st_size != size:
            problems.append(f"{name} has {f.stat().st_size} bytes, manifest says {size}")
    if problems:
        raise ValueError(f"{tag_dir}: checkpoint is incomplete: {'; '.join(problems)}")
    return manifest


def write_manifest(tag_dir: Path, step: int, world_size: int) -> None:
    files = {str(p.relative_to(tag_dir)): p.stat().st_size for p in sorted(tag_dir.rglob("*")) if p.is_file()}
    _atomic_write(tag_dir / MANIFEST, json.dumps({"step": step, "world_size": world_size, "files": files},
                                                 indent=1))


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".writing")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def commit(root: Path, step: int, world_size: int, keep_last: int) -> list[str]:
    """Rank 0, after every rank has written step_N.tmp/: manifest, rename, latest, rotation."""
    tmp, final = root / (tag_for(step) + ".tmp"), root / tag_for(step)
    write_manifest(tmp, step, world_size)
    if final.exists():  # re-saving the same step after a resume: replace the old commit
        shutil.rmtree(final)
    os.replace(tmp, final)
    _atomic_write(root / LATEST, final.name)
    rotated = []
    for _, d in committed(root)[:-keep_last]:
        shutil.rmtree(d, ignore_errors=True)
        rotated.append(d.name)
    return rotated


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


def fingerprint(paths: list[str | None], tokenizer_dir: str | None) -> str:
    """sha256 over the data files' bytes and the tokenizer files: a resume on other data is refused."""
    return _fingerprint(tuple(p for p in paths if p), tokenizer_dir)


@functools.lru_cache(maxsize=8)  # hashed once per process, however often it is asked for
def _fingerprint(paths: tuple[str, ...], tokenizer_dir: str | None) -> str:
    h = hashlib.sha256()
    files = [Path(p) for p in paths if Path(p).is_file()]  # hub names and save_to_disk folders: by name
    if tokenizer_dir:
        files += sorted(p for p in Path(tokenizer_dir).glob("*") if p.is_file() and "token" in p.name)
    h.update("\0".join(p for p in paths if not Path(p).is_file()).encode())
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def resume_target(root: Path, mode: str) -> Path | None:
    """`never` -> None; `auto` -> newest committed (or None); else a committed checkpoint folder."""
    if mode == "never":
        return None
    if mode == "auto":
        found = committed(root)
        return found[-1][1] if found else None
    p = Path(mode)
    if not p.exists():
        raise ValueError(f"--resume {mode}: no such checkpoint folder")
    if not (p / MANIFEST).is_file() and (p / LATEST).is_file():  # a checkpoints/ root was given
        p = p / (p / LATEST).read_text().strip()
    verify_manifest(p)
    return p


def resume_differences(tag_dir: Path, now: dict[str, Any]) -> list[str]:
    """What would make a resume inexact: each item names the field, the checkpoint's and the current value."""
    meta = json.loads((tag_dir / META_FILE).read_text())
    then = meta["resume_keys"]
    return [f"{k}: checkpoint has {then.get(k)!r}, this run has {now[k]!r}" for k in now if then.get(k) != now[k]]
