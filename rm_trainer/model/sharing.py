"""Whether shared prompts (data.segments) are exact for a model: the check training's --share_prompt and
scoring both run on the live model before any row shares its prompt."""

from __future__ import annotations

import torch

from rm_trainer.data.batching import Sequences
from rm_trainer.data.segments import ALWAYS, ShareRule
from rm_trainer.errors import UserError

# The largest relative difference between shared and separate rewards the check accepts, by dtype: fp32 as
# issue 35 asks; bf16/fp16 about 4x the largest measured on random Llamas (8e-3, 1.5e-3; docs/batching.md).
# A response that sees another moves its reward by O(1) of the rewards' scale.
SHARE_BOUND = {"fp32": 1e-5, "bf16": 3e-2, "fp16": 6e-3}
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
NO_DENSE_MASK = ("flash_attention_2", "flash_attention_3", "flex_attention")


def check_sharing(forward, backbone_config, device: torch.device, dtype: str = "fp32") -> str | None:
    """None if a row of one prompt and three responses scores the same shared as its three sequences apart
    through `forward` (the model or its engine), else what is wrong: an attention that ignores the 4D mask
    lets a response see the others."""
    impl = getattr(backbone_config, "_attn_implementation", None) or "default"
    if impl in NO_DENSE_MASK:
        return (f"attention implementation {impl!r} does not take the dense mask shared prompts need; use sdpa "
                "or eager, or --share_prompt off")
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(1, backbone_config.vocab_size, (9,), generator=g).tolist()
    row = [prompt + torch.randint(1, backbone_config.vocab_size, (n,), generator=g).tolist() for n in (5, 3, 6)]
    with torch.no_grad():
        want = Sequences.of(row, 0).run(forward, device).float()
        got = Sequences.shared([row], 0, ALWAYS).run(forward, device).float()
    err, scale = float((got - want).abs().max()), float(want.abs().max().clamp(min=1e-3))
    if err > SHARE_BOUND[dtype] * scale:
        return (f"shared and separate rewards differ by {err:.3g} at a reward scale of {scale:.3g} with attention "
                f"implementation {impl!r} (bound {SHARE_BOUND[dtype]:g} relative in {dtype}); use sdpa or eager, "
                "or --share_prompt off")
    return None


def scoring_rule(model, mode: str = "auto") -> ShareRule | None:
    """Which scored sequences of one prompt share it (score_sequences' `groups`): off, None; else the check
    on this model, once (its outcome is kept on the model), then ShareRule.of its config (auto) or ALWAYS
    (on). A failed check under `on` is a UserError naming the reason."""
    if mode == "off":
        return None
    if not hasattr(model, "share_problem"):
        w = model.score.weight
        model.share_problem = check_sharing(model, model.config, w.device, DTYPE_NAMES.get(w.dtype, "fp32"))
    if model.share_problem is not None:
        if mode == "on":
            raise UserError(f"--share_prompt on: {model.share_problem}")
        return None
    return ALWAYS if mode == "on" else ShareRule.of(model.config)
