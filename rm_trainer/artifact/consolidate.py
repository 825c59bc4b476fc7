"""Consolidation: a committed checkpoint in, a verified `reward.pt` (and optionally the HF folder and the
peft adapter folder) out.

A committed checkpoint carries `rm_trainer_meta.json` (resolved config, backbone config, token ids,
held-out reward statistics and a probe batch scored by the live engine) and the tokenizer files, so
`consolidate()` is self-sufficient: checkpoint folder in, verified `reward.pt` (and optionally the HF
folder) out.

Host memory stays near the size of the weights once: the ZeRO shards are merged one rank at a time
straight into tensors of the artifact's dtype (zero_merge.consolidated_state_dict), and verification and
the HF export reuse those very tensors. See bench/artifact_memory.py for the measured peaks.

DeepSpeed's checkpoint files need pickle: consolidate only checkpoints you trust. `reward.pt` itself
holds only tensors, strings and numbers (see format.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from rm_trainer import disk
from rm_trainer.artifact import lora
from rm_trainer.artifact.checkpoint_files import LATEST, META_FILE, TOKENIZER_DIR, CheckpointRecord, verify_manifest
from rm_trainer.artifact.format import (
    FORMAT,
    attributes_of,
    check_state_dict,
    fp32_compute,
    model_from_state,
    shipped_tokenizer,
    tokenizer_tensors,
)
from rm_trainer.artifact.zero_merge import consolidated_state_dict
from rm_trainer.errors import CheckpointError, UserError
from rm_trainer.model.lora import settings
from rm_trainer.model.reward import DTYPES, TIE_PREFIX


def resolve_tag(checkpoint_dir: str | Path, tag: str | None) -> str:
    ckpt = Path(checkpoint_dir)
    if not ckpt.is_dir():
        raise CheckpointError(f"{ckpt}: no such checkpoint folder (expected OUT/checkpoints of a run)")
    if tag is None:
        latest = ckpt / LATEST
        if not latest.is_file():
            raise CheckpointError(f"{ckpt}: no 'latest' file; pass --tag (one of: "
                                  f"{', '.join(sorted(p.name for p in ckpt.iterdir() if p.is_dir())) or 'none'})")
        tag = latest.read_text().strip()
    if not (ckpt / tag).is_dir():
        raise CheckpointError(f"{ckpt}: no checkpoint folder {tag!r}")
    return tag


def consolidate(checkpoint_dir: str | Path, out_path: str | Path, tag: str | None = None, verify: bool = True,
                hf_out: str | Path | None = None, hf_shard_size: str = "5GB",
                lora_out: str | Path | None = None) -> dict[str, Any]:
    """Merge a ZeRO-2/3 checkpoint into one `reward.pt`, verify it, and optionally export the HF folder.
    A LoRA run's adapters are merged into the base weights (lora.merge_lora); lora_out also writes them
    unmerged, with the head, as a peft adapter folder.

    Verification builds the model around the merged tensors and re-scores the probe batch that the live
    engine scored when the checkpoint was saved. A mismatch (lost head, empty shard, wrong layout)
    raises instead of shipping a silently broken reward model.
    """
    ckpt = Path(checkpoint_dir)
    tag = resolve_tag(ckpt, tag)
    if not (ckpt / tag / META_FILE).is_file():
        raise CheckpointError(f"{ckpt / tag}: no {META_FILE}; was this checkpoint written by rm_trainer?")
    verify_manifest(ckpt / tag)  # refuses a checkpoint with a missing, truncated or damaged file
    meta = CheckpointRecord.read(ckpt / tag / META_FILE)
    # Cast to the training dtype while merging: equal to the live engine's weights (its half-precision
    # weights are casts of the fp32 masters).
    state = consolidated_state_dict(str(ckpt), tag, DTYPES[meta.dtype])
    report: dict[str, Any] = {}
    ties = tie_model(state)  # --tie_loss davidson: its nu is recorded, not shipped as a weight
    if ties:
        report["tie_nu"] = ties["nu"]
    lora_cfg = settings(meta.run_config.get("model", {}))
    if lora_cfg is not None:  # checkpoints hold what trains; the frozen base weights come from --model
        report["base_weights_read"] = lora.fill_base_weights(state, meta.backbone_config,
                                                             meta.run_config["model"]["path"], DTYPES[meta.dtype])
        if lora_out is not None:
            report["lora_adapter"] = str(lora.export_adapter(
                state, lora_cfg, meta.backbone_config, meta.run_config["model"]["path"],
                shipped_tokenizer(tokenizer_tensors(ckpt / tag / TOKENIZER_DIR))[0], meta.pad_token_id, lora_out,
                attributes_of(meta.run_config)))
        report["lora_layers_merged"] = lora.merge_lora(state, lora_cfg, meta.backbone_config)
    elif lora_out is not None:
        raise UserError(f"{ckpt / tag}: not a LoRA run (model.lora_r is 0); there is no adapter to export")
    check_state_dict(state, meta.backbone_config, f"{ckpt / tag}", attributes_of(meta.run_config))
    artifact = artifact_dict(meta, state, ckpt / tag / TOKENIZER_DIR) | ({"tie_model": ties} if ties else {})
    out_path = Path(out_path)
    size = sum(v.numel() * v.element_size() for v in state.values())
    # never leave a half-written reward.pt behind, on a full disk either
    disk.write_atomically("writing", out_path, lambda tmp: torch.save(artifact, tmp), size)
    report |= {"path": str(out_path), "tag": tag, "tensors": len(state),
               "params": sum(v.numel() for v in state.values())}
    if verify:
        report.update(verify_loaded(artifact, str(out_path)))
    if hf_out is not None:
        from rm_trainer.artifact.hf_export import export_artifact

        report["hf"] = str(export_artifact(artifact, hf_out, hf_shard_size))
    return report


def artifact_dict(meta: CheckpointRecord, state: dict[str, torch.Tensor], tokenizer_dir: Path) -> dict[str, Any]:
    """reward.pt's contents (format.py) from a checkpoint's record and its merged weights."""
    return {
        "format": FORMAT,
        "state_dict": state,
        "backbone_config": json.dumps(meta.backbone_config),
        "tokenizer_files": tokenizer_tensors(tokenizer_dir),
        "pad_token_id": meta.pad_token_id,
        "eos_token_id": meta.eos_token_id,
        "max_len": meta.max_len,
        "dtype": meta.dtype,
        "step": meta.step,
        "run_config": json.dumps(meta.run_config),
        "probe": {k: torch.tensor(v) for k, v in meta.probe.items()},
        "reward_stats": meta.reward_stats or {},
    } | ({"attributes": attributes_of(meta.run_config)} if attributes_of(meta.run_config) else {})


def tie_model(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """In place: takes the Davidson tie parameter (model.DavidsonTie) out of a training state dict; returns
    {"loss": "davidson", "nu": ...}, or {} for a run without it. P(tie | r_1, r_2) = nu / (e^{d/2} + e^{-d/2}
    + nu) with d = r_1 - r_2, for whoever wants the model's tie probability; a reward needs no nu."""
    theta = [state.pop(k) for k in [k for k in state if k.startswith(TIE_PREFIX)]]
    return {"loss": "davidson", "nu": float(torch.exp(theta[0].float()).item())} if theta else {}


