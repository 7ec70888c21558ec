"""Give vLLM the compressed page size of each lowrank layer.

Replaces ``Attention.get_kv_cache_spec`` (vllm/model_executor/layers/attention/attention.py): the
runners ask each layer for its spec and there is no backend hook. For a layer whose backend is the
lowrank one, the spec is a plain ``FullAttentionSpec`` of dtype uint8 with
``head_size = head_size_v = slot_bytes / 2``, so that ``page_size_bytes`` is exactly
``block_size * num_kv_heads * slot_bytes``: vLLM's allocator then really holds more tokens, and layers
with different formats form one ``UniformTypeKVCacheSpecs`` group. With ``exact_window``/``exact_sink``
the spec is a :class:`vllm_lowrank.layered.LayeredAttentionSpec` (ring blocks per request), and
``UniformTypeKVCacheSpecs.max_num_blocks_per_req`` is replaced to ask the group's layer specs, so that the
block table has room for the ring blocks when a plan mixes page sizes. Other layers are untouched.
"""

from __future__ import annotations

import torch

from ._compat import require_vllm


def apply() -> None:
    require_vllm(__name__)
    from vllm.model_executor.layers.attention.attention import Attention
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    original = Attention.get_kv_cache_spec
    if getattr(original, "_lowrank_patched", False):
        return

    def get_kv_cache_spec(self, vllm_config):
        from vllm_lowrank.backend import LowRankBackend
        from vllm_lowrank.config import layer_index
        from vllm_lowrank.plan import layer_layout, plugin_config

        backend = getattr(self, "attn_backend", None)
        if not (isinstance(backend, type) and issubclass(backend, LowRankBackend)):
            return original(self, vllm_config)
        cfg = plugin_config(vllm_config)
        dtype, block_size = vllm_config.model_config.dtype, vllm_config.cache_config.block_size
        layout = layer_layout(cfg, layer_index(self.layer_name), self.head_size, dtype)
        fields = dict(block_size=block_size, num_kv_heads=self.num_kv_heads, head_size=layout.spec_head_size,
                      head_size_v=layout.spec_head_size, dtype=torch.uint8)
        if not cfg.layered:
            return FullAttentionSpec(**fields)
        from vllm_lowrank.checks import check_layered
        from vllm_lowrank.layered import LayeredAttentionSpec, ring_plan

        check_layered(vllm_config, cfg)
        num_layers = vllm_config.model_config.get_total_num_hidden_layers()
        k, per_block = ring_plan(cfg, num_layers, self.head_size, dtype, block_size)
        from vllm.logger import init_logger

        init_logger("vllm.vllm_lowrank").info_once(
            "lowrank layered cache: the last %d and first %d tokens of every sequence exact (%s), in %d ring "
            "blocks per sequence (%d-%d exact tokens a block, by layer): vLLM's KV cache size in tokens counts them",
            cfg.exact_window, cfg.exact_sink, cfg.exact_dtype, k, min(per_block), max(per_block))
        return LayeredAttentionSpec(**fields, ring_blocks=k)

    get_kv_cache_spec._lowrank_patched = True  # type: ignore[attr-defined]
    Attention.get_kv_cache_spec = get_kv_cache_spec
    _uniform_specs_ask_their_layers()


def _uniform_specs_ask_their_layers() -> None:
    """``UniformTypeKVCacheSpecs.max_num_blocks_per_req`` (the width of the worker's block table) is
    ``KVCacheSpec``'s ``cdiv(max_len, block_size)``; layered specs need their ring blocks on top. Take the
    widest of the group's own specs instead (the same number for plain specs)."""
    from vllm.v1.kv_cache_interface import UniformTypeKVCacheSpecs

    if getattr(UniformTypeKVCacheSpecs.max_num_blocks_per_req, "_lowrank_patched", False):
        return

    def max_num_blocks_per_req(self, vllm_config, max_len: int) -> int:
        return max(spec.max_num_blocks_per_req(vllm_config, max_len) for spec in self.kv_cache_specs.values())

    max_num_blocks_per_req._lowrank_patched = True  # type: ignore[attr-defined]
    UniformTypeKVCacheSpecs.max_num_blocks_per_req = max_num_blocks_per_req
