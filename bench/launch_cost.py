#!/usr/bin/env python
"""The fixed cost of a launch: wall time of a tiny training run from the command to its verified reward.pt,
and (this checkout) where it goes, phase by phase on rank 0 (OUT/final_metrics.json "seconds"). What a user
waits for besides the steps, and what every test that trains pays (JSON out).

Each run is the test suite's shared run shape: the demo's 256 pairs, a tiny Llama, 12 steps, fp32, max_len
64, an evaluation and a checkpoint at steps 6 and 12, consolidation with verification; with and without
the HF export. Layouts: one process (plain python) and 2 ranks (the deepspeed launcher, ZeRO-3).

    python bench/launch_cost.py                                   # this checkout
    python bench/launch_cost.py --code /tmp/base --python /tmp/base/.venv/bin/python   # another checkout
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, add_output, child_env, finish, free_port

LAYOUTS = {"one_process": ("python", 1, "zero2"), "two_ranks": ("deepspeed", 2, "zero3")}


def assets(work: Path, python: str) -> dict:
    """The demo's pairs and tokenizer, and a tiny Llama saved with save_pretrained (as the tests make them)."""
    code = ("import json, sys, torch; from pathlib import Path; from rm_trainer import demo; "
            "from transformers import AutoConfig, AutoModel, AutoTokenizer; "
            "a = demo.prepare(Path(sys.argv[1]), n_train=256, n_test=48, seed=0); torch.manual_seed(1234); "
            "AutoModel.from_config(AutoConfig.from_pretrained(a['model'])).save_pretrained(a['model']); "
            "print(json.dumps(a))")
    p = subprocess.run([python, "-c", code, str(work / "demo")], capture_output=True, text=True, check=True,
                       env=child_env(1, PYTHONPATH=os.environ.get("PYTHONPATH", "")), cwd=work)
    return json.loads(p.stdout.strip().splitlines()[-1])


def run(layout: str, a: dict, out: Path, code: Path, python: str, hf: bool) -> dict:
    launcher, ranks, ds = LAYOUTS[layout]
    bin_dir = Path(python).parent
    script = str(code / "launch" / "train_reward.py")
    cmd = ([python, script] if launcher == "python" else
           [str(bin_dir / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(free_port()), script])
    cmd += ["--model", a["model"], "--data", a["train"], "--test_data", a["test"], "--ds_config",
            str(code / "ds_configs" / f"{ds}.json"), "--dtype", "fp32", "--lr", "1e-3", "--max_steps", "12",
            "--warmup_steps", "1", "--max_len", "64", "--seed", "7", "--eval_every", "6", "--save_every", "6",
            "--micro_batch_size", str(4 // ranks), "--output_dir", str(out), "--no-hf_export" if not hf else
            "--hf_export"]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=code, env=child_env(1), capture_output=True, text=True, timeout=900)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    final = json.loads((out / "final_metrics.json").read_text())
    return {"wall_seconds": round(wall, 2)} | ({"rank0_seconds": final["seconds"]} if "seconds" in final else {})


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--code", type=Path, default=ROOT, help="the checkout to measure")
    ap.add_argument("--python", default=sys.executable, help="its interpreter (its venv's bin holds deepspeed)")
    ap.add_argument("--repeats", type=int, default=2, help="runs per configuration; the fastest is kept")
    add_output(ap)
    a = ap.parse_args(argv)
    result: dict = {"code": str(a.code.resolve()), "cores": os.cpu_count(), "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        demo = assets(work, a.python)
        for layout in LAYOUTS:
            for hf in (False, True):
                name = f"{layout}{'_hf' if hf else ''}"
                tries = [run(layout, demo, work / f"{name}_{i}", a.code.resolve(), a.python, hf)
                         for i in range(a.repeats)]
                result["runs"][name] = min(tries, key=lambda r: r["wall_seconds"])
                print(name, result["runs"][name], flush=True)
    return finish(result, a.output)


if __name__ == "__main__":
    main()
