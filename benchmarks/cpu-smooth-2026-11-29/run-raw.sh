#!/bin/bash
# key smoothing without offsets (raw-moment scales, k.smooth_raw) on 16 and 4 windows, and the 3.56x plan with it
# (and the offsets) on 16 (from the repository root)
B=bases/smollm2-135m.safetensors; D=benchmarks/cpu-smooth-2026-11-29
python -m vllm_lowrank.evaluate --windows 16 --json $D/run-16w-b.json --formats vllm \
  "{\"format\": \"int4\", \"basis\": \"$B\", \"offset\": false, \"smooth_keys\": true}" \
  '{"plan": "bases/smollm2-135m.plans.json:3.56x", "smooth_keys": true}' > $D/run-16w-b.log 2>&1
python -m vllm_lowrank.evaluate --windows 4 --json $D/run-4w-b.json --formats vllm \
  "{\"format\": \"int4\", \"basis\": \"$B\", \"offset\": false, \"smooth_keys\": true}" > $D/run-4w-b.log 2>&1
