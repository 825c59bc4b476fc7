#!/usr/bin/env python
"""Long context: activation memory per rank and seconds per step at sequence parallelism N=1 and N=2, and
the dry-run table for Llama-3-8B (JSON out).

  1. measured on CPU: a small Llama (H 256, 4 heads over 1 KV head, 2 layers, sdpa, fp32, activation
     checkpointing) as the reward model, one pair of length T (its two sequences in one forward, the
     rejected 7 tokens shorter), forward + backward of the Bradley-Terry loss. Each (N, T) is a fresh
     process group (python for N=1, torchrun for N=2, DeepSpeed's Ulysses attention through
     rm_trainer's own train/sequence_parallel.py). A rank's activation memory is its peak RSS during the
     step minus its RSS before it (/proc/self/status: VmHWM - VmRSS, with glibc's mmap threshold fixed, see
     MALLOC), the largest over the ranks; also what autograd saves in the forward (the layer inputs).
  2. the ratio of N=2 to N=1 per T against the 1/N ideal, and the longest T whose activations fit
     --budget_gib per rank at N=1 and at N=2;
  3. the table: rm-estimate's figures (train/estimate.py, the same as --dry-run) for Llama-3-8B on 8 x 80 GB,
     ZeRO-3, bf16, activation checkpointing, one pair per micro-batch, T = 16K..128K and N = 1, 2, 4, 8,
     with the smallest N that fits (and with 10% left for buffers), and the activations with --tiled_mlp
     or with --offload_activations (and the pinned host memory per GPU that takes).

    python bench/long_context.py                      # T = 1K..16K (~10 min on 2 cores)
    python bench/long_context.py --lengths 512,1024   # seconds
    python bench/long_context.py --table_only         # the 8B table alone
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import GIB, ROOT, add_output, child_env, finish, free_port, llama_config

# glibc raises its mmap threshold as large blocks are freed and then serves them from the heap, which it
# keeps: peak RSS would then tell the allocator's history, not the live tensors. A fixed threshold maps every
# block over 1 MiB on its own and returns it when freed.
MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
LLAMA3_8B = {"vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": 8}


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def worker(out: Path, T: int, layers: int, hidden: int) -> None:
    """One forward + backward of one pair of length T on this process group (N = its world size)."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModel

    from rm_trainer.model.reward import RewardModel
    from rm_trainer.train import engine
    from rm_trainer.train.build import enable_checkpointing

    rt = engine.init_distributed(timeout_s=1800)
    torch.manual_seed(0)
    backbone = AutoModel.from_config(llama_config(2000, hidden, layers, T + 8), attn_implementation="sdpa")
    enable_checkpointing(backbone)
    seq = None
    if rt.world_size > 1:
        from rm_trainer.train.sequence_parallel import setup

        seq = setup(rt.world_size, backbone.config, "sdpa")
    model = RewardModel(backbone, seed=0, seq=seq).train()
    ids = torch.randint(4, 2000, (2, T), generator=torch.Generator().manual_seed(1))
    lens = torch.tensor([T, T - 7])
    saved = []  # what autograd keeps from the forward (with checkpointing: each layer's input)
    before = _status("VmRSS")
    started = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.nbytes) or t, lambda t: t):
        r = model(ids, lens)
    F.softplus(r[1] - r[0]).backward()  # -log sigmoid(r_c - r_r)
    seconds = time.perf_counter() - started
    peak = _status("VmHWM")
    (out.parent / f"{out.name}.rank{rt.rank}").write_text(json.dumps(
        {"activation_gib": (peak - before) / GIB, "saved_gib": sum(saved) / GIB, "seconds": seconds,
         "reward": r.tolist()}))
    engine.leave_process_group()


def measure(work: Path, n: int, T: int, layers: int, hidden: int) -> dict:
    out = work / f"n{n}_t{T}"
    cmd = [sys.executable] if n == 1 else [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node",
                                           str(n), "--master_port", str(free_port()), "--master_addr", "127.0.0.1"]
    subprocess.run(cmd + [__file__, "--worker", str(out), "--t", str(T), "--layers", str(layers), "--hidden",
                          str(hidden)], cwd=ROOT, env=child_env(**MALLOC), check=True, capture_output=True,
                   timeout=3600)
    ranks = [json.loads((work / f"{out.name}.rank{r}").read_text()) for r in range(n)]
    return {"n": n, "t": T, "activation_gib_per_rank": max(x["activation_gib"] for x in ranks),
            "autograd_saved_gib_per_rank": max(x["saved_gib"] for x in ranks),
            "seconds_per_step": max(x["seconds"] for x in ranks), "rewards": ranks[0]["reward"]}


