"""Run configuration: typed sections, YAML/JSON file + CLI overrides, all problems reported at once.

Everything here is pure Python + pydantic: it runs before any process group exists, so a bad config
costs the user one second, not a cluster allocation.
"""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from rm_trainer.errors import ConfigError  # noqa: F401  (re-exported: raised by the config's users too)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    path: str | None = Field(None, description="HF save_pretrained folder of the SFT backbone; or a reward model "
                             "to continue: an HF *ForSequenceClassification folder (num_labels=1) or a reward.pt")
    tokenizer: str | None = Field(None, description="tokenizer folder; defaults to model.path")
    random_init: bool = Field(False, description="build the backbone from path's config.json with random weights")
    gradient_checkpointing: bool = Field(False, description="activation checkpointing of the decoder layers")
    disable_dropout: bool = Field(True, description="set every dropout p to 0: chosen and rejected must see "
                                  "the same network, and equivalence across world sizes needs determinism")
    reward_path: Literal["fused", "plain"] = Field(
        "fused", description="fused: gather last rows before the final norm + closed-form BT loss; "
        "plain: norm and head over every token (for comparison)")
    attn_implementation: str | None = Field(None, description="e.g. sdpa, eager, flash_attention_2")
    head_init_std: float | None = Field(None, gt=0, description="std of the score head; default 1/sqrt(H+1)")
    lora_r: int = Field(0, ge=0, description="LoRA rank (peft); 0 = full fine-tuning. The score head is always "
                        "fully trained; only adapters and head get optimizer state")
    lora_alpha: float | None = Field(None, gt=0, description="LoRA scaling numerator (scale = alpha / r); "
                                     "default 2 x lora_r")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="keep 0: with dropout, chosen and rejected "
                                "see different networks in the same forward")
    lora_target: list[str] | None = Field(None, description="module names to adapt, e.g. q_proj,v_proj; "
                                          "default every linear layer of the decoder")


class SourceConfig(Section):
    """One preference source of a mixture."""
    path: str = Field(description="file, save_to_disk folder or hub dataset name")
    name: str | None = Field(None, description="label in reports and eval metrics; default: file stem")
    weight: float = Field(1.0, gt=0, description="rows drawn per row available: 0.5 = half, 2 = each twice")
    test_path: str | None = None
    test_fraction: float | None = Field(None, ge=0.0, lt=1.0, description="default: data.test_fraction")


class DataConfig(Section):
    train_path: str | None = Field(None, description="preference file (or use data.sources for a mixture)")
    test_path: str | None = Field(None, description="held-out file; else test_fraction of train is held out")
    test_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    sources: list[SourceConfig] | None = Field(None, description="a mixture: several sources with weights")
    format: Literal["auto", "hh", "prompt", "conversational"] = "auto"
    prompt_key: str = "prompt"
    chosen_key: str = "chosen"
    rejected_key: str = "rejected"
    margin_key: str | None = Field(None, description="optional column: loss = -log sigma(r_c - r_r - margin)")
    chat_template: str | None = Field(None, description="Jinja file, for tokenizers without a chat template")
    max_len: int = Field(512, ge=8, description="tokens per sequence (prompt + response + EOS)")
    on_error: Literal["error", "skip"] = Field("error", description="malformed rows: stop, or count and skip")
    max_drop_fraction: float = Field(0.05, ge=0.0, le=1.0, description="abort if a source drops more than this")
    num_proc: int | None = Field(None, ge=1, description="tokenization processes (datasets.map); default: the "
                                 "available cores, capped at 16, one per 10k rows")
    cache_dir: str | None = Field(None, description="tokenized-dataset cache (default OUT/data_cache); one "
                                  "folder per content key, reused by every start, resume and requeue")
    prepare_timeout_s: float = Field(86400, gt=0, description="how long the other ranks wait for rank 0 to "
                                     "prepare the data (they poll; no collective is pending meanwhile)")

    def source_list(self) -> list[SourceConfig]:
        if self.sources:
            return self.sources
        return [SourceConfig(path=self.train_path, name="train", test_path=self.test_path,
                             test_fraction=self.test_fraction)] if self.train_path else []


