"""Metrics sinks: tensorboard under OUT/tb and one JSON object per line in OUT/metrics.jsonl (rank 0)."""

from __future__ import annotations

import json
from pathlib import Path


class MetricsLogger:
    def __init__(self, out_dir: Path, enabled: bool, tensorboard: bool = True):
        self.enabled = enabled
        self.tb = None
        self.jsonl = None
        if not enabled:
            return
        self.jsonl = open(out_dir / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tb"))

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
