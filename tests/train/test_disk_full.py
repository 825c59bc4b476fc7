"""A full disk, for real: a small tmpfs mounted where the run writes (root only; skipped with the reason
otherwise). At a checkpoint save of a 2-rank ZeRO-3 run, during data preparation, and during
consolidation: one message with the path and the space needed and free, exit 2, no traceback, nothing
half-written, the last committed checkpoint intact, and after space is freed the rerun finishes exactly
as an uninterrupted run."""

from __future__ import annotations

import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from helpers import BIN, ROOT, load_artifact, losses, run_env, train, train_args

from rm_trainer.artifact.checkpoint_files import verify_manifest
from rm_trainer.disk import tree_bytes

pytestmark = pytest.mark.slow


@contextmanager
def tmpfs(path: Path, size: int):
    """A tmpfs of `size` bytes at `path`; yields resize(bytes). Skips where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    kb = max(64, size // 1024)
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kb}k", "tmpfs", str(path)], capture_output=True,
                       text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {p.stderr.strip()}")

    def resize(n: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={max(64, n // 1024)}k", str(path)], check=True)

    try:
        yield resize
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def args(tiny_pretrained, demo_assets, **extra) -> list[str]:
    flags = dict(dtype="fp32", lr=1e-3, max_steps=6, warmup_steps=1, max_len=64, seed=5, eval_every=3, save_every=2,
                 keep_last=4, micro_batch_size=2) | extra
    return train_args(tiny_pretrained, demo_assets["train"], demo_assets["test"], "zero3", **flags)


def one_message(stderr: str, prog: str = "rm-train") -> str:
    lines = [line for line in stderr.splitlines() if line.startswith(f"{prog}: error:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-4000:]
    return lines[0]


def test_disk_full_at_a_save_stops_cleanly_and_resume_is_exact(tiny_pretrained, demo_assets, tmp_path):
    ref = tmp_path / "ref"
    train(ref, args(tiny_pretrained, demo_assets))  # uninterrupted: checkpoints at 2, 4, 6
    size = tree_bytes(ref / "checkpoints" / "step_2")
    out = tmp_path / "run"
    with tmpfs(out / "checkpoints", int(size * 1.6)) as resize:
        p = train(out, args(tiny_pretrained, demo_assets), launcher="deepspeed", check=False)  # torchrun would add
        msg = one_message(p.stderr)  # its own traceback of the failed rank
        print(f"\nthe full-disk message: {msg}")
        assert p.returncode == 2, p.stderr[-3000:]
        assert f"saving checkpoint step 4 to {out / 'checkpoints'} failed: No space left on device" in msg
        assert "it needed about" in msg and "were free there" in msg
        assert "step_4.tmp was removed and the last committed checkpoint (step_2) is intact" in msg
        names = sorted(x.name for x in (out / "checkpoints").iterdir())
        assert "step_4.tmp" not in names and "step_2" in names, names
        verify_manifest(out / "checkpoints" / "step_2")  # every file and checksum as committed
        resize(size * 8)  # space freed
        train(out, args(tiny_pretrained, demo_assets, resume="auto"))
    assert losses(out) == losses(ref)  # steps 3..6 after the resume: the same bits
    a, b = load_artifact(out)["state_dict"], load_artifact(ref)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_disk_full_during_data_preparation_is_one_message(tiny_pretrained, tmp_path):
    from rm_trainer.demo import prepare

    data = prepare(tmp_path / "demo", n_train=3000, n_test=10, seed=1)["train"]
    cache = tmp_path / "cache"
    with tmpfs(cache, 96 * 1024):
        cmd = [str(BIN / "rm-prepare"), *train_args(tiny_pretrained, data, max_len=64, cache_dir=cache,
                                                     output_dir=tmp_path / "o")]
        p = subprocess.run(cmd, cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=600)
        msg = one_message(p.stderr, "rm-prepare")
        assert p.returncode == 2 and f"preparing the tokenized data in {cache} failed" in msg, msg
        assert "No space left on device" in msg and not list(cache.iterdir())


def test_disk_full_during_consolidation_leaves_no_partial_reward_pt(tiny_pretrained, demo_assets, tmp_path):
    run = tmp_path / "run"
    train(run, args(tiny_pretrained, demo_assets, max_steps=2), launcher="python", nprocs=1)
    want = (run / "reward.pt").stat().st_size
    dest = tmp_path / "dest"
    with tmpfs(dest, want // 2) as resize:
        cmd = [sys.executable, "-m", "rm_trainer.cli.consolidate", "--checkpoint_dir", str(run / "checkpoints"),
               "--output", str(dest / "reward.pt"), "--no-verify"]
        p = subprocess.run(cmd, cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=600)
        msg = one_message(p.stderr, "rm-consolidate")
        assert p.returncode == 2 and f"writing {dest / 'reward.pt'} failed" in msg and "it needed about" in msg
        assert list(dest.iterdir()) == []  # no reward.pt, no reward.pt.tmp
        resize(want * 3)
        p = subprocess.run(cmd, cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        a = torch.load(dest / "reward.pt", map_location="cpu", weights_only=True)["state_dict"]
    b = load_artifact(run)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in b)