class TrainConfig(Section):
    dtype: Literal["fp32", "bf16", "fp16"] = "bf16"
    micro_batch_size: int = Field(4, ge=1, description="pairs per rank per micro step (2x sequences)")
    grad_accum: int = Field(1, ge=1, description="micro steps per optimizer step")
    eval_batch_size: int | None = Field(None, ge=1)
    lr: float = Field(1e-5, gt=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.95)
    adam_eps: float = Field(1e-8, gt=0)
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    warmup_steps: int | None = Field(None, ge=0, description="overrides warmup_ratio")
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1, description="overrides epochs")
    max_grad_norm: float = Field(1.0, ge=0, description="0 disables clipping")
    seed: int = 42
    eval_every: int = Field(0, ge=0, description="steps between evals; 0 = only at the end")
    save_every: int = Field(0, ge=0, description="steps between checkpoints; 0 = only at the end")
    keep_last: int = Field(3, ge=2, description="committed checkpoints kept (>= 2: one may be mid-rotation)")
    resume: str = Field("auto", description="auto (newest committed in OUT/checkpoints), never, or a PATH")
    resume_force: bool = Field(False, description="resume although data, model, max_len, seed or batch differ")
    max_consecutive_skips: int = Field(5, ge=1, description="abort after this many non-finite steps in a row")
    log_every: int = Field(1, ge=1)
    dist_timeout_s: float = Field(1800, gt=0, description="collective timeout while training: a rank that "
                                  "waits longer for the others fails instead of hanging")
    batching: Literal["grouped", "random"] = Field(
        "grouped", description="grouped: each global batch sorted by pair length before it is split into "
        "micro-batches (less padding); random: split as drawn")
    packing: bool = Field(False, description="padding-free: split each global batch into token-balanced "
                          "micro-batches and pack their sequences into rows of pack_len tokens")
    pack_len: int | None = Field(None, ge=8, description="tokens per packed row (default 2 x data.max_len)")
    center_rewards_coefficient: float = Field(0.0, ge=0, description="adds c * mean((r_c + r_r)^2) to the loss "
                                              "(TRL's name and formula): rewards centred near 0; 0.01 is usual")
    eval_at_start: bool = Field(False, description="evaluate before the first step (not on a resume), e.g. "
                                "to check a model you continue from")


class OutputConfig(Section):
    output_dir: str | None = None
    tensorboard: bool = True
    verify_consolidation: bool = Field(True, description="re-score a probe batch from reward.pt vs the engine")
    hf_out: str | None = Field(None, description="HF AutoModelForSequenceClassification folder; default OUT/hf")
    hf_export: bool = Field(True, description="write the HF folder at the end of training")
    hf_shard_size: str = Field("5GB", pattern=r"^\d+(\.\d+)?\s*[KMG]i?B$",
                               description="largest safetensors shard of the HF export, e.g. 5GB, 500MB")
    lora_export: bool = Field(False, description="with LoRA: also write OUT/lora_adapter, a peft adapter folder "
                              "(adapters + score head) for PeftModel.from_pretrained")
    preempt_marker: str | None = Field(None, description="file rank 0 writes when the ranks stopped at a "
                                       "committed checkpoint for a preemption (default OUT/preempted.json)")


class RunConfig(Section):
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    output: OutputConfig = OutputConfig()
    ds_config: str | None = Field(None, description="DeepSpeed JSON; default ds_configs/zero2.json")

    @model_validator(mode="after")
    def _cross_checks(self) -> RunConfig:
        # Collected into one error so pydantic reports them alongside field errors.
        problems = []
        if not self.model.path:
            problems.append("model.path (--model) is required: an HF save_pretrained folder")
        if not self.data.train_path and not self.data.sources:
            problems.append("data.train_path (--data) is required: a .jsonl/.json/.parquet file "
                            "(or data.sources for a mixture)")
        if self.data.train_path and self.data.sources:
            problems.append("data.train_path and data.sources are both set: put every file in data.sources")
        names = [s.name or Path(s.path).stem for s in self.data.sources or []]
        if len(set(names)) != len(names):
            problems.append(f"data.sources: names must be unique, got {names}")
        if not self.output.output_dir:
            problems.append("output.output_dir (--output_dir) is required")
        if self.train.pack_len is not None and self.train.pack_len < self.data.max_len:
            problems.append(f"train.pack_len ({self.train.pack_len}) must be at least data.max_len "
                            f"({self.data.max_len}): a sequence is never split across packed rows")
        if self.output.lora_export and not self.model.lora_r:
            problems.append("output.lora_export needs LoRA: set model.lora_r (--lora_r 8)")
        if self.model.lora_target is not None and not self.model.lora_target:
            problems.append("model.lora_target is empty: name modules (q_proj,v_proj) or leave it unset")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def eval_batch_size(self) -> int:
        return self.train.eval_batch_size or self.train.micro_batch_size

    @property
    def pack_len(self) -> int | None:
        """Tokens per packed row; None packs each micro-batch into one row (flash-attention's varlen path
        reads sequence boundaries from position_ids only for a single row)."""
        if self.model.attn_implementation == "flash_attention_2":
            return None
        return self.train.pack_len or 2 * self.data.max_len


