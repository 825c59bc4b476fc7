#!/usr/bin/env python
"""Start-of-run data preparation at scale: wall time and peak memory (process tree) to read, check and
tokenize N HH-style pairs, then the time of a second start with the same data, for jsonl, parquet and
conversational sources (JSON out).

The pairs are the 2,312 real HH-RLHF pairs in ../shared/data, repeated with a numbered first turn so that
every row is distinct; the tokenizer is a 2k byte-level BPE trained locally on them. Each measurement is a
fresh process with an empty `datasets` home cache, running what rank 0 runs at the start of training.

    python bench/prepare_data.py                         # 200,000 pairs, all three formats
    python bench/prepare_data.py --pairs 5000 --formats jsonl       # seconds (the tests)
    python bench/prepare_data.py --code /path/to/other/checkout     # measure another checkout (this layout)
    python bench/prepare_data.py --mixture 1000000 --max_len 128    # one 1M-row mixture (issue 34)

--mixture N measures one two-source mixture instead, as a run config's data.sources: 80% of N short
prompt/chosen/rejected rows in a jsonl file (each HH pair's last human turn and the first words of its
two answers, so almost no row is cut) and 20% HH full texts in a parquet file, under the tiny test Llama.
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

from common import GIB, ROOT, add_output, bpe_tokenizer, child_env, finish, hh_pairs

TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}\n\nHuman: {{ m['content'] }}{% else %}\n\n"
            "Assistant: {{ m['content'] }}{% endif %}{% endfor %}{% if add_generation_prompt %}\n\nAssistant:"
            "{% endif %}")

# What rank 0 runs at the start of a run: build or load the content-keyed cache (data/cache.py). (The
# figures for checkouts before the cache, in docs/benchmarks.md, came from this script at commit f9284b0.)
START = """
import json, os, sys, time
from pathlib import Path
import rm_trainer
from rm_trainer import objectives
from rm_trainer.cli.train_flags import load_run_config
from rm_trainer.data.cache import prepare_or_load
from rm_trainer.data.tokenize import load_tokenizer
here = Path(rm_trainer.__file__).parent
assert here.parent == Path(os.getcwd()), f"measuring {here}, not the checkout in {os.getcwd()}"
cfg, _ = load_run_config(sys.argv[1:])
t0 = time.perf_counter()
dest, hit = prepare_or_load(cfg, load_tokenizer(cfg), objectives.build(cfg))
pairs = json.loads((dest / "report.json").read_text())["_total"]["train_pairs"]
print(json.dumps({"data_seconds": time.perf_counter() - t0, "cache_hit": hit, "train_pairs": pairs}))
"""


def measure(cmd: list[str], env: dict, cwd: Path) -> dict:
    """Wall time, peak memory of the process and its tokenization workers (PSS summed over the tree:
    pages the forked workers share with the parent are counted once), and the command's own JSON line."""
    import psutil

    def pss(pid: int) -> int:  # smaps_rollup: one cheap read per process (Linux)
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("Pss:"))

    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        p = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
        proc, peak = psutil.Process(p.pid), 0
        while p.poll() is None:
            try:
                peak = max(peak, sum(pss(q.pid) for q in [proc, *proc.children(recursive=True)]))
            except (psutil.Error, OSError, StopIteration):
                pass
            time.sleep(0.25)
        log.seek(0)
        out = log.read()
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out[-4000:]}")
    line = next(ln for ln in reversed(out.splitlines()) if ln.startswith("{"))
    return {"wall_seconds": round(time.perf_counter() - t0, 1), "peak_pss_gib": round(peak / GIB, 3)} | {
        k: (round(v, 1) if isinstance(v, float) else v) for k, v in json.loads(line).items()}


def write_sources(rows: list[dict], n: int, work: Path, formats: list[str]) -> dict[str, Path]:
    import datasets

    from rm_trainer.data.formats import split_hh

    def hh(i: int) -> dict:
        r = rows[i % len(rows)]
        tag = f"\n\nHuman: request {i}"  # the same numbered first turn on both sides: the prompt stays shared
        return {"chosen": tag + r["chosen"], "rejected": tag + r["rejected"]}

    out = {}
    if "jsonl" in formats or "parquet" in formats:
        with open(work / "pairs.jsonl", "w") as f:
            for i in range(n):
                f.write(json.dumps(hh(i)) + "\n")
        out["jsonl"] = work / "pairs.jsonl"
    if "parquet" in formats:
        datasets.Dataset.from_json(str(work / "pairs.jsonl"), cache_dir=str(work / "hfc")).to_parquet(
            str(work / "pairs.parquet"))
        out["parquet"] = work / "pairs.parquet"
    if "conversational" in formats:
        with open(work / "messages.jsonl", "w") as f:
            for i in range(n):
                r = hh(i)
                s = split_hh(r["chosen"], r["rejected"])
                if s is None:
                    continue
                prompt = s[0].removesuffix("\n\nAssistant:").replace("\n\nHuman: ", "", 1)
                f.write(json.dumps({"chosen": [{"role": "user", "content": prompt},
                                               {"role": "assistant", "content": s[1].strip()}],
                                    "rejected": [{"role": "user", "content": prompt},
                                                 {"role": "assistant", "content": s[2].strip()}]}) + "\n")
        (work / "chat.jinja").write_text(TEMPLATE)
        out["conversational"] = work / "messages.jsonl"
    return {k: v for k, v in out.items() if k in formats}


