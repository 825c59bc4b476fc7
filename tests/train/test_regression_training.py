"""Multi-attribute regression in real runs (--objective regression):

- on a generated task with known attribute functions (helpfulness = helpful words, verbosity = length), a
  2-rank ZeRO-3 run reaches Pearson >= 0.9 on held-out rows for both attributes, and reward.pt scores
  each attribute as the live engine did;
- reward.pt, the HF folder (plain transformers and load_reward_model), rm-score, rm-serve and rm-eval give
  the same attributes (1e-5 relative), and OpenRLHF's /get_reward one scalar per text;
- killed with kill -9 and resumed, a regression run is bit-exact;
- 2 sequence-parallel ranks train an attribute head like one rank (losses, gradient norm, eval metrics);
- a LoRA run's peft folder (--lora_export) gives the same attributes on a base loaded with num_labels=K;
- a bad row (a missing attribute without the mask, a rating that is not a number) stops the run naming
  file:line:field, and a pairs file given to a regression run is named."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys

import pytest
import torch
from helpers import (
    AUTH,
    ROOT,
    Server,
    metrics,
    one_rank_and_two_sequence_ranks,
    resume_from_copy,
    run_env,
    same_artifact_weights,
    train,
    train_args,
)

from rm_trainer import load_reward_model
from rm_trainer.demo import HELPFUL, NEUTRAL, TOPICS, make_pairs

pytestmark = pytest.mark.slow

ATTRIBUTES = "helpfulness,verbosity"


def write(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def ratings(n: int, seed: int, missing: float = 0.0) -> list[dict]:
    """Rated responses: helpfulness = how many helpful words (0..4), verbosity = words / 3 (about 1..5).
    `missing`: the fraction of values left out (null)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        good, plain = rng.randint(0, 4), rng.randint(2, 12)
        words = [rng.choice(HELPFUL) for _ in range(good)] + [rng.choice(NEUTRAL) for _ in range(plain)]
        rng.shuffle(words)
        row = {"prompt": f"Human: tell me about {rng.choice(TOPICS)} please Assistant:",
               "response": " " + " ".join(words), "helpfulness": good, "verbosity": round(len(words) / 3, 3)}
        for a in ("helpfulness", "verbosity"):
            if rng.random() < missing:
                row[a] = None
        rows.append(row)
    return rows


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


COMMON = {"dtype": "fp32", "lr": 1e-3, "warmup_steps": 1, "max_len": 64, "seed": 7, "objective": "regression",
          "attributes": ATTRIBUTES}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_pretrained):
    """A 2-rank ZeRO-3 run on the generated task (10% of the training ratings missing), with its HF export."""
    tmp = tmp_path_factory.mktemp("regression")
    rows, test = ratings(256, 1, missing=0.1), ratings(64, 2)
    out, held_out = tmp / "run", write(tmp / "test.jsonl", test)
    train(out, train_args(tiny_pretrained, write(tmp / "train.jsonl", rows), held_out, "zero3", **COMMON,
                          max_steps=120, micro_batch_size=8, eval_every=40, missing_attributes="mask",
                          reward_weights="helpfulness=1,verbosity=-0.25", hf_export=True))
    return out, test, held_out


def test_a_two_rank_zero3_run_learns_both_attributes(trained):
    out, test, _ = trained
    assert {r["sequences"] for r in metrics(out)} == {16}  # one sequence per rated row, 8 rows per rank
    e = metrics(out, "eval")[-1]
    assert e["rows"] == 64
    assert e["pearson/helpfulness"] >= 0.9 and e["pearson/verbosity"] >= 0.9, e
    # reward.pt scores each attribute on its own, as the held-out eval did
    model = load_reward_model(out / "reward.pt")
    assert model.attributes == ["helpfulness", "verbosity"]
    rewards, attrs = model.score_texts([(x["prompt"], x["response"]) for x in test], attributes=True)
    assert attrs.shape == (64, 2)
    for k, a in enumerate(("helpfulness", "verbosity")):
        y = torch.tensor([float(x[a]) for x in test])
        assert pearson(attrs[:, k], y) == pytest.approx(e[f"pearson/{a}"], rel=1e-4)
        rmse = float(((attrs[:, k] - y) ** 2).mean().sqrt())
        assert rmse == pytest.approx(e[f"rmse/{a}"], rel=1e-4)
    want = attrs[:, 0] - 0.25 * attrs[:, 1]  # the combined reward PPO reads
    assert torch.allclose(rewards, want, rtol=1e-6, atol=1e-6 * float(want.abs().max()))
    assert torch.equal(model.score_texts([(x["prompt"], x["response"]) for x in test]), rewards)


