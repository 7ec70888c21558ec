#!/bin/bash
# the 3.56x plan with the key smoothing switched off, same session (from the repository root)
D=benchmarks/cpu-smooth-2026-11-29
python -m vllm_lowrank.evaluate --windows 16 --json $D/run-16w-c.json --formats vllm \
  '{"plan": "bases/smollm2-135m.plans.json:3.56x", "smooth_keys": false}' > $D/run-16w-c.log 2>&1
