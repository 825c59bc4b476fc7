"""rm-eval end to end on a trained model: RewardBench v1/v2 fixtures, rewards equal score_texts bit for bit,
results invariant to batch size and padding side, the report and pictures, bad rows named, and the
end-of-training held-out report agreeing with rm-eval on the same file."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import torch
from helpers import BIN, ROOT, run_env

from rm_trainer import load_reward_model
from rm_trainer.eval.files import EvalOptions, evaluate
from rm_trainer.eval.rewardbench import v1_sections, v2_scores

V1_SUBSETS = ("alpacaeval-easy", "mt-bench-hard", "refusals-dangerous", "math-prm", "hep-python",
              "xstest-should-respond")


@pytest.fixture(scope="module")
def fixtures(demo_assets, tmp_path_factory):
    rows = [json.loads(line) for line in open(demo_assets["test"])]
    d = tmp_path_factory.mktemp("rb")
    v1 = [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"], "subset": V1_SUBSETS[i % 6],
           "id": i} for i, r in enumerate(rows)]
    v2 = [{"id": i, "prompt": rows[i]["prompt"], "chosen": [rows[i]["chosen"]],
           "rejected": [rows[i]["rejected"], rows[i + 1]["rejected"], rows[i + 2]["rejected"]],
           "subset": ("Factuality", "Math")[i % 2]} for i in range(0, 30, 3)]
    for k in range(3):
        a, b = rows[k], rows[k + 10]
        v2 += [{"id": f"ref:{k}", "prompt": a["prompt"], "chosen": [a["chosen"]], "rejected": [a["rejected"]],
                "subset": "Ties"},
               {"id": f"tied:{k}", "prompt": a["prompt"], "chosen": [a["chosen"], b["chosen"]],
                "rejected": [a["rejected"], b["rejected"]], "subset": "Ties"}]
    for name, data in (("rb1.jsonl", v1), ("rb2.jsonl", v2)):
        with open(d / name, "w") as f:
            f.writelines(json.dumps(x) + "\n" for x in data)
    return d, v1, v2


def rm_eval(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "rm-eval"), *args], cwd=ROOT, env=run_env(), capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_rewardbench_fixtures_scores_equal_score_texts_and_report(run, fixtures, tmp_path):
    out = run("torchrun_z3_w2")
    d, v1, v2 = fixtures
    p = rm_eval("--model", str(out / "reward.pt"), "--data", str(d / "rb1.jsonl"), str(d / "rb2.jsonl"),
                "--output-dir", str(tmp_path / "eval"))
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    result = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    scores = [json.loads(line) for line in open(tmp_path / "eval" / "scores.jsonl")]

    # every reward is score_texts' reward, bit for bit (same items in the same order: the same batches)
    rm = load_reward_model(out / "reward.pt")
    items = ([(r["prompt"], r["chosen"]) for r in v1] + [(r["prompt"], r["rejected"]) for r in v1]
             + [(r["prompt"], x) for r in v2 for x in r["chosen"] + r["rejected"]])
    want = rm.score_texts(items)
    n = len(v1)
    got = torch.tensor([s["chosen"] for s in scores[:n]] + [s["rejected"] for s in scores[:n]]
                       + [x for s in scores[n:] for x in s["scores"]])
    assert torch.equal(got, want)

    # the weighting applied to those rewards
    acc = {s: sum(float(want[i] > want[n + i]) for i in range(n) if v1[i]["subset"] == s)
           / sum(v1[i]["subset"] == s for i in range(n)) for s in V1_SUBSETS}
    assert result["rewardbench"]["sections"] == pytest.approx(v1_sections(acc)["sections"], rel=1e-12)
    k, prompts = 2 * n, []
    for r in v2:
        m = len(r["chosen"]) + len(r["rejected"])
        prompts.append({"subset": r["subset"], "id": r["id"], "num_correct": len(r["chosen"]),
                        "scores": want[k:k + m].tolist()})
        k += m
    assert result["rewardbench2"]["score"] == pytest.approx(v2_scores(prompts)["score"], rel=1e-12)
    assert summary["rewardbench"] == pytest.approx(result["rewardbench"]["score"])
    assert summary["pictures"] is True

    report = (tmp_path / "eval" / "report.md").read_text()
    for needle in ("## RewardBench (v1 section weighting)", "| Chat Hard |", "## RewardBench 2", "| Ties |",
                   "| hep-python |", "prefer-longer %", "ECE", "![calibration](calibration.png)"):
        assert needle in report, needle
    for png in ("rewards.png", "calibration.png", "length_gap.png"):
        data = (tmp_path / "eval" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, png


@pytest.mark.slow
def test_results_do_not_depend_on_batch_size_or_padding_side(run, fixtures):
    rm = load_reward_model(run("torchrun_z3_w2") / "reward.pt")
    d, _, _ = fixtures
    files = [str(d / "rb1.jsonl"), str(d / "rb2.jsonl")]
    base, _, c0, r0 = evaluate(rm, files, EvalOptions(max_batch_tokens=16384, padding_side="right"))
    for budget, side in ((64, "right"), (1, "right"), (16384, "left"), (200, "left")):
        other, _, c, r = evaluate(rm, files, EvalOptions(max_batch_tokens=budget, padding_side=side))
        scale = float(torch.cat([c0, r0]).abs().max())
        assert torch.allclose(c, c0, rtol=1e-5, atol=1e-5 * scale) and torch.allclose(r, r0, rtol=1e-5,
                                                                                       atol=1e-5 * scale)
        for g, v in base["diagnostics"]["groups"].items():
            w = other["diagnostics"]["groups"][g]
            assert (w["n"], w["acc"], w["prefer_longer_acc"]) == (v["n"], v["acc"], v["prefer_longer_acc"]), g
            assert w["margin"] == pytest.approx(v["margin"], rel=1e-4, abs=1e-5)
        assert other["rewardbench"]["sections"] == base["rewardbench"]["sections"], (budget, side)
        assert other["rewardbench2"]["subsets"]["Math"] == base["rewardbench2"]["subsets"]["Math"]


@pytest.mark.slow
def test_end_of_training_report_agrees_with_rm_eval_on_the_held_out_file(run, demo_assets, tmp_path):
    out = run("torchrun_z3_w2")
    for f in ("report.md", "metrics.json", "rewards.png", "calibration.png", "length_gap.png"):
        assert (out / "eval" / f).is_file(), f
    live = json.loads((out / "eval" / "metrics.json").read_text())["diagnostics"]
    p = rm_eval("--model", str(out / "hf"), "--data", demo_assets["test"], "--output_dir", str(tmp_path))
    assert p.returncode == 0, p.stderr[-3000:]
    art = json.loads((tmp_path / "metrics.json").read_text())["diagnostics"]
    assert art["pairs"] == live["pairs"] and art["acc"] == live["acc"]
    assert art["prefer_longer_acc"] == live["prefer_longer_acc"]  # same pairs, same response lengths
    assert art["margin"]["mean"] == pytest.approx(live["margin"]["mean"], rel=1e-4)
    assert art["ece"] == pytest.approx(live["ece"], rel=1e-3, abs=1e-6)
    events = b"".join(f.read_bytes() for f in (out / "tb").rglob("events.out.tfevents.*"))
    assert b"eval/reward_chosen" in events and b"eval/ece" in events  # histograms and diagnostics each eval


def test_bad_rows_are_named_by_file_line_and_field(run, tmp_path):
    bad = tmp_path / "v2.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "chosen": ["a"], "rejected": ["b"], "subset": "Math"}) + "\n"
                   + json.dumps({"prompt": "p", "chosen": ["a"], "rejected": [], "subset": "Math"}) + "\n")
    model = tmp_path / "rm" / "reward.pt"  # a copy: the shared run's folder keeps exactly its own files
    model.parent.mkdir()
    shutil.copy(run("torchrun_z3_w2") / "reward.pt", model)
    p = rm_eval("--model", str(model), "--data", str(bad))
    assert p.returncode == 2 and f"{bad}:2: field 'rejected'" in p.stderr and "Traceback" not in p.stderr
    p = rm_eval("--model", str(model), "--data", str(bad), "--on_error", "skip")
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads(p.stdout.strip().splitlines()[-1])["dropped"] == {"malformed": 1}
    assert (model.parent / "eval" / "v2" / "report.md").is_file()  # default: eval/<data name>/ beside the model


@pytest.fixture(scope="module")
def long_run(demo_assets, tiny_pretrained, tmp_path_factory):
    """A short run whose held-out pairs are all longer than max_len on both sides, at different lengths:
    the pair policy (one prompt cut for both) and each response's own encoding differ."""
    from helpers import train, train_args

    rows = [json.loads(line) for line in open(demo_assets["test"])]
    d = tmp_path_factory.mktemp("long")
    long = [{"prompt": r["prompt"] * 4, "chosen": r["chosen"] * (1 + i % 3), "rejected": r["rejected"] * (2 - i % 2)}
            for i, r in enumerate(rows)]
    (d / "long.jsonl").write_text("".join(json.dumps(r) + "\n" for r in long))
    out = d / "run"
    train(out, train_args(tiny_pretrained, demo_assets["train"], d / "long.jsonl", "zero2", dtype="fp32", lr=1e-3,
                          max_steps=4, warmup_steps=1, max_len=48, seed=3, micro_batch_size=4, hf_export=True),
          launcher="python",
          nprocs=1)
    return out, d / "long.jsonl", long


