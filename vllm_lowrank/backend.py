"""The ``lowrank`` attention backend: vLLM's paged KV cache kept compressed, per layer.

Registered as ``AttentionBackendEnum.CUSTOM`` (``get_name()`` must return an existing member name).
The KV cache of a layer is a uint8 tensor [num_blocks, num_kv_heads, block_size, slot_bytes], each
(block, head) page laid out field by field (:func:`vllm_lowrank.formats.cache_shape`); the spec that
vLLM sees (``patches/kv_cache_spec.py``) has ``head_size = slot_bytes / 2`` so that its
page size is the compressed one. K/V are stored by ``do_kv_cache_update`` before ``forward``.

On CUDA the Triton kernels of :mod:`vllm_lowrank.kernels` store and attend; elsewhere (the CPU) the
plain PyTorch path of :mod:`vllm_lowrank.reference` does, with the same contracts.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from vllm.config import VllmConfig, get_current_vllm_config
from vllm.logger import init_logger
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionLayer,
    AttentionMetadata,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.attention.backends.utils import split_decodes_and_prefills
from vllm.v1.kv_cache_interface import AttentionSpec

from . import reference
from .config import LowRankConfigError, layer_index
from .formats import SlotLayout, cache_shape
from .plan import LayerState, build_layer_state, plugin_config

logger = init_logger(f"vllm.{__name__}")  # under "vllm" so that vLLM's log handler prints it

BACKEND_PATH = "vllm_lowrank.backend.LowRankBackend"


class LowRankBackend(AttentionBackend):
    forward_includes_kv_cache_update: bool = False
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto"]

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_impl_cls() -> type["LowRankImpl"]:
        return LowRankImpl

    @staticmethod
    def get_builder_cls() -> type["LowRankMetadataBuilder"]:
        return LowRankMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes() -> list[int | MultipleOf]:
        return [MultipleOf(16)]

    @staticmethod
    def get_kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_size: int,
                           cache_dtype_str: str = "auto") -> tuple[int, ...]:
        # head_size is the spec's (slot_bytes / 2): K and V together fill one slot
        return cache_shape(num_blocks, block_size, num_kv_heads, 2 * head_size)

    @classmethod
    def supports_head_size(cls, head_size: int) -> bool:
        return head_size % 8 == 0 and 16 <= head_size <= 256

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER


@dataclass
class LowRankMetadata(AttentionMetadata):
    num_actual_tokens: int
    num_reqs: int
    num_decodes: int  # decodes come first (reorder threshold 1)
    num_decode_tokens: int
    max_query_len: int
    max_seq_len: int
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    slot_mapping: torch.Tensor
    query_start_loc_cpu: torch.Tensor
    seq_lens_cpu: torch.Tensor
    positions: torch.Tensor | None = None  # [num_tokens] position of each query token
    ring: int = 0  # layered cache: ring blocks at the front of each block-table row (block_table excludes them)
    ring_table: torch.Tensor | None = None  # [num_reqs, ring] those ring blocks
    req_of_token: torch.Tensor | None = None  # [num_actual_tokens] each new token's request
    # the step's ring-store targets (kernels.ring_store_targets) by (ring slots a page, capturing): computed
    # by the first layer, reused by the others (inside a captured CUDA graph too, recomputed on replay)
    ring_store_slots: dict[tuple[int, bool], list[torch.Tensor]] = field(default_factory=dict)


class LowRankMetadataBuilder(AttentionMetadataBuilder[LowRankMetadata]):
    # decode-only batches run the Triton decode kernel with a fixed split count and no host syncs
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.UNIFORM_BATCH

    def __init__(self, kv_cache_spec: AttentionSpec, layer_names: list[str], vllm_config: VllmConfig,
                 device: torch.device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self._init_reorder_batch_threshold(1, supports_spec_as_decode=False)
        specs = getattr(kv_cache_spec, "kv_cache_specs", None)  # UniformTypeKVCacheSpecs: per-layer specs
        self.ring = getattr(next(iter(specs.values())) if specs else kv_cache_spec, "ring_blocks", 0)
        # layered cache: our slot mapping and each token's request, in buffers that keep their address
        # from step to step (a CUDA graph replays its kernels on the captured pointers)
        self._slots = torch.empty(0, dtype=torch.long, device=device)
        self._req = torch.empty(0, dtype=torch.int32, device=device)

    def build_for_cudagraph_capture(self, common_attn_metadata: CommonAttentionMetadata) -> LowRankMetadata:
        md = self.build(0, common_attn_metadata)
        md.seq_lens.fill_(1)  # capture is fast with short contexts; replay reads the real seq_lens
        return md

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> LowRankMetadata:
        cam = common_attn_metadata
        num_decodes, _, num_decode_tokens, _ = split_decodes_and_prefills(
            cam, decode_threshold=self.reorder_batch_threshold)
        seq_lens_cpu = cam.seq_lens_cpu_upper_bound
        if seq_lens_cpu is None:
            seq_lens_cpu = cam.seq_lens.cpu()
        md = LowRankMetadata(
            num_actual_tokens=cam.num_actual_tokens, num_reqs=cam.num_reqs, num_decodes=num_decodes,
            num_decode_tokens=num_decode_tokens, max_query_len=cam.max_query_len,
            max_seq_len=cam.max_seq_len, query_start_loc=cam.query_start_loc, seq_lens=cam.seq_lens,
            block_table=cam.block_table_tensor, slot_mapping=cam.slot_mapping,
            query_start_loc_cpu=cam.query_start_loc_cpu, seq_lens_cpu=seq_lens_cpu,
            positions=cam.positions)
        return self._with_ring(md) if self.ring else md

    def _with_ring(self, md: LowRankMetadata) -> LowRankMetadata:
        """Layered cache: the ring blocks split off the block table, and the compressed slots of the new
        tokens recomputed (vLLM's slot mapping counts the ring blocks as the first positions' blocks)."""
        from .layered import new_token_slots

        n, k, total = md.num_actual_tokens, self.ring, md.slot_mapping.shape[0]
        if self._slots.shape[0] < total:
            self._slots = torch.empty(total, dtype=torch.long, device=md.slot_mapping.device)
            self._req = torch.empty(total, dtype=torch.int32, device=md.slot_mapping.device)
        slots, req = self._slots[:total], self._req[:total]
        positions = md.positions[:n]
        slots.fill_(-1)
        req.fill_(-1)
        slots[:n], req[:n] = new_token_slots(md.block_table, md.query_start_loc, md.num_reqs, md.seq_lens, positions,
                                             k, self.kv_cache_spec.block_size)
        md.ring, md.ring_table, md.req_of_token = k, md.block_table[:, :k], req
        md.block_table, md.slot_mapping, md.positions = md.block_table[:, k:], slots, positions
        return md


class LowRankImpl(AttentionImpl[LowRankMetadata]):
    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int,
                 alibi_slopes: list[float] | None, sliding_window: int | None, kv_cache_dtype: str,
                 logits_soft_cap: float | None = None, attn_type: str = AttentionType.DECODER,
                 kv_sharing_target_layer_name: str | None = None, **extra: Any) -> None:
        unsupported = {
            "ALiBi": alibi_slopes is not None,
            f"sliding window ({sliding_window})": sliding_window is not None,
            f"logit soft-capping ({logits_soft_cap})": bool(logits_soft_cap),
            f"attention type {attn_type}": attn_type != AttentionType.DECODER,
            "KV sharing between layers": kv_sharing_target_layer_name is not None,
            f"kv_cache_dtype={kv_cache_dtype!r}": kv_cache_dtype != "auto",
            "attention sinks": extra.get("sinks") is not None,
        }
        bad = [name for name, is_bad in unsupported.items() if is_bad]
        if bad:
            raise LowRankConfigError(
                f"the lowrank attention backend does not support {', '.join(bad)}; it supports decoder "
                f"self-attention with kv_cache_dtype='auto' (set the compressed format through "
                f"additional_config={{'lowrank': {{'format': ...}}}})")
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads
        self.vllm_config = get_current_vllm_config()
        self.config = plugin_config(self.vllm_config)  # parse and check now, at model build
        logger.info_once("lowrank KV cache formats: %s", self.config.describe(
            self.vllm_config.model_config.get_total_num_hidden_layers()))
        self.state: LayerState | None = None
        self._prefill_compiled = False
        if self.config.layered:
            from .patches import block_tables

            block_tables.apply()  # room for the ring in the v2 GPU runner's block tables (CUDA only)

    def _state(self, layer: AttentionLayer, device: torch.device) -> LayerState:
        if self.state is None:
            self.state = build_layer_state(self.config, layer_index(layer.layer_name), self.num_kv_heads,
                                           self.head_size, self.vllm_config, device)
            logger.info_once("lowrank attention on %s runs %s", device.type,
                             "the PyTorch path" if _ops(device) is reference else "the Triton kernels")
        return self.state

    def do_kv_cache_update(self, layer: torch.nn.Module, key: torch.Tensor, value: torch.Tensor,
                           kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        n = slot_mapping.shape[0]
        if n == 0:
            return
        st = self._state(layer, key.device)
        if self.config.layered:
            self._store_layered(layer, key, value, kv_cache, st)
            return
        _ops(key.device).store(key[:n].view(n, self.num_kv_heads, self.head_size),
                               value[:n].view(n, self.num_kv_heads, self.head_size),
                               kv_cache, slot_mapping, st.layout, st.transforms)

    def _store_layered(self, layer: torch.nn.Module, key: torch.Tensor, value: torch.Tensor,
                       kv_cache: torch.Tensor, st: LayerState) -> None:
        """Store into the compressed slots of our own slot mapping (the ring is written after attention)."""
        from vllm.forward_context import get_forward_context

        md = get_forward_context().attn_metadata
        md = md[layer.layer_name] if isinstance(md, dict) else md
        if md is None:
            return
        n = md.num_actual_tokens
        _ops(key.device).store(key[:n].view(n, self.num_kv_heads, self.head_size),
                               value[:n].view(n, self.num_kv_heads, self.head_size), kv_cache, md.slot_mapping[:n],
                               st.layout, st.transforms)

    def forward(self, layer: AttentionLayer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, attn_metadata: LowRankMetadata | None, output: torch.Tensor,
                output_scale: torch.Tensor | None = None,
                output_block_scale: torch.Tensor | None = None) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("fused output quantization is not supported by the lowrank backend")
        if attn_metadata is None:  # profiling / dummy run
            return output.zero_()
        md = attn_metadata
        n = md.num_actual_tokens
        out = output[:n].view(n, self.num_heads, self.head_size)
        q = query[:n].view(n, self.num_heads, self.head_size)
        st = self._state(layer, q.device)

        if not self._prefill_compiled and q.device.type == "cuda":
            self._compile_prefill(q, kv_cache, md, st)
        nd, ndt = md.num_decodes, md.num_decode_tokens
        if self.config.layered:
            self._layered(md, q, key, value, kv_cache, st, out)
        elif nd:
            _ops(q.device).decode_attention(q[:ndt], kv_cache, md.block_table[:nd], md.seq_lens[:nd],
                                            st.layout, st.transforms, self.scale, out[:ndt])
        if md.num_reqs > nd and not self.config.layered:
            self._prefill(md, q, key, value, kv_cache, st, out)
        if output.shape[0] > n:
            output[n:].zero_()
        if self.config.calibrate:
            from .calibration import observe

            observe(layer_index(layer.layer_name), q, key[:n].view(n, self.num_kv_heads, self.head_size),
                    value[:n].view(n, self.num_kv_heads, self.head_size), md.positions[:n])
        return output

    def _layered(self, md: LowRankMetadata, q: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 kv_cache: torch.Tensor, st: LayerState, out: torch.Tensor) -> None:
        """A layered cache. With the Triton kernels, decodes write their token into the ring and then run
        the decode kernel, which reads the ring as one more split (no host sync: CUDA-graph safe);
        longer chunks go through :meth:`_layered_requests` and are written into the ring after it. On
        the PyTorch path every request goes through :meth:`_layered_requests`."""
        from .formats import ring_layout

        n, nd, ndt = md.num_actual_tokens, md.num_decodes, md.num_decode_tokens
        w, s = self.config.exact_window, self.config.exact_sink
        ring = ring_layout(self.head_size, st.layout.model_dtype, self.config.exact_dtype)
        k = key[:n].view(n, self.num_kv_heads, self.head_size)
        v = value[:n].view(n, self.num_kv_heads, self.head_size)
        if _ops(q.device) is reference:
            from .layered import store_exact

            self._layered_requests(md, range(md.num_reqs), q, key, value, kv_cache, st, out, ring)
            store_exact(k, v, kv_cache, md.ring_table, md.req_of_token[:n], md.positions[:n], w, s, ring)
            return
        from . import kernels
        from .formats import ring_tokens_per_block

        # keyed by capture too: a CUDA graph's warm-up and capture runs share one metadata object, and the
        # captured graph must compute the targets itself
        cache_key = (ring_tokens_per_block(kv_cache.shape[2], kv_cache.shape[3], ring),
                     q.device.type == "cuda" and torch.cuda.is_current_stream_capturing())
        if cache_key not in md.ring_store_slots:
            md.ring_store_slots[cache_key] = kernels.ring_store_targets(
                kv_cache, md.ring_table, md.req_of_token[:n], md.positions[:n], md.seq_lens, w, s, ring)
        slots = md.ring_store_slots[cache_key]
        if nd:
            kernels.store_ring(k[:ndt], v[:ndt], kv_cache, md.ring_table, md.req_of_token[:ndt], md.positions[:ndt],
                               md.seq_lens, w, s, ring, slots=[x[:ndt] for x in slots])
            kernels.decode_attention(q[:ndt], kv_cache, md.block_table[:nd], md.seq_lens[:nd], st.layout,
                                     st.transforms, self.scale, out[:ndt], ring_table=md.ring_table[:nd], window=w,
                                     sink=s, ring_slot=ring)
        if md.num_reqs > nd:
            self._layered_requests(md, range(nd, md.num_reqs), q, key, value, kv_cache, st, out, ring)
            kernels.store_ring(k[ndt:n], v[ndt:n], kv_cache, md.ring_table, md.req_of_token[ndt:n],
                               md.positions[ndt:n], md.seq_lens, w, s, ring, slots=[x[ndt:n] for x in slots])

    def _layered_requests(self, md: LowRankMetadata, requests: range, q: torch.Tensor, key: torch.Tensor,
                          value: torch.Tensor, kv_cache: torch.Tensor, st: LayerState, out: torch.Tensor,
                          ring: SlotLayout) -> None:
        """Requests that attend before their tokens enter the ring: a prompt's first chunk without
        ``prefill_from_cache`` attends to its own exact K/V as usual; the others read the ring, their own
        K/V and the compressed cache, through the prefill kernel (one launch per contiguous run) or, on
        the PyTorch path, :func:`vllm_lowrank.layered.layered_attention` per request."""
        qsl, seq_lens = md.query_start_loc_cpu.tolist(), md.seq_lens_cpu.tolist()
        exact, layered = [], []
        for i in requests:
            if qsl[i + 1] > qsl[i]:
                first_chunk = seq_lens[i] == qsl[i + 1] - qsl[i] and not self.config.prefill_from_cache
                (exact if first_chunk else layered).append(i)
        for a, b in _runs(exact):  # one varlen call per contiguous run of first chunks
            self._exact_prefill(md, qsl, a, b, q, key, value, out)
        n = md.num_actual_tokens
        k = key[:n].view(n, self.num_kv_heads, self.head_size)
        v = value[:n].view(n, self.num_kv_heads, self.head_size)
        w, s = self.config.exact_window, self.config.exact_sink
        if _ops(q.device) is reference:
            from .layered import layered_attention

            for i in layered:
                q0, q1 = qsl[i], qsl[i + 1]
                row = torch.cat((md.ring_table[i], md.block_table[i]))
                layered_attention(q[q0:q1], k[q0:q1], v[q0:q1], kv_cache, row, md.ring, seq_lens[i], w, s, st.layout,
                                  st.transforms, self.scale, out[q0:q1], ring)
            return
        from . import kernels

        for a, b in _runs(layered):
            max_q = max(qsl[i + 1] - qsl[i] for i in range(a, b))
            kernels.paged_attention(q, kv_cache, md.block_table, md.seq_lens, md.query_start_loc, max_q, st.layout,
                                    st.transforms, self.scale, out, requests=(a, b), ring_table=md.ring_table,
                                    window=w, sink=s, ring_slot=ring, key=k, value=v)

    def _compile_prefill(self, q: torch.Tensor, kv_cache: torch.Tensor, md: LowRankMetadata,
                         st: LayerState) -> None:
        """Compile this layer's prefill kernel now (start-up: the first forward with metadata, e.g. a
        CUDA-graph warm-up run) rather than at the first continuation chunk while serving, where
        Triton's compilation (about a second) stalls the whole batch."""
        if _ops(q.device) is reference:  # the PyTorch path forced on CUDA: nothing to compile
            self._prefill_compiled = True
            return
        if torch.cuda.is_current_stream_capturing():
            return
        from . import kernels

        ring = None
        if self.config.layered:
            from .formats import ring_layout

            ring = (md.ring, self.config.exact_window, self.config.exact_sink,
                    ring_layout(self.head_size, st.layout.model_dtype, self.config.exact_dtype))
        kernels.compile_prefill(kv_cache, md.block_table.stride(0), self.num_heads, q.dtype, st.layout,
                                st.transforms, self.scale, ring)
        self._prefill_compiled = True

    def _prefill(self, md: LowRankMetadata, q: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 kv_cache: torch.Tensor, st: LayerState, out: torch.Tensor) -> None:
        """Requests after the decodes: a prompt's first chunk attends to its own exact K/V; continuation
        chunks and prefix-cache hits read the compressed cache (all of them, with prefill_from_cache)."""
        qsl = md.query_start_loc_cpu.tolist()
        seq_lens = md.seq_lens_cpu.tolist()
        exact: list[int] = []
        paged: list[int] = []
        for i in range(md.num_decodes, md.num_reqs):
            q0, q1, length = qsl[i], qsl[i + 1], seq_lens[i]
            if q1 <= q0:
                continue
            if length == q1 - q0 and not self.config.prefill_from_cache:
                exact.append(i)
            else:
                paged.append(i)
        for a, b in _runs(exact):
            self._exact_prefill(md, qsl, a, b, q, key, value, out)
        if not paged:
            return
        if _ops(q.device) is reference:
            for i in paged:
                q0, q1 = qsl[i], qsl[i + 1]
                reference.paged_attention(q[q0:q1], kv_cache, md.block_table[i:i + 1], [seq_lens[i]],
                                          [0, q1 - q0], st.layout, st.transforms, self.scale, out[q0:q1])
            return
        from . import kernels

        for a, b in _runs(paged):  # one launch per contiguous run of requests (usually one)
            max_q = max(qsl[i + 1] - qsl[i] for i in range(a, b))
            kernels.paged_attention(q, kv_cache, md.block_table, md.seq_lens, md.query_start_loc, max_q,
                                    st.layout, st.transforms, self.scale, out, requests=(a, b))

    def _exact_prefill(self, md: LowRankMetadata, qsl: list[int], a: int, b: int, q: torch.Tensor,
                       key: torch.Tensor, value: torch.Tensor, out: torch.Tensor) -> None:
        """First chunks of requests a..b-1 (contiguous tokens) over their own uncompressed K/V: one
        varlen FlashAttention call on CUDA (as vLLM's own backend), PyTorch SDPA per request elsewhere."""
        q0, q1 = qsl[a], qsl[b]
        k = key[q0:q1].view(-1, self.num_kv_heads, self.head_size)
        v = value[q0:q1].view(-1, self.num_kv_heads, self.head_size)
        varlen = _flash_varlen(q.device, q.dtype, self.head_size)
        if varlen is not None:
            fn, fa_version = varlen
            cu = md.query_start_loc[a:b + 1] - q0 if q0 else md.query_start_loc[a:b + 1]
            max_q = max(qsl[i + 1] - qsl[i] for i in range(a, b))
            fn(q=q[q0:q1], k=k, v=v, out=out[q0:q1], cu_seqlens_q=cu, max_seqlen_q=max_q, cu_seqlens_k=cu,
               max_seqlen_k=max_q, softmax_scale=self.scale, causal=True, fa_version=fa_version)
            return
        for i in range(a, b):
            r0, r1 = qsl[i] - q0, qsl[i + 1] - q0
            out[q0 + r0:q0 + r1] = reference.exact_causal_attention(
                q[q0 + r0:q0 + r1], k[r0:r1], v[r0:r1], self.scale).to(out.dtype)


