"""K-wise rankings in real runs (--objective ranking):

- rows of K = 2 are the pairs: a 2-rank ranking run on the demo's pairs written as rankings has the loss
  trace of the pairs run (1e-6 relative), and the same held-out accuracy; so do real HH-RLHF pairs at a
  max_len that cuts most of their prompts (one truncation rule: the prompt cut once per row), on ZeRO-3;
- K = 4 rows run 4 sequences each per step where the pair split runs 12 (counted from the logged
  `sequences`), and a 2-rank ZeRO-3 run learns the ranking (held-out pairwise accuracy and top-1); rm-eval
  on its held-out file, and on the same rows in UltraFeedback's layout, gives the run's own eval metrics;
- 2 sequence-parallel ranks train rankings like one rank (losses, gradient norm, held-out metrics);
- resumed from one of its checkpoints, a ranking run is bit-exact;
- a bad row stops the run naming file:line:field, and a pairs file given to a ranking run is named."""

from __future__ import annotations

import itertools
import json
import random
import subprocess
import sys

import pytest
import torch
from helpers import (
    ROOT,
    SHARED_HH,
    hh_prompt_rows,
    metrics,
    one_rank_and_two_sequence_ranks,
    resume_from_copy,
    run_env,
    same_artifact_weights,
    train,
    train_args,
)

from rm_trainer import load_reward_model
from rm_trainer.demo import TOPICS, _response, make_pairs

pytestmark = pytest.mark.slow