@pytest.mark.slow
def test_a_reward_is_a_function_of_prompt_and_response_alone_in_every_path(long_run, tmp_path):
    from helpers import Server

    out, path, long = long_run
    n = len(long)
    single = rm_eval("--model", str(out / "reward.pt"), "--data", str(path), "--output_dir", str(tmp_path / "s"))
    pair = rm_eval("--model", str(out / "reward.pt"), "--data", str(path), "--output_dir", str(tmp_path / "p"),
                   "--truncation", "pair")
    assert single.returncode == 0 and pair.returncode == 0, single.stderr[-2000:] + pair.stderr[-2000:]
    s_rows = [json.loads(x) for x in open(tmp_path / "s" / "scores.jsonl")]
    p_rows = [json.loads(x) for x in open(tmp_path / "p" / "scores.jsonl")]
    assert [r["id"] for r in s_rows] == [f"{path}:{i + 1}" for i in range(n)]  # joins back to the data
    got = torch.tensor([r["chosen"] for r in s_rows] + [r["rejected"] for r in s_rows])
    as_pair = torch.tensor([r["chosen"] for r in p_rows] + [r["rejected"] for r in p_rows])
    scale = float(got.abs().max())
    print(f"\nrm-eval per-response reward, pair vs single truncation: max |diff| "
          f"{float((as_pair - got).abs().max()):.4g} (reward scale {scale:.3g})")
    assert float((as_pair - got).abs().max()) > 1e-3 * scale  # the two policies do differ on these pairs

    # rm-score, rm-serve and score_texts give rm-eval's rewards for the same (prompt, response) rows
    items = [(r["prompt"], r["chosen"]) for r in long] + [(r["prompt"], r["rejected"]) for r in long]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps({"prompt": p, "response": x}) + "\n" for p, x in items))
    p = subprocess.run([str(BIN / "rm-score"), "--model", str(out / "reward.pt"), "--data",
                        str(tmp_path / "rows.jsonl"), "--output", str(tmp_path / "scored.jsonl")], cwd=ROOT,
                       env=run_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    scored = torch.tensor([json.loads(x)["reward"] for x in open(tmp_path / "scored.jsonl")])
    rm = load_reward_model(out / "reward.pt")
    tol = {"rtol": 1e-5, "atol": 1e-5 * scale}
    assert torch.allclose(scored, got, **tol) and torch.allclose(rm.score_texts(items), got, **tol)
    server = Server(out / "reward.pt")
    try:
        import asyncio

        import aiohttp

        async def ask():
            async with aiohttp.ClientSession() as s, s.post(
                    server.url + "/score", json={"rows": [{"prompt": p, "response": x} for p, x in items]},
                    headers={"Authorization": "Bearer test-key-123"}) as r:
                return r.status, await r.json()

        code, body = asyncio.run(ask())
    finally:
        server.stop()
    assert code == 200 and torch.allclose(torch.tensor([x["reward"] for x in body["results"]]), got, **tol)

    # the HF export, where the whole text fits max_len
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out / "hf")
    hf = AutoModelForSequenceClassification.from_pretrained(out / "hf").eval()
    fits = [i for i, (p_, x) in enumerate(items) if len(tok(p_ + x)["input_ids"]) <= rm.max_len]
    assert fits, "no text fits: the HF check would be empty"
    with torch.no_grad():
        hf_r = torch.stack([hf(**tok(items[i][0] + items[i][1], return_tensors="pt")).logits[0, 0] for i in fits])
    assert torch.allclose(hf_r, got[fits], **tol)

    # the run's own numbers: eval/* (the loss's view) is rm-eval --truncation pair; OUT/eval/ is rm-eval
    live = json.loads((out / "final_metrics.json").read_text())["eval"]
    pair_m = json.loads((tmp_path / "p" / "metrics.json").read_text())["diagnostics"]
    assert live["pairs"] == pair_m["pairs"] and live["acc"] == pytest.approx(pair_m["acc"], abs=1e-9)
    report = json.loads((out / "eval" / "metrics.json").read_text())["diagnostics"]
    single_m = json.loads((tmp_path / "s" / "metrics.json").read_text())["diagnostics"]
    assert report["pairs"] == single_m["pairs"] and report["acc"] == single_m["acc"]
    assert report["margin"]["mean"] == pytest.approx(single_m["margin"]["mean"], rel=1e-4)