def eight_b_table(work: Path) -> dict:
    from transformers import LlamaConfig

    from rm_trainer.train.estimate import estimate

    LlamaConfig(**LLAMA3_8B).save_pretrained(work / "llama3_8b")
    rows, need, headroom = [], {}, {}
    for T in (16384, 32768, 65536, 131072):
        for n in (1, 2, 4, 8):
            e, tiled, off = (estimate(str(work / "llama3_8b"), {"zero_optimization": {"stage": 3}}, 8, 8, 1, T,
                                      "bf16", True, 80, sequence_parallel=n, tiled_mlp=t, offload_activations=o)
                             for t, o in ((False, False), (True, False), (False, True)))
            rows.append({"t": T, "n": n, "model_states_gib": e.model_states_gpu_gib,
                         "activations_gib": e.activations_gpu_gib, "total_gib": e.total_gpu_gib, "fits": e.fits,
                         "activations_gib_tiled_mlp": tiled.activations_gpu_gib,
                         "activations_gib_offload": off.activations_gpu_gib,
                         "offloaded_cpu_gib_per_gpu": off.activations_cpu_gib})
            if e.fits and T not in need:
                need[T] = n
            if e.total_gpu_gib <= 0.9 * 80 and T not in headroom:  # 10% for buffers and fragmentation
                headroom[T] = n
    return {"setup": "Llama-3-8B, 8 x 80 GB, ZeRO-3, bf16, activation checkpointing, 1 pair per micro-batch",
            "rows": rows, "smallest_n_that_fits": {str(t): need.get(t) for t in (16384, 32768, 65536, 131072)},
            "smallest_n_with_10pct_headroom": {str(t): headroom.get(t) for t in (16384, 32768, 65536, 131072)}}


def summarize(runs: list[dict], budget: float) -> dict:
    by = {(r["n"], r["t"]): r for r in runs}
    pairs = [t for n, t in by if n == 1 and (2, t) in by]
    ratio = lambda key: {str(t): round(by[2, t][key] / by[1, t][key], 3) for t in pairs}  # noqa: E731
    longest = {str(n): max([t for (m, t), r in by.items() if m == n and r["activation_gib_per_rank"] <= budget],
                           default=None) for n in (1, 2)}
    rel = max((abs(a - b) / max(abs(b), 1e-12) for t in pairs
               for a, b in zip(by[2, t]["rewards"], by[1, t]["rewards"], strict=True)), default=None)
    return {"activation_ratio_n2_over_n1": ratio("activation_gib_per_rank"),
            "autograd_saved_ratio_n2_over_n1": ratio("autograd_saved_gib_per_rank"),
            "seconds_ratio_n2_over_n1": ratio("seconds_per_step"), "ideal_ratio": 0.5, "budget_gib_per_rank": budget,
            "longest_t_within_budget": longest, "rewards_max_rel_diff_n2_vs_n1": rel}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="1024,2048,4096,8192,16384")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--budget_gib", type=float, default=0.5, help="activation memory per rank for longest T")
    ap.add_argument("--table_only", action="store_true")
    ap.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--t", type=int, default=0, help=argparse.SUPPRESS)
    add_output(ap)
    a = ap.parse_args()
    if a.worker is not None:
        return worker(a.worker, a.t, a.layers, a.hidden)
    with tempfile.TemporaryDirectory() as tmp:
        result = {"table_8b": eight_b_table(Path(tmp))}
        if not a.table_only:
            runs = [measure(Path(tmp), n, int(t), a.layers, a.hidden) for t in a.lengths.split(",") for n in (1, 2)]
            result |= {"model": f"Llama H={a.hidden}, {a.layers} layers, 4 heads / 1 KV head, sdpa, fp32, "
                                "activation checkpointing", "runs": runs, **summarize(runs, a.budget_gib)}
    finish(result, a.output)


if __name__ == "__main__":
    main()