def write(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def as_rankings(pairs: list[dict]) -> list[dict]:
    """Each pair as a ranking of its two responses, in a seeded order (the better one not always first)."""
    rng = random.Random(0)
    out = []
    for p in pairs:
        first = rng.random() < 0.5
        responses = [p["chosen"], p["rejected"]] if first else [p["rejected"], p["chosen"]]
        out.append({"prompt": p["prompt"], "responses": responses, "scores": [1, 0] if first else [0, 1]})
    return out


def rankings(n: int, seed: int, k: int = 4) -> list[dict]:
    """Rows of k responses to one prompt, the score of each its count of helpful words (0..3)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        levels = rng.sample(range(4), k)
        rows.append({"prompt": f"Human: tell me about {rng.choice(TOPICS)} please Assistant:",
                     "responses": [_response(rng, g, 3 - g) for g in levels], "scores": levels})
    return rows


def split_into_pairs(rows: list[dict]) -> list[dict]:
    """What a trainer without rankings does: every ordered pair with different scores, as its own row."""
    return [{"prompt": r["prompt"], "chosen": r["responses"][i], "rejected": r["responses"][j]}
            for r in rows for i, j in itertools.permutations(range(len(r["responses"])), 2)
            if r["scores"][i] > r["scores"][j]]


COMMON = {"dtype": "fp32", "lr": 1e-3, "warmup_steps": 1, "max_len": 64, "seed": 7}


def test_rankings_of_two_train_exactly_like_their_pairs(tmp_path, tiny_pretrained):
    pairs, test = make_pairs(128, 3), make_pairs(32, 4)
    runs = {}
    for name, rows, test_rows, objective in (("pairs", pairs, test, "pairs"),
                                             ("ranking", as_rankings(pairs), as_rankings(test), "ranking")):
        runs[name] = out = tmp_path / name
        train(out, train_args(tiny_pretrained, write(tmp_path / f"{name}.jsonl", rows),
                              write(tmp_path / f"{name}_test.jsonl", test_rows), "zero2", **COMMON, max_steps=8,
                              micro_batch_size=4, eval_every=8, objective=objective, hf_export=False),
              launcher="torchrun")
    a, b = metrics(runs["pairs"]), metrics(runs["ranking"])
    assert len(a) == len(b) == 8
    for x, y in zip(a, b, strict=True):
        assert abs(x["loss"] - y["loss"]) <= 1e-6 * abs(x["loss"]), (x["loss"], y["loss"])
        assert x["acc"] == y["acc"] and y["sequences"] == x["sequences"] == 16
    ea, eb = metrics(runs["pairs"], "eval")[-1], metrics(runs["ranking"], "eval")[-1]
    assert ea["acc"] == eb["acc"] and abs(ea["loss"] - eb["loss"]) <= 1e-6 * ea["loss"]
    assert eb["prompts"] == 32 and eb["responses"] == 64


@pytest.mark.skipif(not SHARED_HH.is_file(), reason=f"real HH-RLHF pairs not found at {SHARED_HH}")
def test_real_hh_pairs_as_rankings_of_two_train_like_the_pairs_when_max_len_cuts_their_prompts(tmp_path):
    from transformers import AutoModel

    from rm_trainer.demo import tiny_llama_config, train_tokenizer

    pairs = hh_prompt_rows(600)
    model = tmp_path / "model"
    tok = train_tokenizer([p["prompt"] + p["chosen"] for p in pairs] + [p["rejected"] for p in pairs], model,
                          vocab_size=1000, kind="bpe")
    torch.manual_seed(0)
    AutoModel.from_config(tiny_llama_config(len(tok))).save_pretrained(model)
    runs = {}
    for name, rows, objective in (("pairs", pairs, "pairs"), ("ranking", as_rankings(pairs), "ranking")):
        runs[name] = out = tmp_path / name
        train(out, train_args(model, write(tmp_path / f"{name}.jsonl", rows), None, "zero3", **COMMON | {"max_len": 96},
                              max_steps=6, micro_batch_size=4, test_fraction=0, objective=objective,
                              max_drop_fraction=0.5, hf_export=False, verify=False))
    reports = [json.loads((runs[k] / "data_report.json").read_text())["train"]["train"] for k in runs]
    for k in ("rows", "used", "token_length_percentiles", "fraction_truncated_at_max_len"):
        assert reports[0][k] == reports[1][k], k  # the same rows kept and cut
    cut = [{k: r["kept_with_note"][k] for k in ("prompt_truncated", "response_truncated")} for r in reports]
    assert cut[0] == cut[1] and sum(cut[0].values()) > 0.5 * reports[0]["used"], reports  # max_len cuts most
    a, b = metrics(runs["pairs"]), metrics(runs["ranking"])
    assert len(a) == len(b) == 6
    for x, y in zip(a, b, strict=True):
        assert abs(x["loss"] - y["loss"]) <= 1e-6 * abs(x["loss"]), (x["loss"], y["loss"])
        assert x["acc"] == y["acc"] and x["sequences"] == y["sequences"]


def test_four_responses_run_once_each_and_the_ranking_is_learned(tmp_path, tiny_pretrained):
    rows, test = rankings(96, 1), rankings(32, 2)
    data, held_out = write(tmp_path / "train.jsonl", rows), write(tmp_path / "test.jsonl", test)
    ranked = tmp_path / "ranked"
    train(ranked, train_args(tiny_pretrained, data, held_out, "zero3", **COMMON, max_steps=24, micro_batch_size=2,
                             eval_every=24, objective="ranking", ranking_loss="plackett_luce"))
    split = tmp_path / "split"  # the same rows split into pairs: 6 pairs, 12 sequences, per row
    train(split, train_args(tiny_pretrained, write(tmp_path / "pairs.jsonl", split_into_pairs(rows[:16])), None,
                            "zero2", **COMMON, max_steps=2, micro_batch_size=12, test_fraction=0, hf_export=False),
          launcher="python", nprocs=1)
    # per row and step: the ranking's 4 rows a step (2 per rank) run 4 sequences each; the split's 12 pairs a
    # step are 2 rows' worth (6 pairs each), and run 12 sequences per row
    assert {r["sequences"] / 4 for r in metrics(ranked)} == {4.0}
    assert {r["sequences"] / 2 for r in metrics(split)} == {12.0}
    e = metrics(ranked, "eval")[-1]
    assert e["prompts"] == 32 and e["responses"] == 32 * 4
    assert e["acc"] >= 0.9 and e["top1"] >= 0.8, e
    # reward.pt scores each response on its own, as the ranking trained it: its order matches the scores
    model = load_reward_model(ranked / "reward.pt")
    r = model.score_texts([(x["prompt"], y) for x in test for y in x["responses"]]).view(len(test), 4)
    right = sum(int((r[i, a] > r[i, b]) == (x["scores"][a] > x["scores"][b]))
                for i, x in enumerate(test) for a, b in itertools.combinations(range(4), 2))
    assert right / (32 * 6) == pytest.approx(e["acc"], abs=1 / (32 * 6))
    # rm-eval on the held-out file, and on the same rows in UltraFeedback's layout: the run's own eval metrics
    uf = [{"instruction": x["prompt"], "completions": [{"response": y, "overall_score": v, "fine-grained_score": 0}
                                                      for y, v in zip(x["responses"], x["scores"], strict=True)]}
          for x in test]
    uf_file = write(tmp_path / "uf.jsonl", uf)
    p = subprocess.run([sys.executable, "-m", "rm_trainer.cli.eval", "--model", str(ranked / "reward.pt"), "--data",
                        held_out, uf_file, "--output_dir", str(tmp_path / "eval")], cwd=ROOT, env=run_env(),
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads((tmp_path / "eval" / "rankings.json").read_text())
    assert got["prompts"] == 64 and got["responses"] == 64 * 4 and got["pairs"] == 64 * 6
    mine, theirs = got["per_file"][held_out], got["per_file"][uf_file]
    # one reward function: the layout changes no number (beyond fp32 rounding of the batch it lands in)
    assert (mine["acc"], mine["top1"], mine["pairs"]) == (theirs["acc"], theirs["top1"], theirs["pairs"])
    for loss in ("pairs", "plackett_luce"):
        assert mine["loss"][loss] == pytest.approx(theirs["loss"][loss], rel=1e-6)
    assert mine["acc"] == pytest.approx(e["acc"], abs=1 / (32 * 6))
    assert mine["top1"] == pytest.approx(e["top1"], abs=1 / 32)
    assert mine["loss"]["plackett_luce"] == pytest.approx(e["loss"], rel=1e-4)
    scored = [json.loads(line) for line in (tmp_path / "eval" / "ranking_scores.jsonl").read_text().splitlines()]
    assert [s["scores"] for s in scored[:32]] == [[float(v) for v in x["scores"]] for x in test]
    got_r = torch.tensor([s["rewards"] for s in scored[:32]])
    assert float((got_r - r).abs().max()) <= 1e-5 * float(r.abs().max())


def test_two_sequence_ranks_train_rankings_like_one_rank(tmp_path, tiny_pretrained):
    """--sequence_parallel 2 (packed, ZeRO-3) against one rank holding whole rows, same global batch: per-step
    losses, the first gradient norm and the held-out metrics within 1e-5 relative."""
    data, held_out = write(tmp_path / "train.jsonl", rankings(32, 3)), write(tmp_path / "t.jsonl", rankings(8, 4))
    flags = COMMON | {"max_steps": 6, "micro_batch_size": 2, "eval_every": 6, "objective": "ranking",
                      "packing": True, "pack_len": 64, "hf_export": False}
    e1, e2, m2 = one_rank_and_two_sequence_ranks(tmp_path, tiny_pretrained, data, held_out, flags, 6)
    assert {r["sequences"] for r in m2} == {8}
    assert e2["prompts"] == e1["prompts"] == 8 and (e2["acc"], e2["top1"]) == (e1["acc"], e1["top1"])
    assert abs(e2["loss"] - e1["loss"]) <= 1e-5 * e1["loss"]


def test_a_ranking_run_resumed_from_a_checkpoint_is_bit_exact(tmp_path, tiny_pretrained):
    args = train_args(tiny_pretrained, write(tmp_path / "train.jsonl", rankings(48, 5, k=3)), None, "zero2",
                      **COMMON, max_steps=8, micro_batch_size=2, save_every=2, test_fraction=0,
                      objective="ranking", hf_export=False)
    a, b = tmp_path / "uninterrupted", tmp_path / "resumed"
    train(a, args)
    resume_from_copy(a, b, args, 4)  # as a crash after step_4 leaves it (SIGKILL: the kill tests)
    assert [r["loss"] for r in metrics(a)] == [r["loss"] for r in metrics(b)]  # exact float equality
    assert same_artifact_weights(a, b)


def dry_run(tmp_path, model, data) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "launch/train_reward.py", "--model", model, "--data", data,
                           "--output_dir", str(tmp_path / "o"), "--objective", "ranking", "--dry-run"],
                          cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=300)


def test_bad_rows_and_pairs_files_are_named(tmp_path, tiny_pretrained):
    rows = rankings(6, 1)
    rows[3]["scores"] = rows[3]["scores"][:3]
    p = dry_run(tmp_path, tiny_pretrained, write(tmp_path / "bad.jsonl", rows))
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert f"{tmp_path / 'bad.jsonl'}:4: field 'scores' has 3 values for 4 responses" in p.stderr
    p = dry_run(tmp_path, tiny_pretrained, write(tmp_path / "pairs.jsonl", make_pairs(8, 1)))
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "holds preference pairs (chosen/rejected)" in p.stderr and "--objective pairs" in p.stderr, p.stderr
    good = dry_run(tmp_path, tiny_pretrained, write(tmp_path / "good.jsonl", rankings(40, 1)))
    assert good.returncode == 0, good.stderr[-3000:]
    assert "objective ranking (pairs loss): each response one sequence" in good.stdout
    # 4 rows of 4 responses: 6 pairs per row, 2 sequences each
    assert "splitting the rows into pairs would run 48.0" in good.stdout
