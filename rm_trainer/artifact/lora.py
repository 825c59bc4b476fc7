"""LoRA at consolidation: merge the adapters into the base weights, or export them as a peft folder.

The merged state of a LoRA run holds the frozen base weights (`X.base_layer.weight`), the adapters
(`X.lora_A.default.weight`, `X.lora_B.default.weight`) and the head. `merge_lora` folds every adapter into
its base weight, W + (alpha / r) B A, computed in fp32 and rounded once, so `reward.pt` and the HF export
are plain full models: no `lora_` keys, head (K, H). `export_adapter` writes the unmerged adapters + head
as a standard peft folder instead. Neither needs anything but torch (and peft for the adapter folder).
(model/lora.py puts the adapters on for training.)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from rm_trainer.errors import ConfigError
from rm_trainer.model.attributes import combination
from rm_trainer.model.backbone import backbone_from_config_dict
from rm_trainer.model.lora import ADAPTER, BASE, LORA_A, LORA_B, linear_names
from rm_trainer.model.reward import RewardModel


def merge_lora(state: dict[str, torch.Tensor], lora: dict, backbone_config: dict) -> int:
    """In place: every adapted layer's `X.base_layer.weight` + `X.lora_{A,B}` -> `X.weight` = W + s B A with
    s = alpha / r, computed in fp32 and cast back to W's dtype (bias moved likewise). GPT-2's Conv1D stores
    W transposed (in, out); which layers are Conv1D comes from the architecture built on the meta device,
    not from the shapes (square layers would be ambiguous). Returns how many layers were merged."""
    from transformers.pytorch_utils import Conv1D

    with torch.device("meta"):
        plain = RewardModel(backbone_from_config_dict(backbone_config, torch.float32))
    scale = lora["alpha"] / lora["r"]
    merged = 0
    for key in [k for k in state if k.endswith(LORA_A)]:
        layer = key.removesuffix(LORA_A)
        a, b = state.pop(key), state.pop(layer + LORA_B)
        w = state.pop(layer + BASE + ".weight")
        delta = (b.float() @ a.float()) * scale
        if isinstance(plain.get_submodule(layer), Conv1D):
            delta = delta.T
        state[layer + ".weight"] = (w.float() + delta).to(w.dtype)
        if layer + BASE + ".bias" in state:
            state[layer + ".bias"] = state.pop(layer + BASE + ".bias")
        merged += 1
    leftover = sorted(k for k in state if ".lora_" in k or BASE + "." in k)
    if leftover:
        raise RuntimeError(f"LoRA merge left adapter keys behind: {leftover[:5]}")
    return merged


def fill_base_weights(state: dict[str, torch.Tensor], backbone_config: dict, base_path: str,
                      dtype: torch.dtype) -> int:
    """In place: the frozen base weights a LoRA checkpoint leaves out (DeepSpeed's
    exclude_frozen_parameters), read tensor by tensor from the safetensors of `base_path` (the run's
    --model, which the resume keys fingerprint) under the names training gives them: `backbone.` + the
    backbone's own name, with `.base_layer` for the adapted layers. Returns how many were filled."""
    from safetensors import safe_open

    with torch.device("meta"):
        backbone = backbone_from_config_dict(backbone_config, torch.float32)
    prefix = backbone.base_model_prefix + "."
    adapted = {k.removesuffix(LORA_A) for k in state if k.endswith(LORA_A)}
    wanted = {}  # backbone name in the files -> name in the state
    for name in backbone.state_dict():
        layer, _, leaf = f"backbone.{name}".rpartition(".")
        key = f"{layer}{BASE}.{leaf}" if layer in adapted else f"{layer}.{leaf}"
        if key not in state:
            wanted[name] = key
    folder = Path(base_path)
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else \
        ["model.safetensors"]
    filled = 0
    for fname in files:
        if not (folder / fname).is_file():
            raise ConfigError([f"{folder}: no {fname}: the frozen base weights of this LoRA checkpoint are read "
                               "from the run's --model, saved as safetensors"])
        with safe_open(str(folder / fname), framework="pt") as f:
            for k in f.keys():
                name = k.removeprefix(prefix) if k.removeprefix(prefix) in wanted else k
                if name in wanted:
                    state[wanted.pop(name)] = f.get_tensor(k).to(dtype)
                    filled += 1
    if wanted:
        raise ConfigError([f"{folder}: the LoRA checkpoint's frozen weights {sorted(wanted.values())[:5]} are not "
                           "in the base model's files; consolidate with the --model the run trained on"])
    return filled


def export_adapter(state: dict[str, torch.Tensor], lora: dict, backbone_config: dict, base_path: str,
                   tokenizer, pad_token_id: int | None, out_dir: str | Path, attributes: dict | None = None) -> Path:
    """The unmerged adapters + the score head as a standard peft folder (adapter_config.json with
    task_type SEQ_CLS and modules_to_save=[score], adapter_model.safetensors):

        base = AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=1)
        rm = PeftModel.from_pretrained(base, out_dir)

    gives the rewards of reward.pt. An attribute head (attributes: format.attributes_of) has K outputs: load
    the base with num_labels=K, and rm_attributes.json names them and holds the reward's coefficients. Built
    with peft itself around a model on the meta device, so only the adapter tensors are ever materialised."""
    from accelerate import init_empty_weights
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.for_model(**backbone_config)
    config.num_labels = len(attributes["names"]) if attributes else 1
    config.pad_token_id = pad_token_id
    dtype = state["score.weight"].dtype
    with init_empty_weights(include_buffers=False):
        hf = AutoModelForSequenceClassification.from_config(config, dtype=dtype)
    targets = lora["target"] or linear_names(getattr(hf, hf.base_model_prefix))
    pcfg = LoraConfig(task_type="SEQ_CLS", r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                      target_modules=list(targets), bias="none")  # SEQ_CLS: peft adds `score` to modules_to_save
    model = get_peft_model(hf, pcfg, adapter_name=ADAPTER)
    prefix = f"base_model.model.{hf.base_model_prefix}."
    adapter = {prefix + k.removeprefix("backbone."): v for k, v in state.items() if ".lora_" in k}
    adapter[f"base_model.model.score.modules_to_save.{ADAPTER}.weight"] = state["score.weight"]
    missing = sorted(set(adapter) - {n for n, _ in model.named_parameters()})
    if missing:
        raise RuntimeError(f"LoRA adapter export: the peft model has no parameters {missing[:5]}")
    model.load_state_dict(adapter, strict=False, assign=True)
    model.peft_config[ADAPTER].base_model_name_or_path = str(base_path)
    out = Path(out_dir)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    if attributes:
        write_attributes(out, attributes)
    return out


def write_attributes(out: Path, attributes: dict) -> None:
    """rm_attributes.json: an attribute head's output names (logits[:, k]) and the reward's coefficients."""
    names = list(attributes["names"])
    weights = combination(names, attributes["reward_weights"]).tolist()
    doc = {"names": names, "reward_weights": weights,
           "load": f"AutoModelForSequenceClassification.from_pretrained(base, num_labels={len(names)}), then "
                   "PeftModel.from_pretrained(base, this folder); reward = logits @ reward_weights"}
    (out / "rm_attributes.json").write_text(json.dumps(doc, indent=1) + "\n")
