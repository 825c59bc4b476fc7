"""Fill a DeepSpeed JSON's "auto" values from the run config and catch contradictions.

Pure dict manipulation (no deepspeed import) so it runs, and fails, before any process group starts.
Rule: "auto" takes the run config's value. An explicit JSON value wins over a run-config *default*
(the user's existing DeepSpeed JSON keeps working), but contradicting a value the user set in the
run config is an error that names both sides.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from rm_trainer.config import RunConfig, explicitly_set
from rm_trainer.errors import ConfigError

DEFAULT_DS_CONFIG: dict[str, Any] = {
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "bf16": {"enabled": "auto"},
    "fp16": {"enabled": "auto"},
    "zero_optimization": {"stage": 2},
    "steps_per_print": 1_000_000,
    "wall_clock_breakdown": False,
}


def load_ds_json(path: str | None) -> dict:
    if path is None:
        return copy.deepcopy(DEFAULT_DS_CONFIG)
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ConfigError([f"ds_config {path}: invalid JSON at line {e.lineno} col {e.colno}: {e.msg}"]) from None
    if not isinstance(data, dict):
        raise ConfigError([f"ds_config {path}: top level must be a JSON object"])
    return data


def resolve_ds_config(
    cfg: RunConfig, world_size: int, hidden_size: int | None = None, cuda: bool = False
) -> tuple[dict, RunConfig]:
    """Return (resolved DeepSpeed dict, run config updated with values adopted from the JSON).

    Raises ConfigError with every conflict and every unresolvable "auto" at once.
    """
    ds = load_ds_json(cfg.ds_config)
    src = cfg.ds_config or "default ds_config"
    user_set = explicitly_set(cfg)
    cfg = cfg.model_copy(deep=True)
    problems: list[str] = []

    def settle(ds_key: str, field: str, cast=float) -> None:
        """Unify one scalar between the JSON (top-level key) and the run config field."""
        sec, name = field.split(".")
        ours = getattr(getattr(cfg, sec), name)
        theirs = ds.get(ds_key, "auto")
        if theirs == "auto":
            ds[ds_key] = ours
            return
        try:
            theirs_v = cast(theirs)
        except (TypeError, ValueError):
            problems.append(f"{src}: {ds_key}={theirs!r} is neither a number nor \"auto\"")
            return
        if field in user_set and theirs_v != ours:
            problems.append(
                f"{src}: {ds_key}={theirs} contradicts run config {field}={ours}; "
                f'set one of them, or write "auto" in the JSON'
            )
        else:
            setattr(getattr(cfg, sec), name, theirs_v)
            ds[ds_key] = theirs_v

    settle("train_micro_batch_size_per_gpu", "train.micro_batch_size", int)
    settle("gradient_accumulation_steps", "train.grad_accum", int)
    settle("gradient_clipping", "train.max_grad_norm", float)

    m, a = cfg.train.micro_batch_size, cfg.train.grad_accum
    tbs = ds.get("train_batch_size", "auto")
    if tbs == "auto":
        ds["train_batch_size"] = m * a * world_size
    elif int(tbs) != m * a * world_size:
        problems.append(
            f"{src}: train_batch_size={tbs} but micro_batch_size ({m}) x grad_accum ({a}) x world_size "
            f"({world_size}) = {m * a * world_size}; fix one, or write \"auto\""
        )

    _settle_precision(ds, cfg, user_set, src, problems)
    _fill_optimizer(ds, cfg, cuda)
    _fill_zero_auto(ds, hidden_size)
    ds.setdefault("steps_per_print", 1_000_000)  # our own logger reports; DeepSpeed's would duplicate

    leftovers = _find_auto(ds)
    problems += [f'{src}: {k} is "auto" but rm_trainer has no value for it; set it explicitly' for k in leftovers]
    if problems:
        raise ConfigError(problems)
    return ds, cfg


def _settle_precision(ds: dict, cfg: RunConfig, user_set: set[str], src: str, problems: list[str]) -> None:
    def state(key: str) -> Any:  # None (absent), "auto", True or False
        sec = ds.get(key)
        return sec.get("enabled", "auto") if isinstance(sec, dict) else sec

    states = {k: state(k) for k in ("bf16", "fp16")}
    on = [k for k, v in states.items() if v is True]
    dtype_set = "train.dtype" in user_set
    if len(on) > 1:
        problems.append(f"{src}: bf16 and fp16 are both enabled; enable at most one")
        return
    if on and dtype_set and cfg.train.dtype != on[0]:
        problems.append(f"{src}: {on[0]}.enabled=true contradicts run config train.dtype={cfg.train.dtype}; "
                        'set one of them, or write "auto" in the JSON')
        return
    if on:
        cfg.train.dtype = on[0]
    elif states.get(cfg.train.dtype) is False:
        if dtype_set:
            problems.append(f"{src}: {cfg.train.dtype}.enabled=false contradicts run config "
                            f'train.dtype={cfg.train.dtype}; set one of them, or write "auto" in the JSON')
            return
        cfg.train.dtype = "fp32"
    for key in ("bf16", "fp16"):
        sec = ds.get(key)
        ds[key] = {**(sec if isinstance(sec, dict) else {}), "enabled": cfg.train.dtype == key}


def _fill_optimizer(ds: dict, cfg: RunConfig, cuda: bool) -> None:
    t = cfg.train
    opt = ds.get("optimizer")
    if opt is not None:
        params = opt.setdefault("params", {})
        for k, v in (("lr", t.lr), ("betas", list(t.adam_betas)), ("eps", t.adam_eps),
                     ("weight_decay", t.weight_decay)):
            if params.get(k, "auto") == "auto":
                params[k] = v
        if not cuda:
            # DeepSpeed's fused/CPU Adam need compiled ops; torch's AdamW needs none.
            params.setdefault("torch_adam", True)
    sch = ds.get("scheduler")
    if sch is not None:
        params = sch.setdefault("params", {})
        for k in list(params):
            if params[k] == "auto":
                params[k] = {"warmup_max_lr": t.lr, "warmup_min_lr": 0.0, "cos_min_ratio": t.min_lr_ratio,
                             "warmup_type": "linear"}.get(k, params[k])
        # total/warmup step counts depend on the dataset size; the trainer fills them.


def _fill_zero_auto(ds: dict, hidden_size: int | None) -> None:
    # The same heuristics as HF's integration, so existing HF-style JSONs work unchanged.
    zo = ds.get("zero_optimization", {})
    if hidden_size:
        fills = {
            "reduce_bucket_size": hidden_size * hidden_size,
            "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
            "stage3_param_persistence_threshold": 10 * hidden_size,
        }
        for k, v in fills.items():
            if zo.get(k) == "auto":
                zo[k] = v


SCHEDULER_STEP_KEYS = ("total_num_steps", "warmup_num_steps")


def fill_scheduler_steps(ds: dict, total_steps: int, warmup_steps: int) -> None:
    sch = ds.get("scheduler")
    if sch is None:
        return
    params = sch.setdefault("params", {})
    for k, v in (("total_num_steps", total_steps), ("warmup_num_steps", warmup_steps)):
        if params.get(k, "auto") == "auto":
            params[k] = v


def _find_auto(node: Any, prefix: str = "") -> list[str]:
    out = []
    if isinstance(node, dict):
        for k, v in node.items():
            path = f"{prefix}.{k}" if prefix else k
            if path.startswith("scheduler.params.") and k in SCHEDULER_STEP_KEYS:
                continue
            out += _find_auto(v, path)
    elif node == "auto":
        out.append(prefix)
    return out
