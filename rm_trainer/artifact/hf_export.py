"""Export `reward.pt` as a folder plain transformers loads with AutoModelForSequenceClassification.

    rm-export-hf --model OUT/reward.pt --output_dir OUT/hf [--hf_shard_size 5GB]

The folder has the *ForSequenceClassification architecture, num_labels=1 (an attribute head: one label per
attribute, id2label their names, rm_attributes and rm_reward_weights in the config), the head named `score`,
pad_token_id set (never EOS), safetensors weights (sharded, with an index, above the shard size), the
tokenizer that gives training's sequence by itself (EOS appended: data/scoring_tokenizer.py), the held-out
reward mean/std in the config, and a model card with the standard ways to call it.
"""

from __future__ import annotations

import json
from pathlib import Path

from rm_trainer import disk
from rm_trainer.artifact.format import read_artifact, shipped_tokenizer
from rm_trainer.data.tokenize import lead_text, special_prefix
from rm_trainer.errors import UserError
from rm_trainer.model.attributes import combination

CARD = """---
library_name: transformers
pipeline_tag: text-classification
tags: [reward-model, rlhf, rm_trainer]
---
# Reward model ({objective}), trained with rm_trainer

A reward head (`score`, Linear(H, {outputs}, bias=False)) on a {base} backbone. The reward of a text is
the raw logit at its final EOS; higher means more preferred. Use the logit itself: a sigmoid of a single
reward is not a probability. `sigmoid(r_a - r_b)` is the modelled probability that a is preferred to b.{attributes}

**Pass raw text.** The tokenizer produces training's sequence by itself: `tok(text)` adds {prefix} and the
final EOS where the reward is read. Do not append EOS yourself. For a conversation, render it with
`tok.apply_chat_template(messages, tokenize=False)` and tokenize that text the same way.{problems}

## transformers pipeline (what RewardBench's scripts do)

```python
from transformers import pipeline

rm = pipeline("text-classification", model="{path}", function_to_apply="none")
rm(["Human: hi Assistant: Hello! How can I help?"], batch_size=8)   # [{{'label': 'LABEL_0', 'score': reward}}]
```

## AutoModelForSequenceClassification, batched

```python
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

tok = AutoTokenizer.from_pretrained("{path}")
rm = AutoModelForSequenceClassification.from_pretrained("{path}").eval()
texts = ["Human: hi Assistant: Hello! How can I help?", "Human: hi Assistant: Go away."]
batch = tok(texts, padding=True, return_tensors="pt")        # right or left padding: the same rewards
with torch.no_grad():
    reward = rm(**batch).logits[:, 0]                         # raw reward, one per text
normalized = (reward - rm.config.reward_mean) / rm.config.reward_std   # held-out statistics
```

## vLLM (OpenAI-style classify request; documented, not run by rm_trainer's tests)

```bash
vllm serve {path} --runner pooling
curl localhost:8000/classify -H 'Content-Type: application/json' \\
  -d '{{"model": "{path}", "input": ["Human: hi Assistant: Hello!"], "use_activation": false}}'
```

vLLM tokenizes `input` with this tokenizer, so the final EOS is added as in training; `use_activation: false`
returns the raw reward instead of its sigmoid (older vLLM versions call it `activation`). For `messages`, also
send `"add_special_tokens": true`.

Held-out reward statistics: mean {mean}, std {std}. Max length in training: {max_len} tokens (longer
texts were truncated from the left of the prompt, keeping the final EOS; truncate the same way, or keep
inputs shorter). Padding token: `{pad}` (id {pad_id}), which differs from EOS so that the pooled position
is the final EOS.
"""


def export_hf(reward_pt: str | Path, out_dir: str | Path, shard_size: str = "5GB") -> Path:
    """reward.pt (memory-mapped) -> HF folder."""
    return export_artifact(read_artifact(reward_pt), out_dir, shard_size)


def export_artifact(art: dict, out_dir: str | Path, shard_size: str = "5GB") -> Path:
    """Write the HF folder from an artifact dict whose tensors are already in memory (or memory-mapped):
    the model is built on the meta device around those tensors, so nothing is copied but one shard at a
    time while the safetensors files are written (`model.safetensors`, or `model-0000k-of-0000n
    .safetensors` + `model.safetensors.index.json` above shard_size). The tokenizer is the one the model
    ships with (artifact.format.shipped_tokenizer): tok(text) gives training's ids."""
    out = Path(out_dir)
    size = sum(v.numel() * v.element_size() for v in art["state_dict"].values())
    disk.write_atomically("writing the HF export", out, lambda tmp: _write_hf(art, tmp, shard_size, out), size)
    return out


