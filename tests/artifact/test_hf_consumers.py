"""The exported model scores raw text as training did, in the standard consumers: a transformers pipeline
(batch 1 and 8), AutoModelForSequenceClassification on tok(texts, padding=True) (right and left padding),
and RewardBench's rendering (the chat template applied, then the pipeline). Real exports of tiny models
trained through the real entry point, with the tokenizer styles real backbones ship with
(rm_trainer.demo.tokenizer_variant): BOS added (Llama-like), pad = EOS in the source model, and a
Llama-3-like chat template. A text that ends in EOS already scores the same as without it, in every
path: score_texts, rm-score, rm-serve and rm-eval."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from helpers import ROOT, run_env, train, train_args

from rm_trainer import load_reward_model
from rm_trainer.data.tokenize import encode_item, special_prefix
from rm_trainer.demo import tokenizer_variant, write_jsonl

pytestmark = pytest.mark.slow
REL = 1e-5


def close(got, want) -> None:
    got, want = torch.as_tensor(got, dtype=torch.float64), torch.as_tensor(want, dtype=torch.float64)
    err, scale = float((got - want).abs().max()), float(want.abs().max())
    print(f"max |diff| {err:.3g} at reward scale {scale:.3g}")
    assert err <= REL * scale, (got.tolist(), want.tolist())


def conversation(row: dict, side: str) -> list[dict]:
    return [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row[side].strip()}]


@pytest.fixture(scope="module")
def trained(demo_assets, tmp_path_factory):
    """style -> run folder, each trained 6 steps in one process (chat: the demo pairs as conversations)."""
    root, done = tmp_path_factory.mktemp("hf_consumers"), {}
    rows = [json.loads(line) for line in open(demo_assets["train"])]
    test = [json.loads(line) for line in open(demo_assets["test"])]

    def get(style: str):
        if style not in done:
            d = root / style
            chat = style.startswith("chat")
            as_rows = (lambda rs: [{s: conversation(r, s) for s in ("chosen", "rejected")} for r in rs]) if chat \
                else (lambda rs: rs)
            write_jsonl(d / "train.jsonl", as_rows(rows))
            write_jsonl(d / "test.jsonl", as_rows(test))
            tok = tokenizer_variant([r["prompt"] + r["chosen"] for r in rows], d / "model", style, vocab_size=400)
            from rm_trainer.demo import tiny_llama_config

            tiny_llama_config(len(tok)).save_pretrained(d / "model")
            train(d / "out", train_args(d / "model", d / "train.jsonl", d / "test.jsonl", random_init=True,
                                        dtype="fp32", max_len=64, max_steps=6, micro_batch_size=8, lr=1e-3,
                                        hf_export=True),
                  launcher="python", nprocs=1)
            done[style] = d / "out"
        return done[style]

    return get


def texts(demo_assets, n: int = 8) -> list[str]:
    return [r["prompt"] + r["chosen"] for r in map(json.loads, open(demo_assets["test"]))][:n]


@pytest.mark.parametrize("style", ["bos", "pad_eos", "chat", "chat_eos"])
def test_pipeline_and_padded_batches_score_raw_text_as_training(trained, demo_assets, style):
    """Raw texts, or (chat styles) conversations rendered with tok.apply_chat_template(tokenize=False), against
    score_texts of the same texts or conversations."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    out = trained(style)
    hf, tok = AutoModelForSequenceClassification.from_pretrained(out / "hf").eval(), AutoTokenizer.from_pretrained(
        out / "hf")
    if style.startswith("chat"):
        convs = [conversation(json.loads(line), "chosen") for line in open(demo_assets["test"])][:8]
        want = load_reward_model(out / "reward.pt").score_texts(convs)
        items = [tok.apply_chat_template(c, tokenize=False) for c in convs]
    else:
        items = texts(demo_assets)
        want = load_reward_model(out / "reward.pt").score_texts(items)
    assert tok.pad_token_id != tok.eos_token_id and hf.config.pad_token_id == tok.pad_token_id
    pipe = pipeline("text-classification", model=hf, tokenizer=tok, function_to_apply="none", device="cpu")
    for batch in (1, 8):
        close([r["score"] for r in pipe(items, batch_size=batch)], want)
    for side in ("right", "left"):
        tok.padding_side = side
        with torch.no_grad():
            close(hf(**tok(items, padding=True, return_tensors="pt")).logits[:, 0], want)
    card = (out / "hf" / "README.md").read_text()
    assert "append EOS yourself" not in card.replace("Do not append EOS yourself", "")
    assert 'pipeline("text-classification"' in card and "/classify" in card and "padding=True" in card


