"""The run configuration: typed sections (pydantic models) and the cross-field checks between them.

Models only: reading YAML/JSON files and command-line flags into these models is the command layer's
job (cli/train_flags.py). Pure Python + pydantic, no torch: it runs before any process group exists, so
a bad config costs the user a second, not a cluster allocation. docs/config.md is generated from the
field descriptions here (python -m rm_trainer.cli.config_doc).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from rm_trainer.errors import ConfigError  # noqa: F401  (re-exported: raised by the config's users too)

SWITCH_WORDS = {"true": "on", "1": "on", "yes": "on", "on": "on", "false": "off", "0": "off", "no": "off",
                "off": "off"}


def switch(value):
    """An auto/on/off field (a switch) also takes a boolean: `packing: true` in an older config file is on.
    On the command line a switch is `--x` (on), `--no-x` (off) or `--x auto`."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return SWITCH_WORDS.get(value.lower(), value) if isinstance(value, str) else value


def weight_map(value):
    """A {name: weight} field also takes the flag form `helpfulness=1,verbosity=-0.3`."""
    if not isinstance(value, str):
        return value
    out = {}
    for part in filter(None, (p.strip() for p in value.split(","))):
        name, eq, number = part.partition("=")
        if not eq or not name.strip():
            raise ValueError(f"{part!r} is not name=number (e.g. helpfulness=1,verbosity=-0.3)")
        out[name.strip()] = number.strip()
    return out


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    """The backbone the reward head sits on, how it is built and run, and LoRA."""

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
    tiled_mlp: bool = Field(False, description="long inputs: each gated MLP computed in shards of ~H tokens and "
                            "recomputed per shard in the backward (DeepSpeed's TiledMLP), so a row's MLP "
                            "activations never exist at once; costs one more MLP forward (docs/long-context.md)")
    offload_activations: bool = Field(False, description="with gradient_checkpointing: each checkpointed layer "
                                      "input waits for the backward in pinned CPU memory, copied on a side "
                                      "stream (DeepSpeed's CheckpointHiddenStatesOffload); GPUs only, a no-op on "
                                      "CPU (docs/long-context.md)")
    head_init_std: float | None = Field(None, gt=0, description="std of the score head; default 1/sqrt(H+1)")
    lora_r: int = Field(0, ge=0, description="LoRA rank (peft); 0 = full fine-tuning. The score head is always "
                        "fully trained; only adapters and head get optimizer state")
    lora_alpha: float | None = Field(None, gt=0, description="LoRA scaling numerator (scale = alpha / r); "
                                     "default 2 x lora_r")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="keep 0: with dropout, chosen and rejected "
                                "see different networks in the same forward")
    lora_target: list[str] | None = Field(None, description="module names to adapt, e.g. q_proj,v_proj; "
                                          "default every linear layer of the decoder")
    router_aux_loss_coef: float | None = Field(None, ge=0, description="MoE backbones: weight of the router's "
                                               "load-balancing loss; default the model config's own; 0 = off")
    reward_weights: dict[str, float] | None = Field(
        None, description="--objective regression: the scalar reward PPO reads, a linear combination of the "
        "attributes (helpfulness=1,verbosity=-0.3); default the first attribute; saved with the artifact")
    _weight_maps = field_validator("reward_weights", mode="before")(weight_map)


class SourceConfig(Section):
    """One preference source of a mixture, with its own weight and held-out split."""

    path: str = Field(description="file, save_to_disk folder or hub dataset name")
    name: str | None = Field(None, description="label in reports and eval metrics; default: file stem")
    weight: float = Field(1.0, gt=0, description="rows drawn per row available: 0.5 = half, 2 = each twice")
    test_path: str | None = Field(None, description="this source's held-out file")
    test_fraction: float | None = Field(None, ge=0.0, lt=1.0, description="default: data.test_fraction")


