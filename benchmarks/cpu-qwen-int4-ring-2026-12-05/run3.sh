#!/usr/bin/env bash
# Qwen2.5-Coder-1.5B, the same 8 windows: an int8 ring of the last 8 without the first token (exact_sink 0),
# to tell the attention sink's int8 rounding from the window's.
set -euo pipefail
cd "$(dirname "$0")/../.."
B=out/qwen2.5-coder-1.5b-instruct-bfloat16-basis.safetensors
D=benchmarks/cpu-qwen-int4-ring-2026-12-05
python -P -m vllm_lowrank.evaluate --model qwen --text stdlib --windows 8 --basis $B --json $D/eval-8w-nosink.json \
  --formats vllm "{\"format\": \"int4\", \"basis\": \"$B\", \"exact_window\": 8, \"exact_sink\": 0, \"exact_dtype\": \"int8\"}" \
  "{\"format\": \"int4\", \"basis\": \"$B\", \"exact_window\": 0, \"exact_sink\": 1}"
