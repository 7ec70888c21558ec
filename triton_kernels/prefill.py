"""Prefill kernel: causal attention of query chunks over their compressed paged context.

For chunked-prefill continuations, prefix-cache hits and evaluation runs that attend over the stored
compressed K/V. Query token ``i`` of request ``b`` sits at position ``seq_len - q_len + i`` and sees
cached tokens ``0 .. position`` (the chunk's own tokens must already be stored).

Grid (request, query tile, kv_head). A program's M rows are ``BLOCK_Q`` query tokens x the query group
of its KV head (GQA: each cached tile is read once for the whole group and ``BLOCK_Q`` tokens), padded
to a power of two; it walks the cached tokens up to its last query's position in tiles of ``BLOCK_N``
(block-table gather, the same dequantizing helpers as decode), keeps an online softmax in the latent
space and writes ``P_v o_lat + c_v``. No decompressed copy of the context is ever made.

A layered cache (``RING_W``/``RING_S``): query position ``t`` reads exact the positions ``p <= t`` with
``p > t - RING_W`` or ``p < RING_S``, and compressed the others (``RING_S <= p <= t - RING_W``). The
exact ones come from the request's ring (positions before the chunk, stored by earlier steps) or, for
the chunk's own tokens, from its K/V in hand (the ring is written after attention: a chunk longer than
the window would overwrite what its own first queries read). They go first, into one online softmax
with the compressed tiles (every row has an exact position, its own or position 0, so the compressed
phase never sees an empty row); their values are accumulated in model space as ``v - c_v``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_lowrank.formats import SlotLayout, ring_layout
from vllm_lowrank.transforms import LayerTransforms

from .common import (INT4, LOG2E, attend_tile, check_cache, dot_dtypes, exact_start, exact_step, int8_codes,
                     interpreted, layout_constexprs, load_query, next_pow2, ring_constexprs, ring_tile, store_output,
                     transform_args)
from .query import project_queries


@triton.jit
def _exact_pairs(pos, p, valid, RING_W: tl.constexpr, RING_S: tl.constexpr):
    """[M, N]: which positions ``p`` [N] row positions ``pos`` [M] read exact (layered cache)."""
    pp = p[None, :]
    t = pos[:, None]
    return valid[None, :] & (pp <= t) & ((pp > t - RING_W) | (pp < RING_S))


@triton.jit
def _own_tile(p0, p_end, first_req, q0, h, xk_ptr, stride_xkt, stride_xkh, xv_ptr, stride_xvt, stride_xvh, d, d_mask,
              c_v, q, qc, pos, m_i, l_i, acc_x, qk_scale, X_N: tl.constexpr, RING_W: tl.constexpr,
              RING_S: tl.constexpr, RING_INT8: tl.constexpr, HAS_V_OFFSET: tl.constexpr, UPCAST: tl.constexpr):
    """An exact step over the chunk's own tokens at positions ``p0 .. min(p0 + X_N, p_end)``, read from its K/V
    in hand (token ``q0 + p - first_req``); with an int8 ring, as the codec's int8 codes and scales, the
    way the ring will hold them."""
    p = p0 + tl.arange(0, X_N)
    valid = p < p_end
    tok = (q0 + p - first_req).to(tl.int64)
    m = valid[:, None] & d_mask[None, :]
    k = tl.load(xk_ptr + tok[:, None] * stride_xkt + h * stride_xkh + d[None, :], mask=m, other=0.0)
    v = tl.load(xv_ptr + tok[:, None] * stride_xvt + h * stride_xvh + d[None, :], mask=m, other=0.0)
    if RING_INT8:
        k_scale, k_codes = int8_codes(k.to(tl.float32))
        v_scale, v_codes = int8_codes(v.to(tl.float32))
        k, k_scale = k_codes.to(k.dtype), k_scale.to(tl.float32)
        v, v_scale = v_codes.to(v.dtype), v_scale.to(tl.float32)
    else:
        k_scale = tl.full((X_N,), 1.0, dtype=tl.float32)
        v_scale = k_scale
    return exact_step(q, qc, c_v, k, k_scale, v, v_scale, _exact_pairs(pos, p, valid, RING_W, RING_S), m_i, l_i,
                      acc_x, qk_scale, RING_INT8, HAS_V_OFFSET, UPCAST)


@triton.jit
def _exact_phase(xq_rows, row_mask, pos, first_req, first_pos, last_pos, q0, h, cache_ptr, ring_row, stride_cblk,
                 head_off, xk_ptr, stride_xkt, stride_xkh, xv_ptr, stride_xvt, stride_xvh, k_offset_ptr, v_offset_ptr,
                 qk_scale, D: tl.constexpr, D_TILE: tl.constexpr, X_N: tl.constexpr,
                 RING_W: tl.constexpr, RING_S: tl.constexpr, RING_T: tl.constexpr, RING_N: tl.constexpr,
                 RING_INT8: tl.constexpr, RING_K_OFF: tl.constexpr, RING_K_BYTES: tl.constexpr,
                 RING_K_SCALE_OFF: tl.constexpr, RING_K_T: tl.constexpr, RING_V_OFF: tl.constexpr,
                 RING_V_BYTES: tl.constexpr, RING_V_SCALE_OFF: tl.constexpr, RING_V_T: tl.constexpr,
                 MODEL_DTYPE: tl.constexpr, HAS_K_OFFSET: tl.constexpr, HAS_V_OFFSET: tl.constexpr,
                 UPCAST: tl.constexpr):
    """The exact positions of a query tile (layered cache): online softmax ``(m_i, l_i, acc_x)``, ``acc_x``
    [M, D_TILE] = ``sum_p w_p (v_p - c_v)``. Rows are at positions ``pos`` [M] of a request whose chunk
    starts at ``first_req``; the tile's rows span ``first_pos .. last_pos``."""
    d = tl.arange(0, D_TILE)
    d_mask = d < D
    q, qc, c_v, m_i, l_i, acc_x = exact_start(xq_rows, row_mask, k_offset_ptr, v_offset_ptr, h, D, D_TILE,
                                              HAS_K_OFFSET, HAS_V_OFFSET)
    if first_req > 0:  # positions before the chunk, from the ring; its window part only if the tile's band
        # reaches it or it holds sink positions
        j_lo = tl.where((first_pos - RING_W + 1 < first_req) | (first_req - RING_W < RING_S), 0, RING_W)
        for j0 in range(j_lo, RING_W + RING_S, RING_N):
            p, valid, k, k_scale, v, v_scale = ring_tile(j0, first_req, cache_ptr, ring_row, stride_cblk, head_off, d,
                                                         d_mask, RING_W, RING_S, RING_T, RING_N, RING_INT8, RING_K_OFF,
                                                         RING_K_BYTES, RING_K_SCALE_OFF, RING_K_T, RING_V_OFF,
                                                         RING_V_BYTES, RING_V_SCALE_OFF, RING_V_T, MODEL_DTYPE)
            keep = _exact_pairs(pos, p, valid, RING_W, RING_S)
            m_i, l_i, acc_x = exact_step(q, qc, c_v, k, k_scale, v, v_scale, keep, m_i, l_i, acc_x, qk_scale,
                                         RING_INT8, HAS_V_OFFSET, UPCAST)
    # the chunk's own tokens: its sink positions, then the window band of the tile's rows (disjoint ranges)
    sink_end = tl.minimum(RING_S, last_pos + 1)
    for p0 in range(first_req, sink_end, X_N):
        m_i, l_i, acc_x = _own_tile(p0, sink_end, first_req, q0, h, xk_ptr, stride_xkt, stride_xkh, xv_ptr,
                                    stride_xvt, stride_xvh, d, d_mask, c_v, q, qc, pos, m_i, l_i, acc_x, qk_scale, X_N,
                                    RING_W, RING_S, RING_INT8, HAS_V_OFFSET, UPCAST)
    band = tl.maximum(tl.maximum(sink_end, first_req), first_pos - RING_W + 1)
    for p0 in range(band, last_pos + 1, X_N):
        m_i, l_i, acc_x = _own_tile(p0, last_pos + 1, first_req, q0, h, xk_ptr, stride_xkt, stride_xkh, xv_ptr,
                                    stride_xvt, stride_xvh, d, d_mask, c_v, q, qc, pos, m_i, l_i, acc_x, qk_scale, X_N,
                                    RING_W, RING_S, RING_INT8, HAS_V_OFFSET, UPCAST)
    return m_i, l_i, acc_x


