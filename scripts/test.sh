#!/usr/bin/env bash
# The test command for a fresh machine: sets up (idempotent, see setup.sh), then runs the test suite.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -m "not vllm"` for the fast unit tests).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# -P: the checkout's folder triton_kernels/ must not shadow OpenAI's package of that name, which vLLM probes
exec .venv/bin/python -P -m pytest -q -p no:cacheprovider "$@"
