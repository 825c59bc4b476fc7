#!/usr/bin/env python
"""How long a command takes to answer before any real work: `--help`, `--version`, and a config error (a
missing model folder and data file: exit status 2), for every console script, as the median of --repeat
fresh processes (JSON out). With --compare BIN, the same commands from another installation (its venv's
bin folder, e.g. an older checkout's) in the same run, and the ratios.

    python bench/cli_startup.py                                   # this checkout's .venv/bin
    python bench/cli_startup.py --compare /path/to/old/.venv/bin  # before vs after, one run
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import add_output, child_env, finish

COMMANDS = ("rm-train", "rm-prepare", "rm-consolidate", "rm-score", "rm-serve", "rm-eval", "rm-export-hf",
            "rm-estimate")
BAD_CONFIG = ["--model", "/no/such/model", "--data", "/no/such/pairs.jsonl", "--output_dir", "/tmp/rm_no_run",
              "--lr", "fast"]


def timed(cmd: list[str], repeat: int) -> dict:
    """Median wall seconds of `repeat` runs, and the exit status (the same every time)."""
    times, codes = [], set()
    for _ in range(repeat):
        t0 = time.perf_counter()
        p = subprocess.run(cmd, env=child_env(1), capture_output=True, text=True, timeout=300)
        times.append(time.perf_counter() - t0)
        codes.add(p.returncode)
    return {"seconds": round(statistics.median(times), 3), "exit": sorted(codes)}


def measure(bin_dir: Path, repeat: int) -> dict:
    out = {"help": {}, "version": {}}
    for c in COMMANDS:
        if not (bin_dir / c).exists():
            continue
        out["help"][c] = timed([str(bin_dir / c), "--help"], repeat)
        out["version"][c] = timed([str(bin_dir / c), "--version"], repeat)
    out["config_error"] = timed([str(bin_dir / "rm-train"), *BAD_CONFIG], repeat)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bin", type=Path, default=Path(sys.executable).parent, help="this installation's bin folder")
    ap.add_argument("--compare", type=Path, default=None, help="another installation's bin folder")
    ap.add_argument("--repeat", type=int, default=5)
    add_output(ap)
    a = ap.parse_args(argv)
    result: dict = {"repeat": a.repeat, "now": measure(a.bin, a.repeat)}
    if a.compare:
        result["compared"] = measure(a.compare, a.repeat)
        now, then = result["now"], result["compared"]
        result["speedup"] = {
            "config_error": round(then["config_error"]["seconds"] / now["config_error"]["seconds"], 2),
            "rm-train --help": round(then["help"]["rm-train"]["seconds"] / now["help"]["rm-train"]["seconds"], 2)}
    return finish(result, a.output)


if __name__ == "__main__":
    main()
