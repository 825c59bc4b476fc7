"""engine.consolidated_state_dict: the streaming ZeRO merge equals DeepSpeed's own zero_to_fp32, bit for bit,
on real 2-rank ZeRO-2 and ZeRO-3 checkpoints (see conftest.RUNS)."""

from __future__ import annotations

import shutil

import pytest
import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

from rm_trainer.artifact.zero_merge import consolidated_state_dict
from rm_trainer.errors import CheckpointError

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", ["ds_z2_w2", "torchrun_z3_w2"])
def test_streaming_merge_equals_zero_to_fp32_bit_for_bit(run, name):
    ckpt = run(name) / "checkpoints"
    want = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), "step_12")
    got = consolidated_state_dict(str(ckpt), "step_12")
    assert list(got) == list(want) and "score.weight" in got
    assert all(got[k].dtype == torch.float32 and torch.equal(got[k], want[k]) for k in want)
    half = consolidated_state_dict(str(ckpt), "step_12", torch.bfloat16)  # cast while merging
    assert all(torch.equal(half[k], want[k].to(torch.bfloat16)) for k in want)


def test_merge_refuses_a_missing_rank_partition(run, tmp_path):
    src = run("torchrun_z3_w2") / "checkpoints" / "step_12"
    shutil.copytree(src, tmp_path / "step_12")
    (tmp_path / "step_12" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(CheckpointError, match="1 \\*_optim_states.pt files for a world of 2"):
        consolidated_state_dict(str(tmp_path), "step_12")
