"""Triton kernels that store into and attend over compressed KV slots (``vllm_lowrank.kernels``).

- :func:`store`: project, quantize and scatter new K/V into their slots (one launch per layer);
  :func:`store_ring`: a layered cache's exact tokens into their requests' rings;
- :func:`decode_attention`: split-KV (flash-decoding) paged attention, one query token per request;
- :func:`paged_attention`: causal attention of query chunks over their compressed context (prefill);
  :func:`compile_prefill` compiles it at start-up.
- ``query.project_queries``: the key basis applied to raw queries in one launch (prefill, layered decode).

Same contracts as the PyTorch oracle in :mod:`vllm_lowrank.reference`.
"""

from .decode import decode_attention, default_num_splits, workspace_numel
from .prefill import compile_prefill, paged_attention
from .store import ring_store_targets, store, store_ring

__all__ = ["compile_prefill", "decode_attention", "default_num_splits", "paged_attention", "ring_store_targets",
           "store", "store_ring", "workspace_numel"]