@triton.jit(do_not_specialize=["req_start"])
def _prefill_kernel(
    q_ptr, stride_qt, stride_qh,  # queries [T, Hq, RK]: projected (float32) or raw (model dtype)
    cache_ptr, stride_cblk,  # uint8 [num_blocks, H, BLOCK_SIZE, slot_bytes], pages field by field
    STRIDE_CHEAD: tl.constexpr,  # page bytes (BLOCK_SIZE * slot_bytes), a constexpr: known alignment
    block_table_ptr, stride_btb,  # int32 [num_reqs, max_blocks] (a layered cache: without the ring columns)
    seq_lens_ptr, query_start_ptr,  # int32 [num_reqs], [num_reqs + 1]
    req_start,  # first request of this launch (program 0 of grid dim 0)
    out_ptr, stride_ot, stride_oh,  # [T, Hq, D] model dtype
    basis_ptr, offset_ptr,  # P_v [H, D, RV] float32, c_v [H, D] float32
    qk_scale,  # softmax scale * log2(e)
    # a layered cache's exact tokens (unused unless RING_W + RING_S > 0):
    xq_ptr, stride_xqt, stride_xqh,  # raw queries [T, Hq, D] (model dtype)
    xk_ptr, stride_xkt, stride_xkh, xv_ptr, stride_xvt, stride_xvh,  # the chunks' own exact K/V [T, H, D]
    ring_ptr, stride_rb,  # int32 [num_reqs, ring blocks]: each request's ring
    k_offset_ptr,  # c_k [H, D] float32
    G: tl.constexpr, G_P2: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, TILE_B: tl.constexpr, D: tl.constexpr, D_TILE: tl.constexpr,
    K_STORAGE: tl.constexpr, K_OFF: tl.constexpr, K_BYTES: tl.constexpr, K_SCALE_OFF: tl.constexpr,
    K_ZERO_OFF: tl.constexpr, K_T: tl.constexpr, RK: tl.constexpr, RK_TILE: tl.constexpr,
    V_STORAGE: tl.constexpr, V_OFF: tl.constexpr, V_BYTES: tl.constexpr, V_SCALE_OFF: tl.constexpr,
    V_ZERO_OFF: tl.constexpr, V_T: tl.constexpr, RV: tl.constexpr, RV_TILE: tl.constexpr,
    MODEL_DTYPE: tl.constexpr, QK_DTYPE: tl.constexpr, PV_DTYPE: tl.constexpr, UPCAST: tl.constexpr,
    HAS_BASIS: tl.constexpr, HAS_OFFSET: tl.constexpr,
    RING_W: tl.constexpr, RING_S: tl.constexpr, RING_T: tl.constexpr, RING_N: tl.constexpr, X_N: tl.constexpr,
    RING_INT8: tl.constexpr, RING_K_OFF: tl.constexpr, RING_K_BYTES: tl.constexpr, RING_K_SCALE_OFF: tl.constexpr,
    RING_K_T: tl.constexpr, RING_V_OFF: tl.constexpr, RING_V_BYTES: tl.constexpr, RING_V_SCALE_OFF: tl.constexpr,
    RING_V_T: tl.constexpr, HAS_K_OFFSET: tl.constexpr,
):
    """Attention of ``BLOCK_Q`` query tokens x one query group over their causal compressed context."""
    b = tl.program_id(0) + req_start
    q_tile = tl.program_id(1)
    h = tl.program_id(2)
    M: tl.constexpr = BLOCK_Q * G_P2
    HAS_RING: tl.constexpr = RING_W + RING_S > 0

    q0 = tl.load(query_start_ptr + b)
    q_len = tl.load(query_start_ptr + b + 1) - q0
    seq_len = tl.load(seq_lens_ptr + b)
    first = q_tile * BLOCK_Q
    if first < q_len:
        r = tl.arange(0, M)
        qi = first + r // G_P2  # query token index within the request
        g = r % G_P2
        row_mask = (qi < q_len) & (g < G)
        first_req = seq_len - q_len  # the chunk's first position
        pos = first_req + tl.minimum(qi, q_len - 1)  # padding rows reuse the last token's position
        first_pos = first_req + first
        last_pos = first_req + tl.minimum(first + BLOCK_Q, q_len) - 1
        head_off = h.to(tl.int64) * STRIDE_CHEAD
        if HAS_RING:
            xq_rows = xq_ptr + (q0 + tl.minimum(qi, q_len - 1)).to(tl.int64) * stride_xqt + (h * G + g) * stride_xqh
            m_i, l_i, acc_x = _exact_phase(
                xq_rows, row_mask, pos, first_req, first_pos, last_pos, q0, h, cache_ptr,
                ring_ptr + b.to(tl.int64) * stride_rb, stride_cblk, head_off, xk_ptr, stride_xkt, stride_xkh, xv_ptr,
                stride_xvt, stride_xvh, k_offset_ptr, offset_ptr, qk_scale, D, D_TILE, X_N, RING_W, RING_S, RING_T,
                RING_N, RING_INT8, RING_K_OFF, RING_K_BYTES, RING_K_SCALE_OFF, RING_K_T, RING_V_OFF, RING_V_BYTES,
                RING_V_SCALE_OFF, RING_V_T, MODEL_DTYPE, HAS_K_OFFSET, HAS_OFFSET, UPCAST)
            m_x = m_i
        else:
            m_i = tl.full((M,), float("-inf"), dtype=tl.float32)
            l_i = tl.zeros((M,), dtype=tl.float32)
        q_rows = q_ptr + (q0 + tl.minimum(qi, q_len - 1)).to(tl.int64) * stride_qt + (h * G + g) * stride_qh
        q_a, q_b, q_sum, q_mul = load_query(q_rows, row_mask, K_STORAGE, RK, RK_TILE, QK_DTYPE, h, q_ptr, q_ptr, D,
                                            False, False)  # projected on the host
        qk_row = q_mul * qk_scale
        acc_a = tl.zeros((M, RV_TILE), dtype=tl.float32)
        acc_b = tl.zeros((M, RV_TILE), dtype=tl.float32)
        acc_z = tl.zeros((M,), dtype=tl.float32)

        # compressed positions RING_S <= p <= pos - RING_W (all p <= pos without a ring)
        bt_row = block_table_ptr + b.to(tl.int64) * stride_btb
        pos_c = pos - RING_W
        end = last_pos - RING_W + 1  # past the tile's last compressed position
        T_START: tl.constexpr = RING_S // BLOCK_N * BLOCK_N
        t_start = T_START
        if T_START < RING_S:  # the tile that holds the last sink positions: masked below RING_S
            if T_START < end:
                m_i, l_i, acc_a, acc_b, acc_z = attend_tile(
                    T_START, RING_S, end, pos_c, m_i, l_i, acc_a, acc_b, acc_z, cache_ptr, bt_row, stride_cblk,
                    head_off, q_a, q_b, q_sum, qk_row, K_STORAGE, K_OFF, K_BYTES, K_SCALE_OFF, K_ZERO_OFF, K_T, RK,
                    RK_TILE, V_STORAGE, V_OFF, V_BYTES, V_SCALE_OFF, V_ZERO_OFF, V_T, RV, RV_TILE, BLOCK_SIZE,
                    BLOCK_N, TILE_B, MODEL_DTYPE, QK_DTYPE, PV_DTYPE, UPCAST, True, True)
            t_start = T_START + BLOCK_N
        # tiles before the tile's first row's last compressed position need neither the causal nor the end mask
        free_end = (first_pos - RING_W + 1) // BLOCK_N * BLOCK_N
        for t0 in range(t_start, free_end, BLOCK_N):
            m_i, l_i, acc_a, acc_b, acc_z = attend_tile(
                t0, 0, end, pos_c, m_i, l_i, acc_a, acc_b, acc_z, cache_ptr, bt_row, stride_cblk, head_off, q_a, q_b,
                q_sum, qk_row, K_STORAGE, K_OFF, K_BYTES, K_SCALE_OFF, K_ZERO_OFF, K_T, RK, RK_TILE, V_STORAGE,
                V_OFF, V_BYTES, V_SCALE_OFF, V_ZERO_OFF, V_T, RV, RV_TILE, BLOCK_SIZE, BLOCK_N, TILE_B, MODEL_DTYPE,
                QK_DTYPE, PV_DTYPE, UPCAST, False, True)
        for t0 in range(tl.maximum(t_start, free_end), end, BLOCK_N):
            m_i, l_i, acc_a, acc_b, acc_z = attend_tile(
                t0, RING_S, end, pos_c, m_i, l_i, acc_a, acc_b, acc_z, cache_ptr, bt_row, stride_cblk, head_off, q_a,
                q_b, q_sum, qk_row, K_STORAGE, K_OFF, K_BYTES, K_SCALE_OFF, K_ZERO_OFF, K_T, RK, RK_TILE, V_STORAGE,
                V_OFF, V_BYTES, V_SCALE_OFF, V_ZERO_OFF, V_T, RV, RV_TILE, BLOCK_SIZE, BLOCK_N, TILE_B, MODEL_DTYPE,
                QK_DTYPE, PV_DTYPE, UPCAST, True, True)

        inv_l = 1.0 / l_i  # every row sees at least one position
        if HAS_RING:  # the exact part, rescaled to the final running max
            extra = acc_x * (tl.where(m_x > float("-inf"), tl.exp2(m_x - m_i), 0.0) * inv_l)[:, None]
        else:
            extra = tl.zeros((M, D_TILE), dtype=tl.float32)  # unused
        out_rows = out_ptr + (q0 + qi).to(tl.int64) * stride_ot + (h * G + g) * stride_oh
        if V_STORAGE == INT4:
            o_a = (acc_a + acc_z[:, None]) * inv_l[:, None]
            o_b = (acc_b + acc_z[:, None]) * inv_l[:, None]
            if HAS_RING and not HAS_BASIS:  # the channels back in order, to add the exact part (D_TILE wide)
                o = tl.reshape(tl.join(o_a, o_b), (M, 2 * RV_TILE))
                store_output(o, o, out_rows, row_mask, basis_ptr, offset_ptr, h, RV, 2 * RV_TILE, D, D_TILE, False,
                             HAS_BASIS, HAS_OFFSET, extra, True)
            else:
                store_output(o_a, o_b, out_rows, row_mask, basis_ptr, offset_ptr, h, RV, RV_TILE, D, D_TILE, True,
                             HAS_BASIS, HAS_OFFSET, extra, HAS_RING)
        else:
            o = acc_a * inv_l[:, None]
            store_output(o, o, out_rows, row_mask, basis_ptr, offset_ptr, h, RV, RV_TILE, D, D_TILE, False,
                         HAS_BASIS, HAS_OFFSET, extra, HAS_RING)