def close(a, b, what: str) -> None:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    assert float((a - b).abs().max()) <= 1e-5 * float(b.abs().max()), what


def test_every_path_gives_the_same_attributes_and_openrlhf_one_scalar(trained, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out, test, held_out = trained
    texts = [(x["prompt"], x["response"]) for x in test[:16]]
    rewards, attrs = load_reward_model(out / "reward.pt").score_texts(texts, attributes=True)
    # the HF folder: num_labels = K, named; loaded by plain transformers and by load_reward_model
    hf = AutoModelForSequenceClassification.from_pretrained(out / "hf").eval()
    assert hf.config.num_labels == 2 and hf.config.id2label == {0: "helpfulness", 1: "verbosity"}
    assert hf.config.rm_reward_weights == [1.0, -0.25]
    tok = AutoTokenizer.from_pretrained(out / "hf")
    with torch.no_grad():
        logits = hf(**tok([p + r for p, r in texts], padding=True, return_tensors="pt")).logits
    close(logits, attrs, "plain transformers")
    got_r, got_a = load_reward_model(out / "hf").score_texts(texts, attributes=True)
    close(got_a, attrs, "load_reward_model(hf/)")
    close(got_r, rewards, "load_reward_model(hf/) rewards")
    # rm-score: each row gets its attributes beside the combined reward
    src, dest = write(tmp_path / "rows.jsonl", [{"prompt": p, "response": r} for p, r in texts]), tmp_path / "s.jsonl"
    p = subprocess.run([sys.executable, "-m", "rm_trainer.cli.score", "--model", str(out / "reward.pt"), "--data",
                        src, "--output", str(dest)], cwd=ROOT, env=run_env(), capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    scored = [json.loads(line) for line in dest.read_text().splitlines()]
    close([r["reward"] for r in scored], rewards, "rm-score rewards")
    close([[r["attributes"]["helpfulness"], r["attributes"]["verbosity"]] for r in scored], attrs, "rm-score")
    # rm-serve: OpenRLHF's /get_reward still gets one scalar per text (plus the attributes), /score too
    server = Server(out / "reward.pt")
    try:
        served = asyncio.run(serve_both(server, [p + r for p, r in texts], texts))
    finally:
        server.stop()
    close(served[0]["rewards"], rewards, "/get_reward")
    assert served[0]["scores"] == served[0]["rewards"] and all(isinstance(x, float) for x in served[0]["rewards"])
    close([[a["helpfulness"], a["verbosity"]] for a in served[0]["attributes"]], attrs, "/get_reward attributes")
    close([[r["attributes"]["helpfulness"], r["attributes"]["verbosity"]] for r in served[1]["results"]], attrs,
          "/score attributes")
    # rm-eval on the held-out rating file (the run's own eval/rmse and eval/pearson) and, in the same call, on a
    # pairs file: its accuracy is that of the combined reward
    pairs = make_pairs(48, 9)
    pair_file = write(tmp_path / "pairs.jsonl", pairs)
    p = subprocess.run([sys.executable, "-m", "rm_trainer.cli.eval", "--model", str(out / "reward.pt"), "--data",
                        held_out, pair_file, "--output_dir", str(tmp_path / "eval")], cwd=ROOT, env=run_env(),
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    model = load_reward_model(out / "reward.pt")
    r_c = model.score_texts([(x["prompt"], x["chosen"]) for x in pairs])
    r_r = model.score_texts([(x["prompt"], x["rejected"]) for x in pairs])
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert summary["pairs"] == 48 and summary["acc"] == pytest.approx(float((r_c > r_r).double().mean()), abs=1e-9)
    scored = [json.loads(line) for line in (tmp_path / "eval" / "scores.jsonl").read_text().splitlines()]
    close([s["chosen"] for s in scored if s["kind"] == "pair"], r_c, "rm-eval pairs, chosen")
    close([s["rejected"] for s in scored if s["kind"] == "pair"], r_r, "rm-eval pairs, rejected")
    result = json.loads((tmp_path / "eval" / "attributes.json").read_text())
    e = metrics(out, "eval")[-1]
    assert result["rows"] == 64
    for a in ("helpfulness", "verbosity"):
        assert result["attributes"][a]["rated"] == 64
        assert result["attributes"][a]["pearson"] == pytest.approx(e[f"pearson/{a}"], rel=1e-5)
        assert result["attributes"][a]["rmse"] == pytest.approx(e[f"rmse/{a}"], rel=1e-4)


def test_a_lora_regression_run_exports_a_peft_adapter_with_its_k_outputs(tmp_path, tiny_pretrained):
    """--lora_export of an attribute head: the peft folder on a base loaded with num_labels=K gives
    reward.pt's attributes, and rm_attributes.json's coefficients give its reward."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rows, out = ratings(64, 3), tmp_path / "lora"
    train(out, train_args(tiny_pretrained, write(tmp_path / "train.jsonl", rows), None, "zero2", **COMMON,
                          max_steps=4, micro_batch_size=4, test_fraction=0, lora_r=4, lora_alpha=8, lora_export=True,
                          hf_export=False, reward_weights="helpfulness=1,verbosity=-0.25"))
    doc = json.loads((out / "lora_adapter" / "rm_attributes.json").read_text())
    assert doc["names"] == ["helpfulness", "verbosity"] and doc["reward_weights"] == [1.0, -0.25]
    texts = [(x["prompt"], x["response"]) for x in rows[:8]]
    rewards, attrs = load_reward_model(out / "reward.pt").score_texts(texts, attributes=True)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_pretrained, num_labels=2)
    adapted = PeftModel.from_pretrained(base, out / "lora_adapter").eval()
    tok = AutoTokenizer.from_pretrained(out / "lora_adapter")  # appends EOS, as training did
    with torch.no_grad():
        logits = torch.cat([adapted(**tok(p + r, return_tensors="pt")).logits for p, r in texts])
    close(logits, attrs, "peft adapter")
    close(logits @ torch.tensor(doc["reward_weights"]), rewards, "peft adapter, combined reward")


def test_two_sequence_ranks_train_an_attribute_head_like_one_rank(tmp_path, tiny_pretrained):
    """--sequence_parallel 2 (packed, ZeRO-3) against one rank holding whole rows, same global batch: each
    sequence's K attributes come from the rank holding its last token, through one [sequences, K]
    all-reduce, so the losses, the first gradient norm and the held-out metrics agree."""
    data, held_out = write(tmp_path / "train.jsonl", ratings(64, 4, missing=0.1)), write(tmp_path / "t.jsonl",
                                                                                        ratings(16, 5))
    flags = COMMON | {"max_steps": 8, "micro_batch_size": 4, "eval_every": 8, "missing_attributes": "mask",
                      "packing": True, "pack_len": 64, "hf_export": False}
    e1, e2, m2 = one_rank_and_two_sequence_ranks(tmp_path, tiny_pretrained, data, held_out, flags, 8)
    assert {r["sequences"] for r in m2} == {4}
    assert e2["rows"] == e1["rows"] == 16
    keys = [f"{m}/{a}" for m in ("rmse", "pearson") for a in ATTRIBUTES.split(",")]
    close([e2[k] for k in keys], [e1[k] for k in keys], "held-out metrics")


async def serve_both(server: Server, queries: list[str], rows: list[tuple[str, str]]) -> tuple[dict, dict]:
    import aiohttp

    async with aiohttp.ClientSession() as s:
        async with s.post(server.url + "/get_reward", json={"query": queries}, headers=AUTH) as r:
            assert r.status == 200
            first = await r.json()
        body = {"rows": [{"prompt": p, "response": x} for p, x in rows]}
        async with s.post(server.url + "/score", json=body, headers=AUTH) as r:
            assert r.status == 200
            return first, await r.json()


def test_a_regression_run_resumed_from_a_checkpoint_is_bit_exact(tmp_path, tiny_pretrained):
    args = train_args(tiny_pretrained, write(tmp_path / "train.jsonl", ratings(64, 5, missing=0.2)), None, "zero2",
                      **COMMON, max_steps=8, micro_batch_size=2, save_every=2, test_fraction=0,
                      missing_attributes="mask", attribute_weights="verbosity=0.5", hf_export=False)
    a, b = tmp_path / "uninterrupted", tmp_path / "resumed"
    train(a, args)
    resume_from_copy(a, b, args, 4)  # as a crash after step_4 leaves it (SIGKILL: the kill tests)
    assert [r["loss"] for r in metrics(a)] == [r["loss"] for r in metrics(b)]  # exact float equality
    assert same_artifact_weights(a, b)


def dry_run(tmp_path, model, data, *flags: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "rm_trainer.cli.train", "--model", str(model), "--data", data, "--output_dir",
           str(tmp_path / "out"), "--objective", "regression", "--attributes", ATTRIBUTES, "--dry-run"]
    return subprocess.run([*cmd, *flags], cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=300)


def test_bad_rating_rows_are_named_and_a_pairs_file_is_refused(tmp_path, tiny_pretrained):
    rows = ratings(20, 3)
    rows[4]["verbosity"] = None
    p = dry_run(tmp_path, tiny_pretrained, write(tmp_path / "missing.jsonl", rows))
    assert p.returncode == 2 and "missing.jsonl:5: field 'verbosity' is missing" in p.stderr, p.stderr
    assert "--missing_attributes mask" in p.stderr
    p = dry_run(tmp_path, tiny_pretrained, write(tmp_path / "missing.jsonl", rows), "--missing_attributes", "mask")
    assert p.returncode == 0, p.stderr
    assert "objective regression (MSE on 2 attributes: helpfulness x1, verbosity x1; missing values masked)" in p.stdout
    rows = ratings(20, 3)
    rows[7]["helpfulness"] = "four"
    p = dry_run(tmp_path, tiny_pretrained, write(tmp_path / "text.jsonl", rows))
    assert p.returncode == 2 and "text.jsonl:8: field 'helpfulness' is 'four'; expected a finite number" in p.stderr
    p = dry_run(tmp_path, tiny_pretrained, write(tmp_path / "pairs.jsonl", make_pairs(8, 1)))
    assert p.returncode == 2 and "pairs.jsonl: no 'response' field" in p.stderr, p.stderr
    p = dry_run(tmp_path, tiny_pretrained, write(tmp_path / "ok.jsonl", ratings(20, 3)), "--reward_weights",
                "helpfulness=1,length=2")
    assert p.returncode == 2 and "model.reward_weights names length, not among data.attributes" in p.stderr


# ---------------------------------------------------------------- --objective bt+regression: pairs and ratings


def mixed_args(tmp_path, model, **flags) -> list[str]:
    """A bt+regression run over two sources: the demo's pairs (chosen has one more helpful word) and rated
    responses (helpfulness = the helpful words), each with its own held-out tenth."""
    pairs, rated = write(tmp_path / "pairs.jsonl", make_pairs(160, 1)), write(tmp_path / "rated.jsonl", ratings(160, 3))
    cfg = tmp_path / "sources.yaml"
    cfg.write_text(f"data:\n  sources:\n    - {{path: {pairs}, test_fraction: 0.1}}\n"
                   f"    - {{path: {rated}, test_fraction: 0.1}}\n")
    args = train_args(model, "unused", None, "zero2", **COMMON | {"objective": "bt+regression"}, **flags)
    return ["--config", str(cfg), *args[:2], *args[4:]]  # the sources in place of --data


def test_pairs_and_ratings_train_one_head_and_resume_bit_exact(tmp_path, tiny_pretrained):
    args = mixed_args(tmp_path, tiny_pretrained, max_steps=120, micro_batch_size=8, eval_every=120, save_every=40,
                      bt_weight=0.5)
    a, b = tmp_path / "uninterrupted", tmp_path / "resumed"
    train(a, args)
    steps = metrics(a)
    # each micro-batch holds rows of both kinds: 2 sequences per pair, 1 per rated row, 16 rows per step
    assert all(16 < r["sequences"] < 32 for r in steps) and len({r["sequences"] for r in steps}) > 1
    e = metrics(a, "eval")[-1]
    assert e["rows"] == 32 and e["responses"] == 16 * 2 + 16, e
    assert e["acc"] >= 0.9 and e["pearson/helpfulness"] >= 0.9 and e["pearson/verbosity"] >= 0.9, e
    assert e["pairs/acc"] == e["acc"] and e["rated/pearson/helpfulness"] == e["pearson/helpfulness"]
    model = load_reward_model(a / "reward.pt")  # the reward is the first attribute, which BT ranked
    held = make_pairs(32, 9)
    r = model.score_texts([(p["prompt"], p[k]) for p in held for k in ("chosen", "rejected")]).view(-1, 2)
    assert float((r[:, 0] > r[:, 1]).float().mean()) >= 0.9
    resume_from_copy(a, b, args, 80)  # as a crash after step_80 leaves it (SIGKILL: the kill tests)
    assert [r["loss"] for r in steps] == [r["loss"] for r in metrics(b)]  # exact float equality
    assert same_artifact_weights(a, b)
