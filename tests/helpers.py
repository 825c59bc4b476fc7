"""Launch real training runs (deepspeed launcher, torchrun, plain python) from tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# ../shared sits beside the checkout (also in CI); RM_TRAINER_SHARED points elsewhere if needed.
SHARED = Path(os.environ.get("RM_TRAINER_SHARED", ROOT.parent / "shared"))
SHARED_HH = SHARED / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"


def train_args(model, data, test_data=None, ds: str | None = None, **flags) -> list[str]:
    """A training command line: the model, the data, the held-out file, the DeepSpeed JSON
    (ds_configs/<ds>.json), then `--flag value` for every keyword (True: the bare boolean flag, False:
    --no-flag, None: left out). The one place tests spell rm-train's arguments."""
    args = ["--model", str(model), "--data", str(data)]
    if test_data is not None:
        args += ["--test_data", str(test_data)]
    if ds is not None:
        args += ["--ds_config", f"ds_configs/{ds}.json"]
    for name, value in flags.items():
        if value is True:
            args.append(f"--{name}")
        elif value is False:
            args.append(f"--no-{name}")
        elif value is not None:
            args += [f"--{name}", str(value)]
    return args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_env() -> dict[str, str]:
    env = dict(os.environ)
    # One thread per rank: 2 ranks on 2 cores, and the same kernels (same summation order) in every run.
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


FAULT_LAUNCHER = Path(__file__).resolve().parent / "fault_launch.py"


def launch_cmd(launcher: str, nprocs: int, faults: bool = False) -> list[str]:
    """faults=True runs tests/fault_launch.py (the entry point with RM_FAULT_* injection) instead."""
    script = str(FAULT_LAUNCHER if faults else ROOT / "launch" / "train_reward.py")
    if launcher == "deepspeed":
        return [str(BIN / "deepspeed"), "--num_gpus", str(nprocs), "--master_port", str(free_port()), script]
    if launcher == "torchrun":
        return [str(BIN / "torchrun"), "--nproc_per_node", str(nprocs), "--master_port", str(free_port()),
                "--master_addr", "127.0.0.1", script]
    assert launcher == "python" and nprocs == 1
    return [sys.executable, script]


def _faults(env: dict | None) -> bool:
    return any(k.startswith("RM_FAULT_") for k in env or {})


def train(out: Path, args: list[str], launcher: str = "deepspeed", nprocs: int = 2,
          timeout: int = 600, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = launch_cmd(launcher, nprocs, _faults(env)) + args + ["--output_dir", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=run_env() | (env or {}), capture_output=True, text=True,
                          timeout=timeout)
    (out.parent / f"{out.name}.log").write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-6000:]}")
    return proc


def metrics(out: Path, split: str = "train") -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == split]


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in metrics(out)]


def one_rank_and_two_sequence_ranks(tmp_path: Path, model, data, held_out, flags: dict, steps: int):
    """The same run on one rank (N=1, ZeRO-2) and on 2 ranks at --sequence_parallel 2 (one data-parallel group,
    ZeRO-3): the same global batch. Asserts each step's loss and the first step's gradient norm agree
    within 1e-5 of their magnitude. Returns (both runs' last eval records, the N=2 run's step records)."""
    one, two = tmp_path / "one", tmp_path / "two"
    train(one, train_args(model, data, held_out, "zero2", **flags), launcher="python", nprocs=1)
    train(two, train_args(model, data, held_out, "zero3", **flags, sequence_parallel=2))
    m1, m2 = metrics(one), metrics(two)
    assert len(m1) == len(m2) == steps
    for key, n in (("loss", steps), ("grad_norm", 1)):
        a, b = [r[key] for r in m1][:n], [r[key] for r in m2][:n]
        assert max(abs(x - y) for x, y in zip(a, b, strict=True)) <= 1e-5 * max(map(abs, a)), (key, a, b)
    return metrics(one, "eval")[-1], metrics(two, "eval")[-1], m2


def load_artifact(out: Path) -> dict:
    return torch.load(out / "reward.pt", map_location="cpu", weights_only=True)


def start(out: Path, args: list[str], launcher: str = "deepspeed", nprocs: int = 2,
          env: dict | None = None) -> subprocess.Popen:
    """Start a run in its own process group, so a test can SIGKILL the launcher and every rank."""
    cmd = launch_cmd(launcher, nprocs, _faults(env)) + args + ["--output_dir", str(out)]
    log = open(out.parent / f"{out.name}.killed.log", "w")
    return subprocess.Popen(cmd, cwd=ROOT, env=run_env() | (env or {}), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def kill_when_paused(proc: subprocess.Popen, out: Path, ranks: int = 2, timeout: int = 300) -> None:
    """SIGKILL a run started with RM_FAULT_PAUSE_AT once every rank has reached the pause point (bounded)."""
    deadline = time.time() + timeout
    while not all((out / f".paused_rank{r}").exists() for r in range(ranks)):
        assert proc.poll() is None, f"run ended before the pause point: see {out}.killed.log"
        assert time.time() < deadline, "pause point never reached"
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher's whole process group, as a node failure would
    proc.wait(timeout=60)


def kill_then_resume(out: Path, args: list[str], pause_at: str, committed: list[int]) -> None:
    """Start a run, SIGKILL it at RM_FAULT_PAUSE_AT=pause_at with exactly the `committed` checkpoint steps on
    disk, then rerun it to the end: it must resume from the newest of them."""
    from rm_trainer.artifact import checkpoint_files as ckpt

    proc = start(out, args, env={"RM_FAULT_PAUSE_AT": pause_at})
    kill_when_paused(proc, out)
    assert [s for s, _ in ckpt.committed(out / "checkpoints")] == committed
    for f in out.glob(".paused_rank*"):
        f.unlink()
    assert f"step_{committed[-1]}" in train(out, args).stdout


def same_artifact_weights(a: Path, b: Path) -> bool:
    ra, rb = load_artifact(a)["state_dict"], load_artifact(b)["state_dict"]
    return ra.keys() == rb.keys() and all(torch.equal(ra[k], rb[k]) for k in ra)


KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}


class Server:
    """rm-serve as a real process on loopback (`--api_key KEY`), up within 120 s or the test fails."""

    def __init__(self, model, *flags: str):
        import asyncio

        import aiohttp

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "rm_trainer.cli.serve", "--model", str(model), "--port",
                                      str(self.port), "--api_key", KEY, *flags], cwd=ROOT, env=run_env(),
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 120
        while True:  # bounded: the server answers /health within 120 s or the test fails
            assert self.proc.poll() is None, self.proc.stdout.read()
            try:
                asyncio.run(self.get("/health"))
                return
            except aiohttp.ClientConnectionError:
                assert time.monotonic() < deadline, "rm-serve did not come up in 120 s"
                time.sleep(0.3)

    async def get(self, path: str, headers=None):
        import aiohttp

        async with aiohttp.ClientSession() as s, s.get(self.url + path, headers=headers) as r:
            return r.status, await r.text()

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        finally:
            self.proc.kill()
        return self.proc.stdout.read()
