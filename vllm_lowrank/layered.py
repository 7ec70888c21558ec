"""A layered cache: each sequence's first S and last W tokens kept exact beside the compressed cache.

Measured in vLLM (EVALUATION.md, "The layered cache in the plugin"), the first token and the last 64
exact take SmolLM2's 4x plan from +13.5% to +0.65% perplexity. The exact tokens live in *ring
blocks*: the first ``k`` entries of every block-table row, allocated with the request by
:class:`LayeredAttentionManager` (registered for :class:`LayeredAttentionSpec` through vLLM's KV
cache spec registry). The compressed block of position ``p`` is then row column ``k + p // block_size``,
so the plugin builds its own slot mapping (vLLM's points into the ring). A ring block holds
:func:`ring_tokens_per_block` exact tokens per KV head, as slots of :func:`ring_layout` (K and V
in the model dtype, or int8 with ``exact_dtype: "int8"``) on the same pages as the compressed ones,
laid out field by field like a cache page of that many slots: position ``p`` goes to ring index
``p % W`` and, if ``p < S``, also to ``W + p``. Position ``p`` of a sequence of ``n`` tokens is held
exact when ``p >= n - W`` or ``p < S``.

On CUDA the decode kernel reads the ring as one more split, the prefill kernel reads it for
continuation chunks (and ``prefill_from_cache`` prompts), and :func:`vllm_lowrank.kernels.store_ring`
writes it; elsewhere :func:`layered_attention`, the PyTorch path and the kernels' oracle, does.

Prefix caching must be off: ring blocks are per request and are not hashed, and after a prefix-cache
hit the ring would lack the hit's tokens. (A recompute preemption starts again at position 0, so the
ring is rewritten.)
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import FullAttentionSpec

from . import reference
from .codec import decode_layer, encode_layer
from .formats import SlotLayout, ring_layout, ring_tokens_per_block
from .transforms import LayerTransforms, build_tensor_transform


def ring_blocks(window: int, sink: int, tokens_per_block: list[int]) -> int:
    """Ring blocks per request: enough for ``window + sink`` exact tokens in every layer."""
    if window + sink == 0:
        return 0
    if min(tokens_per_block) < 1:
        from .config import LowRankConfigError

        raise LowRankConfigError("exact_window/exact_sink: a block of this format is smaller than one exact token "
                                 "(K and V in the model dtype); use a larger --block-size")
    return max(math.ceil((window + sink) / t) for t in tokens_per_block)


def ring_plan(cfg, num_layers: int, head_dim: int, model_dtype: torch.dtype, block_size: int) -> tuple[int, list[int]]:
    """(ring blocks per request, exact tokens a ring block holds in each layer) of a layered config
    (:class:`vllm_lowrank.config.LowRankConfig`): the layer with the smallest slot sets the blocks."""
    ring = ring_layout(head_dim, model_dtype, cfg.exact_dtype)
    slots = [SlotLayout.build(cfg.layer_format(i), head_dim, model_dtype).slot_bytes for i in range(num_layers)]
    per_block = [ring_tokens_per_block(block_size, s, ring) for s in slots]
    return ring_blocks(cfg.exact_window, cfg.exact_sink, per_block), per_block


def capacity_ratio(cfg, num_layers: int, head_dim: int, model_dtype: torch.dtype, block_size: int,
                   tokens: int) -> float:
    """How many more sequences of ``tokens`` tokens fit than in vLLM's own cache in the model dtype: its
    bytes over this config's (whole compressed blocks plus the ring blocks, every layer alike).
    What the evaluation tables call capacity; vLLM's own "KV cache size in tokens" counts ring blocks
    as tokens, so it overstates a layered cache's."""
    slots = sum(SlotLayout.build(cfg.layer_format(i), head_dim, model_dtype).slot_bytes for i in range(num_layers))
    ring = ring_plan(cfg, num_layers, head_dim, model_dtype, block_size)[0] if cfg.layered else 0
    blocks = math.ceil(tokens / block_size)
    return num_layers * 2 * head_dim * model_dtype.itemsize * blocks / (slots * (blocks + ring))


