#!/bin/bash
# 16 windows: vLLM's baseline, rotated int4 with offsets, with offsets + key smoothing (from the repository root)
B=bases/smollm2-135m.safetensors; OUT=benchmarks/cpu-smooth-2026-11-29/run-16w
python -m vllm_lowrank.evaluate --windows 16 --json "$OUT.json" --formats vllm \
  "{\"format\": \"int4\", \"basis\": \"$B\", \"smooth_keys\": false}" \
  "{\"format\": \"int4\", \"basis\": \"$B\", \"smooth_keys\": true}" > "$OUT.log" 2>&1
