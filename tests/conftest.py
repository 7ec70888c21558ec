"""Shared fixtures: the real SmolLM2-135M model and short-lived vLLM engines on the CPU."""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def smollm2() -> Path:
    from vllm_lowrank.models import smollm2

    return smollm2()


@contextlib.contextmanager
def vllm_engine(model: Path, **kwargs) -> Iterator["object"]:
    """An offline ``LLM`` (float32, eager, seeded) that is shut down on exit, freeing its processes."""
    from vllm import LLM

    args = dict(dtype="float32", enforce_eager=True, seed=0, max_model_len=768, block_size=16,
                kv_cache_memory_bytes=64 << 20, disable_log_stats=False)
    args.update(kwargs)
    llm = LLM(str(model), **args)
    try:
        yield llm
    finally:
        with contextlib.suppress(Exception):
            llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def kv_cache_tokens(llm) -> int:
    """vLLM's own KV cache capacity in tokens (what it logs as 'GPU KV cache size')."""
    cc = llm.llm_engine.vllm_config.cache_config
    return cc.num_gpu_blocks * cc.block_size