@functools.lru_cache(maxsize=None)
def _flash_varlen(device: torch.device, dtype: torch.dtype, head_size: int):
    """(flash_attn_varlen_func, fa_version) of vLLM's FlashAttention where it runs this case, else None."""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16) or head_size > 256 or head_size % 8:
        return None
    try:
        from vllm.v1.attention.backends.fa_utils import flash_attn_varlen_func, get_flash_attn_version
    except ImportError:
        return None
    version = get_flash_attn_version(head_size=head_size)
    if version is None:
        return None
    logger.info_once("lowrank: first prompt chunks run vLLM's FlashAttention %d on their exact K/V", version)
    return flash_attn_varlen_func, version


KERNELS_ENV = "VLLM_LOWRANK_KERNELS"


def _ops(device: torch.device):
    """The Triton kernels on CUDA, the plain PyTorch path elsewhere (same contracts).

    ``$VLLM_LOWRANK_KERNELS`` = ``triton`` or ``torch`` forces one (``triton`` on CPU tensors needs
    ``TRITON_INTERPRET=1``: how CI runs the kernels inside vLLM without a GPU).
    """
    choice = os.environ.get(KERNELS_ENV, "auto")
    if choice not in ("auto", "triton", "torch"):
        raise LowRankConfigError(f"{KERNELS_ENV}={choice!r}; accepted: auto, triton, torch")
    if choice == "triton" or (choice == "auto" and device.type == "cuda"):
        from . import kernels

        return kernels
    return reference


def _runs(indices: list[int]) -> list[tuple[int, int]]:
    """Contiguous [start, end) runs of sorted integers."""
    runs: list[tuple[int, int]] = []
    for i in indices:
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs
