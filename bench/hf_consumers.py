#!/usr/bin/env python
"""Does the exported model score raw text as training did, in the standard consumers? (JSON out)

For each tokenizer style real backbones ship with (rm_trainer.demo.tokenizer_variant: no special tokens,
BOS added, pad = EOS, a Llama-3-like chat template, a Llama-2-like chat template whose turns end in EOS),
a tiny Llama is trained for a few steps through the real entry point on the real HH-RLHF pairs (plain
texts, or the same pairs as conversations for the chat styles). Then each consumer scores held-out texts
from `OUT/hf` and is compared with `load_reward_model(OUT/reward.pt).score_texts`, training's own
tokenization. The texts are ones that fit training's max_len (256 tokens here): a longer one is truncated
by training's policy, which a consumer of raw text does not apply.

  pipeline_b1 / pipeline_b8   transformers.pipeline("text-classification", function_to_apply="none") on the
                              raw texts, batch 1 and 8 (what RewardBench's scripts and vLLM/SGLang's classify
                              endpoints do: tokenize the raw text)
  auto_right / auto_left      AutoModelForSequenceClassification on tok(texts, padding=True), right and left
  rewardbench                 chat styles: tok.apply_chat_template([user, assistant], tokenize=False), then
                              the pipeline (RewardBench's rendering)
  trailing_eos                score_texts of each text with EOS already written at its end

    python bench/hf_consumers.py            # 5 styles x ~30 s on 2 cores
    python bench/hf_consumers.py --smoke    # 2 styles, fewer steps (the tests)
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, add_output, child_env, finish, hh_pairs

from rm_trainer.demo import TOKENIZER_STYLES


def conversations(pairs: list[dict]) -> list[dict]:
    """HH pairs as single-turn conversations (the first human turn, each side's first answer)."""
    from rm_trainer.data.formats import split_hh

    out = []
    for r in pairs:
        s = split_hh(r["chosen"], r["rejected"])
        if s is None or "Human:" in s[0][len("\n\nHuman:"):] or not s[1].strip() or not s[2].strip():
            continue
        prompt = s[0].removesuffix("Assistant:").strip().removeprefix("Human:").strip()
        out.append({side: [{"role": "user", "content": prompt}, {"role": "assistant", "content": t.strip()}]
                    for side, t in (("chosen", s[1]), ("rejected", s[2]))})
    return out


def train(work: Path, style: str, pairs: list[dict], steps: int, max_len: int = 256) -> Path:
    """A tiny Llama trained on pairs (or their conversations) with a tokenizer of this style."""
    from rm_trainer.demo import tiny_llama_config, tokenizer_variant, write_jsonl

    chat = style.startswith("chat")
    rows = conversations(pairs) if chat else pairs
    write_jsonl(work / "train.jsonl", rows[:-64])
    write_jsonl(work / "test.jsonl", rows[-64:])
    texts = [r["chosen"] for r in pairs] + [r["rejected"] for r in pairs]
    tok = tokenizer_variant(texts, work / "model", style)
    tiny_llama_config(len(tok), max_pos=1024).save_pretrained(work / "model")
    cmd = [sys.executable, str(ROOT / "launch" / "train_reward.py"), "--model", str(work / "model"), "--random_init",
           "--data", str(work / "train.jsonl"), "--test_data", str(work / "test.jsonl"), "--dtype", "fp32",
           "--max_len", str(max_len), "--max_steps", str(steps), "--micro_batch_size", "8", "--lr", "1e-3",
           "--max_drop_fraction", "0.5", "--output_dir", str(work / "out"), "--no-tensorboard"]
    p = subprocess.run(cmd, cwd=ROOT, env=child_env(2), capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"training ({style}) failed:\n{p.stderr[-4000:]}")
    return work / "out"


def diff(got, want) -> dict:
    import torch

    got, want = torch.as_tensor(got, dtype=torch.float64), torch.as_tensor(want, dtype=torch.float64)
    err = float((got - want).abs().max())
    return {"max_abs": err, "max_rel": err / max(float(want.abs().max()), 1e-12)}


def consumers(out: Path, items: list, chat: bool) -> dict:
    """Each consumer's rewards of `items` (texts, or conversations for chat styles) against score_texts."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    from rm_trainer import load_reward_model

    rm = load_reward_model(out / "reward.pt")
    want = rm.score_texts(items).tolist()
    hf = AutoModelForSequenceClassification.from_pretrained(out / "hf").eval()
    tok = AutoTokenizer.from_pretrained(out / "hf")
    texts = [tok.apply_chat_template(c, tokenize=False) for c in items] if chat else items
    pipe = pipeline("text-classification", model=hf, tokenizer=tok, function_to_apply="none", device="cpu")
    got = {f"pipeline_b{b}": [r["score"] for r in pipe(texts, batch_size=b)] for b in (1, 8)}
    for side in ("right", "left"):
        tok.padding_side = side
        with torch.no_grad():
            got[f"auto_{side}"] = hf(**tok(texts, padding=True, return_tensors="pt")).logits[:, 0].tolist()
    if chat:
        got = {"rewardbench": got["pipeline_b1"], **got}
    else:
        got["trailing_eos"] = rm.score_texts([t + rm.tokenizer.eos_token for t in items]).tolist()
    return {name: diff(r, want) for name, r in got.items()}


def fitting(items: list, out: Path, n: int) -> list:
    """The first n items whose sequence fits training's max_len: longer ones are truncated by training's
    policy (the prompt from the left), which a consumer that tokenizes the raw text does not do."""
    from rm_trainer import load_reward_model
    from rm_trainer.data.tokenize import encode_item, special_prefix

    rm = load_reward_model(out / "reward.pt")
    prefix = special_prefix(rm.tokenizer)
    return [x for x in items if len(encode_item(rm.tokenizer, x, 1 << 30, prefix)) <= rm.max_len][:n]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--styles", default=",".join(TOKENIZER_STYLES))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--texts", type=int, default=16, help="held-out texts (or conversations) each consumer scores")
    ap.add_argument("--smoke", action="store_true", help="2 styles, 4 steps")
    add_output(ap)
    a = ap.parse_args(argv)
    if a.smoke:
        a.styles, a.steps, a.texts = "bos,chat", 4, 8
    pairs = hh_pairs()
    random.Random(0).shuffle(pairs)
    pairs = pairs[:600]
    result: dict = {"steps": a.steps, "texts": a.texts, "styles": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for style in a.styles.split(","):
            work = Path(tmp) / style
            out = train(work, style, pairs, a.steps)
            chat = style.startswith("chat")
            items = fitting([json.loads(line)["chosen"] for line in open(work / "test.jsonl")], out, a.texts)
            result["styles"][style] = consumers(out, items, chat)
    result["worst_rel"] = max(d["max_rel"] for s in result["styles"].values() for d in s.values())
    return finish(result, a.output)


if __name__ == "__main__":
    main()
