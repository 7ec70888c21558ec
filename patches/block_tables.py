"""Give each request's block-table row room for a layered cache's ring blocks in vLLM's v2 GPU runner.

Replaces ``GPUModelRunner.initialize_kv_cache`` (vllm/v1/worker/gpu/model_runner.py) with a wrapper.
That runner sizes its block tables as ``cdiv(max_model_len, block_size)`` (aligned) without asking the
KV cache spec's ``max_num_blocks_per_req``, which :class:`vllm_lowrank.layered.LayeredAttentionSpec`
raises by its ring blocks (vLLM's v1 runners, the CPU one included, do ask). A request near
``max_model_len``, or any request when the ring is large, then overflowed its row: an index-out-of-bounds
assertion on the H200 with the 4x plan's 65 ring blocks. The wrapper adds each KV cache group's ring
blocks to the row width it passes to ``BlockTables``. Applied by the backend when it builds a layered
cache (in the worker, before the KV cache is initialised), only on CUDA, where that runner runs.
"""

from __future__ import annotations

from typing import Any

from ._compat import require_vllm


def ring_blocks_per_group(kv_cache_config: Any) -> list[int]:
    """Ring blocks per request of each KV cache group (0 where the group has no layered cache)."""
    rings = []
    for group in kv_cache_config.kv_cache_groups:
        spec = group.kv_cache_spec
        members = getattr(spec, "kv_cache_specs", None)  # UniformTypeKVCacheSpecs: its layers' specs
        rings.append(max((getattr(s, "ring_blocks", 0) for s in members.values()), default=0) if members
                     else getattr(spec, "ring_blocks", 0))
    return rings


def widened(block_tables_cls: Any, rings: list[int]) -> Any:
    """A ``BlockTables`` factory whose rows are ``rings[i]`` blocks wider in group ``i``."""

    def make(*args: Any, max_num_blocks_per_group: list[int], **kwargs: Any) -> Any:
        wide = [m + r for m, r in zip(max_num_blocks_per_group, rings, strict=True)]
        return block_tables_cls(*args, max_num_blocks_per_group=wide, **kwargs)

    return make


def apply() -> None:
    require_vllm(__name__)
    from vllm.platforms import current_platform

    if not current_platform.is_cuda_alike():
        return
    import vllm.v1.worker.gpu.model_runner as runner

    original = runner.GPUModelRunner.initialize_kv_cache
    if getattr(original, "_lowrank_patched", False):
        return

    def initialize_kv_cache(self, kv_cache_config) -> None:
        rings = ring_blocks_per_group(kv_cache_config)
        if not any(rings):
            return original(self, kv_cache_config)
        base = runner.BlockTables
        runner.BlockTables = widened(base, rings)
        try:
            return original(self, kv_cache_config)
        finally:
            runner.BlockTables = base

    initialize_kv_cache._lowrank_patched = True  # type: ignore[attr-defined]
    runner.GPUModelRunner.initialize_kv_cache = initialize_kv_cache
