#!/usr/bin/env python
"""rm-serve under load: requests/s and p50/p99 latency at concurrency 1, 8 and 64 (JSON out), with
batching across requests (--max_wait_ms 5, the default), without waiting (--max_wait_ms 0: whatever is
queued when the model thread is free), and with batching off (--max_batch_requests 1).

Each client sends one text per request, as RL rollout workers do, in a closed loop: the next request
when the last answer arrives. Texts are the real HH-RLHF dialogues in ../shared/data (full chosen
texts, OpenRLHF's /get_reward schema). The reward model has real-model proportions but is small (H 512,
4 layers, GQA 8/2, random init, fp32, a 2k byte-level BPE trained locally on the texts, max_len 512),
saved as reward.pt and served by the real `rm-serve` process; the client is aiohttp in this process.
On 2 cores the server's torch threads and the client share the CPU.

    python bench/serve_speed.py             # ~4 min on 2 cores
    python bench/serve_speed.py --smoke     # seconds (the tests)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, add_output, bpe_tokenizer, child_env, finish, free_port, hh_pairs, llama_config

MODES = {"batching": ["--max_wait_ms", "5"], "max_wait_0": ["--max_wait_ms", "0"],
         "off": ["--max_wait_ms", "0", "--max_batch_requests", "1"]}


def write_reward_pt(path: Path, hidden: int, layers: int, max_len: int, pairs: list[dict], tmp: Path) -> None:
    """A random-init reward model in the reward.pt format (what training writes after consolidation)."""
    import torch
    from transformers import AutoModel

    from rm_trainer.artifact.format import FORMAT, tokenizer_tensors
    from rm_trainer.model.reward import RewardModel

    tok = bpe_tokenizer(pairs, tmp / "tok")
    torch.manual_seed(0)
    cfg = llama_config(len(tok), hidden, layers, max_len, tok)
    model = RewardModel(AutoModel.from_config(cfg))
    torch.save({"format": FORMAT, "state_dict": model.state_dict(), "backbone_config": cfg.to_json_string(),
                "tokenizer_files": tokenizer_tensors(tmp / "tok"), "pad_token_id": tok.pad_token_id,
                "eos_token_id": tok.eos_token_id, "max_len": max_len, "dtype": "fp32", "step": 0,
                "run_config": "{}", "probe": {}, "reward_stats": {}}, path)


async def load(url: str, texts: list[str], concurrency: int, requests: int) -> dict:
    import aiohttp

    latencies: list[float] = []
    todo = iter(range(requests))

    async def client(session):
        for i in todo:  # shared iterator: `requests` in all, `concurrency` in flight
            t0 = time.perf_counter()
            async with session.post(url + "/get_reward", json={"query": [texts[i % len(texts)]]}) as r:
                assert r.status == 200, await r.text()
                await r.json()
            latencies.append(time.perf_counter() - t0)

    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=conn) as s:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(s) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    latencies.sort()
    q = lambda p: round(1000 * latencies[min(len(latencies) - 1, int(p * len(latencies)))], 1)  # noqa: E731
    return {"requests": requests, "seconds": round(wall, 3), "requests_per_s": round(requests / wall, 2),
            "p50_ms": q(0.5), "p99_ms": q(0.99)}


def forwards(url: str) -> tuple[float, float]:
    import urllib.request

    text = urllib.request.urlopen(url + "/metrics").read().decode()
    get = lambda n: float(re.search(rf"^{n} (\S+)$", text, re.M).group(1))  # noqa: E731
    return get("rm_forwards_total"), get("rm_rows_total")


def serve(model: Path, port: int, flags: list[str], threads: int) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-m", "rm_trainer.cli.serve", "--model", str(model), "--port", str(port),
                          *flags], cwd=ROOT, env=child_env(threads), stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    import urllib.request

    for _ in range(600):  # bounded: 60 s
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            return p
        except OSError:
            assert p.poll() is None, p.stderr.read()
            time.sleep(0.1)
    raise RuntimeError("rm-serve did not come up")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--max_len", type=int, default=512)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--requests_per_client", type=int, default=4, help="requests = max(64, this x concurrency)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="the server's torch threads")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, for the tests")
    add_output(ap)
    a = ap.parse_args(argv)
    if a.smoke:
        a.hidden, a.layers, a.max_len, a.concurrency, a.requests_per_client = 64, 2, 128, [1, 8], 2
    hh = hh_pairs()
    texts = [r["chosen"] for r in hh]
    random.Random(0).shuffle(texts)
    result: dict = {"hidden": a.hidden, "layers": a.layers, "max_len": a.max_len, "server_threads": a.threads,
                    "cpus": os.cpu_count(), "modes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "reward.pt"
        write_reward_pt(model, a.hidden, a.layers, a.max_len, hh, Path(tmp))
        for mode, flags in MODES.items():
            port = free_port()
            proc = serve(model, port, flags, a.threads)
            url = f"http://127.0.0.1:{port}"
            try:
                asyncio.run(load(url, texts, 4, 16))  # warm-up
                runs = {}
                for c in a.concurrency:
                    f0, r0 = forwards(url)
                    runs[str(c)] = asyncio.run(load(url, texts, c, max(64, a.requests_per_client * c)))
                    f1, r1 = forwards(url)
                    runs[str(c)]["rows_per_forward"] = round((r1 - r0) / (f1 - f0), 2)
                result["modes"][mode] = {"flags": " ".join(flags), "concurrency": runs}
            finally:
                proc.terminate()
                proc.wait(60)
    top = str(max(a.concurrency))
    m = result["modes"]
    result["batching_over_off_requests_per_s_at_max_concurrency"] = round(
        m["batching"]["concurrency"][top]["requests_per_s"] / m["off"]["concurrency"][top]["requests_per_s"], 3)
    result["batching_over_max_wait_0_requests_per_s_at_max_concurrency"] = round(
        m["batching"]["concurrency"][top]["requests_per_s"] / m["max_wait_0"]["concurrency"][top]["requests_per_s"], 3)
    return finish(result, a.output)

if __name__ == "__main__":
    main()
