#!/usr/bin/env bash
# Every GPU measurement in one script (< ~6 min on one H100/H200). Results: JSON files in $OUT
# (the device tool's output folder) or bench/results/gpu.
#   bash bench/gpu_suite.sh          # GPU: Llama-3.2-1B shape, T=2048, bf16, activation checkpointing
#   bash bench/gpu_suite.sh smoke    # CPU-sized smoke run of the same steps (the test suite runs this)
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-gpu}
out=${OUT:-bench/results/gpu}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if [ "$mode" = smoke ]; then
  "$py" bench/loss_memory.py --preset smoke --device cpu --dtypes bf16 --gc on --output "$out/loss_memory.json"
  "$py" bench/train_step.py --preset smoke --steps 2 --warmup 1 --dtype fp32 --output "$out/train_step.json"
  exit 0
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
# (a) ours vs (b) HF sequence classification vs (c) causal LM + value head: peak memory, saved bytes, FLOPs
timeout 300 "$py" bench/loss_memory.py --preset llama1b --device cuda --dtypes bf16 --gc on \
  --output "$out/loss_memory_llama1b.json" > "$out/loss_memory.log" 2>&1 || echo "loss_memory failed or timed out: rc=$?"
# full ZeRO-2 training steps: tokens/s and MFU
timeout 240 "$py" bench/train_step.py --preset llama1b --steps 10 --warmup 3 \
  --output "$out/train_step_llama1b.json" > "$out/train_step.log" 2>&1 || echo "train_step failed or timed out: rc=$?"
# shared prompts (issue 35) vs grouped and packed, real HH pairs, a 1B Llama shape at T=2048, bf16
timeout 420 "$py" bench/throughput.py --hidden 2048 --layers 16 --max_len 2048 --pack_len 4096 --dtype bf16 \
  --micro 8 --accum 4 --steps 4 --output "$out/throughput_shared_1b.json" > "$out/throughput.log" 2>&1 \
  || echo "throughput failed or timed out: rc=$?"
# the real entry point on CUDA/nccl, no code change: demo data, bf16, one process (ZeRO-2) and the
# deepspeed launcher (ZeRO-3, partitioned construction)
"$py" -m rm_trainer.demo /tmp/rm_demo >/dev/null
timeout 150 "$py" launch/train_reward.py --config launch/demo.yaml --model /tmp/rm_demo/model \
  --data /tmp/rm_demo/data/train.jsonl --test_data /tmp/rm_demo/data/test.jsonl --dtype bf16 \
  --output_dir /tmp/rm_gpu_z2 > "$out/e2e_z2.log" 2>&1 || echo "e2e zero2 failed: rc=$?"
timeout 150 "$py" -m deepspeed.launcher.runner --num_gpus 1 launch/train_reward.py --config launch/demo.yaml \
  --model /tmp/rm_demo/model --data /tmp/rm_demo/data/train.jsonl --test_data /tmp/rm_demo/data/test.jsonl \
  --dtype bf16 --gradient_checkpointing --ds_config ds_configs/zero3.json --output_dir /tmp/rm_gpu_z3 \
  > "$out/e2e_z3.log" 2>&1 || echo "e2e zero3 failed: rc=$?"
for r in z2 z3; do cp "/tmp/rm_gpu_$r/final_metrics.json" "$out/e2e_${r}_final.json" 2>/dev/null || true; done
ls -la "$out"
