"""The `reward.pt` artifact: consolidation from a committed checkpoint, verification, loading.

A committed checkpoint carries `rm_trainer_meta.json` (resolved config, backbone config, token ids,
held-out reward statistics and a probe batch scored by the live engine) and the tokenizer files, so
`consolidate()` is self-sufficient: checkpoint folder in, verified `reward.pt` out.

`reward.pt` holds only tensors, strings and numbers, so it loads with `torch.load(weights_only=True)`:
safe to load from anywhere. DeepSpeed's checkpoint files need pickle: load those only from
directories you trust.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from rm_trainer.checkpoint import LATEST, META_FILE, TOKENIZER_DIR, verify_manifest
from rm_trainer.model import DTYPES, RewardModel, backbone_from_config_dict

FORMAT = "rm_trainer.reward.v1"


def resolve_tag(checkpoint_dir: str | Path, tag: str | None) -> str:
    ckpt = Path(checkpoint_dir)
    if tag is None:
        latest = ckpt / LATEST
        if not latest.is_file():
            raise ValueError(f"{ckpt}: no 'latest' file; pass --tag (one of: "
                             f"{', '.join(sorted(p.name for p in ckpt.iterdir() if p.is_dir())) or 'none'})")
        tag = latest.read_text().strip()
    if not (ckpt / tag).is_dir():
        raise ValueError(f"{ckpt}: no checkpoint folder {tag!r}")
    return tag


def _tokenizer_tensors(folder: Path) -> dict[str, torch.Tensor]:
    # Raw bytes as uint8 tensors: works for tokenizer.json and sentencepiece .model files alike,
    # and keeps reward.pt loadable with weights_only=True.
    return {p.name: torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8)
            for p in sorted(folder.iterdir()) if p.is_file()}


def consolidate(checkpoint_dir: str | Path, out_path: str | Path, tag: str | None = None,
                verify: bool = True) -> dict[str, Any]:
    """Merge a ZeRO-2/3 checkpoint into one `reward.pt` and (optionally) verify it.

    Verification rebuilds the model from the artifact alone and re-scores the probe batch that the live
    engine scored when the checkpoint was saved. A mismatch (lost head, empty shard, wrong layout)
    raises instead of shipping a silently broken reward model.
    """
    from rm_trainer import engine  # deepspeed is only needed here, not to *load* reward.pt

    ckpt = Path(checkpoint_dir)
    tag = resolve_tag(ckpt, tag)
    meta_path = ckpt / tag / META_FILE
    if not meta_path.is_file():
        raise ValueError(f"{ckpt / tag}: no {META_FILE}; was this checkpoint written by rm_trainer?")
    verify_manifest(ckpt / tag)  # refuses a checkpoint with a missing or truncated rank file
    meta = json.loads(meta_path.read_text())
    dtype = DTYPES[meta["dtype"]]
    fp32 = engine.consolidated_state_dict(str(ckpt), tag=tag)
    check_state_dict(fp32, meta["backbone_config"], f"{ckpt / tag}")
    # Training dtype: equal to the live engine's weights (its half weights are casts of these masters).
    state = {k: v.to(dtype).contiguous() for k, v in fp32.items()}
    artifact = {
        "format": FORMAT,
        "state_dict": state,
        "backbone_config": json.dumps(meta["backbone_config"]),
        "tokenizer_files": _tokenizer_tensors(ckpt / tag / TOKENIZER_DIR),
        "pad_token_id": meta["pad_token_id"],
        "eos_token_id": meta["eos_token_id"],
        "max_len": meta["max_len"],
        "dtype": meta["dtype"],
        "step": meta["step"],
        "run_config": json.dumps(meta["run_config"]),
        "probe": {k: torch.tensor(v) for k, v in meta["probe"].items()},
        "reward_stats": meta.get("reward_stats") or {},
    }
    out_path = Path(out_path)
    tmp = out_path.with_name(out_path.name + ".tmp")
    torch.save(artifact, tmp)
    tmp.replace(out_path)  # never leave a half-written reward.pt behind
    report = {"path": str(out_path), "tag": tag, "tensors": len(state),
              "params": sum(v.numel() for v in state.values())}
    if verify:
        report.update(verify_artifact(out_path))
    return report


def check_state_dict(state: dict[str, torch.Tensor], backbone_config: dict, where: str) -> None:
    """Every expected tensor present, none empty (a ZeRO-3 save can produce empty ones), shapes as the
    model config says. The expected shapes come from the model built on the meta device (no memory)."""
    with torch.device("meta"):
        expected = RewardModel(backbone_from_config_dict(backbone_config, torch.float32)).state_dict()
    problems = [f"missing {k}" for k in expected if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in expected]
    for k, v in state.items():
        if v.numel() == 0:
            problems.append(f"{k} is empty")
        elif k in expected and tuple(v.shape) != tuple(expected[k].shape):
            problems.append(f"{k} has shape {tuple(v.shape)}, the model config says {tuple(expected[k].shape)}")
    if problems:
        raise ValueError(f"{where}: consolidated weights do not match the model: {'; '.join(problems[:10])}")


def probe_tolerance(dtype: str) -> float:
    # fp32: the same arithmetic on the same weights; half precision: CPU fp32 re-scoring vs the live
    # engine's half-precision kernels differs by rounding, so only gross errors should trip it.
    return 1e-4 if dtype == "fp32" else 5e-2


def verify_artifact(path: str | Path) -> dict[str, float]:
    art = torch.load(path, map_location="cpu", weights_only=True)
    model = load_reward_model(path, dtype=torch.float32)
    probe = art["probe"]
    with torch.no_grad():
        got = model(probe["input_ids"], probe["seq_lengths"])
    want = probe["rewards"].float()
    err = float((got - want).abs().max())
    scale = float(want.abs().max().clamp(min=1.0))
    tol = probe_tolerance(art["dtype"]) * scale
    if not err <= tol:
        raise RuntimeError(f"{path}: consolidated weights score the probe batch differently from the live "
                           f"engine (max |diff| {err:.3g} > {tol:.3g}); the checkpoint is inconsistent")
    return {"probe_max_abs_diff": err, "probe_tolerance": tol}


def load_reward_model(path: str | Path, device: str | torch.device = "cpu",
                      dtype: torch.dtype | None = None, normalize: bool = False) -> RewardModel:
    """Rebuild the reward model from `reward.pt` alone (no network, no original folders).

    Returns it in eval mode with `.tokenizer` and `.max_len` attached; call `model(ids, lengths)` or
    `model.score_texts([...])`. This is what a PPO stage calls. normalize=True returns
    (r - mean) / std with the held-out statistics computed at the end of training.
    """
    from transformers import AutoTokenizer

    art = torch.load(path, map_location="cpu", weights_only=True)
    if art.get("format") != FORMAT:
        raise ValueError(f"{path}: not an rm_trainer reward.pt (format {art.get('format')!r})")
    dtype = dtype or DTYPES[art["dtype"]]
    backbone = backbone_from_config_dict(json.loads(art["backbone_config"]), dtype)
    model = RewardModel(backbone)
    model.load_state_dict({k: v.to(dtype) for k, v in art["state_dict"].items()}, strict=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in art["tokenizer_files"].items():
            (Path(tmp) / name).write_bytes(data.numpy().tobytes())
        model.tokenizer = AutoTokenizer.from_pretrained(tmp)
    model.max_len = int(art["max_len"])
    model.pad_token_id = int(art["pad_token_id"])
    stats = art.get("reward_stats") or {}
    if normalize:
        if "mean" not in stats:
            raise ValueError(f"{path}: has no held-out reward statistics (trained without a test set)")
        model.set_normalization(stats["mean"], stats["std"])
    return model.to(device).eval()