def test_tokenizers_a_model_ships_with_give_trainings_ids(trained, demo_assets):
    """load_reward_model's tokenizer (from reward.pt and from hf/) and hf/'s own: tok(text) is the sequence
    training scored; a tokenizer with BOS keeps exactly one."""
    from transformers import AutoTokenizer

    out, items = trained("bos"), texts(demo_assets, 4)
    rm = load_reward_model(out / "reward.pt")
    want = [encode_item(rm.tokenizer, t, rm.max_len, special_prefix(rm.tokenizer)) for t in items]
    for tok in (rm.tokenizer, load_reward_model(out / "hf").tokenizer, AutoTokenizer.from_pretrained(out / "hf")):
        got = [tok(t)["input_ids"] for t in items]
        assert got == want and all(ids[0] == tok.bos_token_id != ids[1] and ids[-1] == tok.eos_token_id
                                   for ids in got)


def test_rewardbench_rendering_equals_rm_eval_per_response_rewards(trained, demo_assets, tmp_path):
    """RewardBench 2's schema, rendered as RewardBench renders it: the chat template over [user, assistant],
    then the pipeline on the text; against rm-eval's scores.jsonl for the same file (--chat on)."""
    from transformers import AutoTokenizer, pipeline

    out = trained("chat")
    rows = [json.loads(line) for line in open(demo_assets["test"])][:6]
    rb2 = [{"id": i, "subset": "demo", "prompt": r["prompt"], "chosen": [r["chosen"].strip()],
            "rejected": [r["rejected"].strip(), rows[(i + 1) % len(rows)]["rejected"].strip()]}
           for i, r in enumerate(rows)]
    write_jsonl(tmp_path / "rb2.jsonl", rb2)
    p = subprocess.run([sys.executable, "-m", "rm_trainer.cli.eval", "--model", str(out / "reward.pt"), "--data",
                        str(tmp_path / "rb2.jsonl"), "--chat", "on", "--output_dir", str(tmp_path / "eval")],
                       cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    scored = [json.loads(line) for line in open(tmp_path / "eval" / "scores.jsonl")]
    tok = AutoTokenizer.from_pretrained(out / "hf")
    pipe = pipeline("text-classification", model=str(out / "hf"), function_to_apply="none", device="cpu")
    for row, s in zip(rb2, scored, strict=True):
        rendered = [tok.apply_chat_template([{"role": "user", "content": row["prompt"]},
                                             {"role": "assistant", "content": r}], tokenize=False)
                    for r in row["chosen"] + row["rejected"]]
        assert not rendered[0].startswith(tok.bos_token)  # the tokenizer adds it, once
        close([r["score"] for r in pipe(rendered, batch_size=3)], s["scores"])


def test_a_text_that_already_ends_in_eos_scores_the_same_in_every_path(trained, demo_assets, tmp_path):
    out = trained("bos")
    rm = load_reward_model(out / "reward.pt")
    items, eos = texts(demo_assets, 4), rm.tokenizer.eos_token
    want = rm.score_texts(items)
    assert torch.equal(rm.score_texts([t + eos for t in items]), want)
    write_jsonl(tmp_path / "rows.jsonl", [{"text": t + eos} for t in items])
    p = subprocess.run([sys.executable, "-m", "rm_trainer.cli.score", "--model", str(out / "reward.pt"), "--data",
                        str(tmp_path / "rows.jsonl"), "--output", str(tmp_path / "scored.jsonl")], cwd=ROOT,
                       env=run_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert [json.loads(line)["reward"] for line in open(tmp_path / "scored.jsonl")] == want.tolist()
    rows = [json.loads(line) for line in open(demo_assets["test"])][:4]
    for suffix, name in (("", "plain"), (eos, "eos")):
        write_jsonl(tmp_path / f"{name}.jsonl", [{"prompt": r["prompt"], "chosen": r["chosen"] + suffix,
                                                  "rejected": r["rejected"] + suffix} for r in rows])
        p = subprocess.run([sys.executable, "-m", "rm_trainer.cli.eval", "--model", str(out / "reward.pt"),
                            "--data", str(tmp_path / f"{name}.jsonl"), "--output_dir", str(tmp_path / name)],
                           cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
    plain, with_eos = ([(r["chosen"], r["rejected"]) for r in map(json.loads, open(tmp_path / n / "scores.jsonl"))]
                       for n in ("plain", "eos"))
    assert plain == with_eos and len(plain) == 4


def test_rm_serve_scores_a_text_that_ends_in_eos_as_one_that_does_not(trained, demo_assets):
    pytest.importorskip("aiohttp")
    import asyncio

    import aiohttp
    from helpers import AUTH, Server

    out = trained("bos")
    rm = load_reward_model(out / "reward.pt")
    items = texts(demo_assets, 3)
    server = Server(out / "reward.pt")
    try:
        async def post(path, body):
            async with aiohttp.ClientSession() as s, s.post(server.url + path, json=body, headers=AUTH) as r:
                assert r.status == 200, await r.text()
                return await r.json()

        eos = rm.tokenizer.eos_token
        for t in items:
            plain = asyncio.run(post("/score", {"rows": [{"text": t}]}))["results"][0]["reward"]
            assert asyncio.run(post("/score", {"rows": [{"text": t + eos}]}))["results"][0]["reward"] == plain
            assert asyncio.run(post("/get_reward", {"query": [t + eos]}))["rewards"][0] == plain
    finally:
        server.stop()
