#!/usr/bin/env bash
# Qwen2.5-Coder-1.5B, the same 8 windows as run.sh: the ring in the model dtype (bf16) instead of int8, to
# tell the ring's int8 rounding of raw (uncentred) keys from the ring itself.
set -euo pipefail
cd "$(dirname "$0")/../.."
B=out/qwen2.5-coder-1.5b-instruct-bfloat16-basis.safetensors
D=benchmarks/cpu-qwen-int4-ring-2026-12-05
r() { echo "{\"format\": \"int4\", \"basis\": \"$B\", \"exact_window\": $1, \"exact_sink\": 1}"; }
python -P -m vllm_lowrank.evaluate --model qwen --text stdlib --windows 8 --basis $B --json $D/eval-8w-bf16ring.json \
  --formats vllm "$(r 8)" "$(r 32)"
