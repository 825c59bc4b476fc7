"""Weights & Biases, beside tensorboard and metrics.jsonl (`--report_to tensorboard,wandb`).

Rank 0 only. Every scalar the logger writes goes here too, under the same names (train/loss, eval/acc,
...), each evaluation's reward histograms as wandb histograms, the end-of-run report's pictures as images,
and the resolved run config as the run's config. The run id is stored in every checkpoint's record, so
a resumed run (also after a requeue) continues the same wandb run.

Offline when WANDB_MODE says so (offline, disabled), or when api.wandb.ai cannot be reached within two
seconds: the run is written under OUT/wandb/ and `wandb sync OUT/wandb/offline-run-*` uploads it later.
wandb is imported only here, and only when asked for (pip install 'rm_trainer[wandb]').
"""

from __future__ import annotations

import os
import secrets
import socket
from pathlib import Path

from rm_trainer.errors import ConfigError


def _reachable(host: str = "api.wandb.ai", port: int = 443, timeout_s: float = 2.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


class WandbSink:
    def __init__(self, out_dir: Path, config: dict, run_id: str | None, project: str | None):
        try:
            import wandb
        except ImportError:
            raise ConfigError(["output.report_to: wandb needs the wandb package; pip install "
                               "'rm_trainer[wandb]' (or wandb)"]) from None
        self.wandb = wandb
        mode = os.environ.get("WANDB_MODE") or ("online" if _reachable() else "offline")
        if mode == "offline" and "WANDB_MODE" not in os.environ:
            print("[rm_trainer] wandb: api.wandb.ai is not reachable; logging offline to "
                  f"{out_dir / 'wandb'} (upload later with `wandb sync`)", flush=True)
        self.id = run_id or f"{out_dir.name[:40]}-{secrets.token_hex(4)}"
        self.run = wandb.init(project=project, name=out_dir.name, id=self.id, resume="allow", dir=str(out_dir),
                              mode=mode, config=config)

    def log(self, split: str, step: int, values: dict) -> None:
        self.run.log({f"{split}/{k}": v for k, v in values.items() if isinstance(v, (int, float))}, step=step)

    def histograms(self, step: int, r_c, r_r) -> None:
        h = self.wandb.Histogram
        # not eval/margin: in wandb a histogram and the eval/margin scalar would share one key
        self.run.log({"eval_hist/reward_chosen": h(r_c.numpy()), "eval_hist/reward_rejected": h(r_r.numpy()),
                      "eval_hist/margin": h((r_c - r_r).numpy())}, step=step)

    def images(self, step: int, folder: Path) -> None:
        pictures = {f"eval/{p.stem}": self.wandb.Image(str(p)) for p in sorted(folder.glob("*.png"))}
        if pictures:
            self.run.log(pictures, step=step)

    def close(self) -> None:
        self.run.finish()