@pytest.mark.slow
def test_empty_and_whitespace_responses_are_scored_as_prompt_then_eos(run, tmp_path):
    """What a policy can emit gets a reward in rm-score, rm-serve's rows and rm-eval: the prompt and EOS."""
    model = run("torchrun_z3_w2") / "reward.pt"
    rm = load_reward_model(model)
    rows = [{"prompt": "Human: hi Assistant:", "response": r} for r in ("", " ", "\n", " fine")]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    p = subprocess.run([str(BIN / "rm-score"), "--model", str(model), "--data", str(tmp_path / "r.jsonl"),
                        "--output", str(tmp_path / "o.jsonl")], cwd=ROOT, env=run_env(), capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    got = torch.tensor([json.loads(x)["reward"] for x in open(tmp_path / "o.jsonl")])
    want = rm.score_texts([(r["prompt"], r["response"]) for r in rows])
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    eos = rm.tokenizer.eos_token_id
    ids = rm.tokenizer("Human: hi Assistant:", add_special_tokens=True)["input_ids"]
    ids = [i for i in ids if i != eos] + [eos]  # the prompt, then EOS: what training builds for ""
    assert float(rm(torch.tensor([ids]), torch.tensor([len(ids)]))[0]) == pytest.approx(float(got[0]), rel=1e-5)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "Human: hi Assistant:", "chosen": " fine", "rejected": " "}) + "\n")
    p = rm_eval("--model", str(model), "--data", str(pairs), "--output_dir", str(tmp_path / "e"))
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["diagnostics"]["pairs"] == 1