def probe_tolerance(dtype: str) -> float:
    # fp32: the same arithmetic on the same weights; half precision: CPU fp32 re-scoring vs the live
    # engine's half-precision kernels differs by rounding, so only gross errors should trip it.
    return 1e-4 if dtype == "fp32" else 5e-2


def verify_loaded(art: dict, where: str) -> dict[str, float]:
    """Re-score the probe batch with the artifact's own tensors (computed in fp32) and compare with the
    rewards the live engine gave when the checkpoint was written."""
    model = model_from_state(json.loads(art["backbone_config"]), art["state_dict"], DTYPES[art["dtype"]],
                             art.get("attributes"))
    probe = art["probe"]
    with torch.no_grad(), fp32_compute(model):
        got = model(probe["input_ids"], probe["seq_lengths"])
    want = probe["rewards"].float()
    err = float((got - want).abs().max())
    scale = float(want.abs().max().clamp(min=1.0))
    tol = probe_tolerance(art["dtype"]) * scale
    if not err <= tol:
        raise CheckpointError(f"{where}: consolidated weights score the probe batch differently from the live "
                              f"engine (max |diff| {err:.3g} > {tol:.3g}); the checkpoint is inconsistent")
    return {"probe_max_abs_diff": err, "probe_tolerance": tol}
