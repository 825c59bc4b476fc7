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
