"""The benchmarks run (CPU-sized smoke mode of the GPU suite) and report what they claim."""

import json
import math
import subprocess
import sys

import pytest
from helpers import ROOT, SHARED_HH, run_env

pytestmark = pytest.mark.slow


def test_gpu_suite_smoke_mode(tmp_path):
    env = run_env() | {"OUT": str(tmp_path), "PYTHON": sys.executable}
    p = subprocess.run(["bash", "bench/gpu_suite.sh", "smoke"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-4000:]
    mem = json.loads((tmp_path / "loss_memory.json").read_text())
    (row,) = mem["runs"]
    assert row["dtype"] == "bf16" and row["gc"] is True
    for path in ("ours", "hf_seq", "causal", "backbone"):
        assert row[path]["saved_bytes"] > 0 and row[path]["flops"] > 0 and row[path]["peak_bytes"] > 0
    # the targets, measured: saved (a)/(b) <= 0.55, FLOPs <= 1.001x backbone, peaks
    assert mem["all_targets_met"], row["ratios"]
    assert row["ratios"]["hf_seq_extra_saved_in_layer_checkpoints"] > 3  # ~4 layers' worth
    step = json.loads((tmp_path / "train_step.json").read_text())
    assert step["tokens_per_s"] > 0 and all(math.isfinite(x) for x in step["losses"])
    assert step["zero_stage"] == 2 and step["device_name"] == "cpu"


def test_artifact_memory_bench_small_model(tmp_path):
    """The end-of-run commands (consolidate, load, export) run as separate processes on a real 2-rank
    ZeRO-3 checkpoint and report their peaks; the README's figures come from the default (0.3 B) size."""
    out = tmp_path / "am.json"
    small = ["--layers", "2", "--hidden", "256", "--inter", "512", "--vocab", "8000", "--hf_shard_size", "1MB"]
    p = subprocess.run([sys.executable, "bench/artifact_memory.py", *small, "--output", str(out)], cwd=ROOT,
                       env=run_env(), capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-4000:]
    r = json.loads(out.read_text())
    assert set(r["runs"]) == {"baseline", "consolidate", "end_of_run", "load", "export"}
    assert all(x["peak_rss_gib"] > r["runs"]["baseline"]["peak_rss_gib"] * 0.9 for x in r["runs"].values())
    assert r["bounds_met"] and r["hf_loads_cleanly"]
    assert "model.safetensors.index.json" in r["hf_files"] and len(r["hf_files"]) > 2  # 1MB shards


@pytest.mark.skipif(not SHARED_HH.is_file(), reason=f"real HH-RLHF pairs not found at {SHARED_HH}")
def test_prepare_data_bench_second_start_hits_the_cache(tmp_path):
    out = tmp_path / "pd.json"
    p = subprocess.run([sys.executable, "bench/prepare_data.py", "--pairs", "3000", "--formats", "jsonl,conversational",
                        "--output", str(out)], cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-4000:]
    r = json.loads(out.read_text())
    for fmt in ("jsonl", "conversational"):
        first, second = r["runs"][fmt]["first"], r["runs"][fmt]["second"]
        assert first["cache_hit"] is False and second["cache_hit"] is True
        assert first["train_pairs"] == second["train_pairs"] > 2900 and first["peak_pss_gib"] > 0


@pytest.mark.skipif(not SHARED_HH.is_file(), reason=f"real HH-RLHF pairs not found at {SHARED_HH}")
def test_throughput_bench_smoke_runs_every_mode_with_equal_losses(tmp_path):
    out = tmp_path / "tp.json"
    p = subprocess.run([sys.executable, "bench/throughput.py", "--smoke", "--threads", "1", "--output", str(out)],
                       cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-4000:]
    r = json.loads(out.read_text())
    assert set(r["modes"]) == {"random", "grouped", "packed", "shared", "shared_packed", "default"}
    assert r["pairs"] == 2308
    m = r["modes"]
    assert m["random"]["efficiency"] < m["packed"]["efficiency"] <= 1 and m["grouped"]["efficiency"] > 0
    # shared prompts forward fewer tokens per epoch than any unshared mode (the batching code's count)
    assert m["shared"]["epoch_tokens"] < m["packed"]["epoch_tokens"] == m["grouped"]["epoch_tokens"]
    assert all(x["tokens_per_s"] > 0 and len(x["losses"]) == 2 for x in m.values())
    assert r["max_loss_difference"] <= 1e-5  # the same global batches: the same steps
    assert "shared pairs/s >= 1.3x packed" in r["targets"] and "shared tokens/epoch <= 0.70x packed" in r["targets"]


def test_score_speed_bench_smoke(tmp_path):
    """rm-score's batching on the real HH texts: sorted batches pad less than input-order ones, and both
    give the same rewards; the README's ratio comes from the default size."""
    if not SHARED_HH.is_file():
        pytest.skip(f"real HH-RLHF pairs not found at {SHARED_HH}")
    out = tmp_path / "score.json"
    p = subprocess.run([sys.executable, "bench/score_speed.py", "--smoke", "--output", str(out)], cwd=ROOT,
                       env=run_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    r = json.loads(out.read_text())
    assert r["rewards_agree"] and r["rows"] == 64
    m = r["modes"]
    assert m["sorted"]["padding_efficiency"] > m["unsorted"]["padding_efficiency"]
    # sorted batches are split at the budget and wherever a quarter would be padding (data.batching.MIN_FILL):
    # they may take a forward or two more than input order, and are never under 3/4 real tokens
    assert m["sorted"]["padding_efficiency"] >= 0.75
    b = r["best_of_8"]  # the smoke's max_len 128 cuts most HH prompts, and a cut prompt is cut per response
    assert b["rows"] == 64 and b["max_relative_reward_difference"] <= 1e-5
    assert b["modes"]["shared"]["tokens_forwarded"] < b["modes"]["unshared"]["tokens_forwarded"] == b["real_tokens"]


def test_serve_bench_smoke_reports_every_mode_and_concurrency(tmp_path):
    """The real rm-serve process under closed-loop clients; the README's table comes from the default sizes."""
    if not SHARED_HH.is_file():
        pytest.skip(f"{SHARED_HH} not found")
    out = tmp_path / "serve.json"
    p = subprocess.run([sys.executable, "bench/serve_speed.py", "--smoke", "--output", str(out)], cwd=ROOT,
                       env=run_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    r = json.loads(out.read_text())
    assert set(r["modes"]) == {"batching", "max_wait_0", "off"}
    for mode in r["modes"].values():
        for c, run in mode["concurrency"].items():
            assert run["requests_per_s"] > 0 and 0 < run["p50_ms"] <= run["p99_ms"], (c, run)
    assert r["modes"]["off"]["concurrency"]["8"]["rows_per_forward"] == 1.0  # batching off: one request a forward
    assert r["batching_over_off_requests_per_s_at_max_concurrency"] > 0


def test_cli_startup_bench_times_every_command(tmp_path):
    """What docs/benchmarks.md's start-up table comes from; here once per command, this installation only."""
    out = tmp_path / "startup.json"
    p = subprocess.run([sys.executable, "bench/cli_startup.py", "--repeat", "1", "--output", str(out)], cwd=ROOT,
                       env=run_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    r = json.loads(out.read_text())["now"]
    assert len(r["help"]) == len(r["version"]) == 8
    assert all(x["exit"] == [0] and x["seconds"] > 0 for x in [*r["help"].values(), *r["version"].values()])
    assert r["config_error"]["exit"] == [2]


def test_hf_consumers_bench_smoke_runs_the_consumers_of_two_styles(tmp_path):
    """What docs/serving.md's consumer table comes from, at 2 styles and 4 training steps."""
    if not SHARED_HH.is_file():
        pytest.skip(f"{SHARED_HH} not found")
    out = tmp_path / "hfc.json"
    p = subprocess.run([sys.executable, "bench/hf_consumers.py", "--smoke", "--output", str(out)], cwd=ROOT,
                       env=run_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    r = json.loads(out.read_text())
    assert set(r["styles"]) == {"bos", "chat"} and "rewardbench" in r["styles"]["chat"]
    assert r["worst_rel"] <= 1e-5  # every consumer scores as training did


def test_one_reward_bench_smoke_single_is_score_texts_and_pair_is_not(tmp_path):
    """What docs/evaluation.md's one-reward figures come from, at 2 training steps."""
    if not SHARED_HH.is_file():
        pytest.skip(f"{SHARED_HH} not found")
    out = tmp_path / "one.json"
    p = subprocess.run([sys.executable, "bench/one_reward.py", "--smoke", "--output", str(out)], cwd=ROOT,
                       env=run_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    r = json.loads(out.read_text())
    assert r["pairs_over_max_len"] > 0  # the policies can differ on this file
    assert r["single"]["reward_vs_score_texts"]["max_rel"] <= 1e-5 and r["single"]["subset_acc_max_diff_points"] == 0
    assert r["pair"]["reward_vs_score_texts"]["max_rel"] > 1e-3  # the loss's view is another function


def test_long_context_bench_measures_both_sizes_and_the_8b_table(tmp_path):
    """bench/long_context.py at one short length: N=1 and N=2 score the same pair, each rank saves half of
    what one rank saves, and the 8B table needs more sequence ranks the longer the input."""
    out = tmp_path / "lc.json"
    p = subprocess.run([sys.executable, "bench/long_context.py", "--lengths", "512", "--output", str(out)], cwd=ROOT,
                       env=run_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    r = json.loads(out.read_text())
    assert [(x["n"], x["t"]) for x in r["runs"]] == [(1, 512), (2, 512)]
    assert r["rewards_max_rel_diff_n2_vs_n1"] <= 1e-5
    assert r["autograd_saved_ratio_n2_over_n1"]["512"] == pytest.approx(0.5, abs=0.01)
    need = r["table_8b"]["smallest_n_that_fits"]
    assert need["16384"] == 1 and need["131072"] >= 2 and need["131072"] >= need["65536"]
    row = r["table_8b"]["rows"][0]
    assert row["activations_gib_tiled_mlp"] < row["activations_gib"]


def test_objectives_bench_counts_a_third_of_the_split_s_sequences(tmp_path):
    """bench/objectives.py --smoke: four responses per row run 4 sequences, their six pairs 12; the epoch
    takes fewer seconds (the timed ratio is the benchmark's to report, not this test's)."""
    out = tmp_path / "obj.json"
    p = subprocess.run([sys.executable, "bench/objectives.py", "--smoke", "--output", str(out)], cwd=ROOT,
                       env=run_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    r = json.loads(out.read_text())
    assert (r["ranking"]["sequences_per_row"], r["pair_split"]["sequences_per_row"]) == (4.0, 12.0)
    assert r["sequences_ratio_split_over_ranking"] == 3.0
    assert r["ranking"]["steps_per_epoch"] == r["pair_split"]["steps_per_epoch"] == 4


def test_objective_exactness_bench_smoke(tmp_path):
    """Every fused objective against its float64 definition: fp32 within 1e-5 relative, bf16 gradients
    within one bf16 rounding (2^-8) of the largest gradient."""
    out = tmp_path / "exact.json"
    p = subprocess.run([sys.executable, "bench/objective_exactness.py", "--batches", "5", "--output", str(out)],
                       cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    r = json.loads(out.read_text())["objectives"]
    assert set(r) == {"ranking_pairs", "plackett_luce", "regression", "soft_ties", "davidson"}
    for name, by_dtype in r.items():
        assert by_dtype["float32"]["max_loss_rel_err"] <= 1e-5 and by_dtype["float32"]["max_grad_rel_err"] <= 1e-5
        assert by_dtype["bfloat16"]["max_loss_rel_err"] <= 1e-5, name  # the loss is fp32 from bf16 rewards
        assert 0 < by_dtype["bfloat16"]["max_grad_rel_err"] <= 2 ** -8 * 1.01, name
