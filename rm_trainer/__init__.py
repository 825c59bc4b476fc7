"""rm_trainer: Bradley-Terry reward models on DeepSpeed ZeRO-2/3.

The public names below are imported on first use (PEP 562), so `import rm_trainer` and the config and
command-line layers load neither torch nor transformers: a config error is reported in well under a
second. The packages form a strict stack; see docs/architecture.md.
"""

from __future__ import annotations

import importlib

_PUBLIC = {
    "RewardModel": "rm_trainer.model.reward",
    "gather_last": "rm_trainer.model.reward",
    "bradley_terry_loss": "rm_trainer.objectives.bt_loss",
    "margin": "rm_trainer.objectives.bt_loss",
    "preference_accuracy": "rm_trainer.objectives.bt_loss",
    "get_preference_iterator": "rm_trainer.data.batching",
    "load_reward_model": "rm_trainer.artifact.load",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value  # the next lookup is a plain attribute
        return value
    raise AttributeError(f"module 'rm_trainer' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
