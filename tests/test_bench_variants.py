"""The benchmark scripts' plugin variants are valid settings for the shapes they run on.

A GPU session is 30 minutes; a variant that the plugin refuses at start-up costs one of its vLLM
starts. These checks run the plugin's own parser on every variant of ``scripts/bench_serving.py``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from vllm_lowrank.config import ModelShape, is_layered, parse
from vllm_lowrank.sensitivity import BLOCK_SIZE
from vllm_lowrank.shapes import SHAPES, make_basis

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _bench_serving():
    spec = importlib.util.spec_from_file_location("bench_serving", SCRIPTS / "bench_serving.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("shape", ["1b", "8b"])
def test_every_serving_variant_parses_for_its_shape(shape, tmp_path):
    # imported here, not at collection: vllm_lowrank.layered imports vLLM and so Triton, which must not be
    # imported before test_kernels.py sets TRITON_INTERPRET (its interpreter tests would move to a subprocess)
    from vllm_lowrank.layered import capacity_ratio

    s = SHAPES[shape]
    model = ModelShape(s["num_hidden_layers"], s["num_key_value_heads"], s["head_dim"])
    basis = make_basis(shape, tmp_path / "basis.safetensors")
    variants = _bench_serving().plugin_variants(shape, basis)
    assert {"lr:int4", "lr:int4-w32", "lr:int4-w8", "lr:int4-w8-int8", "lr:ring-4x"} <= set(variants)
    for name, raw in variants.items():
        cfg = parse(raw, model)
        assert cfg.layered == is_layered(raw), name
        ratio = capacity_ratio(cfg, model.num_layers, model.head_dim, torch.bfloat16, BLOCK_SIZE, 1280)
        assert 1.0 < ratio < 9.0, (name, ratio)
    # a smaller ring holds more tokens than the bf16 ring of 32, an int8 one more than a bf16 one, and no ring
    # the most
    cap = {n: capacity_ratio(parse(variants[n], model), model.num_layers, model.head_dim, torch.bfloat16,
                             BLOCK_SIZE, 1280) for n in ("lr:int4", "lr:int4-w32", "lr:int4-w8", "lr:int4-w8-int8")}
    assert cap["lr:int4-w32"] < cap["lr:int4-w8"] < cap["lr:int4-w8-int8"] < cap["lr:int4"], cap
