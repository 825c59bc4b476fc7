"""The best checkpoints by a held-out metric (`--keep_best K --best_metric eval/acc`).

With keep_best > 0 every evaluation is followed by a checkpoint of the weights it evaluated; once that
checkpoint is committed, rank 0 ranks it in OUT/checkpoints/best.json (best first; on a tie the earlier
step ranks higher, so a later step must be strictly better). The K best are exempt from rotation, and at
the end of the run the best one is consolidated and exported as OUT/best/ (reward.pt + hf/), verified like
the final one. best.json is read back on resume: the ranking continues, without the entries of steps the
resumed run will redo or whose checkpoints are gone.

The metric is any number an evaluation logs: eval/loss, eval/acc, eval/margin, eval/<source>/acc (mixtures)
or a diagnostic (eval/length_corr, ...). The mode is max, or min for names ending in "loss", unless set.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from rm_trainer.errors import ConfigError

BEST_FILE = "best.json"


def resolve_mode(metric: str, mode: str) -> str:
    if mode != "auto":
        return mode
    return "min" if metric.endswith("loss") else "max"


class BestCheckpoints:
    """Rank 0's ranking. note() takes each evaluation's numbers, committed() ranks a committed step."""

    def __init__(self, root: Path, keep: int, metric: str, mode: str, done: int):
        self.path, self.keep, self.metric = root / BEST_FILE, keep, metric
        self.mode = resolve_mode(metric, mode)
        self.ranking: list[dict] = []  # best first: {"step", "tag", "value"}
        self.pending: dict[int, float] = {}
        if self.path.is_file():  # a resumed run: keep what is still true
            old = json.loads(self.path.read_text())
            if old.get("metric") == metric and old.get("mode") == self.mode:
                self.ranking = [e for e in old["ranking"] if e["step"] <= done and (root / e["tag"]).is_dir()]

    def note(self, step: int, result: dict) -> None:
        """An evaluation at `step`: its value of the metric, ranked once its checkpoint is committed."""
        key = self.metric.removeprefix("eval/")
        if key not in result:
            raise ConfigError([f"train.best_metric {self.metric!r} is not a number the evaluation logs; "
                               f"choose one of {sorted('eval/' + k for k in result if k != 'pairs')}"])
        self.pending[step] = float(result[key])

    def committed(self, step: int, tag: str) -> None:
        value = self.pending.pop(step, None)
        if value is None or not math.isfinite(value):
            return
        entries = [e for e in self.ranking if e["step"] != step] + [{"step": step, "tag": tag, "value": value}]
        sign = -1.0 if self.mode == "max" else 1.0
        self.ranking = sorted(entries, key=lambda e: (sign * e["value"], e["step"]))[:self.keep]
        self._write()

    def tags(self) -> set[str]:
        return {e["tag"] for e in self.ranking}

    def best(self) -> dict | None:
        return self.ranking[0] if self.ranking else None

    def _write(self) -> None:
        tmp = self.path.with_name(self.path.name + ".writing")
        tmp.write_text(json.dumps({"metric": self.metric, "mode": self.mode, "keep": self.keep,
                                   "ranking": self.ranking}, indent=1) + "\n")
        os.replace(tmp, self.path)


def read_best(root: Path) -> dict | None:
    """The best entry of a run's best.json (None when there is none)."""
    p = root / BEST_FILE
    if not p.is_file():
        return None
    ranking = json.loads(p.read_text()).get("ranking") or []
    return ranking[0] if ranking else None