class DataConfig(Section):
    """The preference files, their shape and column names, truncation, and how malformed rows are handled
    (see docs/data.md)."""

    train_path: str | None = Field(None, description="preference file (or use data.sources for a mixture)")
    test_path: str | None = Field(None, description="held-out file; else test_fraction of train is held out")
    test_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="held out from train (seeded) when there is "
                                 "no test_path")
    sources: list[SourceConfig] | None = Field(None, description="a mixture: several sources with weights")
    format: Literal["auto", "hh", "prompt", "conversational", "ranking", "ultrafeedback", "rating"] = Field(
        "auto", description="the rows' shape; auto decides once per source, from its first row (ranking and "
        "ultrafeedback: --objective ranking; rating: --objective regression)")
    prompt_key: str = Field("prompt", description="column of the prompt (explicit and conversational rows)")
    chosen_key: str = Field("chosen", description="column of the preferred response (or full text / messages)")
    rejected_key: str = Field("rejected", description="column of the other response")
    margin_key: str | None = Field(None, description="optional column: loss = -log sigma(r_c - r_r - margin)")
    tie_key: str | None = Field(None, description="optional column: true (or a preference strength of 0) marks "
                                "a tied pair, trained with the soft tie loss instead of being dropped")
    ranking_score: str = Field("overall_score", description="--objective ranking on UltraFeedback rows: which "
                               "score of each completion rates it (overall_score or fine-grained_score)")
    attributes: list[str] | None = Field(None, description="--objective regression: the rated attributes, each a "
                                         "column of numbers (helpfulness,correctness,...); the head has one "
                                         "output per attribute")
    response_key: str = Field("response", description="--objective regression: column of the rated response")
    missing_attributes: Literal["error", "mask"] = Field(
        "error", description="--objective regression: a row without one of the attributes (absent or null) is "
        "an error, or (mask) that attribute is left out of its loss and metrics")
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
    """Precision, batch, optimizer and schedule, evaluation, checkpoints and resume, batching and packing."""

    dtype: Literal["fp32", "bf16", "fp16"] = Field("bf16", description="training precision (fills the DeepSpeed "
                                                    "JSON's \"auto\" bf16/fp16)")
    micro_batch_size: int = Field(4, ge=1, description="pairs per rank per micro step (2x sequences); with "
                                  "--objective ranking, rows (K sequences each)")
    grad_accum: int = Field(1, ge=1, description="micro steps per optimizer step")
    eval_batch_size: int | None = Field(None, ge=1, description="pairs per rank per eval forward; default "
                                        "micro_batch_size")
    lr: float = Field(1e-5, gt=0, description="peak learning rate of AdamW (LoRA: ~1e-4)")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="final learning rate as a fraction of lr")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay; never on norms, biases or the head")
    adam_betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas, e.g. 0.9,0.95")
    adam_eps: float = Field(1e-8, gt=0, description="AdamW epsilon")
    lr_schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="decay after warmup")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="linear warmup, as a fraction of the steps")
    warmup_steps: int | None = Field(None, ge=0, description="overrides warmup_ratio")
    epochs: int = Field(1, ge=1, description="passes over the training pairs")
    max_steps: int | None = Field(None, ge=1, description="overrides epochs")
    max_grad_norm: float = Field(1.0, ge=0, description="0 disables clipping")
    seed: int = Field(42, description="data order, held-out split, mixture and head init")
    eval_every: int = Field(0, ge=0, description="steps between evals; 0 = only at the end")
    save_every: int = Field(0, ge=0, description="steps between checkpoints; 0 = only at the end")
    keep_last: int = Field(3, ge=2, description="committed checkpoints kept (>= 2: one may be mid-rotation)")
    keep_best: int = Field(0, ge=0, description="also keep the K best checkpoints by best_metric (each eval is "
                           "saved), exempt from rotation; the best is exported as OUT/best/. 0 = off")
    best_metric: str = Field("eval/acc", pattern=r"^eval/\S+$", description="what ranks checkpoints: eval/acc, "
                             "eval/loss, eval/<source>/acc, or an eval diagnostic")
    best_mode: Literal["auto", "max", "min"] = Field("auto", description="auto: min for a metric ending in "
                                                     "loss, else max")
    resume: str = Field("auto", description="auto (newest committed in OUT/checkpoints), never, or a PATH")
    resume_force: bool = Field(False, description="resume although data, model, max_len, seed or batch differ")
    max_consecutive_skips: int = Field(5, ge=1, description="abort after this many non-finite steps in a row")
    log_every: int = Field(1, ge=1, description="steps between metric lines (each costs one host sync)")
    dist_timeout_s: float = Field(1800, gt=0, description="collective timeout while training: a rank that "
                                  "waits longer for the others fails instead of hanging")
    batching: Literal["grouped", "random"] = Field(
        "grouped", description="grouped: each global batch sorted by pair length before it is split into "
        "micro-batches (less padding); random: split as drawn")
    packing: Literal["auto", "on", "off"] = Field(
        "auto", description="padding-free: split each global batch into token-balanced micro-batches and pack "
        "their sequences into rows of pack_len tokens. auto: on when the start-up check proves packed rows "
        "score like padded ones for this model and attention (else grouped, saying why), and batching is not "
        "random; on: the check must pass; off: padded")
    share_prompt: Literal["auto", "on", "off"] = Field(
        "auto", description="one prompt, many responses: each row's prompt encoded once, its responses after "
        "it, each attending to the prompt and itself (docs/batching.md). auto: where the start-up check proves "
        "it exact for this model and attention, on the rows where it costs less (else off, saying why); on: "
        "every row with a common prefix, and the check must pass; off: each response its own sequence")
    _switches = field_validator("packing", "share_prompt", mode="before")(switch)
    pack_len: int | None = Field(None, ge=8, description="tokens per packed row (default 2 x data.max_len)")
    sequence_parallel: int = Field(1, ge=1, description="sequence ranks per data-parallel group (DeepSpeed's Ulysses): "
                                   "each holds 1/N of every row's tokens, for long inputs; must divide the world "
                                   "size and the attention heads (docs/long-context.md)")
    center_rewards_coefficient: float = Field(0.0, ge=0, description="adds c * mean((r_c + r_r)^2) to the loss "
                                              "(TRL's name and formula): rewards centred near 0; 0.01 is usual")
    objective: Literal["pairs", "ranking", "regression", "bt+regression"] = Field(
        "pairs", description="pairs: Bradley-Terry on (chosen, rejected); ranking: rows of one prompt, K >= 2 "
        "responses and a score each (or UltraFeedback's completions), each response one forward per step; "
        "regression: rated responses, MSE on each of data.attributes; bt+regression: pair sources and rating "
        "sources in one run, BT on the combined reward plus the MSE (docs/objectives.md)")
    bt_weight: float = Field(1.0, gt=0, description="--objective bt+regression: the BT term's weight against "
                             "the regression term (each row counts once: a pair's loss is bt_weight x BT)")
    attribute_weights: dict[str, float] | None = Field(
        None, description="--objective regression: each attribute's weight in the loss (helpfulness=2,"
        "verbosity=0.5); unnamed attributes weigh 1")
    _weight_maps = field_validator("attribute_weights", mode="before")(weight_map)
    ranking_loss: Literal["pairs", "plackett_luce"] = Field(
        "pairs", description="--objective ranking: pairs = BT over every ordered pair with different scores, "
        "averaged per prompt; plackett_luce = the likelihood of the whole order, ties grouped")
    tie_loss: Literal["soft", "davidson"] = Field(
        "soft", description="tied pairs (data.tie_key): soft = BT against 1/2; davidson = the Davidson model, a "
        "tie as a third outcome with one learned parameter nu (left out of reward.pt)")
    eval_at_start: bool = Field(False, description="evaluate before the first step (not on a resume), e.g. "
                                "to check a model you continue from")