@dataclasses.dataclass(frozen=True, kw_only=True)
class LayeredAttentionSpec(FullAttentionSpec):
    """A full-attention spec whose requests also hold ``ring_blocks`` blocks of exact tokens."""

    ring_blocks: int = 0

    @classmethod
    def merge(cls, specs: list["LayeredAttentionSpec"]) -> "LayeredAttentionSpec":
        rings = {s.ring_blocks for s in specs}
        assert len(rings) == 1, f"layers of one KV cache group disagree on their ring blocks: {rings}"
        return dataclasses.replace(super().merge(specs), ring_blocks=rings.pop())

    def max_memory_usage_bytes(self, vllm_config) -> int:
        return super().max_memory_usage_bytes(vllm_config) + self.ring_blocks * self.page_size_bytes

    def max_num_blocks_per_req(self, vllm_config, max_len: int) -> int:
        return super().max_num_blocks_per_req(vllm_config, max_len) + self.ring_blocks


class LayeredAttentionManager(FullAttentionManager):
    """Allocates each request's ring blocks first, with its first compressed block."""

    def _ring_tokens(self) -> int:
        return getattr(self.kv_cache_spec, "ring_blocks", 0) * self.block_size

    def get_num_blocks_to_allocate(self, request_id: str, num_tokens: int, *args, **kwargs) -> int:
        return super().get_num_blocks_to_allocate(request_id, num_tokens + self._ring_tokens(), *args, **kwargs)

    def allocate_new_blocks(self, request_id: str, num_tokens: int, num_tokens_main_model: int):
        ring = self._ring_tokens()
        return super().allocate_new_blocks(request_id, num_tokens + ring, num_tokens_main_model + ring)


def register() -> None:
    """Register the spec and its manager with vLLM (after vLLM's own, which register only into an
    empty registry)."""
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(LayeredAttentionSpec, LayeredAttentionManager,
                                 uniform_type_base_spec=FullAttentionSpec)