def short_row(r: dict, i: int) -> dict | None:
    """A short prompt/chosen/rejected row from an HH pair: its last human turn, and the first 12 words of
    each answer (numbered, so every row is distinct)."""
    from rm_trainer.data.formats import split_hh

    s = split_hh(r["chosen"], r["rejected"])
    if s is None:
        return None
    prompt = s[0].rsplit("Human:", 1)[-1].removesuffix("Assistant:").strip()
    words = lambda t: " ".join(t.split()[:12])  # noqa: E731
    return {"prompt": f"({i}) {prompt}", "chosen": words(s[1]), "rejected": words(s[2])}


def write_mixture(rows: list[dict], n: int, work: Path) -> Path:
    """The two sources of --mixture and the run config that names them; returns the config's path."""
    import yaml

    n_short = n * 4 // 5
    with open(work / "short.jsonl", "w") as f:
        written, i = 0, 0
        while written < n_short:
            row = short_row(rows[i % len(rows)], i)
            i += 1
            if row is not None and row["chosen"] != row["rejected"]:
                f.write(json.dumps(row) + "\n")
                written += 1
    hh = write_sources(rows, n - n_short, work, ["parquet"])["parquet"]
    cfg = {"data": {"sources": [{"path": str(work / "short.jsonl"), "name": "short"}, {"path": str(hh), "name": "hh"}]}}
    (work / "run.yaml").write_text(yaml.safe_dump(cfg))
    return work / "run.yaml"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=200_000)
    ap.add_argument("--formats", default="jsonl,parquet,conversational")
    ap.add_argument("--max_len", type=int, default=512)
    ap.add_argument("--num_proc", type=int, default=None, help="default: the code's own default")
    ap.add_argument("--code", type=Path, default=ROOT)
    ap.add_argument("--mixture", type=int, default=0, help="measure one mixture of this many rows instead")
    add_output(ap)
    a = ap.parse_args(argv)
    from rm_trainer.demo import tiny_llama_config

    rows = hh_pairs()
    formats = a.formats.split(",")
    result = {"pairs": a.pairs, "max_len": a.max_len, "code": str(a.code.resolve()), "cores": os.cpu_count(),
              "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tok = bpe_tokenizer(rows, work / "model")
        tiny_llama_config(len(tok)).save_pretrained(work / "model")
        if a.mixture:
            sources, result["pairs"], result["formats"] = {"mixture": write_mixture(rows, a.mixture, work)}, \
                a.mixture, "80% short prompt/chosen/rejected rows (jsonl), 20% HH full texts (parquet)"
        else:
            sources = write_sources(rows, a.pairs, work, formats)
        for fmt, path in sources.items():
            out = work / f"out_{fmt}"
            data = ["--config", str(path)] if fmt == "mixture" else ["--data", str(path)]
            flags = ["--model", str(work / "model"), *data, "--output_dir", str(out), "--max_len",
                     str(a.max_len), "--test_fraction", "0.01", "--max_drop_fraction", "0.2"]
            flags += ["--chat_template", str(work / "chat.jinja")] if fmt == "conversational" else []
            flags += ["--num_proc", str(a.num_proc)] if a.num_proc else []
            env = child_env(1, PYTHONPATH=str(a.code.resolve()), HF_DATASETS_CACHE=str(work / f"home_cache_{fmt}"))
            cmd = [sys.executable, "-c", START, *flags]
            # cwd: `python -c` puts it first on sys.path, so it decides which rm_trainer is measured
            first = measure(cmd, env, a.code.resolve())
            second = measure(cmd, env, a.code.resolve())
            result["runs"][fmt] = {"first": first, "second": second,
                                   "speedup_second": round(first["wall_seconds"] / second["wall_seconds"], 1)}
    return finish(result, a.output)


if __name__ == "__main__":
    main()
