"""Decode kernel: split-KV (flash-decoding) paged attention over compressed slots.

One query token per request. Stage 1, grid (batch, kv_head, split): each program takes the whole query
group of its KV head (GQA: every KV block is read once, for all the heads that share it) as the M rows
of ``tl.dot`` tiles (padded to 16), walks its split of the request's tokens in tiles of ``BLOCK_N``
(gathered through the block table), and keeps an online softmax in the latent space. Stage 2, grid
(batch, kv_head): log-sum-exp merge of the splits, then the values are rebuilt once per query head
(``P_v o_lat + c_v``, a float32 ``tl.dot``) and written in the model dtype.

The split count is fixed by the caller (no data-dependent grid, no host sync: CUDA-graph safe); a
split that falls past a request's length writes an empty partial (lse = -inf). Scratch: a float32
buffer of :func:`workspace_numel` elements, preallocatable.

A layered cache adds one program per (request, KV head) to stage 1, split index 0 (the compressed splits
follow it): it attends over the request's ring of exact tokens in model space (:func:`_ring_split`,
tensor-core dots) while the other splits read the compressed ones, and stage 2 merges its partial as one
more split.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from vllm_lowrank.formats import SlotLayout, ring_layout
from vllm_lowrank.transforms import LayerTransforms

from .common import (FP8, INT4, LOG2E, MODEL, attend_tile, check_cache, dot, dot_dtypes, exact_start, exact_step,
                     interpreted, layout_constexprs, load_payload, load_query, next_pow2, nibbles_to_dot,
                     ring_constexprs, ring_tile, store_output, tile_pages, tile_scales, to_dot, transform_args,
                     transform_ptrs)
from .query import project_queries


# --- token rows: the cached tokens as the dots' M dimension ------------------------------------------
# ``s^T = K q^T`` [BLOCK_N, G_TILE] and ``o^T += V^T p^T`` [RV_TILE, G_TILE]: the tokens fill the
# tensor cores' 16 rows and the query group is the N dimension, which may be 8 wide, so a group of 4
# wastes half of the softmax work instead of three quarters (rows padded to 16). Transposed V payloads
# are then the ``V^T`` operand as stored (contiguous along tokens).


@triton.jit
def _attend_tile_t(t0, begin, end, m_i, l_i, acc_a, acc_b, acc_z, cache_ptr, bt_row, stride_blk, head_off,
                   qt_a, qt_b, q_sum, qk_row,
                   K_STORAGE: tl.constexpr, K_OFF: tl.constexpr, K_BYTES: tl.constexpr, K_SCALE_OFF: tl.constexpr,
                   K_ZERO_OFF: tl.constexpr, K_T: tl.constexpr, RK: tl.constexpr, RK_TILE: tl.constexpr,
                   V_STORAGE: tl.constexpr, V_OFF: tl.constexpr, V_BYTES: tl.constexpr, V_SCALE_OFF: tl.constexpr,
                   V_ZERO_OFF: tl.constexpr, V_T: tl.constexpr, RV: tl.constexpr, RV_TILE: tl.constexpr,
                   BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, TILE_B: tl.constexpr, MODEL_DTYPE: tl.constexpr,
                   QK_DTYPE: tl.constexpr, PV_DTYPE: tl.constexpr, UPCAST: tl.constexpr, MASKED: tl.constexpr):
    """:func:`attend_tile` with tokens as rows: ``qt_*`` [RK_TILE, G_TILE], accumulators [RV_TILE, G_TILE]."""
    IS_F32_QK: tl.constexpr = QK_DTYPE == tl.float32
    IS_F32_PV: tl.constexpr = PV_DTYPE == tl.float32
    page, w0, mask = tile_pages(bt_row, t0, end, stride_blk, head_off, BLOCK_SIZE, BLOCK_N, TILE_B, MASKED)
    zero = tl.zeros((BLOCK_N, qt_a.shape[1]), dtype=tl.float32)
    if K_STORAGE == INT4:
        b = load_payload(cache_ptr, page, w0, mask, K_STORAGE, K_OFF, K_BYTES, (RK + 1) // 2, RK_TILE, TILE_B,
                         BLOCK_SIZE, MODEL_DTYPE, K_T, False)
        s = dot(nibbles_to_dot(b, False, QK_DTYPE, UPCAST), qt_a, zero, IS_F32_QK, UPCAST)
        s = dot(nibbles_to_dot(b, True, QK_DTYPE, UPCAST), qt_b, s, IS_F32_QK, UPCAST)
    else:
        k = load_payload(cache_ptr, page, w0, mask, K_STORAGE, K_OFF, K_BYTES, RK, RK_TILE, TILE_B, BLOCK_SIZE,
                         MODEL_DTYPE, K_T, False)
        s = dot(to_dot(k, QK_DTYPE, UPCAST), qt_a, zero, IS_F32_QK, UPCAST)
    if K_STORAGE != MODEL:
        s = s * tile_scales(cache_ptr, page, w0, mask, K_SCALE_OFF, TILE_B, BLOCK_SIZE)[:, None]
    if K_STORAGE == INT4:
        s += tile_scales(cache_ptr, page, w0, mask, K_ZERO_OFF, TILE_B, BLOCK_SIZE)[:, None] * q_sum[None, :]
    s = s * qk_row[None, :]
    if MASKED:
        tok = t0 + tl.arange(0, BLOCK_N)
        s = tl.where(((tok < end) & (tok >= begin))[:, None], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=0))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[None, :])
    l_i = l_i * alpha + tl.sum(p, axis=0)
    acc_a = acc_a * alpha[None, :]
    if V_STORAGE == MODEL:
        vt = load_payload(cache_ptr, page, w0, mask, V_STORAGE, V_OFF, V_BYTES, RV, RV_TILE, TILE_B, BLOCK_SIZE,
                          MODEL_DTYPE, V_T, True, True)
        acc_a = dot(vt.to(PV_DTYPE), p.to(PV_DTYPE), acc_a, IS_F32_PV, UPCAST)
        return m_new, l_i, acc_a, acc_b, acc_z
    v_scale = tile_scales(cache_ptr, page, w0, mask, V_SCALE_OFF, TILE_B, BLOCK_SIZE)
    if PV_DTYPE == tl.float16:  # weights over the tile's largest scale: see tile_pv
        s_max = tl.max(v_scale, axis=0)
        s_max = tl.where(s_max > 0, s_max, 1.0)
    else:
        s_max = 1.0
    pv = (p * (v_scale / s_max)[:, None]).to(PV_DTYPE)
    zero_o = tl.zeros(acc_a.shape, dtype=tl.float32)
    if V_STORAGE == INT4:
        acc_b = acc_b * alpha[None, :]
        acc_z = acc_z * alpha
        bt = load_payload(cache_ptr, page, w0, mask, V_STORAGE, V_OFF, V_BYTES, (RV + 1) // 2, RV_TILE, TILE_B,
                          BLOCK_SIZE, MODEL_DTYPE, V_T, False, True)
        acc_a += s_max * dot(nibbles_to_dot(bt, False, PV_DTYPE, UPCAST), pv, zero_o, IS_F32_PV, UPCAST)
        acc_b += s_max * dot(nibbles_to_dot(bt, True, PV_DTYPE, UPCAST), pv, zero_o, IS_F32_PV, UPCAST)
        v_zero = tile_scales(cache_ptr, page, w0, mask, V_ZERO_OFF, TILE_B, BLOCK_SIZE)
        z_over_s = tl.where(v_scale > 0, v_zero / tl.where(v_scale > 0, v_scale, 1.0), 0.0)
        acc_z += tl.sum(tl.where(v_scale[:, None] > 0, s_max * pv.to(tl.float32) * z_over_s[:, None],
                                 p * v_zero[:, None]), axis=0)
    else:
        vt = to_dot(load_payload(cache_ptr, page, w0, mask, V_STORAGE, V_OFF, V_BYTES, RV, RV_TILE, TILE_B,
                                 BLOCK_SIZE, MODEL_DTYPE, V_T, False, True), PV_DTYPE, UPCAST)
        if V_STORAGE == FP8:  # a stale byte past the end may be NaN
            vt = tl.where(tl.reshape(mask, (BLOCK_N,))[None, :], vt, 0.0)
        acc_a += s_max * dot(vt, pv, zero_o, IS_F32_PV, UPCAST)
    return m_new, l_i, acc_a, acc_b, acc_z


@triton.jit
def _ring_split(q_rows, g_mask, cache_ptr, ring_row, stride_cblk, head_off, seq_len, k_offset_ptr, v_offset_ptr, h,
                qk_scale, RING_W: tl.constexpr, RING_S: tl.constexpr, RING_T: tl.constexpr, RING_N: tl.constexpr,
                RING_INT8: tl.constexpr, RING_K_OFF: tl.constexpr, RING_K_BYTES: tl.constexpr,
                RING_K_SCALE_OFF: tl.constexpr, RING_K_T: tl.constexpr, RING_V_OFF: tl.constexpr,
                RING_V_BYTES: tl.constexpr, RING_V_SCALE_OFF: tl.constexpr, RING_V_T: tl.constexpr,
                D: tl.constexpr, D_TILE: tl.constexpr, G_TILE: tl.constexpr, MODEL_DTYPE: tl.constexpr,
                HAS_K_OFFSET: tl.constexpr, HAS_V_OFFSET: tl.constexpr, UPCAST: tl.constexpr):
    """Attention of a query group over the exact tokens of its request's ring (the new one already there),
    the one split in model space (see :func:`ring_tile`). Returns ``(lse, o)``: log2-sum-exp [G_TILE]
    (-inf if empty) and the normalised ``sum_j p_j (v_j - c_v)`` [G_TILE, D_TILE]."""
    d = tl.arange(0, D_TILE)
    d_mask = d < D
    q, qc, c_v, m_i, l_i, acc = exact_start(q_rows, g_mask, k_offset_ptr, v_offset_ptr, h, D, D_TILE, HAS_K_OFFSET,
                                            HAS_V_OFFSET)
    for j0 in range(0, RING_W + RING_S, RING_N):
        _, valid, k, k_scale, v, v_scale = ring_tile(j0, seq_len, cache_ptr, ring_row, stride_cblk, head_off, d,
                                                     d_mask, RING_W, RING_S, RING_T, RING_N, RING_INT8, RING_K_OFF,
                                                     RING_K_BYTES, RING_K_SCALE_OFF, RING_K_T, RING_V_OFF,
                                                     RING_V_BYTES, RING_V_SCALE_OFF, RING_V_T, MODEL_DTYPE)
        keep = tl.broadcast_to(valid[None, :], (G_TILE, RING_N))  # every held position is exact for the new token
        m_i, l_i, acc = exact_step(q, qc, c_v, k, k_scale, v, v_scale, keep, m_i, l_i, acc, qk_scale, RING_INT8,
                                   HAS_V_OFFSET, UPCAST)
    lse = tl.where(l_i > 0, m_i + tl.log2(l_i), float("-inf"))
    return lse, acc / tl.where(l_i > 0, l_i, 1.0)[:, None]


@triton.jit(do_not_specialize=["num_splits"])
def _decode_split_kernel(
    q_ptr, stride_qb, stride_qh,  # queries: raw [B, Hq, D] (model dtype), projected here (Q_HAS_*), or
    # projected on the host [B, Hq, RK] (float32; see projects_query)
    k_basis_ptr, k_smooth_ptr,  # P_k [H, D, RK], s_k [H, D] float32: the query's projection P_k^T (s q)
    cache_ptr, stride_cblk,  # uint8 [num_blocks, H, BLOCK_SIZE, slot_bytes], pages field by field
    STRIDE_CHEAD: tl.constexpr,  # page bytes (BLOCK_SIZE * slot_bytes), a constexpr: known alignment
    block_table_ptr, stride_btb,  # int32 [B, max_blocks]
    seq_lens_ptr,  # int32 [B]
    part_o_ptr, part_lse_ptr,  # float32 [B, Hq, num_splits, RV], [B, Hq, num_splits]
    qk_scale,  # softmax scale * log2(e)
    num_splits,  # splits per request over the compressed tokens (grid dim 2, plus one with a ring)
    # a layered cache's ring, the program of split index 0 (unused unless RING_W + RING_S > 0):
    xq_ptr, stride_xqb, stride_xqh,  # raw queries [B, Hq, D] (model dtype)
    ring_ptr, stride_rb,  # int32 [B, ring blocks]: each request's ring
    k_offset_ptr, v_offset_ptr,  # c_k, c_v [H, D] float32
    ring_o_ptr, ring_lse_ptr,  # float32 [B, Hq, D], [B, Hq]: the ring's partial output and lse
    G: tl.constexpr, G_TILE: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, TILE_B: tl.constexpr,
    K_STORAGE: tl.constexpr, K_OFF: tl.constexpr, K_BYTES: tl.constexpr, K_SCALE_OFF: tl.constexpr,
    K_ZERO_OFF: tl.constexpr, K_T: tl.constexpr, RK: tl.constexpr, RK_TILE: tl.constexpr,
    V_STORAGE: tl.constexpr, V_OFF: tl.constexpr, V_BYTES: tl.constexpr, V_SCALE_OFF: tl.constexpr,
    V_ZERO_OFF: tl.constexpr, V_T: tl.constexpr, RV: tl.constexpr, RV_TILE: tl.constexpr,
    MODEL_DTYPE: tl.constexpr, QK_DTYPE: tl.constexpr, PV_DTYPE: tl.constexpr, UPCAST: tl.constexpr,
    TOKEN_ROWS: tl.constexpr,  # tokens as the dots' M rows (_attend_tile_t), else the query group
    RING_W: tl.constexpr, RING_S: tl.constexpr,  # layered cache: last RING_W and first RING_S tokens exact
    D: tl.constexpr, D_TILE: tl.constexpr, RING_G_TILE: tl.constexpr, RING_T: tl.constexpr, RING_N: tl.constexpr,
    RING_INT8: tl.constexpr, RING_K_OFF: tl.constexpr, RING_K_BYTES: tl.constexpr, RING_K_SCALE_OFF: tl.constexpr,
    RING_K_T: tl.constexpr, RING_V_OFF: tl.constexpr, RING_V_BYTES: tl.constexpr, RING_V_SCALE_OFF: tl.constexpr,
    RING_V_T: tl.constexpr, HAS_K_OFFSET: tl.constexpr, HAS_V_OFFSET: tl.constexpr,
    Q_HAS_BASIS: tl.constexpr, Q_HAS_SMOOTH: tl.constexpr,
):
    """Partial attention of one request's query group over one split of its cached tokens (or, for split
    index 0 of a layered cache, over its ring's exact tokens, beside the other splits)."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    num_q_heads = tl.num_programs(1) * G

    if RING_W + RING_S > 0:
        # the ring's program: its exact tokens, in model space; split index 0, so that the GPU starts it
        # first (grid dimension 2 varies slowest) and it overlaps the compressed splits instead of trailing them
        if split == 0:
            gr = tl.arange(0, RING_G_TILE)
            gr_mask = gr < G
            lse, o = _ring_split(xq_ptr + b.to(tl.int64) * stride_xqb + (h * G + gr) * stride_xqh, gr_mask, cache_ptr,
                                 ring_ptr + b.to(tl.int64) * stride_rb, stride_cblk, h.to(tl.int64) * STRIDE_CHEAD,
                                 tl.load(seq_lens_ptr + b), k_offset_ptr, v_offset_ptr, h, qk_scale, RING_W, RING_S,
                                 RING_T, RING_N, RING_INT8, RING_K_OFF, RING_K_BYTES, RING_K_SCALE_OFF, RING_K_T,
                                 RING_V_OFF, RING_V_BYTES, RING_V_SCALE_OFF, RING_V_T, D, D_TILE, RING_G_TILE,
                                 MODEL_DTYPE, HAS_K_OFFSET, HAS_V_OFFSET, UPCAST)
            rows = (b * num_q_heads + h * G + gr).to(tl.int64)
            tl.store(ring_lse_ptr + rows, lse, mask=gr_mask)
            d = tl.arange(0, D_TILE)
            tl.store(ring_o_ptr + rows[:, None] * D + d[None, :], o, mask=gr_mask[:, None] & (d[None, :] < D))
            return
        split -= 1

    seq_len = tl.load(seq_lens_ptr + b)
    if RING_W + RING_S > 0:  # layered cache: the compressed positions are [lo, hi), the rest are exact
        hi = tl.maximum(seq_len - RING_W, 0)
        lo = tl.minimum(hi, RING_S)
        lo_al = lo // BLOCK_N * BLOCK_N
        some = hi > lo
        lo = tl.where(some, lo, lo_al)  # nothing compressed: an empty range
        hi = tl.where(some, hi, lo_al)
    else:
        lo = 0
        lo_al = 0
        hi = seq_len
    per_split = tl.cdiv(tl.cdiv(hi - lo_al, num_splits), BLOCK_N) * BLOCK_N
    start = lo_al + split * per_split
    end = tl.minimum(start + per_split, hi)

    g = tl.arange(0, G_TILE)
    g_mask = g < G
    q_rows = q_ptr + b.to(tl.int64) * stride_qb + (h * G + g) * stride_qh
    q_a, q_b, q_sum, q_mul = load_query(q_rows, g_mask, K_STORAGE, RK, RK_TILE, QK_DTYPE, h, k_basis_ptr, k_smooth_ptr,
                                        D, Q_HAS_BASIS, Q_HAS_SMOOTH)
    qk_row = q_mul * qk_scale

    m_i = tl.full((G_TILE,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((G_TILE,), dtype=tl.float32)
    acc_z = tl.zeros((G_TILE,), dtype=tl.float32)
    bt_row = block_table_ptr + b.to(tl.int64) * stride_btb
    head_off = h.to(tl.int64) * STRIDE_CHEAD
    if TOKEN_ROWS:
        qt_a = tl.trans(q_a)
        qt_b = tl.trans(q_b)
        acc_ta = tl.zeros((RV_TILE, G_TILE), dtype=tl.float32)
        acc_tb = tl.zeros((RV_TILE, G_TILE), dtype=tl.float32)
        if RING_W + RING_S > 0:
            if start < lo:  # the exact sink's tile (split 0 of a layered cache only)
                m_i, l_i, acc_ta, acc_tb, acc_z = _attend_tile_t(
                    start, lo, end, m_i, l_i, acc_ta, acc_tb, acc_z, cache_ptr, bt_row, stride_cblk, head_off, qt_a,
                    qt_b, q_sum, qk_row, K_STORAGE, K_OFF, K_BYTES, K_SCALE_OFF, K_ZERO_OFF, K_T, RK, RK_TILE,
                    V_STORAGE, V_OFF, V_BYTES, V_SCALE_OFF, V_ZERO_OFF, V_T, RV, RV_TILE, BLOCK_SIZE, BLOCK_N, TILE_B,
                    MODEL_DTYPE, QK_DTYPE, PV_DTYPE, UPCAST, True)
                start += BLOCK_N
        full_end = start + tl.maximum(end - start, 0) // BLOCK_N * BLOCK_N  # tiles before it lie inside
        for t0 in range(start, full_end, BLOCK_N):
            m_i, l_i, acc_ta, acc_tb, acc_z = _attend_tile_t(
                t0, 0, end, m_i, l_i, acc_ta, acc_tb, acc_z, cache_ptr, bt_row, stride_cblk, head_off, qt_a, qt_b,
                q_sum, qk_row, K_STORAGE, K_OFF, K_BYTES, K_SCALE_OFF, K_ZERO_OFF, K_T, RK, RK_TILE, V_STORAGE,
                V_OFF, V_BYTES, V_SCALE_OFF, V_ZERO_OFF, V_T, RV, RV_TILE, BLOCK_SIZE, BLOCK_N, TILE_B, MODEL_DTYPE,
                QK_DTYPE, PV_DTYPE, UPCAST, False)
        if full_end < end:
            m_i, l_i, acc_ta, acc_tb, acc_z = _attend_tile_t(
                full_end, 0, end, m_i, l_i, acc_ta, acc_tb, acc_z, cache_ptr, bt_row, stride_cblk, head_off, qt_a,
                qt_b, q_sum, qk_row, K_STORAGE, K_OFF, K_BYTES, K_SCALE_OFF, K_ZERO_OFF, K_T, RK, RK_TILE,
                V_STORAGE, V_OFF, V_BYTES, V_SCALE_OFF, V_ZERO_OFF, V_T, RV, RV_TILE, BLOCK_SIZE, BLOCK_N, TILE_B,
                MODEL_DTYPE, QK_DTYPE, PV_DTYPE, UPCAST, True)
        acc_a = tl.trans(acc_ta)
        acc_b = tl.trans(acc_tb)
    else:
        acc_a = tl.zeros((G_TILE, RV_TILE), dtype=tl.float32)
        acc_b = tl.zeros((G_TILE, RV_TILE), dtype=tl.float32)
        if RING_W + RING_S > 0:
            if start < lo:  # the exact sink's tile (split 0 of a layered cache only)
                m_i, l_i, acc_a, acc_b, acc_z = attend_tile(
                    start, lo, end, m_i, m_i, l_i, acc_a, acc_b, acc_z, cache_ptr, bt_row, stride_cblk, head_off, q_a,
                    q_b, q_sum, qk_row, K_STORAGE, K_OFF, K_BYTES, K_SCALE_OFF, K_ZERO_OFF, K_T, RK, RK_TILE,
                    V_STORAGE, V_OFF, V_BYTES, V_SCALE_OFF, V_ZERO_OFF, V_T, RV, RV_TILE, BLOCK_SIZE, BLOCK_N, TILE_B,
                    MODEL_DTYPE, QK_DTYPE, PV_DTYPE, UPCAST, True, False)
                start += BLOCK_N
        full_end = start + tl.maximum(end - start, 0) // BLOCK_N * BLOCK_N  # tiles before it lie inside
        for t0 in range(start, full_end, BLOCK_N):
            m_i, l_i, acc_a, acc_b, acc_z = attend_tile(
                t0, 0, end, m_i, m_i, l_i, acc_a, acc_b, acc_z, cache_ptr, bt_row, stride_cblk, head_off, q_a, q_b,
                q_sum, qk_row, K_STORAGE, K_OFF, K_BYTES, K_SCALE_OFF, K_ZERO_OFF, K_T, RK, RK_TILE, V_STORAGE,
                V_OFF, V_BYTES, V_SCALE_OFF, V_ZERO_OFF, V_T, RV, RV_TILE, BLOCK_SIZE, BLOCK_N, TILE_B, MODEL_DTYPE,
                QK_DTYPE, PV_DTYPE, UPCAST, False, False)  # pos (m_i here) is unused without CAUSAL
        if full_end < end:
            m_i, l_i, acc_a, acc_b, acc_z = attend_tile(
                full_end, 0, end, m_i, m_i, l_i, acc_a, acc_b, acc_z, cache_ptr, bt_row, stride_cblk, head_off, q_a,
                q_b, q_sum, qk_row, K_STORAGE, K_OFF, K_BYTES, K_SCALE_OFF, K_ZERO_OFF, K_T, RK, RK_TILE,
                V_STORAGE, V_OFF, V_BYTES, V_SCALE_OFF, V_ZERO_OFF, V_T, RV, RV_TILE, BLOCK_SIZE, BLOCK_N, TILE_B,
                MODEL_DTYPE, QK_DTYPE, PV_DTYPE, UPCAST, True, False)

    inv_l = tl.where(l_i > 0, 1.0 / l_i, 0.0)
    lse = tl.where(l_i > 0, m_i + tl.log2(l_i), float("-inf"))
    part = (b * num_q_heads + h * G + g).to(tl.int64) * num_splits + split
    tl.store(part_lse_ptr + part, lse, mask=g_mask)
    c = tl.arange(0, RV_TILE)
    o_rows = part_o_ptr + part * RV
    if V_STORAGE == INT4:
        o_a = (acc_a + acc_z[:, None]) * inv_l[:, None]
        o_b = (acc_b + acc_z[:, None]) * inv_l[:, None]
        tl.store(o_rows[:, None] + 2 * c[None, :], o_a, mask=g_mask[:, None] & (2 * c[None, :] < RV))
        tl.store(o_rows[:, None] + 2 * c[None, :] + 1, o_b, mask=g_mask[:, None] & (2 * c[None, :] + 1 < RV))
    else:
        tl.store(o_rows[:, None] + c[None, :], acc_a * inv_l[:, None], mask=g_mask[:, None] & (c[None, :] < RV))


@triton.jit(do_not_specialize=["num_splits"])
def _decode_merge_kernel(
    part_o_ptr, part_lse_ptr,  # float32 [B, Hq, num_splits, RV], [B, Hq, num_splits]
    out_ptr, stride_ob, stride_oh,  # [B, Hq, D] model dtype
    basis_ptr, offset_ptr,  # P_v [H, D, RV] float32, c_v [H, D] float32
    num_splits,
    ring_o_ptr, ring_lse_ptr,  # float32 [B, Hq, D], [B, Hq]: the ring's partial (layered cache)
    G: tl.constexpr, G_TILE: tl.constexpr,
    RV: tl.constexpr, RV_TILE: tl.constexpr, D: tl.constexpr, D_TILE: tl.constexpr,
    HAS_BASIS: tl.constexpr, HAS_OFFSET: tl.constexpr, HAS_RING: tl.constexpr,
):
    """Merge the splits of one request's query group by log-sum-exp and write ``P_v o_lat + c_v``.

    With a layered cache (``HAS_RING``) the ring's partial ``o_ring`` (normalised ``sum p (v - c_v)``, model
    space) is one more split: its share ``w`` of the softmax adds ``w o_ring`` to the rebuilt output."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    num_q_heads = tl.num_programs(1) * G
    g = tl.arange(0, G_TILE)
    g_mask = g < G
    c = tl.arange(0, RV_TILE)
    rows = (b * num_q_heads + h * G + g).to(tl.int64)
    part0 = rows * num_splits

    lse_max = tl.full((G_TILE,), float("-inf"), dtype=tl.float32)
    if HAS_RING:
        d = tl.arange(0, D_TILE)
        lse_ring = tl.load(ring_lse_ptr + rows, mask=g_mask, other=float("-inf"))
        o_ring = tl.load(ring_o_ptr + rows[:, None] * D + d[None, :], mask=g_mask[:, None] & (d[None, :] < D),
                         other=0.0)
        lse_max = lse_ring
    for s in range(num_splits):
        lse_max = tl.maximum(lse_max, tl.load(part_lse_ptr + part0 + s, mask=g_mask, other=float("-inf")))
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)  # an empty request writes zeros
    o = tl.zeros((G_TILE, RV_TILE), dtype=tl.float32)
    den = tl.zeros((G_TILE,), dtype=tl.float32)
    for s in range(num_splits):
        w = tl.exp2(tl.load(part_lse_ptr + part0 + s, mask=g_mask, other=float("-inf")) - lse_max)
        o_s = tl.load(part_o_ptr + (part0 + s)[:, None] * RV + c[None, :],
                      mask=g_mask[:, None] & (c[None, :] < RV), other=0.0)
        o += w[:, None] * o_s
        den += w
    if HAS_RING:
        w_ring = tl.exp2(lse_ring - lse_max)
        den += w_ring
        den = tl.where(den > 0, den, 1.0)
        extra = o_ring * (w_ring / den)[:, None]
    else:
        den = tl.where(den > 0, den, 1.0)
        extra = o  # unused
    o = o / den[:, None]
    out_rows = out_ptr + b.to(tl.int64) * stride_ob + (h * G + g) * stride_oh
    store_output(o, o, out_rows, g_mask, basis_ptr, offset_ptr, h, RV, RV_TILE, D, D_TILE, False, HAS_BASIS,
                 HAS_OFFSET, extra, HAS_RING)


# tokens per tile: the H200 tile sweep's choice, with 4 warps (benchmarks/h200-2026-11-29c/bench_kernels.log)
DEFAULT_BLOCK_N = 128


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def default_num_splits(batch: int, num_kv_heads: int, device: torch.device | str | None = None,
                       max_seq_len: int | None = None, block_n: int = DEFAULT_BLOCK_N) -> int:
    """A fixed split count that fills the GPU: about 4 programs per SM, a power of two in [1, 64].

    Depends only on the batch shape (and, if given, an upper bound of the context), never on the
    device's seq_lens: safe to capture in a CUDA graph.
    """
    if device is None or torch.device(device).type != "cuda":
        return 2  # the interpreter runs programs one at a time: keep the merge exercised, not parallelism
    sms = _num_sms(torch.device(device))
    splits = next_pow2(max(1, -(-4 * sms // max(1, batch * num_kv_heads))))
    if max_seq_len is not None:
        splits = min(splits, next_pow2(max(1, -(-max_seq_len // (2 * block_n)))))
    return max(1, min(64, splits))


TOKEN_ROWS_ENV = "VLLM_LOWRANK_TOKEN_ROWS"


def default_token_rows(layout: SlotLayout) -> bool:
    """The decode orientation used when the caller does not choose: ``$VLLM_LOWRANK_TOKEN_ROWS`` = ``1``
    (token rows), ``0`` (query-group rows) or ``auto`` (the default): token rows where both K and V
    are 4-bit, the one case they were faster on the H200 (0.87-0.93x the time; int8, fp8, low rank and
    the model dtype 1.05-1.40x, BENCHMARKS.md)."""
    choice = os.environ.get(TOKEN_ROWS_ENV, "auto")
    if choice not in ("0", "1", "auto"):
        raise ValueError(f"{TOKEN_ROWS_ENV}={choice!r}; accepted: 0, 1, auto")
    if choice == "auto":
        return layout.k.fmt.storage == "int4" and layout.v.fmt.storage == "int4"
    return choice == "1"


def workspace_numel(batch: int, num_q_heads: int, latent_dim_v: int, num_splits: int, ring_dim: int = 0) -> int:
    """float32 elements of decode scratch: partial outputs [B, Hq, S, r_v] and their lse [B, Hq, S]; with a
    layered cache (``ring_dim`` = head_dim) also the ring's partial [B, Hq, D] and its lse [B, Hq]."""
    return batch * num_q_heads * (num_splits * (latent_dim_v + 1) + (ring_dim + 1 if ring_dim else 0))


def split_constexprs(layout: SlotLayout, group: int, block_size: int, block_n: int, token_rows: bool,
                     window: int = 0, sink: int = 0, ring_slot: SlotLayout | None = None, has_k_offset: bool = False,
                     has_v_offset: bool = False, upcast: bool = False, stride_chead: int | None = None,
                     k_basis: bool | None = None, k_smooth: bool = False) -> dict:
    """The split kernel's constexprs, for its launch and for ``scripts/kernel_sass.py`` alike
    (``stride_chead``: the cache's ``stride(1)``, by default dense pages; ``k_basis``/``k_smooth``: the
    kernel projects the raw query with the key transform's basis / smoothing scales; by default a basis
    wherever the K format has a transform, unless there is a ring: :func:`projects_query`)."""
    d = layout.head_dim
    ring_slot = ring_slot or ring_layout(d, layout.model_dtype)
    return dict(G=group, G_TILE=max(8 if token_rows else 16, next_pow2(group)),
                STRIDE_CHEAD=stride_chead or block_size * layout.slot_bytes,
                BLOCK_SIZE=block_size, BLOCK_N=block_n, TILE_B=min(block_size, block_n), **layout_constexprs(layout),
                **dot_dtypes(layout), UPCAST=upcast, TOKEN_ROWS=token_rows, RING_W=window, RING_S=sink, D=d,
                D_TILE=max(16, next_pow2(d)), RING_G_TILE=max(16, next_pow2(group)), RING_N=16,
                **ring_constexprs(ring_slot, block_size, layout.slot_bytes), HAS_K_OFFSET=has_k_offset,
                HAS_V_OFFSET=has_v_offset,
                Q_HAS_BASIS=(layout.k.fmt.transform != "none" and projects_query(window + sink > 0)
                             if k_basis is None else k_basis), Q_HAS_SMOOTH=k_smooth)


def projects_query(has_ring: bool) -> bool:
    """Whether the split kernel projects the raw query itself (else the host does, :func:`project_queries`).

    Not with a layered cache's ring: there the in-kernel projection cost the split kernel 12-32 more
    registers a thread on sm_90, or spills (head_dim 64: int4 156 -> 168, lowrank+int8 with an int8 ring
    108 -> 140; ``scripts/kernel_sass.py``), so fewer programs an SM for every compressed split, against
    three or four small host launches saved. Without a ring it costs at most one register."""
    return not has_ring


def merge_constexprs(layout: SlotLayout, group: int, has_basis: bool, has_offset: bool, has_ring: bool) -> dict:
    """The merge kernel's constexprs, for its launch and for ``scripts/kernel_sass.py`` alike."""
    rv, d = layout.v.latent_dim, layout.head_dim
    return dict(G=group, G_TILE=max(16, next_pow2(group)), RV=rv, RV_TILE=max(16, next_pow2(rv)), D=d,
                D_TILE=max(16, next_pow2(d)), HAS_BASIS=has_basis, HAS_OFFSET=has_offset, HAS_RING=has_ring)


def merge_num_warps(head_dim: int) -> int:
    """Warps of the merge kernel: 8 from head_dim 128, where 4 spill the rebuild's [RV, D] basis tile
    (255 registers and 150-250 bytes of stack a thread on sm_90, ``scripts/kernel_sass.py --every-kernel``)."""
    return 4 if head_dim <= 64 else 8


def decode_attention(query: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                     seq_lens: torch.Tensor, layout: SlotLayout, transforms: LayerTransforms, scale: float,
                     out: torch.Tensor, num_splits: int | None = None, workspace: torch.Tensor | None = None,
                     block_n: int = DEFAULT_BLOCK_N, num_warps: int = 4, num_stages: int = 2,
                     token_rows: bool | None = None, ring_table: torch.Tensor | None = None, window: int = 0,
                     sink: int = 0, ring_slot: SlotLayout | None = None) -> None:
    """Batched single-token decode over compressed slots, written into ``out``.

    query/out: [B, Hq, D] (last dim contiguous); kv_cache: uint8 [num_blocks, H, block_size, slot_bytes];
    block_table: int32 [B, max_blocks]; seq_lens: int32 [B] on the device (request b attends to its first
    seq_lens[b] tokens). ``workspace``: float32 with at least :func:`workspace_numel` elements (allocated
    if None). ``token_rows``: the orientation with cached tokens as the dots' rows (the
    query group padded to 8 instead of 16); None: :func:`default_token_rows`. Same
    result as :func:`vllm_lowrank.reference.decode_attention`.

    Layered cache: ``ring_table`` int32 [B, ring blocks] holds each request's ring (its new token already
    written there, :func:`vllm_lowrank.kernels.store_ring`) as slots of ``ring_slot`` (default: the
    model dtype's :func:`vllm_lowrank.formats.ring_layout`); the last ``window`` and first ``sink``
    positions are then read exact from it and only the others compressed (``block_table`` without the
    ring columns), as :func:`vllm_lowrank.layered.layered_attention` does for one query.
    """
    batch, hq, d = query.shape
    if batch == 0:
        return
    _, h, block_size = check_cache(kv_cache, layout)
    assert out.stride(-1) == 1
    assert block_table.stride(-1) == 1
    group = hq // h
    rv = layout.v.latent_dim
    if token_rows is None:
        token_rows = default_token_rows(layout)
    assert max(block_size, block_n) % min(block_size, block_n) == 0, "tiles are whole blocks or parts of one"
    assert not token_rows or block_n >= 16, "token rows need BLOCK_N >= 16 (the dots' M dimension)"
    if num_splits is None:
        num_splits = default_num_splits(batch, h, query.device, block_n=block_n)
    if ring_table is None:
        window = sink = 0
        ring_table = seq_lens  # unused
    assert ring_table.stride(-1) == 1 and query.stride(-1) == 1
    has_ring = window + sink > 0
    need = workspace_numel(batch, hq, rv, num_splits, d if has_ring else 0)
    if workspace is None:
        workspace = torch.empty(need, dtype=torch.float32, device=query.device)
    assert workspace.dtype == torch.float32 and workspace.numel() >= need, "decode workspace too small"
    n_part = batch * hq * num_splits
    part_o = workspace[:n_part * rv]
    part_lse = workspace[n_part * rv:n_part * (rv + 1)]
    ring_o = workspace[n_part * (rv + 1):n_part * (rv + 1) + batch * hq * d] if has_ring else part_o
    ring_lse = workspace[n_part * (rv + 1) + batch * hq * d:need] if has_ring else part_lse

    if projects_query(has_ring):
        q = query
        k_basis, _, k_smooth = transform_ptrs(transforms.k, part_o)
        q_basis, q_smooth = transforms.k.basis is not None, transforms.k.smooth is not None
    else:
        q = project_queries(query, transforms.k, h)
        q = q if q.stride(-1) == 1 else q.contiguous()
        k_basis = k_smooth = part_o
        q_basis = q_smooth = False
    basis, offset, has_basis, has_offset = transform_args(transforms.v, part_o)
    k_offset = transforms.k.offset.float().contiguous() if transforms.k.offset is not None else part_o
    consts = split_constexprs(layout, group, block_size, block_n, token_rows, window, sink, ring_slot,
                              transforms.k.offset is not None, has_offset, interpreted(_decode_split_kernel),
                              kv_cache.stride(1), q_basis, q_smooth)
    _decode_split_kernel[(batch, h, num_splits + has_ring)](
        q, q.stride(0), q.stride(1), k_basis, k_smooth, kv_cache, kv_cache.stride(0),
        consts.pop("STRIDE_CHEAD"),
        block_table, block_table.stride(0), seq_lens, part_o, part_lse, scale * LOG2E, num_splits,
        query, query.stride(0), query.stride(1), ring_table, ring_table.stride(0), k_offset, offset, ring_o, ring_lse,
        **consts, num_warps=num_warps, num_stages=num_stages)
    _decode_merge_kernel[(batch, h)](
        part_o, part_lse, out, out.stride(0), out.stride(1), basis, offset, num_splits, ring_o, ring_lse,
        **merge_constexprs(layout, group, has_basis, has_offset, has_ring), num_warps=merge_num_warps(d))