class OutputConfig(Section):
    """Where the run writes, and what the end of the run produces (reward.pt, the HF folder, the adapter)."""

    output_dir: str | None = Field(None, description="where the run writes everything (see docs/checkpoints.md)")
    tensorboard: bool = Field(True, description="also log to OUT/tb (--no-tensorboard: leave it out of report_to)")
    report_to: list[Literal["tensorboard", "wandb"]] = Field(["tensorboard"], description="where metrics go "
                                                            "besides OUT/metrics.jsonl: tensorboard, wandb")
    wandb_project: str | None = Field(None, description="wandb project (default: WANDB_PROJECT, else wandb's)")
    verify: bool = Field(True, description="re-score a probe batch from reward.pt vs the live engine")
    hf_output_dir: str | None = Field(None, description="HF AutoModelForSequenceClassification folder; default OUT/hf")
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
    ds_config: str | None = Field(None, description="DeepSpeed JSON; default: a built-in ZeRO-2 config")

    @model_validator(mode="after")
    def _cross_checks(self, info: ValidationInfo) -> RunConfig:
        # Collected into one error so pydantic reports them alongside field errors. Validated with
        # context {"model_only": True} (rm-estimate), a config needs no data and no output folder.
        model_only = bool((info.context or {}).get("model_only"))
        problems = []
        if not self.model.path:
            problems.append("model.path (--model) is required: an HF save_pretrained folder")
        if not self.data.train_path and not self.data.sources and not model_only:
            problems.append("data.train_path (--data) is required: a .jsonl/.json/.parquet file "
                            "(or data.sources for a mixture)")
        if self.data.train_path and self.data.sources:
            problems.append("data.train_path and data.sources are both set: put every file in data.sources")
        names = [s.name or Path(s.path).stem for s in self.data.sources or []]
        if len(set(names)) != len(names):
            problems.append(f"data.sources: names must be unique, got {names}")
        if not self.output.output_dir and not model_only:
            problems.append("output.output_dir (--output_dir) is required")
        if self.train.pack_len is not None and self.train.pack_len < self.data.max_len:
            problems.append(f"train.pack_len ({self.train.pack_len}) must be at least data.max_len "
                            f"({self.data.max_len}): a sequence is never split across packed rows")
        if self.train.share_prompt == "on" and self.train.sequence_parallel > 1:
            problems.append("train.share_prompt on: shared prompts are not supported with sequence parallelism "
                            "(train.sequence_parallel > 1); use share_prompt auto or off")
        if self.train.keep_best and not (self.data.test_path or self.data.test_fraction > 0
                                         or any(src.test_path or src.test_fraction for src in self.data.sources or [])):
            problems.append("train.keep_best ranks checkpoints by a held-out metric: give data.test_path "
                            "(--test_data) or a test_fraction above 0")
        if self.train.tie_loss == "davidson" and not self.data.tie_key and not model_only:
            problems.append("train.tie_loss davidson models tied pairs: name their column with data.tie_key "
                            "(--tie_key tie)")
        if self.model.offload_activations and not self.model.gradient_checkpointing:
            problems.append("model.offload_activations moves the checkpointed layer inputs to CPU: it needs "
                            "model.gradient_checkpointing (--gradient_checkpointing)")
        problems += self._objective_problems()
        if self.output.lora_export and not self.model.lora_r:
            problems.append("output.lora_export needs LoRA: set model.lora_r (--lora_r 8)")
        if self.model.lora_target is not None and not self.model.lora_target:
            problems.append("model.lora_target is empty: name modules (q_proj,v_proj) or leave it unset")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _objective_problems(self) -> list[str]:
        """The data format, the pair-only options and the attribute options against train.objective."""
        d, t, problems = self.data, self.train, []
        holds = {"ranking": "ranking", "ultrafeedback": "ranking", "rating": "regression"}.get(d.format, "pairs")
        if d.format != "auto" and t.objective == "bt+regression":
            problems.append(f"train.objective bt+regression reads pair sources and rating sources, each decided from "
                            f"its first row: leave data.format auto (it is {d.format})")
        elif d.format != "auto" and holds != t.objective:
            problems.append(f"data.format {d.format} holds {OBJECTIVE_ROWS[holds]}, and train.objective is "
                            f"{t.objective}: set --objective {holds}, or data.format auto")
        if t.objective != "pairs":
            extra = [f for f, v in (("data.tie_key", d.tie_key), ("data.margin_key", d.margin_key),
                                    ("train.center_rewards_coefficient", t.center_rewards_coefficient)) if v]
            if extra:
                problems.append(f"train.objective {t.objective} reads {OBJECTIVE_ROWS[t.objective]}: "
                                f"{', '.join(extra)} apply to pairs; unset them")
        given = [f for f, v in (("data.attributes", d.attributes), ("train.attribute_weights", t.attribute_weights),
                                ("model.reward_weights", self.model.reward_weights)) if v]
        if t.objective not in ("regression", "bt+regression"):
            if given:
                problems.append(f"{', '.join(given)}: rated attributes are read by --objective regression")
            return problems
        if not d.attributes:
            problems.append(f"train.objective {t.objective} needs data.attributes: the rated columns "
                            "(--attributes helpfulness,correctness)")
            return problems
        if len(set(d.attributes)) != len(d.attributes):
            problems.append(f"data.attributes names an attribute twice: {d.attributes}")
        for field, weights in (("train.attribute_weights", t.attribute_weights),
                               ("model.reward_weights", self.model.reward_weights)):
            unknown = sorted(set(weights or {}) - set(d.attributes))
            if unknown:
                problems.append(f"{field} names {', '.join(unknown)}, not among data.attributes "
                                f"({', '.join(d.attributes)})")
        w = t.attribute_weights or {}
        if any(v < 0 for v in w.values()) or (w and all(w.get(a, 1.0) == 0 for a in d.attributes)):
            problems.append("train.attribute_weights must be >= 0, with at least one attribute above 0")
        if self.model.reward_weights is not None and not any(self.model.reward_weights.values()):
            problems.append("model.reward_weights are all 0: the reward would be constant")
        return problems

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
OBJECTIVE_ROWS = {"pairs": "preference pairs", "ranking": "rankings (scores per response; equal scores tie)",
                  "regression": "rated responses (a number per attribute)",
                  "bt+regression": "preference pairs and rated responses"}


def explicitly_set(cfg: RunConfig) -> set[str]:
    """Dotted names of the fields the user set (file or CLI), as opposed to defaults."""
    out = {s for s in cfg.model_fields_set if s not in SECTIONS}
    for sec in SECTIONS:
        out |= {f"{sec}.{f}" for f in getattr(cfg, sec).model_fields_set}
    return out
