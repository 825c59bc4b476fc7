"""The `reward.pt` artifact: streaming consolidation from a committed checkpoint, verification, loading.

A committed checkpoint carries `rm_trainer_meta.json` (resolved config, backbone config, token ids,
held-out reward statistics and a probe batch scored by the live engine) and the tokenizer files, so
`consolidate()` is self-sufficient: checkpoint folder in, verified `reward.pt` (and optionally the HF
folder) out.

Host memory stays near the size of the weights once: the ZeRO shards are merged one rank at a time
straight into tensors of the artifact's dtype (engine.consolidated_state_dict), verification and the HF
export reuse those very tensors, and loading memory-maps `reward.pt` into a model built on the meta
device (no random init of billions of parameters). See bench/artifact_memory.py for the measured peaks.

`reward.pt` holds only tensors, strings and numbers, so it loads with `torch.load(weights_only=True)`:
safe to load from anywhere. DeepSpeed's checkpoint files need pickle: load those only from
directories you trust.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from rm_trainer import lora
from rm_trainer.checkpoint import LATEST, META_FILE, TOKENIZER_DIR, CheckpointRecord, verify_manifest
from rm_trainer.errors import CheckpointError, UserError
from rm_trainer.model import DTYPES, RewardModel, backbone_from_config_dict

FORMAT = "rm_trainer.reward.v1"


def resolve_tag(checkpoint_dir: str | Path, tag: str | None) -> str:
    ckpt = Path(checkpoint_dir)
    if tag is None:
        latest = ckpt / LATEST
        if not latest.is_file():
            raise CheckpointError(f"{ckpt}: no 'latest' file; pass --tag (one of: "
                                  f"{', '.join(sorted(p.name for p in ckpt.iterdir() if p.is_dir())) or 'none'})")
        tag = latest.read_text().strip()
    if not (ckpt / tag).is_dir():
        raise CheckpointError(f"{ckpt}: no checkpoint folder {tag!r}")
    return tag


def _tokenizer_tensors(folder: Path) -> dict[str, torch.Tensor]:
    # Raw bytes as uint8 tensors: works for tokenizer.json and sentencepiece .model files alike,
    # and keeps reward.pt loadable with weights_only=True.
    return {p.name: torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8)
            for p in sorted(folder.iterdir()) if p.is_file()}


def tokenizer_from_files(files: dict[str, torch.Tensor]):
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        for name, data in files.items():
            (Path(tmp) / name).write_bytes(data.numpy().tobytes())
        return AutoTokenizer.from_pretrained(tmp)


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
    from rm_trainer import engine  # deepspeed is only needed here, not to *load* reward.pt

    ckpt = Path(checkpoint_dir)
    tag = resolve_tag(ckpt, tag)
    if not (ckpt / tag / META_FILE).is_file():
        raise CheckpointError(f"{ckpt / tag}: no {META_FILE}; was this checkpoint written by rm_trainer?")
    verify_manifest(ckpt / tag)  # refuses a checkpoint with a missing, truncated or damaged file
    meta = CheckpointRecord.read(ckpt / tag / META_FILE)
    # Cast to the training dtype while merging: equal to the live engine's weights (its half-precision
    # weights are casts of the fp32 masters).
    state = engine.consolidated_state_dict(str(ckpt), tag, DTYPES[meta.dtype])
    report: dict[str, Any] = {}
    lora_cfg = lora.settings(meta.run_config.get("model", {}))
    if lora_cfg is not None:
        if lora_out is not None:
            report["lora_adapter"] = str(lora.export_adapter(
                state, lora_cfg, meta.backbone_config, meta.run_config["model"]["path"],
                tokenizer_from_files(_tokenizer_tensors(ckpt / tag / TOKENIZER_DIR)), meta.pad_token_id, lora_out))
        report["lora_layers_merged"] = lora.merge_lora(state, lora_cfg, meta.backbone_config)
    elif lora_out is not None:
        raise UserError(f"{ckpt / tag}: not a LoRA run (model.lora_r is 0); there is no adapter to export")
    check_state_dict(state, meta.backbone_config, f"{ckpt / tag}")
    artifact = {
        "format": FORMAT,
        "state_dict": state,
        "backbone_config": json.dumps(meta.backbone_config),
        "tokenizer_files": _tokenizer_tensors(ckpt / tag / TOKENIZER_DIR),
        "pad_token_id": meta.pad_token_id,
        "eos_token_id": meta.eos_token_id,
        "max_len": meta.max_len,
        "dtype": meta.dtype,
        "step": meta.step,
        "run_config": json.dumps(meta.run_config),
        "probe": {k: torch.tensor(v) for k, v in meta.probe.items()},
        "reward_stats": meta.reward_stats or {},
    }
    out_path = Path(out_path)
    tmp = out_path.with_name(out_path.name + ".tmp")
    torch.save(artifact, tmp)
    tmp.replace(out_path)  # never leave a half-written reward.pt behind
    report |= {"path": str(out_path), "tag": tag, "tensors": len(state),
               "params": sum(v.numel() for v in state.values())}
    if verify:
        report.update(verify_loaded(artifact, str(out_path)))
    if hf_out is not None:
        from rm_trainer.hf_export import export_artifact

        report["hf"] = str(export_artifact(artifact, hf_out, hf_shard_size))
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
        raise CheckpointError(f"{where}: consolidated weights do not match the model: {'; '.join(problems[:10])}")


def probe_tolerance(dtype: str) -> float:
    # fp32: the same arithmetic on the same weights; half precision: CPU fp32 re-scoring vs the live
    # engine's half-precision kernels differs by rounding, so only gross errors should trip it.
    return 1e-4 if dtype == "fp32" else 5e-2


def model_from_state(backbone_config: dict, state: dict[str, torch.Tensor], dtype: torch.dtype) -> RewardModel:
    """A RewardModel whose parameters ARE the given tensors (cast only where `dtype` differs): built on
    the meta device (buffers such as rotary frequencies are computed for real), then assigned."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = RewardModel(backbone_from_config_dict(backbone_config, dtype))
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    return model.eval()


