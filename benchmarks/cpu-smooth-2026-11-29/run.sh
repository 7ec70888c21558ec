#!/bin/bash
# vLLM CPU evaluation of query-weighted key smoothing (prefill_from_cache), SmolLM2-135M, rotated int4.
# Usage: run.sh WINDOWS OUT_PREFIX   (from the repository root)
W=${1:-4}; OUT=${2:-benchmarks/cpu-smooth-2026-11-29/run-${W}w}
B=bases/smollm2-135m.safetensors
python -m vllm_lowrank.evaluate --windows "$W" --json "$OUT.json" --formats vllm int4 \
  "{\"format\": \"int4\", \"basis\": \"$B\", \"smooth_keys\": false}" \
  "{\"format\": \"int4\", \"basis\": \"$B\", \"smooth_keys\": true}" \
  "{\"format\": \"int4\", \"basis\": \"$B\", \"offset\": false, \"smooth_keys\": true}" > "$OUT.log" 2>&1
