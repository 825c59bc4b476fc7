"""Loading a trained reward model: from `reward.pt` alone, or from a run's `hf/` folder (the same
weights, tokenizer and max_len: the same rewards, bit for bit). This is what a PPO stage calls."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from rm_trainer.artifact.format import model_from_state, read_artifact, shipped_tokenizer
from rm_trainer.data.read import read_text
from rm_trainer.data.scoring_tokenizer import scoring_tokenizer
from rm_trainer.errors import UserError
from rm_trainer.model.backbone import build_backbone
from rm_trainer.model.reward import DTYPES, RewardModel


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
    model = model_from_state(json.loads(art["backbone_config"]), art["state_dict"], dtype, art.get("attributes"))
    model.tokenizer = shipped_tokenizer(art["tokenizer_files"])[0]  # tokenizer(text) gives training's ids
    model.max_len = int(art["max_len"])
    model.pad_token_id = int(art["pad_token_id"])
    model.tie_model = art.get("tie_model")  # --tie_loss davidson: {"loss", "nu"} (rm-eval's P(tie)); else None
    stats = art.get("reward_stats") or {}
    if normalize:
        if model.attributes:
            raise UserError(f"{path}: an attribute head (--objective regression) keeps its attributes' own scale; "
                            "it has no held-out reward statistics to normalise by")
        if "mean" not in stats:
            raise UserError(f"{path}: has no held-out reward statistics (trained without a test set)")
        model.set_normalization(stats["mean"], stats["std"])
    return model.to(device).eval()


def _load_hf_folder(path: Path, device, dtype: torch.dtype | None, normalize: bool) -> RewardModel:
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(path)
    if getattr(config, "rm_max_len", None) is None:
        raise UserError(f"{path}: not an rm_trainer hf/ export (its config.json has no rm_max_len, so the "
                        "training max_len is unknown); use the run's reward.pt")
    backbone, head = build_backbone(str(path), dtype or config.dtype)
    names = getattr(config, "rm_attributes", None)  # an attribute head: its K outputs and their combination
    model = RewardModel(backbone, head=head, attributes=names)
    if names:
        model.combination = torch.tensor(config.rm_reward_weights, dtype=torch.float32)
    model.tokenizer = AutoTokenizer.from_pretrained(path)
    scoring_tokenizer(model.tokenizer)  # exported that way already; a folder written before is made so too
    model.max_len, model.pad_token_id = int(config.rm_max_len), int(config.pad_token_id)
    if normalize:
        if names:
            raise UserError(f"{path}: an attribute head keeps its attributes' own scale; it has no held-out "
                            "reward statistics to normalise by")
        model.set_normalization(config.reward_mean, config.reward_std)
    return model.to(device).eval()


@dataclass
class ModelOptions:
    """How rm-score, rm-serve and rm-eval load the model: reward.pt or hf/, the device (default: this
    rank's GPU if there is one, else cpu), held-out normalisation, and a chat template file that replaces
    the one saved with the model."""

    model: str
    device: str | None = None
    normalize: bool = False
    chat_template: str | None = None

    def load(self) -> RewardModel:
        device = self.device or (f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu")
        model = load_reward_model(self.model, device=device, normalize=self.normalize)
        if self.chat_template:
            model.tokenizer.chat_template = read_text(self.chat_template, "--chat_template")
        return model
