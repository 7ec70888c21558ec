"""Short-lived offline vLLM engines for the tools (calibration, evaluation); CPU-friendly defaults."""

from __future__ import annotations

import contextlib
import gc
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def model_config(model: str | Path) -> dict[str, Any]:
    return json.loads((Path(model) / "config.json").read_text())


def rope_theta(model: str | Path) -> float | None:
    """RoPE base of a plain (unscaled) RoPE model, else None."""
    cfg = model_config(model)
    rp = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if rp.get("rope_type", rp.get("type", "default")) not in ("default", None):
        return None
    theta = rp.get("rope_theta", cfg.get("rope_theta"))
    return float(theta) if theta is not None else None


def model_shape(model: str | Path) -> tuple[int, int, int, int]:
    """(layers, query heads, KV heads, head_dim)."""
    cfg = model_config(model)
    hq = cfg["num_attention_heads"]
    d = cfg.get("head_dim") or cfg["hidden_size"] // hq
    return cfg["num_hidden_layers"], hq, cfg.get("num_key_value_heads", hq), d


@contextlib.contextmanager
def vllm_llm(model: str | Path, lowrank: dict[str, Any] | None = None, *, dtype: str = "bfloat16",
             max_model_len: int = 1088, kv_cache_memory_bytes: int = 256 << 20, backend: str | None = "lowrank",
             **kwargs: Any) -> Iterator[Any]:
    """An offline ``LLM``; ``backend=None`` gives vLLM's own attention backend (the baseline)."""
    from vllm import LLM

    args: dict[str, Any] = dict(dtype=dtype, enforce_eager=True, seed=0, max_model_len=max_model_len,
                                kv_cache_memory_bytes=kv_cache_memory_bytes, block_size=16)
    if backend is not None:
        args["attention_backend"] = backend
        args["additional_config"] = {"lowrank": lowrank or {}}
    args.update(kwargs)
    llm = LLM(str(model), **args)
    try:
        yield llm
    finally:
        with contextlib.suppress(Exception):
            llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def kv_cache_tokens(llm: Any) -> int:
    cc = llm.llm_engine.vllm_config.cache_config
    return int(cc.num_gpu_blocks * cc.block_size)
