"""Where a run's wall time goes, phase by phase on rank 0, from the moment rm-train started (the imports of
torch, transformers and deepspeed included): the fixed cost of a launch that a user waits for besides the
steps. Host time only (no device sync is added for it). The end of the run prints it in one line and
writes it to OUT/final_metrics.json ("seconds")."""

from __future__ import annotations

import time

PHASES = ("start", "process_group", "data", "engine", "packing_check", "setup", "steps", "eval", "checkpoints",
          "report", "consolidate")


class Clock:
    """started: when the process began (perf_counter); the time until now is the "start" phase (imports,
    the config, the checks before a process group exists)."""

    def __init__(self, started: float | None = None) -> None:
        self.last = time.perf_counter() if started is None else started
        self.seconds: dict[str, float] = {}
        self.lap("start")

    def lap(self, phase: str) -> None:
        """The time since the previous lap goes to `phase` (added up over the run)."""
        now = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self.last
        self.last = now

    def summary(self) -> dict[str, float]:
        out = {k: round(self.seconds[k], 2) for k in PHASES if k in self.seconds}
        return out | {"total": round(sum(self.seconds.values()), 2)}

    def line(self) -> str:
        s = self.summary()
        return "[rm_trainer] wall time on rank 0 (s): " + ", ".join(f"{k} {v:g}" for k, v in s.items())
