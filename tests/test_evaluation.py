"""The evaluation's byte counts of vLLM's own KV caches against the cache sizes vLLM itself reported."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vllm_lowrank.evaluation import resolve, vllm_vector_bytes

# `vllm bench throughput` on the H200, 1B shape (16 layers, 8 KV heads, head_dim 64), 1 GiB of KV cache
MEASURED = Path(__file__).resolve().parent.parent / "benchmarks" / "h200-2026-11-29e" / "throughput-1b.json"


@pytest.mark.parametrize("dtype", ["auto", "fp8", "int8_per_token_head", "int4_per_token_head"])
def test_vllm_cache_bytes_match_vllms_reported_size(dtype):
    rows = {r["variant"]: r for r in json.loads(MEASURED.read_text())}
    layers, kv_heads, head_dim, block = 16, 8, 64, 16
    per_token = layers * kv_heads * 2 * vllm_vector_bytes(dtype, head_dim)
    assert (1 << 30) // per_token // block * block == rows[dtype]["kv_tokens"]


def test_unknown_vllm_dtype_refused_early():
    assert resolve("vllm-int8_per_token_head", None, None).kv_cache_dtype == "int8_per_token_head"
    with pytest.raises(ValueError, match="unknown vLLM kv_cache_dtype"):
        resolve("vllm-int3", None, None)


def test_plans_keep_the_basis_beside_them_unless_basis_is_given():
    """A smoothed plan needs the scales of the basis file beside its plans file: a default basis for the
    presets (the full calibration output, which may lack scales) must not replace it; --basis does."""
    bases = Path(__file__).resolve().parent.parent / "bases"
    plans, beside = str(bases / "smollm2-135m.plans.json"), str(bases / "smollm2-135m.safetensors")
    other = str(bases / "smollm2-135m-4x.safetensors")
    assert resolve("plan:2.75x-s", other, plans).settings["basis"] == beside
    assert resolve("plan:2.75x-s", other, plans, other).settings["basis"] == other
    assert resolve("plan:4x", beside, plans, beside).settings["basis"] == other  # a plan's own basis wins
    assert resolve("lowrank:32", other, plans).settings["basis"] == other