def _write_hf(art: dict, out: Path, shard_size: str, final: Path) -> None:
    """The HF folder into `out` (a .tmp beside `final`, where it is renamed to once complete)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForSequenceClassification

    tok, problems = shipped_tokenizer(art["tokenizer_files"])
    prefix_ids = special_prefix(tok)
    config = _hf_config(art, tok)
    out.mkdir(parents=True, exist_ok=True)
    dtype = art["state_dict"]["score.weight"].dtype
    with init_empty_weights(include_buffers=False):
        hf = AutoModelForSequenceClassification.from_config(config, dtype=dtype)
    prefix = hf.base_model_prefix
    state = {}
    for k, v in art["state_dict"].items():
        if k.startswith("backbone."):
            state[f"{prefix}.{k.removeprefix('backbone.')}"] = v
        elif k == "score.weight":
            state["score.weight"] = v
    missing, unexpected = hf.load_state_dict(state, strict=False, assign=True)
    # buffers such as rotary inv_freq are rebuilt from the config; every parameter must be covered
    params = {n for n, p in hf.named_parameters()}
    still_meta = sorted(n for n, p in hf.named_parameters() if p.is_meta)
    if set(missing) & params or unexpected or still_meta:
        raise RuntimeError(f"HF export: missing {sorted(set(missing) & params)}, unexpected {unexpected}, "
                           f"never assigned {still_meta}")
    hf.save_pretrained(out, safe_serialization=True, max_shard_size=shard_size)
    tok.save_pretrained(out)
    if problems:
        print(f"rm_trainer: HF export {final}: " + "; ".join(problems), flush=True)
    names = (art.get("attributes") or {}).get("names") or []
    (out / "README.md").write_text(CARD.format(
        attributes=_attributes_note(art), objective="attribute regression" if names else "Bradley-Terry",
        outputs=len(names) or 1,
        base=type(hf).__name__.removesuffix("ForSequenceClassification"), path=str(final),
        prefix=f"`{lead_text(tok, prefix_ids)}` first" if prefix_ids else "no special token first",
        problems="".join(f"\n\n**Note:** {p}." for p in problems), mean=round(config.reward_mean, 4),
        std=round(config.reward_std, 4), max_len=art["max_len"], pad=tok.pad_token, pad_id=config.pad_token_id))


def _attributes_note(art: dict) -> str:
    """The model card's paragraph on an attribute head (--objective regression); "" for a scalar reward."""
    a = art.get("attributes")
    if not a:
        return ""
    c = combination(a["names"], a["reward_weights"]).tolist()
    terms = " + ".join(f"{w:g} x {n}" for w, n in zip(c, a["names"], strict=True) if w)
    return (f"\n\n**This head rates {len(a['names'])} attributes** (trained by regression on their ratings): "
            f"`logits[:, k]` is `{'`, `'.join(a['names'])}` in that order (`config.id2label`). The scalar reward "
            f"is `{terms}` (`config.rm_reward_weights`); the examples below read `logits[:, 0]`, so combine the "
            "columns for the reward, and pass `top_k=None` to a pipeline to get every attribute.")


def _hf_config(art: dict, tok):
    """The *ForSequenceClassification config: one label, a pad distinct from EOS, the held-out statistics
    and training's max_len."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(**json.loads(art["backbone_config"]))
    attributes = art.get("attributes")  # --objective regression: one output per attribute
    config.num_labels = len(attributes["names"]) if attributes else 1
    config.problem_type = "regression"
    if attributes:
        config.id2label = dict(enumerate(attributes["names"]))
        config.label2id = {n: i for i, n in enumerate(attributes["names"])}
        config.rm_attributes = list(attributes["names"])
        config.rm_reward_weights = combination(attributes["names"], attributes["reward_weights"]).tolist()
    # HF pools at the last token that is not pad_token_id. With pad == eos (common for Llama-3), that
    # would skip our final EOS, where the reward lives; pick another special token as the pad.
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        for candidate in (tok.bos_token, tok.unk_token):
            if candidate is not None and tok.convert_tokens_to_ids(candidate) != tok.eos_token_id:
                tok.pad_token = candidate
                break
        else:
            raise UserError("the tokenizer has no special token other than EOS to pad with; add a pad token")
    config.pad_token_id = tok.pad_token_id
    stats = art.get("reward_stats") or {}
    config.reward_mean = float(stats.get("mean", 0.0))
    config.reward_std = float(stats.get("std", 1.0))
    config.rm_max_len = int(art["max_len"])  # load_reward_model(hf folder) tokenizes exactly as training did
    return config


def hf_folder_for(reward_pt: str | Path, out_dir: str | Path, timeout_s: float, poll_s: float = 1.0) -> Path:
    """`--model reward.pt`: the HF folder a run starts from (and continues the head of), exported once into
    OUT/init_model/<key> by rank 0, keyed by the file's path, size and mtime. Runs before any process group
    exists, so the other ranks (on any node sharing OUT) poll for the finished folder: the export is
    written beside it and renamed into place."""
    import hashlib
    import os
    import shutil
    import time

    src = Path(reward_pt).resolve()
    st = src.stat()
    key = hashlib.sha256(f"{src}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    dest = Path(out_dir) / "init_model" / key
    if os.environ.get("RANK", "0") == "0" and not dest.is_dir():
        tmp = dest.with_name(key + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        export_hf(src, tmp)
        tmp.rename(dest)
    deadline = time.monotonic() + timeout_s
    while not dest.is_dir():
        if time.monotonic() > deadline:
            raise UserError(f"waited {timeout_s:.0f}s for rank 0 to export {src} to {dest}")
        time.sleep(poll_s)
    return dest
