#!/usr/bin/env bash
# Qwen2.5-Coder-1.5B, 8 stdlib windows: the issue-5 candidate (int4 +offsets, first token and last W exact
# in an int8 ring) against plain int4 +offsets and vLLM's own cache. Needs scripts/setup_qwen.sh and
# `python -m vllm_lowrank.calibrate --model qwen --text stdlib --windows 16` (calib.log) first.
set -euo pipefail
cd "$(dirname "$0")/../.."
B=out/qwen2.5-coder-1.5b-instruct-bfloat16-basis.safetensors
r() { echo "{\"format\": \"int4\", \"basis\": \"$B\", \"exact_window\": $1, \"exact_sink\": 1, \"exact_dtype\": \"int8\"}"; }
python -P -m vllm_lowrank.evaluate --model qwen --text stdlib --windows 8 --basis $B --json benchmarks/cpu-qwen-int4-ring-2026-12-05/eval-8w.json \
  --formats vllm "{\"format\": \"int4\", \"basis\": \"$B\"}" "$(r 8)" "$(r 32)" "$(r 64)"