def prefill_constexprs(layout: SlotLayout, group: int, block_size: int, block_m: int, block_n: int, window: int = 0,
                       sink: int = 0, ring_slot: SlotLayout | None = None, has_basis: bool = False,
                       has_offset: bool = False, has_k_offset: bool = False, upcast: bool = False,
                       stride_chead: int | None = None) -> dict:
    """The prefill kernel's constexprs, for its launch and for ``scripts/kernel_sass.py`` alike
    (``stride_chead``: the cache's ``stride(1)``, by default dense pages)."""
    d, g_p2 = layout.head_dim, next_pow2(group)
    c = layout_constexprs(layout)
    d_tile = max(16, next_pow2(d))
    if window + sink and not has_basis:  # the exact part is added to the latent output as it is: the same width
        d_tile = max(d_tile, c["RV_TILE"] * (2 if layout.v.fmt.storage == "int4" else 1))
    ring_slot = ring_slot or ring_layout(d, layout.model_dtype)
    # BLOCK_Q is fixed by the group alone (not by the chunk lengths): one compiled variant per layer format;
    # M = BLOCK_Q * G_P2 >= 16 for tl.dot
    return dict(STRIDE_CHEAD=stride_chead or block_size * layout.slot_bytes, G=group, G_P2=g_p2,
                BLOCK_Q=max(1, block_m // g_p2, -(-16 // g_p2)), BLOCK_SIZE=block_size, BLOCK_N=block_n,
                TILE_B=min(block_size, block_n), D=d, D_TILE=d_tile, **c, **dot_dtypes(layout), UPCAST=upcast,
                HAS_BASIS=has_basis, HAS_OFFSET=has_offset, RING_W=window, RING_S=sink, RING_N=16, X_N=32,
                **ring_constexprs(ring_slot, block_size, layout.slot_bytes), HAS_K_OFFSET=has_k_offset)


def paged_attention(query: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                    seq_lens: torch.Tensor, query_start_loc: torch.Tensor, max_query_len: int,
                    layout: SlotLayout, transforms: LayerTransforms, scale: float, out: torch.Tensor,
                    requests: tuple[int, int] | None = None, block_m: int = 64, block_n: int = 64,
                    num_warps: int = 4, num_stages: int = 2, ring_table: torch.Tensor | None = None, window: int = 0,
                    sink: int = 0, ring_slot: SlotLayout | None = None, key: torch.Tensor | None = None,
                    value: torch.Tensor | None = None) -> None:
    """Causal attention of every query token over its request's compressed context, into ``out``.

    Like :func:`vllm_lowrank.reference.paged_attention`, except that ``seq_lens`` [R] and
    ``query_start_loc`` [R + 1] are int32 tensors on the device (not lists) and ``max_query_len`` (a
    host int, an upper bound of the chunks' lengths) sizes the grid. query/out: [T, Hq, D] (last dim
    contiguous); ``seq_lens[i]`` counts request i's context including its new tokens. ``requests``
    = (first, end) restricts the launch to those requests; it is a kernel argument rather than a slice
    of the metadata tensors, so that one compiled kernel serves every batch (sliced pointers change
    Triton's alignment specialisation and would compile a variant per offset).

    Layered cache: ``ring_table`` int32 [R, ring blocks] holds each request's ring (its tokens before this
    chunk; the chunk's are written after attention) as slots of ``ring_slot`` (default: the model dtype's
    :func:`vllm_lowrank.formats.ring_layout`), ``block_table`` the compressed blocks, and ``key``/``value``
    [T, H, D] the chunks' own exact K/V (token-indexed like ``query``, as the model gives them: with an int8
    ring the kernel reads them rounded as the ring will hold them). Same result as
    :func:`vllm_lowrank.layered.layered_attention` per request.
    """
    first, end = requests if requests is not None else (0, seq_lens.shape[0])
    if end <= first or max_query_len == 0:
        return
    hq = query.shape[1]
    _, h, block_size = check_cache(kv_cache, layout)
    assert out.stride(-1) == 1
    assert block_table.stride(-1) == 1
    assert max(block_size, block_n) % min(block_size, block_n) == 0, "tiles are whole blocks or parts of one"

    q = project_queries(query, transforms.k, h)
    if q.stride(-1) != 1:
        q = q.contiguous()
    basis, offset, has_basis, has_offset = transform_args(transforms.v, q)
    if ring_table is None:
        window = sink = 0
    if window + sink:
        assert key is not None and value is not None, "a layered cache needs the chunks' own K/V"
        assert ring_table.stride(-1) == 1 and query.stride(-1) == 1
        assert key.stride(-1) == 1 and value.stride(-1) == 1
        k_offset = transforms.k.offset.float().contiguous() if transforms.k.offset is not None else q
    else:
        ring_table, key, value, k_offset = seq_lens, query, query, q  # unused
    consts = prefill_constexprs(layout, hq // h, block_size, block_m, block_n, window, sink, ring_slot, has_basis,
                                has_offset, transforms.k.offset is not None, interpreted(_prefill_kernel),
                                kv_cache.stride(1))
    grid = (end - first, triton.cdiv(max_query_len, consts["BLOCK_Q"]), h)
    _prefill_kernel[grid](
        q, q.stride(0), q.stride(1), kv_cache, kv_cache.stride(0), consts.pop("STRIDE_CHEAD"),
        block_table, block_table.stride(0), seq_lens, query_start_loc, first, out, out.stride(0), out.stride(1),
        basis, offset, scale * LOG2E,
        query, query.stride(0), query.stride(1), key, key.stride(0), key.stride(1), value, value.stride(0),
        value.stride(1), ring_table, ring_table.stride(0), k_offset, **consts, num_warps=num_warps,
        num_stages=num_stages)


def compile_prefill(kv_cache: torch.Tensor, block_table_stride: int, num_q_heads: int, dtype: torch.dtype,
                    layout: SlotLayout, transforms: LayerTransforms, scale: float,
                    ring: tuple[int, int, int, SlotLayout] | None = None) -> None:
    """Compile (by one tiny launch) the :func:`paged_attention` variant that a layer's real launches use.

    One query token over block 0 of ``kv_cache`` (read only) into scratch. Triton specialises on
    pointer alignment and on integer arguments (strides): the scratch tensors have the real ones'
    strides (queries and outputs [T, Hq, D], a block table ``block_table_stride`` wide), so later
    launches over the real metadata find this variant compiled. ``ring`` = (ring blocks, window, sink,
    ring slot) of a layered cache, whose block tables are the columns after the ring blocks.
    """
    dev = kv_cache.device
    table = torch.zeros(1, block_table_stride, dtype=torch.int32, device=dev)
    seq_lens = torch.ones(1, dtype=torch.int32, device=dev)
    query_start_loc = torch.tensor([0, 1], dtype=torch.int32, device=dev)
    q = torch.zeros(1, num_q_heads, layout.head_dim, dtype=dtype, device=dev)
    if ring is None:
        paged_attention(q, kv_cache, table, seq_lens, query_start_loc, 1, layout, transforms, scale,
                        torch.empty_like(q))
        return
    blocks, window, sink, ring_slot = ring
    kv = torch.zeros(1, kv_cache.shape[1], layout.head_dim, dtype=dtype, device=dev)
    paged_attention(q, kv_cache, table[:, blocks:], seq_lens, query_start_loc, 1, layout, transforms, scale,
                    torch.empty_like(q), ring_table=table[:, :blocks], window=window, sink=sink, ring_slot=ring_slot,
                    key=kv, value=kv)
