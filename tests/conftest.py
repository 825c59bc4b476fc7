from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import helpers  # noqa: E402

from rm_trainer import demo  # noqa: E402

# The same kernels (the same summation order, so the same fp32 bits) as the subprocesses the tests start
# (helpers.run_env sets OMP_NUM_THREADS=1): in-process score_texts is compared bit for bit with them.
torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def shared_folder(tmp_path_factory) -> Path:
    """One folder for the whole pytest run, shared by its xdist workers (`make test` runs two): the demo
    assets, the tiny backbone and the finished runs of helpers.trained live there, each made once."""
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shared"
    helpers.RUN_FOLDER[:] = [root]
    return root


@pytest.fixture(scope="session", autouse=True)
def no_leaked_shm_segments():
    """Runs that tests SIGKILL never reach the trainer's own cleanup of DeepSpeed's /dev/shm all-reduce
    segments (66 MB per rank, RAM-backed): remove the ones this session created that no process maps any
    more (another xdist worker's live run keeps its own)."""
    shm = Path("/dev/shm")
    before = set(shm.glob("deepspeed_allreduce_buffer_*"))
    yield
    mapped = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            mapped |= {line.split()[-1] for line in maps.read_text().splitlines() if "deepspeed_allreduce" in line}
        except OSError:  # a process that ended meanwhile, or one we may not read
            continue
    for p in set(shm.glob("deepspeed_allreduce_buffer_*")) - before:
        if str(p) not in mapped:
            p.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def demo_assets(shared_folder) -> dict[str, str]:
    """Synthetic pairs + a word-level tokenizer + a tiny Llama config.json (random-init backbone)."""

    def build(out: Path) -> None:
        (out / "assets.json").write_text(json.dumps(demo.prepare(out, n_train=256, n_test=48, seed=0)))

    return json.loads((helpers.made_once("demo", build) / "assets.json").read_text())


@pytest.fixture(scope="session")
def tiny_pretrained(demo_assets, shared_folder) -> str:
    """A tiny Llama backbone saved with save_pretrained, so every run starts from identical weights
    exactly as from a real SFT checkpoint."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    def build(out: Path) -> None:
        torch.manual_seed(1234)
        cfg = AutoConfig.from_pretrained(demo_assets["model"])
        AutoModel.from_config(cfg).save_pretrained(out)
        AutoTokenizer.from_pretrained(demo_assets["model"]).save_pretrained(out)

    return str(helpers.made_once("tiny_sft", build))


# Real training runs shared by several test modules (each is trained once, when first asked for).
# name: (launcher, ranks, ds_config, extra flags); every run: 12 steps, fp32, eval and save at 6 and 12.
# "ds_" names the DeepSpeed config's runs; ds_z2_w2 starts through the deepspeed launcher, torchrun_z3_w2
# through torchrun, the others through the tests' env launcher (helpers.launch_cmd), seconds cheaper each.
# The default (--packing auto, --share_prompt auto: single_z2, ds_z2_w2, single_accum) shares each pair's
# prompt, and packs where packed micro-batches cost less; the ZeRO-3 runs are padded (grouped batching), the
# baseline the batching modes and reward paths are compared with.
PADDED = {"packing": False}
RUNS = {
    "single_z2": ("python", 1, "zero2", {"micro_batch_size": 4}),
    "ds_z2_w2": ("deepspeed", 2, "zero2", {"micro_batch_size": 2, "tensorboard": True}),
    "torchrun_z3_w2": ("torchrun", 2, "zero3", {"micro_batch_size": 2, "hf_export": True, "tensorboard": True}
                       | PADDED),
    "single_accum": ("python", 1, "zero2", {"micro_batch_size": 2, "grad_accum": 2}),
    "ds_z3_gc": ("env", 2, "zero3", {"micro_batch_size": 2, "gradient_checkpointing": True} | PADDED),
    "ds_z3_plain": ("env", 2, "zero3", {"micro_batch_size": 2, "reward_path": "plain"} | PADDED),
    # batching modes: random (which --packing auto leaves unpacked), grouped (torchrun_z3_w2), packed
    "ds_z3_random": ("env", 2, "zero3", {"micro_batch_size": 2, "batching": "random"}),
    "ds_z3_packed": ("env", 2, "zero3", {"micro_batch_size": 2, "packing": True, "pack_len": 64}),
    "ds_z2_packed_accum": ("env", 2, "zero2", {"micro_batch_size": 1, "grad_accum": 2, "packing": True,
                                               "pack_len": 80}),
}


@pytest.fixture(scope="session")
def run(demo_assets, tiny_pretrained):
    """name -> the output folder of RUNS[name], trained once for the whole pytest run (helpers.trained);
    what it printed is beside it, OUT.log."""

    def get(name):
        launcher, n, ds, extra = RUNS[name]
        return helpers.trained(helpers.train_args(tiny_pretrained, demo_assets["train"], demo_assets["test"], ds,
                                                  dtype="fp32", lr=1e-3, max_steps=12, warmup_steps=1, max_len=64,
                                                  seed=7, eval_every=6, save_every=6, **extra), launcher, n)

    return get