SECTIONS = ("model", "data", "train", "output")
# Short flags users know from the seed script and from other trainers, beyond the automatic
# "unique field name" short forms (--lr, --max_len, --micro_batch_size, ...).
ALIASES = {
    "model": "model.path",
    "data": "data.train_path",
    "train_data": "data.train_path",
    "test_data": "data.test_path",
    "gradient_accumulation_steps": "train.grad_accum",
    "per_device_train_batch_size": "train.micro_batch_size",
    "batch_size": "train.micro_batch_size",
    "learning_rate": "train.lr",
    "deepspeed_config": "ds_config",
}
# Flags consumed by launchers rather than by the config.
LAUNCHER_FLAGS = {"local_rank", "local-rank"}
BOOL_WORDS = {"true", "false", "1", "0", "yes", "no", "on", "off"}


def _field_index() -> dict[str, str]:
    """Map every accepted flag name to its dotted config path."""
    index: dict[str, str] = {"ds_config": "ds_config"}
    seen: dict[str, list[str]] = {}
    for sec in SECTIONS:
        cls = RunConfig.model_fields[sec].annotation
        for name in cls.model_fields:
            index[f"{sec}.{name}"] = f"{sec}.{name}"
            seen.setdefault(name, []).append(sec)
    for name, secs in seen.items():
        if len(secs) == 1:
            index.setdefault(name, f"{secs[0]}.{name}")
    index.update(ALIASES)
    return index


def _is_bool_field(dotted: str) -> bool:
    if "." not in dotted:
        return False
    sec, name = dotted.split(".", 1)
    return RunConfig.model_fields[sec].annotation.model_fields[name].annotation is bool


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = tree.setdefault(p, {})
        if not isinstance(node, dict):
            raise ValueError(f"{'.'.join(parts[:-1])} is not a section")
        tree = node
    tree[parts[-1]] = value


def _parse_value(dotted: str, raw: str) -> Any:
    # Tuples/lists come as JSON ("[0.9, 0.95]") or comma lists; everything else stays a string and
    # pydantic coerces it ("1e-5" -> float, "8" -> int, "true" -> bool).
    if dotted.endswith(("adam_betas", "lora_target")):
        raw = raw.strip()
        return json.loads(raw) if raw.startswith("[") else [s.strip() for s in raw.split(",") if s.strip()]
    return raw


def load_config_file(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError([f"--config {path}: file not found"])
    text = p.read_text()
    try:
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ConfigError([f"--config {path}: cannot parse: {e}"]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"--config {path}: top level must be a mapping of sections"])
    return data


# Options of the --dry-run report, not of the run itself: name -> type.
DRY_RUN_OPTIONS = {"gpu_memory_gb": float, "world_size": int, "gpus_per_node": int}


def parse_cli(argv: list[str]) -> tuple[dict, list[str], dict[str, Any]]:
    """Parse ``--key value`` overrides into a nested dict.

    Returns (overrides, problems, extra flags: dry_run and its options). Unknown flags are problems
    with a did-you-mean hint, collected rather than raised so the user sees all of them at once.
    """
    index = _field_index()
    overrides: dict = {}
    problems: list[str] = []
    flags: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        tok = argv[i]
        i += 1
        if not tok.startswith("--"):
            problems.append(f"unexpected argument {tok!r}: options look like --train.lr 1e-5")
            continue
        key, eq, val = tok[2:].partition("=")
        if key in LAUNCHER_FLAGS:  # deepspeed passes --local_rank=N; LOCAL_RANK env says the same
            if not eq and i < len(argv) and not argv[i].startswith("--"):
                i += 1
            continue
        if key in ("prepare-only", "prepare_only"):
            flags["prepare_only"] = True
            continue
        if key in ("config", "dry-run", "dry_run"):
            if key == "config":
                if not eq:
                    if i >= len(argv):
                        problems.append("--config needs a file path")
                        continue
                    val = argv[i]
                    i += 1
                overrides.setdefault("__config_files__", []).append(val)
            else:
                flags["dry_run"] = True
            continue
        if key in DRY_RUN_OPTIONS:
            if not eq:
                val = argv[i] if i < len(argv) else ""
                i += 1
            try:
                flags[key] = DRY_RUN_OPTIONS[key](val)
            except ValueError:
                problems.append(f"--{key} needs a {DRY_RUN_OPTIONS[key].__name__}, got {val!r}")
            continue
        dotted = index.get(key) or index.get(key.replace("-", "_"))
        if dotted is None:
            hint = difflib.get_close_matches(key, list(index) + list(DRY_RUN_OPTIONS), n=1)
            problems.append(f"unknown option --{key}" + (f" (did you mean --{hint[0]}?)" if hint else ""))
            if not eq and i < len(argv) and not argv[i].startswith("--"):
                i += 1
            continue
        if not eq:
            nxt = argv[i] if i < len(argv) else None
            if _is_bool_field(dotted) and (nxt is None or nxt.startswith("--") or nxt.lower() not in BOOL_WORDS):
                val = "true"  # bare boolean flag
            elif nxt is None or (nxt.startswith("--") and not _looks_numeric(nxt)):
                problems.append(f"--{key} needs a value")
                continue
            else:
                val = nxt
                i += 1
        _set_dotted(overrides, dotted, _parse_value(dotted, val))
    return overrides, problems, flags


