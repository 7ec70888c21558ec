"""Give vLLM the compressed page size of each lowrank layer.

Replaces ``Attention.get_kv_cache_spec`` (vllm/model_executor/layers/attention/attention.py): the
runners ask each layer for its spec and there is no backend hook. For a layer whose backend is the
lowrank one, the spec is a plain ``FullAttentionSpec`` of dtype uint8 with
``head_size = head_size_v = slot_bytes / 2``, so that ``page_size_bytes`` is exactly
``block_size * num_kv_heads * slot_bytes``: vLLM's allocator then really holds more tokens, and layers
with different formats form one ``UniformTypeKVCacheSpecs`` group. Other layers are untouched.
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
        layout = layer_layout(plugin_config(vllm_config), layer_index(self.layer_name), self.head_size,
                              vllm_config.model_config.dtype)
        return FullAttentionSpec(block_size=vllm_config.cache_config.block_size,
                                 num_kv_heads=self.num_kv_heads, head_size=layout.spec_head_size,
                                 head_size_v=layout.spec_head_size, dtype=torch.uint8)

    get_kv_cache_spec._lowrank_patched = True  # type: ignore[attr-defined]
    Attention.get_kv_cache_spec = get_kv_cache_spec
