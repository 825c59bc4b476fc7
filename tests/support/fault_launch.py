#!/usr/bin/env python
"""Test-only launcher: launch/train_reward.py with faults injected by patching rm_trainer's step function.
Production modules read no test variables; only this file does.

  RM_FAULT_PAUSE_AT="STEP.MICRO"  before micro step MICRO of optimizer step STEP, every rank writes
                                  OUT/.paused_rank{r} and sleeps, so a test can SIGKILL the job at an exact
                                  point (mid-accumulation included), or signal a rank there; the ranks
                                  go on when the test writes OUT/.resume
  RM_FAULT_NAN_GRAD="STEP:RANK"   at that step that rank's reward gradients become NaN while its loss stays
                                  finite (DeepSpeed must skip the update on every rank)
  RM_FAULT_SLOW_PREPARE="SECONDS" rank 0's data preparation takes that much longer
"""

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout

from rm_trainer.cli.train import entry  # noqa: E402
from rm_trainer.data import cache as data_cache  # noqa: E402
from rm_trainer.train import run as trainer  # noqa: E402

real_train_step = trainer.train_step


def _out_dir() -> Path:
    argv = sys.argv
    return Path(argv[argv.index("--output_dir") + 1])


def _pause_before(micro_batches, micro: int, rank: int):
    for i, b in enumerate(micro_batches):
        if i == micro:
            (_out_dir() / f".paused_rank{rank}").write_text(str(os.getpid()))
            deadline = time.time() + 3600
            while not (_out_dir() / ".resume").exists() and time.time() < deadline:
                time.sleep(0.05)
        yield b


class _NanGradEngine:
    """The engine, except that the first forward's rewards get a NaN gradient."""

    def __init__(self, eng):
        self._eng, self._armed = eng, True

    def __call__(self, *args, **kwargs):
        rewards = self._eng(*args, **kwargs)
        if self._armed:
            rewards.register_hook(lambda g: g * float("nan"))
            self._armed = False
        return rewards

    def __getattr__(self, name):
        return getattr(self._eng, name)


def faulty_train_step(eng, step, micro_batches, *args, **kwargs):
    rank = int(os.environ.get("RANK", "0"))
    pause = os.environ.get("RM_FAULT_PAUSE_AT")
    if pause and int(pause.split(".")[0]) == step:
        micro_batches = _pause_before(micro_batches, int(pause.split(".")[1]), rank)
    nan = os.environ.get("RM_FAULT_NAN_GRAD")
    if nan and tuple(map(int, nan.split(":"))) == (step, rank):
        eng = _NanGradEngine(eng)
    return real_train_step(eng, step, micro_batches, *args, **kwargs)


trainer.train_step = faulty_train_step
real_prepare_or_load = data_cache.prepare_or_load


def slow_prepare_or_load(*args, **kwargs):
    time.sleep(float(os.environ.get("RM_FAULT_SLOW_PREPARE", "0")))
    return real_prepare_or_load(*args, **kwargs)


data_cache.prepare_or_load = slow_prepare_or_load

if __name__ == "__main__":
    entry(sys.argv[1:])
