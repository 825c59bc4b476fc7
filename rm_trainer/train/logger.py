"""Metrics sinks: tensorboard under OUT/tb, one JSON object per line in OUT/metrics.jsonl, wandb
(tracking.py) and the progress bar (rank 0). The logger decides which steps get a log line; only those pay
a host sync."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from rm_trainer import disk
from rm_trainer.train.step import StepRecord


class MetricsLogger:
    def __init__(self, out_dir: Path, enabled: bool, tensorboard: bool = True, resume_step: int = 0,
                 total: int = 0, every: int = 1, wandb: dict | None = None):
        """resume_step > 0: drop what an interrupted run logged after that step, so every step appears
        once in metrics.jsonl and in tensorboard (purge_step) after a resume. wandb: tracking.WandbSink's
        arguments (config, run_id, project), or None."""
        self.enabled, self.total, self.every, self.out_dir = enabled, total, every, out_dir
        self.tb = None
        self.jsonl = None
        self.wb = None
        self.bar = tqdm(total=total, initial=resume_step, disable=not enabled, desc="train", dynamic_ncols=True)
        self.window: tuple[float, int] | None = None  # (start time, steps done before) of the current window
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
        if wandb is not None:
            from rm_trainer.train.tracking import WandbSink

            self.wb = WandbSink(out_dir, **wandb)

    @property
    def wandb_run_id(self) -> str | None:
        return self.wb.id if self.wb is not None else None

    def train_step(self, rec: StepRecord, grad_norm: Callable[[], float | None], skipped_steps: int) -> None:
        """A line every `every` steps, at the last step, and at every skipped (non-finite) step. Step time
        is averaged over the steps since the previous line, from the first one's start to this line's
        sync: the host runs ahead of the GPU in between, so only a window that ends at a sync measures
        it (and evaluation or saving after a line stays outside the next window)."""
        self.bar.update(1)
        if self.window is None:
            self.window = (rec.started, rec.step - 1)
        if not self.enabled or not (rec.step % self.every == 0 or rec.step == self.total or rec.skipped):
            return
        stats = rec.stats.tolist()  # the statistics reach the host here, and only here
        start, before = self.window
        self.window = None
        m = rec.metrics((time.perf_counter() - start) / (rec.step - before), stats)
        g = grad_norm()
        self.log("train", rec.step, m | {"grad_norm": g if g is not None and math.isfinite(g) else None,
                                         "skipped_steps": skipped_steps})
        self.bar.set_postfix(loss=f"{m['loss']:.4f}", skipped=skipped_steps)

    def log(self, split: str, step: int, values: dict[str, float | int | None]) -> None:
        if not self.enabled:
            return
        values = {k: v for k, v in values.items() if v is not None}
        if self.jsonl is not None:
            self._guard("metrics.jsonl", lambda: self.jsonl.write(json.dumps({"step": step, "split": split,
                                                                               **values}) + "\n"))
        if self.tb is not None:
            def scalars():
                for k, v in values.items():
                    if isinstance(v, (int, float)):
                        self.tb.add_scalar(f"{split}/{k}", v, step)
            self._guard("tensorboard", scalars)
        if self.wb is not None:
            self.wb.log(split, step, values)

    def _guard(self, sink: str, write: Callable[[], object]) -> None:
        """A metrics write the disk refuses stops that sink, with one line, and never the run: training
        goes on and its checkpoints may still fit (or go elsewhere). What is lost: that sink's lines from
        here on; the progress bar and the checkpoints' own records stay."""
        try:
            write()
        except (OSError, RuntimeError) as e:
            if not disk.is_disk_failure(e):
                raise
            print(f"[rm_trainer] warning: {sink} is no longer written: {disk.reason(e)} "
                  f"({disk.human(disk.free_bytes(self.out_dir))} free); training continues", flush=True)
            if sink == "tensorboard":
                self.tb = None
            else:
                self.jsonl = None

    def eval(self, step: int, result: dict, pairs: tuple | None) -> None:
        """An evaluation's numbers, and (tensorboard) histograms of its rewards and margins."""
        self.log("eval", step, {k: v for k, v in result.items() if k != "pairs"})
        if self.enabled and self.tb is not None and pairs is not None:
            from rm_trainer.eval.report import log_histograms

            self._guard("tensorboard", lambda: log_histograms(self.tb, step, *pairs))
        if self.enabled and self.wb is not None and pairs is not None:
            self.wb.histograms(step, *pairs)

    def close_tracking(self, step: int, pictures: Path | None = None) -> None:
        """End of run (rank 0): the report's pictures as wandb images, then the wandb run is finished."""
        if self.wb is not None:
            if pictures is not None:
                self.wb.images(step, pictures)
            self.wb.close()
            self.wb = None

    def close(self) -> None:
        self.bar.close()
        if self.tb is not None:
            self._guard("tensorboard", self.tb.close)
        if self.jsonl is not None:
            self._guard("metrics.jsonl", self.jsonl.close)
