"""rm-score: token-budgeted sorted batches, the same rewards as score_texts (bit for bit), 1 process vs 2
ranks byte-identical, kill -9 then rerun, best-of-n, and bad rows named by file:line:field."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import BIN, ROOT, free_port, run_env

from rm_trainer import load_reward_model
from rm_trainer.data.batching import token_budget_batches
from rm_trainer.errors import DataError
from rm_trainer.use.rows import RowKeys as Keys
from rm_trainer.use.rows import detect_row_format as detect_format
from rm_trainer.use.rows import row_items


def test_token_budget_batches_cover_every_index_once_within_the_budget():
    lengths = [5, 40, 7, 7, 300, 12, 1, 39, 40]
    batches = token_budget_batches(lengths, 80)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert max(lengths[i] for i in b) * len(b) <= 80 or len(b) == 1  # 300 > 80 gets a batch of its own
        assert [lengths[i] for i in b] == sorted((lengths[i] for i in b), reverse=True)
        assert min(lengths[i] for i in b) >= 0.75 * max(lengths[i] for i in b)  # at most a quarter padding
    # 300 | 40 40 (x3 > 80) | 39 | 12 (< 0.75 x 39) | 7 7 | 5 (< 0.75 x 7) | 1
    assert [[lengths[i] for i in b] for b in batches] == [[300], [40, 40], [39], [12], [7, 7], [5], [1]]
    assert token_budget_batches(lengths, 80, sort=False)[0] == [0, 1]  # input order: 40 x 3 > 80
    assert token_budget_batches([10, 2, 10], 1000, sort=False) == [[0, 1, 2]]  # the baseline: budget only


def test_format_is_decided_from_the_columns_and_bad_rows_name_file_line_field():
    keys = Keys()
    assert detect_format(["prompt", "responses", "id"], keys, "f") == "responses"
    assert detect_format(["prompt", "response"], keys, "f") == "response"
    assert detect_format(["messages", "text"], keys, "f") == "messages"
    with pytest.raises(DataError, match="f.jsonl: columns \\['q', 'a'\\] hold none of.*--text_key"):
        detect_format(["q", "a"], keys, "f.jsonl")
    with pytest.raises(DataError, match="f.jsonl:3: field 'prompt': expected text, got None"):
        row_items({"prompt": None, "response": "x"}, "response", keys, "f.jsonl:3")
    with pytest.raises(DataError, match="field 'responses': expected a non-empty list of texts"):
        row_items({"prompt": "p", "responses": []}, "responses", keys, "f:1")
    with pytest.raises(DataError, match="the last message must be the assistant's"):
        row_items({"messages": [{"role": "user", "content": "hi"}]}, "messages", keys, "f:1")
    assert row_items({"prompt": "p", "responses": ["a", "b"]}, "responses", keys, "f:1") == [("p", "a"), ("p", "b")]


# ---------------------------------------------------------------- real commands on a trained model
def score(args: list[str], launcher: list[str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = (launcher or [sys.executable, "-m"]) + ["rm_trainer.cli.score"] + args
    p = subprocess.run(cmd, cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=600)
    if check:
        assert p.returncode == 0, p.stderr[-4000:]
    return p


@pytest.fixture(scope="module")
def inputs(demo_assets, tmp_path_factory):
    rows = [json.loads(line) for line in open(demo_assets["test"])]
    d = tmp_path_factory.mktemp("score_in")
    files = {
        "text": [{"text": r["prompt"] + r["chosen"], "n": i} for i, r in enumerate(rows)],
        "pairs": [{"prompt": r["prompt"], "response": r[k]} for r in rows for k in ("chosen", "rejected")],
        "bon": [{"prompt": r["prompt"], "responses": [r["chosen"], r["rejected"], r["chosen"] + " more"]}
                for r in rows],
    }
    for name, data in files.items():
        with open(d / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(x) + "\n" for x in data)
    return d


@pytest.mark.slow
def test_scores_equal_score_texts_bit_for_bit_from_reward_pt_and_hf_folder(run, inputs, tmp_path):
    out = run("torchrun_z3_w2")
    rm = load_reward_model(out / "reward.pt")
    rows = [json.loads(line) for line in open(inputs / "pairs.jsonl")]
    want = rm.score_texts([(r["prompt"], r["response"]) for r in rows], max_batch_tokens=512)
    for model in ("reward.pt", "hf"):
        dest = tmp_path / f"{model}.jsonl"
        score(["--model", str(out / model), "--data", str(inputs / "pairs.jsonl"), "--output", str(dest),
               "--max_batch_tokens", "512", "--chunk_rows", "4096"])
        got = [json.loads(line) for line in open(dest)]
        assert [{k: v for k, v in g.items() if k != "reward"} for g in got] == rows  # same rows, same order
        assert torch.equal(torch.tensor([g["reward"] for g in got]), want), model
    assert (tmp_path / "reward.pt.jsonl").read_bytes() == (tmp_path / "hf.jsonl").read_bytes()
    # --normalize: the held-out statistics of the artifact
    score(["--model", str(out / "reward.pt"), "--data", str(inputs / "pairs.jsonl"), "--output",
           str(tmp_path / "n.jsonl"), "--max_batch_tokens", "512", "--chunk_rows", "4096", "--normalize"])
    stats = torch.load(out / "reward.pt", weights_only=True, mmap=True)["reward_stats"]
    norm = torch.tensor([json.loads(line)["reward"] for line in open(tmp_path / "n.jsonl")])
    assert torch.allclose(norm, (want - stats["mean"]) / stats["std"], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_two_ranks_write_the_same_file_as_one_and_best_of_n_is_the_argmax(run, inputs, tmp_path):
    model = str(run("torchrun_z3_w2") / "reward.pt")
    args = ["--model", model, "--data", str(inputs / "bon.jsonl"), "--chunk_rows", "7", "--max_batch_tokens", "256"]
    score(args + ["--output", str(tmp_path / "one.parquet")])
    torchrun = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
                str(free_port()), "-m"]
    score(args + ["--output", str(tmp_path / "two.parquet")], launcher=torchrun)
    from datasets import Dataset

    one, two = (Dataset.from_parquet(str(tmp_path / f"{n}.parquet")).to_list() for n in ("one", "two"))
    assert one == two and len(one) == sum(1 for _ in open(inputs / "bon.jsonl"))
    for row in one:
        assert len(row["rewards"]) == 3 and row["best_index"] == max(range(3), key=row["rewards"].__getitem__)
    rm = load_reward_model(model)
    direct = rm.score_texts([(one[0]["prompt"], r) for r in one[0]["responses"]])
    assert torch.allclose(direct, torch.tensor(one[0]["rewards"]), rtol=1e-5, atol=0)
    assert not (tmp_path / "two.parquet.parts").exists()


@pytest.mark.slow
def test_a_killed_run_continues_from_its_finished_chunks_to_the_same_output(run, inputs, tmp_path):
    model = str(run("torchrun_z3_w2") / "reward.pt")
    big = tmp_path / "big.jsonl"
    text = (inputs / "text.jsonl").read_text()
    big.write_text(text * 120)  # ~5,800 rows, ~90 chunks
    args = ["--model", model, "--data", str(big), "--chunk_rows", "64"]
    score(args + ["--output", str(tmp_path / "whole.jsonl")])
    dest = tmp_path / "killed.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "rm_trainer.cli.score", *args, "--output", str(dest)], cwd=ROOT,
                            env=run_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = tmp_path / "killed.jsonl.parts"
    deadline = time.time() + 300
    while len(list(parts.glob("*.jsonl"))) < 3:
        assert proc.poll() is None and time.time() < deadline, "finished (or failed) before it could be killed"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not dest.exists()
    report = json.loads(score(args + ["--output", str(dest)]).stdout.strip().splitlines()[-1])
    assert 3 <= report["resumed_chunks"] < 91 and report["scored_here"] < report["rows"]
    assert dest.read_bytes() == (tmp_path / "whole.jsonl").read_bytes()


@pytest.mark.slow
def test_a_bad_row_is_named_or_counted_and_left_out(run, inputs, tmp_path):
    model = str(run("torchrun_z3_w2") / "reward.pt")
    rows = (inputs / "pairs.jsonl").read_text().splitlines()
    rows[2] = json.dumps({"prompt": None, "response": "x"})
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(rows) + "\n")
    p = score(["--model", model, "--data", str(bad), "--output", str(tmp_path / "o.jsonl")], check=False)
    assert p.returncode == 2 and f"{bad}:3: field 'prompt': expected text, got None" in p.stderr
    assert "Traceback" not in p.stderr
    p = score(["--model", model, "--data", str(bad), "--output", str(tmp_path / "o.jsonl"), "--on_error", "skip"])
    report = json.loads((tmp_path / "o.jsonl.report.json").read_text())
    assert report["dropped"] == {"malformed": 1} and report["written"] == len(rows) - 1
    assert sum(1 for _ in open(tmp_path / "o.jsonl")) == len(rows) - 1


@pytest.mark.slow
def test_best_of_8_rows_and_repeated_prompts_share_each_prompt_and_keep_each_responses_reward(run, demo_assets,
                                                                                            tmp_path):
    """A row of one prompt and 8 responses, and consecutive rows repeating a prompt, encode the prompt once
    (the report's tokens_forwarded), and every reward is that of its (prompt, response) scored alone."""
    model = str(run("torchrun_z3_w2") / "reward.pt")
    rows = [json.loads(line) for line in open(demo_assets["test"])]
    best = [{"prompt": r["prompt"], "responses": [x[k] for x in rows[i:i + 4] for k in ("chosen", "rejected")]}
            for i, r in enumerate(rows[:24])]
    repeated = [{"prompt": b["prompt"], "response": x} for b in best for x in b["responses"]]
    rm = load_reward_model(model)
    alone = torch.tensor([float(rm.score_texts([(r["prompt"], r["response"])], share_prompt="off")[0])
                          for r in repeated])
    for name, data in (("bo8", best), ("repeated", repeated)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in data))
        reports = {}
        for share in ("auto", "off"):
            dest = tmp_path / f"{name}_{share}.jsonl"
            p = score(["--model", model, "--data", str(tmp_path / f"{name}.jsonl"), "--output", str(dest),
                       "--share_prompt", share])
            reports[share] = json.loads(p.stdout.strip().splitlines()[-1])
            got = [json.loads(line) for line in open(dest)]
            flat = torch.tensor([x for g in got for x in (g["rewards"] if name == "bo8" else [g["reward"]])])
            assert float((flat - alone).abs().max()) <= 1e-5 * float(alone.abs().max()), (name, share)
        on, off = reports["auto"], reports["off"]
        assert on["sequences"] == off["sequences"] == len(repeated) and on["tokens"] == off["tokens"]
        assert off["tokens_forwarded"] == off["tokens"] and on["tokens_forwarded"] < 0.8 * on["tokens"], on
