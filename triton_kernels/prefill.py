"""Prefill kernel: causal attention of query chunks over their compressed paged context.

For chunked-prefill continuations, prefix-cache hits and evaluation runs that attend over the stored
compressed K/V. Query token ``i`` of request ``b`` sits at position ``seq_len - q_len + i`` and sees
cached tokens ``0 .. position`` (the chunk's own tokens must already be stored).

Grid (request, query tile, kv_head). A program's M rows are ``BLOCK_Q`` query tokens x the query group
of its KV head (GQA: each cached tile is read once for the whole group and ``BLOCK_Q`` tokens), padded
to a power of two; it walks the cached tokens up to its last query's position in tiles of ``BLOCK_N``
(block-table gather, the same dequantizing helpers as decode), keeps an online softmax in the latent
space and writes ``P_v o_lat + c_v``. No decompressed copy of the context is ever made.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_lowrank.formats import SlotLayout
from vllm_lowrank.transforms import LayerTransforms

from .common import (INT4, LOG2E, check_cache, dot_dtypes, interpreted, layout_constexprs, load_query,
                     next_pow2, project_queries, store_output, transform_args, attend_tile)


@triton.jit(do_not_specialize=["req_start"])
def _prefill_kernel(
    q_ptr, stride_qt, stride_qh,  # queries [T, Hq, RK]: projected (float32) or raw (model dtype)
    cache_ptr, stride_cblk,  # uint8 [num_blocks, H, BLOCK_SIZE, slot_bytes], pages field by field
    STRIDE_CHEAD: tl.constexpr,  # page bytes (BLOCK_SIZE * slot_bytes), a constexpr: known alignment
    block_table_ptr, stride_btb,  # int32 [num_reqs, max_blocks]
    seq_lens_ptr, query_start_ptr,  # int32 [num_reqs], [num_reqs + 1]
    req_start,  # first request of this launch (program 0 of grid dim 0)
    out_ptr, stride_ot, stride_oh,  # [T, Hq, D] model dtype
    basis_ptr, offset_ptr,  # P_v [H, D, RV] float32, c_v [H, D] float32
    qk_scale,  # softmax scale * log2(e)
    G: tl.constexpr, G_P2: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, TILE_B: tl.constexpr, D: tl.constexpr, D_TILE: tl.constexpr,
    K_STORAGE: tl.constexpr, K_OFF: tl.constexpr, K_BYTES: tl.constexpr, K_SCALE_OFF: tl.constexpr,
    K_ZERO_OFF: tl.constexpr, K_T: tl.constexpr, RK: tl.constexpr, RK_TILE: tl.constexpr,
    V_STORAGE: tl.constexpr, V_OFF: tl.constexpr, V_BYTES: tl.constexpr, V_SCALE_OFF: tl.constexpr,
    V_ZERO_OFF: tl.constexpr, V_T: tl.constexpr, RV: tl.constexpr, RV_TILE: tl.constexpr,
    MODEL_DTYPE: tl.constexpr, QK_DTYPE: tl.constexpr, PV_DTYPE: tl.constexpr, UPCAST: tl.constexpr,
    HAS_BASIS: tl.constexpr, HAS_OFFSET: tl.constexpr,
):
    """Attention of ``BLOCK_Q`` query tokens x one query group over their causal compressed context."""
    b = tl.program_id(0) + req_start
    q_tile = tl.program_id(1)
    h = tl.program_id(2)
    M: tl.constexpr = BLOCK_Q * G_P2

    q0 = tl.load(query_start_ptr + b)
    q_len = tl.load(query_start_ptr + b + 1) - q0
    seq_len = tl.load(seq_lens_ptr + b)
    first = q_tile * BLOCK_Q
    if first < q_len:
        r = tl.arange(0, M)
        qi = first + r // G_P2  # query token index within the request
        g = r % G_P2
        row_mask = (qi < q_len) & (g < G)
        pos = seq_len - q_len + tl.minimum(qi, q_len - 1)  # padding rows reuse the last token's position
        q_rows = q_ptr + (q0 + tl.minimum(qi, q_len - 1)).to(tl.int64) * stride_qt + (h * G + g) * stride_qh
        q_a, q_b, q_sum, q_mul = load_query(q_rows, row_mask, K_STORAGE, RK, RK_TILE, QK_DTYPE)
        qk_row = q_mul * qk_scale

        m_i = tl.full((M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((M,), dtype=tl.float32)
        acc_a = tl.zeros((M, RV_TILE), dtype=tl.float32)
        acc_b = tl.zeros((M, RV_TILE), dtype=tl.float32)
        acc_z = tl.zeros((M,), dtype=tl.float32)

        bt_row = block_table_ptr + b.to(tl.int64) * stride_btb
        head_off = h.to(tl.int64) * STRIDE_CHEAD
        end = seq_len - q_len + tl.minimum(first + BLOCK_Q, q_len)  # past the tile's last position
        # tiles before the tile's first query position need neither the causal nor the end mask
        free_end = (seq_len - q_len + first + 1) // BLOCK_N * BLOCK_N
        for t0 in range(0, free_end, BLOCK_N):
            m_i, l_i, acc_a, acc_b, acc_z = attend_tile(
                t0, 0, end, pos, m_i, l_i, acc_a, acc_b, acc_z, cache_ptr, bt_row, stride_cblk, head_off, q_a, q_b,
                q_sum, qk_row, K_STORAGE, K_OFF, K_BYTES, K_SCALE_OFF, K_ZERO_OFF, K_T, RK, RK_TILE, V_STORAGE,
                V_OFF, V_BYTES, V_SCALE_OFF, V_ZERO_OFF, V_T, RV, RV_TILE, BLOCK_SIZE, BLOCK_N, TILE_B, MODEL_DTYPE,
                QK_DTYPE, PV_DTYPE, UPCAST, False, True)
        for t0 in range(free_end, end, BLOCK_N):
            m_i, l_i, acc_a, acc_b, acc_z = attend_tile(
                t0, 0, end, pos, m_i, l_i, acc_a, acc_b, acc_z, cache_ptr, bt_row, stride_cblk, head_off, q_a, q_b,
                q_sum, qk_row, K_STORAGE, K_OFF, K_BYTES, K_SCALE_OFF, K_ZERO_OFF, K_T, RK, RK_TILE, V_STORAGE,
                V_OFF, V_BYTES, V_SCALE_OFF, V_ZERO_OFF, V_T, RV, RV_TILE, BLOCK_SIZE, BLOCK_N, TILE_B, MODEL_DTYPE,
                QK_DTYPE, PV_DTYPE, UPCAST, True, True)

        inv_l = 1.0 / l_i  # every row sees at least token 0
        out_rows = out_ptr + (q0 + qi).to(tl.int64) * stride_ot + (h * G + g) * stride_oh
        if V_STORAGE == INT4:
            store_output((acc_a + acc_z[:, None]) * inv_l[:, None], (acc_b + acc_z[:, None]) * inv_l[:, None],
                         out_rows, row_mask, basis_ptr, offset_ptr, h, RV, RV_TILE, D, D_TILE, True, HAS_BASIS,
                         HAS_OFFSET)
        else:
            o = acc_a * inv_l[:, None]
            store_output(o, o, out_rows, row_mask, basis_ptr, offset_ptr, h, RV, RV_TILE, D, D_TILE, False,
                         HAS_BASIS, HAS_OFFSET)


def paged_attention(query: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                    seq_lens: torch.Tensor, query_start_loc: torch.Tensor, max_query_len: int,
                    layout: SlotLayout, transforms: LayerTransforms, scale: float, out: torch.Tensor,
                    requests: tuple[int, int] | None = None, block_m: int = 64, block_n: int = 64,
                    num_warps: int = 4, num_stages: int = 2) -> None:
    """Causal attention of every query token over its request's compressed context, into ``out``.

    Like :func:`vllm_lowrank.reference.paged_attention`, except that ``seq_lens`` [R] and
    ``query_start_loc`` [R + 1] are int32 tensors on the device (not lists) and ``max_query_len`` (a
    host int, an upper bound of the chunks' lengths) sizes the grid. query/out: [T, Hq, D] (last dim
    contiguous); ``seq_lens[i]`` counts request i's context including its new tokens. ``requests``
    = (first, end) restricts the launch to those requests; it is a kernel argument rather than a slice
    of the metadata tensors, so that one compiled kernel serves every batch (sliced pointers change
    Triton's alignment specialisation and would compile a variant per offset).
    """
    first, end = requests if requests is not None else (0, seq_lens.shape[0])
    if end <= first or max_query_len == 0:
        return
    t, hq, d = query.shape
    _, h, block_size = check_cache(kv_cache, layout)
    assert out.stride(-1) == 1
    assert block_table.stride(-1) == 1
    group = hq // h
    g_p2 = next_pow2(group)
    assert max(block_size, block_n) % min(block_size, block_n) == 0, "tiles are whole blocks or parts of one"
    # fixed by the group alone (not by the chunk lengths): one compiled variant per layer format
    block_q = max(1, block_m // g_p2, -(-16 // g_p2))  # M = block_q * g_p2 >= 16 for tl.dot

    q = project_queries(query, transforms.k, h)
    if q.stride(-1) != 1:
        q = q.contiguous()
    basis, offset, has_basis, has_offset = transform_args(transforms.v, q)
    grid = (end - first, triton.cdiv(max_query_len, block_q), h)
    _prefill_kernel[grid](
        q, q.stride(0), q.stride(1), kv_cache, kv_cache.stride(0), kv_cache.stride(1),
        block_table, block_table.stride(0), seq_lens, query_start_loc, first, out, out.stride(0), out.stride(1),
        basis, offset, scale * LOG2E,
        G=group, G_P2=g_p2, BLOCK_Q=block_q, BLOCK_SIZE=block_size, BLOCK_N=block_n,
        TILE_B=min(block_size, block_n), D=d,
        D_TILE=max(16, next_pow2(d)), **layout_constexprs(layout), **dot_dtypes(layout),
        UPCAST=interpreted(_prefill_kernel), HAS_BASIS=has_basis, HAS_OFFSET=has_offset,
        num_warps=num_warps, num_stages=num_stages)


def compile_prefill(kv_cache: torch.Tensor, block_table_stride: int, num_q_heads: int, dtype: torch.dtype,
                    layout: SlotLayout, transforms: LayerTransforms, scale: float) -> None:
    """Compile (by one tiny launch) the :func:`paged_attention` variant that a layer's real launches use.

    One query token over block 0 of ``kv_cache`` (read only) into scratch. Triton specialises on
    pointer alignment and on integer arguments (strides): the scratch tensors have the real ones'
    strides (queries and outputs [T, Hq, D], a block table ``block_table_stride`` wide), so later
    launches over the real metadata find this variant compiled.
    """
    dev = kv_cache.device
    block_table = torch.zeros(1, block_table_stride, dtype=torch.int32, device=dev)
    seq_lens = torch.ones(1, dtype=torch.int32, device=dev)
    query_start_loc = torch.tensor([0, 1], dtype=torch.int32, device=dev)
    q = torch.zeros(1, num_q_heads, layout.head_dim, dtype=dtype, device=dev)
    paged_attention(q, kv_cache, block_table, seq_lens, query_start_loc, 1, layout, transforms, scale,
                    torch.empty_like(q))