@contextmanager
def fp32_compute(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Run a half-precision model in fp32 without an fp32 copy of it: each module's own parameters are
    upcast just before its forward and restored just after, so at most one module is ever upcast."""
    hooks = []
    for m in model.modules():
        own = [p for p in m.parameters(recurse=False) if p.dtype != torch.float32]
        if not own:
            continue

        def up(_m, _args, own=own):
            for p in own:
                p.__dict__["_rm_half"], p.data = p.data, p.data.float()

        def down(_m, _args, _out, own=own):
            for p in own:
                p.data = p.__dict__.pop("_rm_half")

        hooks += [m.register_forward_pre_hook(up), m.register_forward_hook(down)]
    try:
        yield model
    finally:
        for h in hooks:
            h.remove()


def verify_loaded(art: dict, where: str) -> dict[str, float]:
    """Re-score the probe batch with the artifact's own tensors (computed in fp32) and compare with the
    rewards the live engine gave when the checkpoint was written."""
    model = model_from_state(json.loads(art["backbone_config"]), art["state_dict"], DTYPES[art["dtype"]])
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


def read_artifact(path: str | Path) -> dict:
    """reward.pt, memory-mapped (tensors are read from the page cache as they are used)."""
    art = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if art.get("format") != FORMAT:
        raise UserError(f"{path}: not an rm_trainer reward.pt (format {art.get('format')!r})")
    return art


def load_reward_model(path: str | Path, device: str | torch.device = "cpu",
                      dtype: torch.dtype | None = None, normalize: bool = False) -> RewardModel:
    """Rebuild the reward model from `reward.pt` alone (no network, no original folders), or from a run's
    `hf/` folder (the same weights, tokenizer and max_len: the same rewards, bit for bit).

    Returns it in eval mode with `.tokenizer` and `.max_len` attached; call `model(ids, lengths)` or
    `model.score_texts([...])`. This is what a PPO stage calls. normalize=True returns
    (r - mean) / std with the held-out statistics computed at the end of training. The file is
    memory-mapped and the model built on the meta device, so host memory stays near the weights' size.
    On CPU the weights stay backed by the file: do not overwrite reward.pt in place while it is loaded
    (rm_trainer itself always writes a new file and renames it).
    """
    if Path(path).is_dir():
        return _load_hf_folder(Path(path), device, dtype, normalize)
    art = read_artifact(path)
    dtype = dtype or DTYPES[art["dtype"]]
    model = model_from_state(json.loads(art["backbone_config"]), art["state_dict"], dtype)
    model.tokenizer = tokenizer_from_files(art["tokenizer_files"])
    model.max_len = int(art["max_len"])
    model.pad_token_id = int(art["pad_token_id"])
    stats = art.get("reward_stats") or {}
    if normalize:
        if "mean" not in stats:
            raise UserError(f"{path}: has no held-out reward statistics (trained without a test set)")
        model.set_normalization(stats["mean"], stats["std"])
    return model.to(device).eval()


def _load_hf_folder(path: Path, device, dtype: torch.dtype | None, normalize: bool) -> RewardModel:
    from transformers import AutoConfig, AutoTokenizer

    from rm_trainer.model import build_backbone

    config = AutoConfig.from_pretrained(path)
    if getattr(config, "rm_max_len", None) is None:
        raise UserError(f"{path}: not an rm_trainer hf/ export (its config.json has no rm_max_len, so the "
                        "training max_len is unknown); use the run's reward.pt")
    backbone, head = build_backbone(str(path), dtype or config.dtype)
    model = RewardModel(backbone, head=head)
    model.tokenizer = AutoTokenizer.from_pretrained(path)
    model.max_len, model.pad_token_id = int(config.rm_max_len), int(config.pad_token_id)
    if normalize:
        model.set_normalization(config.reward_mean, config.reward_std)
    return model.to(device).eval()
