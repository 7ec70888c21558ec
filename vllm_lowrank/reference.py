"""Plain PyTorch store and paged attention over compressed slots: the CPU path and the kernels' oracle.

Cache tensor: uint8 [num_blocks, H, block_size, slot_bytes], each (block, head) page laid out field
by field (:mod:`vllm_lowrank.formats`); :func:`read_slots`/:func:`write_slots` convert between it and
slot rows [..., H, slot_bytes], which the codec encodes and decodes. A request's token j lives at slot
``block_table[req, j // block_size] * block_size + j % block_size``. Attention is computed in the latent
space: the query is projected once (``P_k^T q``), scores use the original softmax scale, and values are
rebuilt after the reduction (``P_v o_lat + c_v``).
"""

from __future__ import annotations

import functools

import torch

from .codec import decode_layer, encode_layer
from .formats import SlotLayout
from .transforms import LayerTransforms


@functools.lru_cache(maxsize=64)
def _page_index(layout: SlotLayout, block_size: int, device: torch.device) -> torch.Tensor:
    return layout.page_index(block_size, device)


def _page_coords(kv_cache: torch.Tensor, slots: torch.Tensor, layout: SlotLayout):
    """(pages [num_blocks, H, page bytes] view, advanced index) addressing ``slots``' rows [..., H, slot]."""
    nb, h, bs, sb = kv_cache.shape
    assert sb == layout.slot_bytes, f"cache slot of {sb} bytes, layout has {layout.slot_bytes}"
    pages = kv_cache.view(nb, h, bs * sb)
    slots = slots.long()
    idx = _page_index(layout, bs, kv_cache.device)[slots % bs]  # [..., sb]
    heads = torch.arange(h, device=kv_cache.device)[:, None]
    return pages, ((slots // bs)[..., None, None], heads, idx[..., None, :])


def read_slots(kv_cache: torch.Tensor, slots: torch.Tensor, layout: SlotLayout) -> torch.Tensor:
    """Slot rows [..., H, slot_bytes] of cache slots ``slots`` [...] (non-negative)."""
    pages, index = _page_coords(kv_cache, slots, layout)
    return pages[index]


def write_slots(kv_cache: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor, layout: SlotLayout) -> None:
    """Write slot rows [N, H, slot_bytes] to cache slots ``slots`` [N] (non-negative)."""
    pages, index = _page_coords(kv_cache, slots, layout)
    pages[index] = rows


def store(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
          layout: SlotLayout, transforms: LayerTransforms) -> None:
    """Encode keys/values [N, H, D] and scatter them to ``slot_mapping`` (slots < 0 are padding)."""
    n = slot_mapping.shape[0]
    if n == 0:
        return
    slots, key, value = slot_mapping[:n].long(), key[:n], value[:n]
    valid = slots >= 0
    if not bool(valid.all()):
        slots, key, value = slots[valid], key[valid], value[valid]
    write_slots(kv_cache, slots, encode_layer(key, value, layout, transforms), layout)


def gather_slots(block_table_row: torch.Tensor, length: int, block_size: int) -> torch.Tensor:
    """Slot numbers of a request's tokens 0..length-1."""
    j = torch.arange(length, device=block_table_row.device)
    return block_table_row[j // block_size].long() * block_size + j % block_size


def request_latents(kv_cache: torch.Tensor, block_table_row: torch.Tensor, length: int,
                    layout: SlotLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """Latent K [L, H, r_k] and V [L, H, r_v] (float32) of one request's first ``length`` tokens."""
    slots = gather_slots(block_table_row, length, kv_cache.shape[2])
    return decode_layer(read_slots(kv_cache, slots, layout), layout)


def attend_latent(q_lat: torch.Tensor, k_lat: torch.Tensor, v_lat: torch.Tensor, q_pos: torch.Tensor,
                  scale: float) -> torch.Tensor:
    """Causal attention in latent space: q_lat [Q, Hq, r_k], k/v_lat [L, H, r], query positions [Q].

    Query i sees cached tokens 0..q_pos[i]. Returns the latent output [Q, Hq, r_v] in float32.
    """
    group = q_lat.shape[1] // k_lat.shape[1]
    k = k_lat.repeat_interleave(group, dim=1)
    v = v_lat.repeat_interleave(group, dim=1)
    s = torch.einsum("qhr,lhr->hql", q_lat, k) * scale
    mask = torch.arange(k.shape[0], device=s.device)[None, :] <= q_pos[:, None]
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1)
    return torch.einsum("hql,lhr->qhr", p, v)


def exact_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of a whole prompt over its own uncompressed K/V: q [Q, Hq, D], k/v [Q, H, D].

    Float32 on the CPU; the model dtype elsewhere (SDPA's flash kernels on CUDA).
    """
    group = q.shape[1] // k.shape[1]
    dt = torch.float32 if q.device.type == "cpu" else q.dtype
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1).to(dt), k.repeat_interleave(group, 1).transpose(0, 1).to(dt),
        v.repeat_interleave(group, 1).transpose(0, 1).to(dt), is_causal=True, scale=scale)
    return out.transpose(0, 1)


def paged_attention(query: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                    seq_lens: list[int], query_start_loc: list[int], layout: SlotLayout,
                    transforms: LayerTransforms, scale: float, out: torch.Tensor) -> None:
    """Attention of every query token over its request's compressed context, written into ``out``.

    query/out: [T, Hq, D]; ``seq_lens[i]`` counts request i's context including its new tokens, which
    occupy the last ``q_len`` positions. Works for decodes, continuation chunks and prefix-cache hits.
    """
    hq = query.shape[1]
    group = hq // kv_cache.shape[1]
    for i, length in enumerate(seq_lens):
        q0, q1 = query_start_loc[i], query_start_loc[i + 1]
        if q1 <= q0:
            continue
        k_lat, v_lat = request_latents(kv_cache, block_table[i], length, layout)
        q_pos = torch.arange(length - (q1 - q0), length, device=query.device)
        q_lat = transforms.k.project_query(query[q0:q1], group)
        o_lat = attend_latent(q_lat, k_lat, v_lat, q_pos, scale)
        out[q0:q1] = transforms.v.reconstruct(o_lat, group).to(out.dtype)


def decode_attention(query: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                     seq_lens: torch.Tensor, layout: SlotLayout, transforms: LayerTransforms,
                     scale: float, out: torch.Tensor) -> None:
    """Batched single-token decode: query/out [B, Hq, D], request b attends to its seq_lens[b] tokens."""
    b = query.shape[0]
    if b == 0:
        return
    hq, h, bs = query.shape[1], kv_cache.shape[1], kv_cache.shape[2]
    group = hq // h
    max_len = int(seq_lens.max())
    j = torch.arange(max_len, device=query.device)
    slots = block_table[:, :(max_len + bs - 1) // bs].long()[:, j // bs] * bs + j % bs  # [B, L]
    valid = j[None, :] < seq_lens[:, None].to(j.device)
    slots = torch.where(valid, slots, torch.zeros_like(slots))
    k_lat, v_lat = decode_layer(read_slots(kv_cache, slots, layout), layout)  # [B, L, H, r]
    v_lat = v_lat.masked_fill(~valid[:, :, None, None], 0.0)  # padding rows hold stale bytes (maybe NaN)
    q_lat = transforms.k.project_query(query, group).view(b, h, group, -1)
    s = torch.einsum("bhgr,blhr->bhgl", q_lat, k_lat) * scale
    s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1)
    o_lat = torch.einsum("bhgl,blhr->bhgr", p, v_lat).reshape(b, hq, -1)
    out[:] = transforms.v.reconstruct(o_lat, group).to(out.dtype)
