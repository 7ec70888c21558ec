"""vLLM's own KV cache size, in tokens, grows by each format's page-size ratio (bf16 SmolLM2-135M).

The expected ratio is computed from the formats' slot sizes (Σ over layers of the uncompressed page
divided by Σ of the compressed ones, since layers of unequal page share one block count) and must
match vLLM's reported token count within 1%. The figures are also checked against the rough sizes
of DESIGN.md so a layout regression (say, a stray padding byte per slot) cannot hide.
"""

from __future__ import annotations

import pytest
import torch

from conftest import kv_cache_tokens, vllm_engine
from vllm_lowrank.formats import LayerFormat, SlotLayout, TensorFormat, preset_format

pytestmark = pytest.mark.vllm

LAYERS, KV_HEADS, HEAD_DIM = 30, 3, 64
MEMORY = 192 << 20
PLAN = {"format": "int8", "layers": {"0": {"k": "r16", "v": "int8"}, "1": "hadamard+int4"}}


def _expected_ratio(formats: list[LayerFormat]) -> float:
    full = 2 * HEAD_DIM * 2 * LAYERS
    return full / sum(SlotLayout.build(f, HEAD_DIM, torch.bfloat16).slot_bytes for f in formats)


@pytest.fixture(scope="module")
def uncompressed_tokens(smollm2) -> int:
    with vllm_engine(smollm2, dtype="bfloat16", kv_cache_memory_bytes=MEMORY) as llm:
        return kv_cache_tokens(llm)


@pytest.fixture(scope="module")
def basis_path(tmp_path_factory):
    from vllm_lowrank.basis import orthonormal_basis_file

    path = tmp_path_factory.mktemp("basis") / "b.safetensors"
    orthonormal_basis_file(LAYERS, KV_HEADS, HEAD_DIM, seed=7, rank=32).save(path)
    return path


# (fp8's slot has int8's size: one engine start, about 40 s of CI, would check the same page arithmetic)
CASES = [
    ("full", {"format": "full"}, [preset_format("full")] * LAYERS, (1.0, 1.0)),
    ("int8", {"format": "int8"}, [preset_format("int8")] * LAYERS, (1.9, 2.0)),
    ("int4", {"format": "int4"}, [preset_format("int4")] * LAYERS, (3.5, 3.6)),
    ("lowrank-16-16", {"format": "lowrank", "rank_k": 16, "rank_v": 16},
     [preset_format("lowrank", 16, 16)] * LAYERS, (4.0, 4.0)),
    ("plan", PLAN, [LayerFormat(TensorFormat.parse("r16"), TensorFormat.parse("int8")),
                    preset_format("int4")] + [preset_format("int8")] * (LAYERS - 2), (1.9, 2.1)),
]


@pytest.mark.parametrize("name,settings,formats,rough", CASES, ids=[c[0] for c in CASES])
def test_capacity_ratio(smollm2, uncompressed_tokens, basis_path, name, settings, formats, rough):
    if any(f.k.transform == "basis" or f.v.transform == "basis" for f in formats):
        settings = {**settings, "basis": str(basis_path)}
    with vllm_engine(smollm2, dtype="bfloat16", kv_cache_memory_bytes=MEMORY, attention_backend="lowrank",
                     additional_config={"lowrank": settings}) as llm:
        tokens = kv_cache_tokens(llm)
    measured = tokens / uncompressed_tokens
    expected = _expected_ratio(formats)
    print(f"{name}: {tokens} tokens vs {uncompressed_tokens} uncompressed: {measured:.3f}x "
          f"(page ratio {expected:.3f}x)")
    assert measured == pytest.approx(expected, rel=0.01)
    assert rough[0] - 1e-9 <= expected <= rough[1] + 1e-9
