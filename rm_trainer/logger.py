"""Metrics sinks: tensorboard under OUT/tb and one JSON object per line in OUT/metrics.jsonl (rank 0)."""

from __future__ import annotations

import json
from pathlib import Path


class MetricsLogger:
    def __init__(self, out_dir: Path, enabled: bool, tensorboard: bool = True, resume_step: int = 0):
        """resume_step > 0: drop what an interrupted run logged after that step, so every step appears
        once in metrics.jsonl and in tensorboard (purge_step) after a resume."""
        self.enabled = enabled
        self.tb = None
        self.jsonl = None
        if not enabled:
            return
        path = out_dir / "metrics.jsonl"
        if path.exists():
            keep = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= resume_step]
            path.write_text("".join(line + "\n" for line in keep))
        self.jsonl = open(path, "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tb"), purge_step=resume_step + 1 if resume_step else None)

    def log(self, split: str, step: int, values: dict[str, float | int | None]) -> None:
        if not self.enabled:
            return
        values = {k: v for k, v in values.items() if v is not None}
        self.jsonl.write(json.dumps({"step": step, "split": split, **values}) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{split}/{k}", v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.jsonl is not None:
            self.jsonl.close()