def _looks_numeric(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _pydantic_problems(err: ValidationError) -> list[str]:
    problems = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        if e["type"] == "value_error" and not loc:
            problems.extend(m.strip() for m in msg.split(";"))
            continue
        got = e.get("input")
        shown = f" (got {got!r})" if got is not None and not isinstance(got, dict) else ""
        problems.append(f"{loc}: {msg}{shown}")
    return problems


def _path_problems(tree: dict) -> list[str]:
    """File checks on the raw (merged) tree, so they are reported even when other fields are invalid."""
    def get(sec: str, name: str) -> str | None:
        node = tree.get(sec)
        v = node.get(name) if isinstance(node, dict) else None
        return str(v) if v not in (None, "") else None

    problems = []
    path = get("model", "path")
    if path and path.endswith(".pt"):
        if not Path(path).is_file():
            problems.append(f"model.path {path!r}: file not found (a reward.pt to continue from)")
    elif path and not Path(path).is_dir():
        problems.append(f"model.path {path!r}: not a folder (expected an HF save_pretrained folder)")
    elif path and not (Path(path) / "config.json").is_file():
        problems.append(f"model.path {path!r}: has no config.json")
    tok = get("model", "tokenizer") or path
    if tok and Path(tok).is_dir() and not any((Path(tok) / f).exists() for f in TOKENIZER_FILES):
        problems.append(f"tokenizer folder {tok!r} has none of {', '.join(TOKENIZER_FILES)}")
    data = tree.get("data") if isinstance(tree.get("data"), dict) else {}
    paths = [(f"data.{f}", get("data", f)) for f in ("train_path", "test_path", "chat_template")]
    for i, src in enumerate(data.get("sources") or []):
        if isinstance(src, dict):
            paths += [(f"data.sources[{i}].{f}", src.get(f)) for f in ("path", "test_path")]
    for field, p in paths:
        if p and not Path(str(p)).exists() and not looks_like_hub_name(str(p)):
            problems.append(f"{field} {p!r}: file not found")
    ds = tree.get("ds_config")
    if ds and not Path(str(ds)).is_file():
        problems.append(f"ds_config {ds!r}: file not found")
    return problems


def looks_like_hub_name(p: str) -> bool:
    """'org/name' without a file extension: a dataset on the hub rather than a missing local file."""
    return (p.count("/") == 1 and not p.startswith((".", "/", "~"))
            and not any(p.lower().endswith(e) for e in (".json", ".jsonl", ".gz", ".parquet", ".arrow", ".jinja")))


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


def load_run_config(argv: list[str]) -> tuple[RunConfig, dict[str, Any]]:
    """Config file(s) < CLI overrides. Raises ConfigError listing every problem found."""
    overrides, problems, flags = parse_cli(argv)
    tree: dict = {}
    for path in overrides.pop("__config_files__", []):
        try:
            tree = _merge(tree, load_config_file(path))
        except ConfigError as e:
            problems.extend(e.problems)
    tree = _merge(tree, overrides)
    problems += _path_problems(tree)
    try:
        cfg = RunConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(problems + _pydantic_problems(e)) from None
    if problems:
        raise ConfigError(problems)
    return cfg, flags


def explicitly_set(cfg: RunConfig) -> set[str]:
    """Dotted names of the fields the user set (file or CLI), as opposed to defaults."""
    out = {s for s in cfg.model_fields_set if s not in SECTIONS}
    for sec in SECTIONS:
        out |= {f"{sec}.{f}" for f in getattr(cfg, sec).model_fields_set}
    return out


def world_size_from_env() -> int:
    # Launchers (deepspeed, torchrun, our slurm script) export WORLD_SIZE before the process starts,
    # so the DeepSpeed JSON can be checked against the run config before any process group exists.
    return int(os.environ.get("WORLD_SIZE", "1"))
