"""The benchmarks run (CPU-sized smoke mode of the GPU suite) and report what they claim."""

import json
import math
import subprocess
import sys

import pytest
from helpers import ROOT, run_env

pytestmark = pytest.mark.slow


def test_gpu_suite_smoke_mode(tmp_path):
    env = run_env() | {"OUT": str(tmp_path), "PYTHON": sys.executable}
    p = subprocess.run(["bash", "bench/gpu_suite.sh", "smoke"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-4000:]
    mem = json.loads((tmp_path / "loss_memory.json").read_text())
    (row,) = mem["runs"]
    assert row["dtype"] == "bf16" and row["gc"] is True
    for path in ("ours", "hf_seq", "causal", "backbone"):
        assert row[path]["saved_bytes"] > 0 and row[path]["flops"] > 0 and row[path]["peak_bytes"] > 0
    # the targets, measured: saved (a)/(b) <= 0.55, FLOPs <= 1.001x backbone, peaks
    assert mem["all_targets_met"], row["ratios"]
    assert row["ratios"]["hf_seq_extra_saved_in_layer_checkpoints"] > 3  # ~4 layers' worth
    step = json.loads((tmp_path / "train_step.json").read_text())
    assert step["tokens_per_s"] > 0 and all(math.isfinite(x) for x in step["losses"])
    assert step["zero_stage"] == 2 and step["device_name"] == "cpu"
