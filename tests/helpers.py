"""Launch real training runs from tests: by default each rank a process told its RANK, WORLD_SIZE and
MASTER_ADDR/PORT in its environment, as srun starts them (tests/support/env_launch.py); torchrun, the
deepspeed launcher and plain python where a test names them. The launchers are the fixed cost every test
pays: torchrun imports torch before starting a rank, and the deepspeed launcher's runner and launch
processes each import deepspeed and torch first (measured: 16.8 s vs 21.9 s for the shared 12-step
2-rank run); the runs that name them keep both covered."""

from __future__ import annotations

import json
import os
import shutil
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
    --no-flag, None: left out). The one place tests spell rm-train's arguments. The HF export and the
    tensorboard log are off unless a test reads OUT/hf or OUT/tb (hf_export=True, tensorboard=True, or a
    report_to of its own): a run's own defaults are on. Each costs rank 0 about half a second per launch."""
    quiet = {"hf_export": False} | ({} if "report_to" in flags else {"tensorboard": False})
    flags = quiet | flags
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


FAULT_LAUNCHER = Path(__file__).resolve().parent / "support" / "fault_launch.py"
ENV_LAUNCHER = Path(__file__).resolve().parent / "support" / "env_launch.py"


def launch_cmd(launcher: str, nprocs: int, faults: bool = False) -> list[str]:
    """The command that starts `nprocs` ranks: "env" (tests/support/env_launch.py: each rank told its RANK and
    the rest in its environment, as srun does; the default), "torchrun", "deepspeed", or "python" (one
    process). faults=True runs tests/support/fault_launch.py (the entry point with RM_FAULT_* injection)."""
    script = str(FAULT_LAUNCHER if faults else ROOT / "launch" / "train_reward.py")
    if launcher == "env":
        return [sys.executable, str(ENV_LAUNCHER), str(nprocs), str(free_port()), script]
    if launcher == "deepspeed":
        return [str(BIN / "deepspeed"), "--num_gpus", str(nprocs), "--master_port", str(free_port()), script]
    if launcher == "torchrun":
        return [str(BIN / "torchrun"), "--nproc_per_node", str(nprocs), "--master_port", str(free_port()),
                "--master_addr", "127.0.0.1", script]
    assert launcher == "python" and nprocs == 1
    return [sys.executable, script]


def _faults(env: dict | None) -> bool:
    return any(k.startswith("RM_FAULT_") for k in env or {})


def train(out: Path, args: list[str], launcher: str = "env", nprocs: int = 2,
          timeout: int = 600, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = launch_cmd(launcher, nprocs, _faults(env)) + args + ["--output_dir", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=run_env() | (env or {}), capture_output=True, text=True,
                          timeout=timeout)
    (out.parent / f"{out.name}.log").write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-6000:]}")
    return proc


def run_config(**sections):
    """A RunConfig with placeholder paths and the given sections' fields ({"train": {...}, "data": {...}}),
    for objectives and owners built in-process."""
    from rm_trainer.config import RunConfig

    base = {"model": {"path": "model"}, "data": {"train_path": "data.jsonl"}, "output": {"output_dir": "out"}}
    return RunConfig.model_validate({k: base.get(k, {}) | sections.get(k, {}) for k in base.keys() | sections.keys()})


def objective(**sections):
    """The objective (objectives.build) of run_config(**sections)."""
    from rm_trainer import objectives

    return objectives.build(run_config(**sections))


def prepare(cfg, tok, work_dir: str | None = None):
    """data.sources.prepare_sources with the run's own objective: (train, test, report, source names)."""
    from rm_trainer import objectives
    from rm_trainer.data.sources import prepare_sources

    return prepare_sources(cfg, tok, objectives.build(cfg), work_dir)


def load_pairs(path: str, fmt: str, keys, on_error: str, cache_dir: str | None = None):
    """formats.load_source with the pair objective's layout (keys: pair_rows.PairKeys)."""
    from rm_trainer.data.formats import load_source
    from rm_trainer.objectives.pair_rows import PairLayout

    return load_source(path, fmt, PairLayout(keys), on_error, cache_dir)


def tokenize_pairs(ds, fmt: str, tok, d, source_id: int = 0, path: str = ""):
    """A loaded pair source tokenized as training tokenizes it (pair_rows.PairReader), every row with a status."""
    from rm_trainer.objectives.pair_rows import PairReader

    return PairReader(tok, d).tokenize(ds, fmt, source_id, path)


