#!/usr/bin/env bash
# The main job on a fresh machine: set up, then an offline vLLM batch on SmolLM2-135M with the lowrank
# backend beside vLLM's own, printing outputs and KV cache sizes. Extra arguments go to demo.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python scripts/demo.py "$@"
