"""Checkpoint files at their seam, without an engine: atomic commit, checksums, rotation that keeps an
intact checkpoint, the resume target past a damaged one, each rank's own state. Real runs that save,
stop, crash and resume are tests/train/test_resume.py."""

from __future__ import annotations

import json
import os
import random

import pytest
import torch

from rm_trainer.artifact import checkpoint_files as ckpt
from rm_trainer.errors import CheckpointError


# ---------------------------------------------------------------- unit: the commit protocol (no engine)
def fake_tag(root, step, files=("a.pt", "b.pt")):
    d = root / (ckpt.tag_for(step) + ".tmp")
    d.mkdir(parents=True)
    for f in files:
        (d / f).write_bytes(os.urandom(16))
    return d


def commit_and_rotate(root, step, world_size=2, keep_last=2):
    ckpt.commit(root, step, world_size)
    return ckpt.rotate(root, keep_last)


def test_commit_renames_writes_latest_and_rotates_after_commit(tmp_path):
    for step in (1, 2, 3, 4):
        fake_tag(tmp_path, step)
        rotated = commit_and_rotate(tmp_path, step)
        assert (tmp_path / "latest").read_text() == f"step_{step}"
        assert not (tmp_path / f"step_{step}.tmp").exists()
        assert rotated == ([f"step_{step - 2}"] if step > 2 else [])
    assert [s for s, _ in ckpt.committed(tmp_path)] == [3, 4]
    manifest = ckpt.verify_manifest(tmp_path / "step_4")
    assert manifest["step"] == 4 and set(manifest["files"]) == {"a.pt", "b.pt"}
    assert manifest["files"]["a.pt"]["size"] == 16 and manifest["files"]["a.pt"]["checksum"].startswith("crc32:")


def test_half_written_checkpoints_are_never_loaded_and_get_cleaned(tmp_path):
    fake_tag(tmp_path, 1)
    ckpt.commit(tmp_path, 1, 1)
    fake_tag(tmp_path, 2)  # killed before the commit
    assert ckpt.resume_target(tmp_path, "auto").name == "step_1"
    with pytest.warns(UserWarning, match="half-written checkpoint"):
        assert ckpt.clean_partial(tmp_path) == ["step_2.tmp"]
    assert not (tmp_path / "step_2.tmp").exists() and (tmp_path / ".trash-step_2.tmp").is_dir()
    fake_tag(tmp_path, 2)  # a new save of that step cannot collide with the old folder
    ckpt.purge_trash(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_1", "step_2.tmp"]


def test_missing_truncated_or_corrupted_file_is_refused(tmp_path):
    fake_tag(tmp_path, 5)
    ckpt.commit(tmp_path, 5, 2)
    b = tmp_path / "step_5" / "b.pt"
    b.write_bytes(bytes(x ^ 1 for x in b.read_bytes()))  # same size, other bytes: only the checksum sees it
    with pytest.raises(CheckpointError, match="b.pt does not match its checksum"):
        ckpt.verify_manifest(tmp_path / "step_5")
    b.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="b.pt has 1 bytes, manifest says 16"):
        ckpt.verify_manifest(tmp_path / "step_5")
    (tmp_path / "step_5" / "a.pt").unlink()
    with pytest.raises(CheckpointError, match="missing a.pt"):
        ckpt.verify_manifest(tmp_path / "step_5")


def test_sampled_checksum_of_big_files_reads_little_and_sees_the_tail(tmp_path):
    f = tmp_path / "big.pt"
    data = bytearray(os.urandom(9 << 20))
    f.write_bytes(data)
    before = ckpt.file_checksum(f)
    assert before.startswith("crc32s:")
    data[-10] ^= 0xFF  # the last MiB is always read
    f.write_bytes(data)
    assert ckpt.file_checksum(f) != before


def test_each_rank_checksums_its_own_files_and_rank0_merges(tmp_path):
    d = fake_tag(tmp_path, 7, files=("zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                     "zero_pp_rank_1_mp_rank_00_optim_states.pt", "rm_state_rank1.pt", "meta.json"))
    assert [ckpt.owner_rank(n, 2) for n in sorted(p.name for p in d.iterdir())] == [0, 1, 0, 1]
    ckpt.write_rank_checksums(d, 1, 2)
    assert set(json.loads((d / ".checksums_rank1.json").read_text())) == {
        "rm_state_rank1.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"}
    ckpt.write_rank_checksums(d, 0, 2)
    ckpt.commit(tmp_path, 7, 2)
    files = ckpt.verify_manifest(tmp_path / "step_7")["files"]
    assert len(files) == 4 and not list((tmp_path / "step_7").glob(".checksums*"))  # sidecars merged


def test_resume_auto_skips_a_damaged_newest_checkpoint_and_path_refuses_it(tmp_path):
    for step in (3, 6):
        fake_tag(tmp_path, step)
        ckpt.commit(tmp_path, step, 2)
    (tmp_path / "step_6" / "b.pt").write_bytes(b"short")
    with pytest.warns(UserWarning, match=r"skips .*step_6: checkpoint is damaged: b.pt has 5 bytes"):
        assert ckpt.resume_target(tmp_path, "auto").name == "step_3"
    with pytest.raises(CheckpointError, match=r"--resume .*step_6: refusing to load .*b.pt has 5 bytes"):
        ckpt.resume_target(tmp_path, str(tmp_path / "step_6"))
    (tmp_path / "step_3" / "a.pt").unlink()
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="every committed checkpoint .* is damaged"):
        ckpt.resume_target(tmp_path, "auto")


def test_rotation_never_deletes_the_newest_intact_checkpoint(tmp_path):
    for step in (1, 2, 3):
        fake_tag(tmp_path, step)
        commit_and_rotate(tmp_path, step, keep_last=2)
    assert [s for s, _ in ckpt.committed(tmp_path)] == [2, 3]
    (tmp_path / "step_3" / "a.pt").write_bytes(b"")  # damaged after its commit
    fake_tag(tmp_path, 4)
    (tmp_path / "step_4.tmp" / "a.pt").write_bytes(b"")  # and the next save damaged too (checksummed as is)
    ckpt.commit(tmp_path, 4, 2)
    (tmp_path / "step_4" / "b.pt").unlink()
    assert ckpt.rotate(tmp_path, keep_last=2) == []  # step_2 is the newest intact one: kept
    fake_tag(tmp_path, 5)
    assert commit_and_rotate(tmp_path, 5, keep_last=2) == ["step_2", "step_3"]  # step_5 is intact


def test_resume_target_modes(tmp_path):
    assert ckpt.resume_target(tmp_path, "auto") is None
    assert ckpt.resume_target(tmp_path, "never") is None
    with pytest.raises(ValueError, match="no such checkpoint folder"):
        ckpt.resume_target(tmp_path, str(tmp_path / "nope"))
    fake_tag(tmp_path, 3)
    ckpt.commit(tmp_path, 3, 1)
    assert ckpt.resume_target(tmp_path, str(tmp_path)).name == "step_3"  # a checkpoints/ root works too


def test_rank_state_round_trip(tmp_path):
    torch.manual_seed(3)
    random.seed(4)
    import numpy as np

    np.random.seed(5)
    torch.save(ckpt.rank_state(7), tmp_path / "s.pt")
    want = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    assert ckpt.restore_rank_state(tmp_path / "s.pt") == 7
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(want[0], got[0]) and want[1:] == got[1:]