def tokenize_rows(reader_cls, ds, fmt: str, tok, max_len: int, on_error: str, keys, source_id: int = 0,
                  path: str = ""):
    """A loaded ranking or rating source tokenized as training tokenizes it (objectives/*_rows readers)."""
    from rm_trainer.config import DataConfig

    d = DataConfig(max_len=max_len, on_error=on_error, num_proc=1)
    return reader_cls(tok, d, keys=keys).tokenize(ds, fmt, source_id, path)


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


RUN_FOLDER: list[Path] = []  # the pytest run's shared folder (conftest.shared_folder), for all its xdist workers


def made_once(name: str, build) -> Path:
    """RUN_FOLDER/name, built by build(folder) once for the whole pytest run: the first worker that asks builds it
    under a file lock, the others wait and reuse it. Read it, never write into it."""
    from filelock import FileLock

    assert RUN_FOLDER, "conftest.shared_folder sets the shared folder"
    out = RUN_FOLDER[0] / name
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if not (out / ".made").exists():
            shutil.rmtree(out, ignore_errors=True)  # a build that failed half-way
            out.mkdir()
            build(out)
            (out / ".made").write_text("")
    return out


def trained(args: list[str], launcher: str = "env", nprocs: int = 2, env: dict | None = None) -> Path:
    """The output folder of `args` run to the end, trained once per pytest run however many tests (in any
    xdist worker) ask for the same run: the same launcher, ranks, arguments and environment. What it
    printed is beside it (OUT.log). Read it, never write into it: a test that changes a run's folder copies
    it first (resume_from_copy)."""
    import hashlib

    key = repr((launcher, nprocs, tuple(map(str, args)), tuple(sorted((env or {}).items()))))
    name = "runs/" + hashlib.sha256(key.encode()).hexdigest()[:16]
    holder = made_once(name, lambda d: train(d / "run", args, launcher, nprocs, env=env))
    return holder / "run"


def resume_from_copy(done: Path, out: Path, args: list[str], step: int, launcher: str = "env",
                     nprocs: int = 2) -> subprocess.CompletedProcess:
    """Run `args` again from a copy of the finished run `done` as it stood when step_`step` was its newest
    committed checkpoint (later checkpoints and the end-of-run files removed, `latest` pointing back):
    the run must resume from there and finish. What a crash after that commit leaves; SIGKILL itself, at
    every point of a step and a save, is the kill tests' (kill_then_resume)."""
    from rm_trainer.artifact import checkpoint_files as ckpt

    shutil.copytree(done, out, ignore=shutil.ignore_patterns("reward.pt", "hf", "best", "lora_adapter", "eval",
                                                             "final_metrics.json"))
    root = out / "checkpoints"
    for s, d in ckpt.committed(root):
        if s > step:
            shutil.rmtree(d)
    assert (root / ckpt.tag_for(step)).is_dir(), f"{done} kept no checkpoint of step {step}"
    (root / ckpt.LATEST).write_text(ckpt.tag_for(step))
    p = train(out, args, launcher, nprocs)
    assert f"resumed from {root / ckpt.tag_for(step)} at step {step}" in p.stdout, p.stdout[-2000:]
    return p


def start(out: Path, args: list[str], launcher: str = "env", nprocs: int = 2,
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


class Live:
    """The few Engine methods the start-up checks (resolve_packing, resolve_sharing) use, over a real
    RewardModel."""

    def __init__(self, model):
        self.model = model

    def __call__(self, *args):
        return self.model(*args)

    def eval(self):
        self.model.eval()

    def train(self):
        self.model.train()


def cfg(**train):
    """A RunConfig with placeholder paths and these train fields."""
    from rm_trainer.config import RunConfig

    return RunConfig(model={"path": "m"}, data={"train_path": "d"}, output={"output_dir": "o"}, train=train)


def hh_prompt_rows(n: int) -> list[dict]:
    """The first n real HH-RLHF pairs that split into a shared prompt and two answers, as prompt rows."""
    import gzip

    from rm_trainer.data.formats import split_hh

    rows = []
    with gzip.open(SHARED_HH, "rt") as f:
        for line in f:
            r = json.loads(line)
            s = split_hh(r["chosen"], r["rejected"])
            if s is not None:
                rows.append({"prompt": s[0], "chosen": s[1], "rejected": s[2]})
            if len(rows) == n:
                return rows
    return rows
