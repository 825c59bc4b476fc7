from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from rm_trainer import demo  # noqa: E402

# The same kernels (the same summation order, so the same fp32 bits) as the subprocesses the tests start
# (helpers.run_env sets OMP_NUM_THREADS=1): in-process score_texts is compared bit for bit with them.
torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def no_leaked_shm_segments():
    """Runs that tests SIGKILL never reach the trainer's own cleanup of DeepSpeed's /dev/shm all-reduce
    segments (66 MB per rank, RAM-backed): remove the ones this session created."""
    shm = Path("/dev/shm")
    before = set(shm.glob("deepspeed_allreduce_buffer_*"))
    yield
    for p in set(shm.glob("deepspeed_allreduce_buffer_*")) - before:
        p.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def demo_assets(tmp_path_factory) -> dict[str, str]:
    """Synthetic pairs + a word-level tokenizer + a tiny Llama config.json (random-init backbone)."""
    return demo.prepare(tmp_path_factory.mktemp("demo"), n_train=256, n_test=48, seed=0)


@pytest.fixture(scope="session")
def tiny_pretrained(demo_assets, tmp_path_factory) -> str:
    """A tiny Llama backbone saved with save_pretrained, so every run starts from identical weights
    exactly as from a real SFT checkpoint."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    out = tmp_path_factory.mktemp("tiny_sft")
    torch.manual_seed(1234)
    cfg = AutoConfig.from_pretrained(demo_assets["model"])
    AutoModel.from_config(cfg).save_pretrained(out)
    AutoTokenizer.from_pretrained(demo_assets["model"]).save_pretrained(out)
    return str(out)


# Real training runs shared by several test modules (each is trained once, when first asked for).
# name: (launcher, ranks, ds_config, extra flags); every run: 12 steps, fp32, eval and save at 6 and 12.
# The default, --packing auto, packs (single_z2, ds_z2_w2, single_accum); the ZeRO-3 runs are padded
# (grouped batching), the baseline the batching modes and reward paths are compared with.
PADDED = {"packing": False}
RUNS = {
    "single_z2": ("python", 1, "zero2", {"micro_batch_size": 4}),
    "ds_z2_w2": ("deepspeed", 2, "zero2", {"micro_batch_size": 2}),
    "torchrun_z3_w2": ("torchrun", 2, "zero3", {"micro_batch_size": 2, "hf_export": True} | PADDED),
    "single_accum": ("python", 1, "zero2", {"micro_batch_size": 2, "grad_accum": 2}),
    "ds_z3_gc": ("deepspeed", 2, "zero3", {"micro_batch_size": 2, "gradient_checkpointing": True} | PADDED),
    "ds_z3_plain": ("deepspeed", 2, "zero3", {"micro_batch_size": 2, "reward_path": "plain"} | PADDED),
    # batching modes: random (which --packing auto leaves unpacked), grouped (torchrun_z3_w2), packed
    "ds_z3_random": ("deepspeed", 2, "zero3", {"micro_batch_size": 2, "batching": "random"}),
    "ds_z3_packed": ("deepspeed", 2, "zero3", {"micro_batch_size": 2, "packing": True, "pack_len": 64}),
    "ds_z2_packed_accum": ("deepspeed", 2, "zero2", {"micro_batch_size": 1, "grad_accum": 2, "packing": True,
                                                     "pack_len": 80}),
}


@pytest.fixture(scope="session")
def run(demo_assets, tiny_pretrained, tmp_path_factory):
    from helpers import train, train_args

    root = tmp_path_factory.mktemp("runs")
    done = {}

    def get(name):
        if name not in done:
            launcher, n, ds, extra = RUNS[name]
            out = root / name
            p = train(out, train_args(tiny_pretrained, demo_assets["train"], demo_assets["test"], ds, dtype="fp32",
                                      lr=1e-3, max_steps=12, warmup_steps=1, max_len=64, seed=7, eval_every=6,
                                      save_every=6, **extra), launcher=launcher, nprocs=n)
            (root / f"{name}.log").write_text(p.stdout + p.stderr)  # what the run printed: run_log(out)
            done[name] = out
        return done[name]

    return get