def compressed_slot_mapping(block_table: torch.Tensor, req_of_token: torch.Tensor, positions: torch.Tensor,
                            ring: int, block_size: int) -> torch.Tensor:
    """Slots of the new tokens in the compressed cache: column ``ring + p // block_size`` of their row."""
    blocks = block_table[req_of_token.long(), ring + positions.long() // block_size]
    return blocks.long() * block_size + positions.long() % block_size


def new_token_slots(block_table: torch.Tensor, query_start_loc: torch.Tensor, num_reqs: int, seq_lens: torch.Tensor,
                    positions: torch.Tensor, ring: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(compressed slot, request) of each of a step's tokens [N], without a host sync; -1 for the padding
    that CUDA graphs add (tokens past the last request's, or at or past their request's length)."""
    token = torch.arange(positions.shape[0], device=positions.device, dtype=query_start_loc.dtype)
    req = torch.searchsorted(query_start_loc[1:num_reqs + 1], token, right=True)
    rows = min(num_reqs, block_table.shape[0])
    real = req < rows
    req_c = req.clamp(max=rows - 1)
    positions = positions.long()
    real &= (positions >= 0) & (positions < seq_lens[req_c])
    last = (block_table.shape[1] - ring) * block_size - 1  # padding positions may point past the row
    slots = compressed_slot_mapping(block_table, req_c, positions.clamp(0, last), ring, block_size)
    return torch.where(real, slots, -1), torch.where(real, req, -1)


def ring_cache(kv_cache: torch.Tensor, ring: SlotLayout) -> torch.Tensor:
    """The cache's pages as ring pages: a view [num_blocks, H, T, ring.slot_bytes] that the codec and the
    store kernel treat as a cache of ``T`` (:func:`ring_tokens_per_block`) slots a block."""
    nb, h, bs, sb = kv_cache.shape
    t = ring_tokens_per_block(bs, sb, ring)
    return kv_cache.view(nb, h, bs * sb)[:, :, :t * ring.slot_bytes].view(nb, h, t, ring.slot_bytes)


@functools.lru_cache(maxsize=None)
def ring_transforms(ring: SlotLayout, num_kv_heads: int) -> LayerTransforms:
    """The ring's transforms: none (exact tokens are stored as they come)."""
    d = ring.head_dim
    return LayerTransforms(build_tensor_transform(ring.k.fmt, num_kv_heads, d, None, None),
                           build_tensor_transform(ring.v.fmt, num_kv_heads, d, None, None))


def ring_slots(block_table: torch.Tensor, rows: torch.Tensor, index: torch.Tensor, tokens_per_block: int) -> torch.Tensor:
    """Ring-cache slots of ring index ``index`` of block-table rows ``rows`` (the ring columns first)."""
    index = index.long()
    return block_table[rows.long(), index // tokens_per_block].long() * tokens_per_block + index % tokens_per_block


def ring_store_slots(block_table: torch.Tensor, req_of_token: torch.Tensor, positions: torch.Tensor,
                     last: torch.Tensor, window: int, sink: int, tokens_per_block: int) -> list[torch.Tensor]:
    """Ring-cache slots [N] (-1: not written) that new tokens are stored to, without a host sync: ring
    index ``p % window`` for the last ``window`` positions of their request (``p > last - window``;
    earlier ones would share their ring slots) and ``window + p`` for ``p < sink``. ``req_of_token``
    [N]: each token's block-table row (< 0: padding); ``last`` [N]: its request's last position."""
    req = req_of_token.long()
    pos = positions.long()
    real = (req >= 0) & (pos >= 0) & (pos <= last)
    req = req.clamp(min=0)
    targets = []
    if window:
        targets.append((real & (pos > last - window), pos % window))
    if sink:
        targets.append((real & (pos < sink), (window + pos).clamp(0, window + sink - 1)))
    return [torch.where(keep, ring_slots(block_table, req, index, tokens_per_block), -1) for keep, index in targets]


def store_exact(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                req_of_token: torch.Tensor, positions: torch.Tensor, window: int, sink: int,
                ring: SlotLayout | None = None) -> None:
    """Write new tokens' exact K/V [N, H, D] to ring index ``p % window`` and, if ``p < sink``, also to
    ``window + p`` (``req_of_token`` [N]: each token's block-table row, < 0 for padding), as slots of
    ``ring`` (default: the model dtype's); a request's last position is its last new token's.
    :func:`vllm_lowrank.kernels.store_ring` is the same with the requests' lengths given."""
    if key.shape[0] == 0:
        return
    ring = ring or ring_layout(key.shape[-1], key.dtype)
    cache = ring_cache(kv_cache, ring)
    req = req_of_token.long()
    pos = torch.where(req >= 0, positions.long(), -1)
    last = torch.full((block_table.shape[0],), -1, dtype=torch.long, device=key.device)
    last = last.scatter_reduce(0, req.clamp(min=0), pos, "amax")[req.clamp(min=0)]
    for slots in ring_store_slots(block_table, req, pos, last, window, sink, cache.shape[2]):
        reference.store(key, value, cache, slots, ring, ring_transforms(ring, key.shape[1]))


def read_exact(kv_cache: torch.Tensor, block_table_row: torch.Tensor, length: int, window: int, sink: int,
               ring: SlotLayout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(positions [P], K [P, H, D], V [P, H, D] float32) held in the ring once tokens ``0..length-1`` are
    stored: the last ``window`` (ring index ``p % window``) and the first ``sink`` before them (``window + p``)."""
    device = block_table_row.device
    recent = torch.arange(max(0, length - window), length, device=device)
    first = torch.arange(0, min(sink, max(0, length - window)), device=device)
    positions = torch.cat((first, recent))
    index = torch.cat((window + first, recent % window if window else recent))
    cache = ring_cache(kv_cache, ring)
    slots = ring_slots(block_table_row[None, :], torch.zeros_like(index), index, cache.shape[2])
    k, v = decode_layer(reference.read_slots(cache, slots, ring), ring)
    return positions, k, v


_SCORES_PER_BLOCK = 1 << 25  # float32 scores of one query block in layered_attention (128 MiB a tensor)


def layered_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                      block_table_row: torch.Tensor, ring: int, length: int, window: int, sink: int,
                      layout: SlotLayout, transforms: LayerTransforms, scale: float, out: torch.Tensor,
                      ring_slot: SlotLayout | None = None) -> None:
    """One request's new tokens [Q, Hq, D] attending over its ``length`` tokens, written into ``out``.

    Called before the new tokens go into the ring (:func:`store_exact` after attention), so that a chunk
    longer than the window still finds its predecessors' exact tokens there. Query ``t`` reads exact the
    positions ``p <= t`` with ``p > t - window`` or ``p < sink`` that are held exact (in the ring, or
    among this step's own tokens ``key``/``value`` [Q, H, D]); every other
    position comes from the compressed cache. Scores against exact keys subtract the key offset, as the
    compressed ones do; exact values enter as ``v - c_v``, the offset being added back once. With an
    int8 ring (``ring_slot``), the step's own tokens are read as the ring stores them.
    """
    nq, hq, d = query.shape
    h = kv_cache.shape[1]
    group = hq // h
    device = query.device
    first = length - nq
    k_lat, v_lat = reference.request_latents(kv_cache, block_table_row[ring:], length, layout)  # [L, H, r]
    ring_slot = ring_slot or ring_layout(d, key.dtype)
    held, k_ring, v_ring = read_exact(kv_cache, block_table_row[:ring], first, window, sink, ring_slot)
    if ring_slot.k.fmt.storage != "model":  # the step's own tokens as the ring holds them (as decode reads them)
        key, value = decode_layer(encode_layer(key, value, ring_slot, ring_transforms(ring_slot, h)), ring_slot)
    k_ex = torch.zeros(length, h, d, device=device, dtype=torch.float32)
    v_ex = torch.zeros_like(k_ex)
    is_held = torch.zeros(length, dtype=torch.bool, device=device)
    k_ex[held], v_ex[held], is_held[held] = k_ring, v_ring, True
    k_ex[first:], v_ex[first:], is_held[first:] = key.float(), value.float(), True
    if transforms.k.offset is not None:
        k_ex = k_ex - transforms.k.offset.float()
    if transforms.v.offset is not None:
        v_ex = v_ex - transforms.v.offset.float()

    q_lat = transforms.k.project_query(query, group)  # [Q, Hq, r_k]
    k_lat_g = k_lat.repeat_interleave(group, dim=1)
    v_lat_g = v_lat.repeat_interleave(group, dim=1)
    k_ex_g = k_ex.repeat_interleave(group, dim=1)
    v_ex_g = v_ex.repeat_interleave(group, dim=1)
    p = torch.arange(length, device=device)[None, :]  # [1, L]
    rows = max(1, _SCORES_PER_BLOCK // (hq * length))  # query rows a block: bounded [Hq, rows, L] scores
    for a in range(0, nq, rows):
        b = min(nq, a + rows)
        t = torch.arange(first + a, first + b, device=device)[:, None]  # [rows, 1]
        causal = p <= t
        exact = causal & is_held[None, :] & ((p > t - window) | (p < sink))
        compressed = causal & ~exact
        s_c = torch.einsum("qhr,lhr->hql", q_lat[a:b].float(), k_lat_g) * scale
        s_e = torch.einsum("qhd,lhd->hql", query[a:b].float(), k_ex_g) * scale
        s = torch.where(exact[None], s_e, s_c).masked_fill(~causal[None], float("-inf"))
        w = torch.softmax(s, dim=-1)
        o_lat = torch.einsum("hql,lhr->qhr", w.masked_fill(~compressed[None], 0.0), v_lat_g)
        o_ex = torch.einsum("hql,lhd->qhd", w.masked_fill(~exact[None], 0.0), v_ex_g)
        out[a:b] = (transforms.v.reconstruct(o_lat, group) + o_ex).to(out.dtype)
