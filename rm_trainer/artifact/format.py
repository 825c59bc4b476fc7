"""The `reward.pt` format: what it holds, and building a model around its tensors.

    format            "rm_trainer.reward.v1"
    state_dict        every parameter (LoRA merged), in the training dtype
    backbone_config   the backbone's HF config (JSON text)
    tokenizer_files   the tokenizer's files as uint8 tensors (a chat template included)
    pad_token_id, eos_token_id, max_len, dtype, step
    run_config        the resolved run config (JSON text)
    probe             input_ids, seq_lengths and the live engine's rewards (verification)
    reward_stats      held-out reward mean/std/pairs/step ({} without a test set)
    tie_model         only with --tie_loss davidson: {"loss": "davidson", "nu": the learned tie parameter}
    attributes        only with --objective regression: {"names": [K attribute names, the head's outputs in
                      order], "reward_weights": {name: weight} (model.reward_weights, {} = the first)}

Only tensors, strings and numbers: it loads with `torch.load(weights_only=True)`, so it is safe to load
from anywhere. Loading memory-maps the file into a model built on the meta device (no random init of
billions of parameters).
"""

from __future__ import annotations

import pickle
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from rm_trainer.data.scoring_tokenizer import scoring_tokenizer
from rm_trainer.errors import CheckpointError, UserError
from rm_trainer.model.backbone import backbone_from_config_dict
from rm_trainer.model.reward import RewardModel

FORMAT = "rm_trainer.reward.v1"


def tokenizer_tensors(folder: Path) -> dict[str, torch.Tensor]:
    # Raw bytes as uint8 tensors: works for tokenizer.json and sentencepiece .model files alike,
    # and keeps reward.pt loadable with weights_only=True.
    return {p.name: torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8)
            for p in sorted(folder.iterdir()) if p.is_file()}


def tokenizer_from_files(files: dict[str, torch.Tensor]):
    """The training tokenizer, as it was saved into the checkpoint."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        for name, data in files.items():
            (Path(tmp) / name).write_bytes(data.numpy().tobytes())
        return AutoTokenizer.from_pretrained(tmp)


def shipped_tokenizer(files: dict[str, torch.Tensor]):
    """(the tokenizer a trained model ships with: training's, changed by data.scoring_tokenizer so that its
    usual call gives training's scoring sequence, what could not be arranged)."""
    tok = tokenizer_from_files(files)
    return tok, scoring_tokenizer(tok)


def attributes_of(run_config: dict) -> dict | None:
    """reward.pt's `attributes` entry of a run (its resolved config), or None for a scalar reward."""
    if run_config.get("train", {}).get("objective") not in ("regression", "bt+regression"):
        return None
    return {"names": list(run_config["data"]["attributes"]),
            "reward_weights": dict(run_config["model"].get("reward_weights") or {})}


def check_state_dict(state: dict[str, torch.Tensor], backbone_config: dict, where: str,
                     attributes: dict | None = None) -> None:
    """Every expected tensor present, none empty (a ZeRO-3 save can produce empty ones), shapes as the
    model config says. The expected shapes come from the model built on the meta device (no memory)."""
    with torch.device("meta"):
        expected = RewardModel(backbone_from_config_dict(backbone_config, torch.float32),
                               attributes=(attributes or {}).get("names")).state_dict()
    problems = [f"missing {k}" for k in expected if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in expected]
    for k, v in state.items():
        if v.numel() == 0:
            problems.append(f"{k} is empty")
        elif k in expected and tuple(v.shape) != tuple(expected[k].shape):
            problems.append(f"{k} has shape {tuple(v.shape)}, the model config says {tuple(expected[k].shape)}")
    if problems:
        raise CheckpointError(f"{where}: consolidated weights do not match the model: {'; '.join(problems[:10])}")


def model_from_state(backbone_config: dict, state: dict[str, torch.Tensor], dtype: torch.dtype,
                     attributes: dict | None = None) -> RewardModel:
    """A RewardModel whose parameters ARE the given tensors (cast only where `dtype` differs): built on
    the meta device (buffers such as rotary frequencies are computed for real), then assigned.
    `attributes` (reward.pt's entry): an attribute head, with its reward weights."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = RewardModel(backbone_from_config_dict(backbone_config, dtype),
                            attributes=(attributes or {}).get("names"))
    if attributes:
        model.set_reward_weights(attributes["reward_weights"])
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


def read_artifact(path: str | Path) -> dict:
    """reward.pt, memory-mapped (tensors are read from the page cache as they are used)."""
    if not Path(path).is_file():
        raise UserError(f"{path}: file not found (expected a reward.pt, or a run's hf/ folder)")
    try:
        art = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError) as e:  # torch's errors for a file it cannot read
        raise UserError(f"{path}: not a readable reward.pt ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(art, dict) or art.get("format") != FORMAT:
        got = art.get("format") if isinstance(art, dict) else type(art).__name__
        raise UserError(f"{path}: not an rm_trainer reward.pt (format {got!r})")
    return art
