"""Store kernel: encode new tokens' K and V into their compressed slots, in one launch per layer.

Grid ``(cdiv(N, BLOCK_T), H)``: a program takes ``BLOCK_T`` tokens of one KV head. It reads their raw
K/V in the model dtype, applies the transform ``lat = P^T ((x - c) / s)`` itself (the offset and the
key smoothing elementwise, exactly as :meth:`TensorTransform.project` does; the basis as a float32
``tl.dot`` over head_dim chunks, the tokens as its M rows), quantizes per token and writes every field
of the slot (payload, scale, zero point, alignment gaps) at ``slot_mapping`` (slots < 0 are padding and
left alone).

Without a basis the bytes equal :func:`vllm_lowrank.codec.encode_layer` bit for bit. With one, the
latents are the same float32 sums in another order (a few ulps apart), so a code on a rounding
boundary may land one step away from the codec's: one kernel instead of the host's cast, subtraction
and batched matmul per tensor (BENCHMARKS.md: the host projection doubled the store's time).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_lowrank.formats import SlotLayout
from vllm_lowrank.transforms import LayerTransforms

from .common import (FP8_MAX, INT4, INT4_MAX, INT8, MODEL, check_cache, column_stride, even_odd, field_ptr,
                     int8_codes, layout_constexprs, rint, stored_scale, transform_ptrs)

BLOCK_T = 16  # tokens a program: the M rows of the projection's dot (16 at least)
# head_dim channels a step of the projection's loop: 16 keeps the rotated int4 store of head_dim 128 at
# 96 registers a thread on sm_90 (32: 128; the loop unrolled: 233), scripts/kernel_sass.py
D_CHUNK = 16


@triton.jit
def _cast_rtne(x, DTYPE: tl.constexpr):
    """Cast to ``DTYPE`` rounding to nearest, ties to even, as torch does.

    float32 -> bf16 is done on the bits: the interpreter's emulated conversion rounds ties away
    from zero, and this is exact on every backend (NaN payloads aside).
    """
    if x.dtype == DTYPE:
        return x
    elif DTYPE == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits += 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)


@triton.jit
def _fp8e4m3_bits(y):
    """e4m3fn bits (uint8) of float32 ``y`` in [-448, 448], rounded to nearest even like torch.

    On the bits rather than with ``.to(tl.float8e4nv)``, whose interpreter emulation rounds ties
    away from zero: the magnitude is rounded to a multiple of its e4m3 ulp, ``2**(E - 3)`` with
    ``E = max(exponent, -6)``, and the code is ``(E + 6) * 8 + a / ulp`` (subnormals included; a
    carry into the next binade lands on the right code).
    """
    bits = y.to(tl.uint32, bitcast=True)
    a = tl.abs(y)
    e = ((a.to(tl.uint32, bitcast=True) >> 23).to(tl.int32) - 127)
    e = tl.maximum(e, -6)
    inv_ulp = ((3 - e + 127).to(tl.uint32) << 23).to(tl.float32, bitcast=True)
    n = rint(a * inv_ulp).to(tl.int32)
    code = (e + 6) * 8 + n
    return (code.to(tl.uint32) | ((bits >> 24) & 0x80)).to(tl.uint8)


@triton.jit
def _centre(x, h, d, d_mask, offset_ptr, smooth_ptr, HAS_OFFSET: tl.constexpr, HAS_SMOOTH: tl.constexpr,
            D: tl.constexpr):
    """``(x - c) / s`` in float32 for channels ``d`` of KV head ``h`` (IEEE ops, as the host's project);
    masked channels, loaded as zero, stay zero (offset 0, scale 1 there)."""
    x = x.to(tl.float32)
    if HAS_OFFSET:
        x = x - tl.load(offset_ptr + h * D + d, mask=d_mask, other=0.0)[None, :]
    if HAS_SMOOTH:
        x = tl.math.div_rn(x, tl.load(smooth_ptr + h * D + d, mask=d_mask, other=1.0)[None, :])
    return x


@triton.jit
def _latents(src_rows, row_mask, h, col, col_mask, basis_ptr, offset_ptr, smooth_ptr, R: tl.constexpr,
             D: tl.constexpr, D_CHUNK: tl.constexpr, HAS_BASIS: tl.constexpr, HAS_OFFSET: tl.constexpr,
             HAS_SMOOTH: tl.constexpr):
    """Latent columns ``col`` [C] of the tokens at ``src_rows`` [BLOCK_T] (pointers to their K or V of KV
    head ``h``): ``P^T ((x - c) / s)`` in float32 [BLOCK_T, C], zero in masked columns; the raw ``x`` (its
    dtype) when the transform is the identity."""
    if HAS_BASIS:
        acc = tl.zeros((src_rows.shape[0], col.shape[0]), dtype=tl.float32)
        for d0 in range(0, D, D_CHUNK):
            d = d0 + tl.arange(0, D_CHUNK)
            d_mask = d < D
            x = tl.load(src_rows[:, None] + d[None, :], mask=row_mask[:, None] & d_mask[None, :], other=0.0)
            x = _centre(x, h, d, d_mask, offset_ptr, smooth_ptr, HAS_OFFSET, HAS_SMOOTH, D)
            p = tl.load(basis_ptr + (h * D + d)[:, None] * R + col[None, :],
                        mask=d_mask[:, None] & col_mask[None, :], other=0.0)
            acc = tl.dot(x, p, acc, input_precision="ieee")
        return acc
    else:
        x = tl.load(src_rows[:, None] + col[None, :], mask=row_mask[:, None] & col_mask[None, :], other=0.0)
        if HAS_OFFSET or HAS_SMOOTH:
            x = _centre(x, h, col, col_mask, offset_ptr, smooth_ptr, HAS_OFFSET, HAS_SMOOTH, D)
        return x


@triton.jit
def _encode_tensor(src_rows, row_mask, h, basis_ptr, offset_ptr, smooth_ptr, cache_ptr, page, within,
                   STORAGE: tl.constexpr, OFF: tl.constexpr, NBYTES: tl.constexpr, SCALE_OFF: tl.constexpr,
                   ZERO_OFF: tl.constexpr, TRANSPOSED: tl.constexpr, R: tl.constexpr, R_TILE: tl.constexpr,
                   BLOCK_SIZE: tl.constexpr, MODEL_DTYPE: tl.constexpr, D: tl.constexpr, D_CHUNK: tl.constexpr,
                   HAS_BASIS: tl.constexpr, HAS_OFFSET: tl.constexpr, HAS_SMOOTH: tl.constexpr):
    """Transform and quantize one tensor of the program's tokens (rows) and write it into their pages."""
    c = tl.arange(0, R_TILE)
    scale_ptr = field_ptr(cache_ptr, page, within, SCALE_OFF, 2, BLOCK_SIZE, tl.float16)
    col = c[None, :] * column_stride(TRANSPOSED, BLOCK_SIZE)
    if STORAGE == INT4:
        ev = 2 * c
        ma = row_mask[:, None] & (ev[None, :] < R)
        mb = row_mask[:, None] & (ev[None, :] + 1 < R)
        if HAS_BASIS:  # one dot for all columns, then split into the even and the odd ones
            cc = tl.arange(0, 2 * R_TILE)
            x = _latents(src_rows, row_mask, h, cc, cc < R, basis_ptr, offset_ptr, smooth_ptr, R, D, D_CHUNK,
                         HAS_BASIS, HAS_OFFSET, HAS_SMOOTH)
            xa, xb = even_odd(x)
        else:
            xa = _latents(src_rows, row_mask, h, ev, ev < R, basis_ptr, offset_ptr, smooth_ptr, R, D, D_CHUNK,
                          HAS_BASIS, HAS_OFFSET, HAS_SMOOTH).to(tl.float32)
            xb = _latents(src_rows, row_mask, h, ev + 1, ev + 1 < R, basis_ptr, offset_ptr, smooth_ptr, R, D,
                          D_CHUNK, HAS_BASIS, HAS_OFFSET, HAS_SMOOTH).to(tl.float32)
        lo = tl.minimum(tl.min(tl.where(ma, xa, float("inf")), axis=1),
                        tl.min(tl.where(mb, xb, float("inf")), axis=1))
        hi = tl.maximum(tl.max(tl.where(ma, xa, float("-inf")), axis=1),
                        tl.max(tl.where(mb, xb, float("-inf")), axis=1))
        s16, scale = stored_scale(tl.math.div_rn(hi - lo, INT4_MAX))
        z16 = lo.to(tl.float16)
        zero = z16.to(tl.float32)
        qa = tl.clamp(rint(tl.math.div_rn(xa - zero[:, None], scale[:, None])), 0.0, INT4_MAX)
        qb = tl.clamp(rint(tl.math.div_rn(xb - zero[:, None], scale[:, None])), 0.0, INT4_MAX)
        qa = tl.where(ma, qa, 0.0).to(tl.uint8)
        qb = tl.where(mb, qb, 0.0).to(tl.uint8)
        payload = field_ptr(cache_ptr, page[:, None], within[:, None], OFF, NBYTES, BLOCK_SIZE, tl.uint8,
                            TRANSPOSED)
        tl.store(payload + col, qa | (qb << 4), mask=ma)
        tl.store(scale_ptr, s16, mask=row_mask)
        tl.store(field_ptr(cache_ptr, page, within, ZERO_OFF, 2, BLOCK_SIZE, tl.float16), z16, mask=row_mask)
    else:
        m = row_mask[:, None] & (c[None, :] < R)
        x = _latents(src_rows, row_mask, h, c, c < R, basis_ptr, offset_ptr, smooth_ptr, R, D, D_CHUNK, HAS_BASIS,
                     HAS_OFFSET, HAS_SMOOTH)
        if STORAGE == MODEL:
            payload = field_ptr(cache_ptr, page[:, None], within[:, None], OFF, NBYTES, BLOCK_SIZE, MODEL_DTYPE,
                                TRANSPOSED)
            tl.store(payload + col, _cast_rtne(x, MODEL_DTYPE), mask=m)
        else:
            x = x.to(tl.float32)
            payload = field_ptr(cache_ptr, page[:, None], within[:, None], OFF, NBYTES, BLOCK_SIZE, tl.uint8,
                                TRANSPOSED)
            if STORAGE == INT8:
                s16, q = int8_codes(x)
                q = q.to(tl.int8).to(tl.uint8, bitcast=True)
            else:
                s16, scale = stored_scale(tl.math.div_rn(tl.max(tl.abs(x), axis=1), FP8_MAX))
                y = tl.math.div_rn(x, scale[:, None])
                q = _fp8e4m3_bits(tl.clamp(y, -FP8_MAX, FP8_MAX))
            tl.store(payload + col, q, mask=m)
            tl.store(scale_ptr, s16, mask=row_mask)


@triton.jit
def _zero_gap(cache_ptr, page, within, row_mask, OFF: tl.constexpr, LEN: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """Zero the ``LEN`` (< 4) padding bytes at slot offset ``OFF`` of the program's tokens in their pages."""
    if LEN > 0:
        g = tl.arange(0, 4)
        gap = field_ptr(cache_ptr, page[:, None], within[:, None], OFF, LEN, BLOCK_SIZE, tl.uint8)
        tl.store(gap + g[None, :], tl.zeros((page.shape[0], 4), dtype=tl.uint8),
                 mask=row_mask[:, None] & (g[None, :] < LEN))


@triton.jit(do_not_specialize=["num_tokens"])
def _store_kernel(
    k_ptr, stride_kn, stride_kh,  # raw keys [N, H, D] (model dtype)
    v_ptr, stride_vn, stride_vh,  # raw values [N, H, D]
    cache_ptr, stride_cblk,  # uint8 [num_blocks, H, BLOCK_SIZE, slot_bytes], pages field by field
    STRIDE_CHEAD: tl.constexpr,  # page bytes (BLOCK_SIZE * slot_bytes)
    slot_mapping_ptr,  # [N] int, < 0: padding
    num_tokens,  # N
    k_basis_ptr, k_offset_ptr, k_smooth_ptr,  # P_k [H, D, RK], c_k [H, D], s_k [H, D] float32 (if HAS_*)
    v_basis_ptr, v_offset_ptr,  # P_v [H, D, RV], c_v [H, D] float32 (values are never smoothed)
    BLOCK_T: tl.constexpr, BLOCK_SIZE: tl.constexpr, D: tl.constexpr, D_CHUNK: tl.constexpr,
    K_STORAGE: tl.constexpr, K_OFF: tl.constexpr, K_BYTES: tl.constexpr, K_SCALE_OFF: tl.constexpr,
    K_ZERO_OFF: tl.constexpr, K_T: tl.constexpr, RK: tl.constexpr, RK_TILE: tl.constexpr,
    K_HAS_BASIS: tl.constexpr, K_HAS_OFFSET: tl.constexpr, K_HAS_SMOOTH: tl.constexpr,
    V_STORAGE: tl.constexpr, V_OFF: tl.constexpr, V_BYTES: tl.constexpr, V_SCALE_OFF: tl.constexpr,
    V_ZERO_OFF: tl.constexpr, V_T: tl.constexpr, RV: tl.constexpr, RV_TILE: tl.constexpr,
    V_HAS_BASIS: tl.constexpr, V_HAS_OFFSET: tl.constexpr, MODEL_DTYPE: tl.constexpr,
    GAP0: tl.constexpr, GAP0_LEN: tl.constexpr, GAP1: tl.constexpr, GAP1_LEN: tl.constexpr,
    GAP2: tl.constexpr, GAP2_LEN: tl.constexpr,
):
    """``BLOCK_T`` tokens of one KV head: transform and quantize their K and V and scatter them into their
    pages. Alignment gaps of the slot (``GAPi``: slot offset, ``GAPi_LEN`` < 4 bytes) are zeroed, so every
    byte of a stored slot is defined, as in the codec."""
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    h = tl.program_id(1)
    slot = tl.load(slot_mapping_ptr + tok, mask=tok < num_tokens, other=-1).to(tl.int64)
    row_mask = slot >= 0
    slot = tl.maximum(slot, 0)
    page = (slot // BLOCK_SIZE) * stride_cblk + h.to(tl.int64) * STRIDE_CHEAD
    within = slot % BLOCK_SIZE
    tok = tok.to(tl.int64)
    _encode_tensor(k_ptr + tok * stride_kn + h * stride_kh, row_mask, h, k_basis_ptr, k_offset_ptr, k_smooth_ptr,
                   cache_ptr, page, within, K_STORAGE, K_OFF, K_BYTES, K_SCALE_OFF, K_ZERO_OFF, K_T, RK, RK_TILE,
                   BLOCK_SIZE, MODEL_DTYPE, D, D_CHUNK, K_HAS_BASIS, K_HAS_OFFSET, K_HAS_SMOOTH)
    _encode_tensor(v_ptr + tok * stride_vn + h * stride_vh, row_mask, h, v_basis_ptr, v_offset_ptr, v_offset_ptr,
                   cache_ptr, page, within, V_STORAGE, V_OFF, V_BYTES, V_SCALE_OFF, V_ZERO_OFF, V_T, RV, RV_TILE,
                   BLOCK_SIZE, MODEL_DTYPE, D, D_CHUNK, V_HAS_BASIS, V_HAS_OFFSET, False)
    _zero_gap(cache_ptr, page, within, row_mask, GAP0, GAP0_LEN, BLOCK_SIZE)
    _zero_gap(cache_ptr, page, within, row_mask, GAP1, GAP1_LEN, BLOCK_SIZE)
    _zero_gap(cache_ptr, page, within, row_mask, GAP2, GAP2_LEN, BLOCK_SIZE)


def store_constexprs(layout: SlotLayout, block_size: int, has: dict[str, bool] | None = None,
                     stride_chead: int | None = None) -> dict:
    """The store kernel's constexprs, for its launch and for ``scripts/kernel_sass.py`` alike.

    ``has``: which transform parts are present (:func:`transform_flags`; by default a basis and an
    offset wherever the format has a transform, no smoothing); ``stride_chead``: the cache's
    ``stride(1)``, by default dense pages."""
    c = layout_constexprs(layout, minimum_tile=16)  # the dot's N dimension: 16 at least
    gaps = layout.gaps()
    assert len(gaps) <= 3 and all(nbytes < 4 for _, nbytes in gaps), f"unexpected slot padding {gaps}"
    gaps += [(0, 0)] * 3
    for i, (off, nbytes) in enumerate(gaps[:3]):
        c[f"GAP{i}"], c[f"GAP{i}_LEN"] = off, nbytes
    if has is None:
        kt, vt = layout.k.fmt.transform != "none", layout.v.fmt.transform != "none"
        has = dict(K_HAS_BASIS=kt, K_HAS_OFFSET=kt, K_HAS_SMOOTH=False, V_HAS_BASIS=vt, V_HAS_OFFSET=vt)
    return dict(STRIDE_CHEAD=stride_chead or block_size * layout.slot_bytes, BLOCK_T=BLOCK_T, BLOCK_SIZE=block_size,
                D=layout.head_dim, D_CHUNK=D_CHUNK, **c, **has)


def transform_flags(transforms: LayerTransforms) -> dict[str, bool]:
    """The ``*_HAS_*`` constexprs of a layer's transforms."""
    k, v = transforms.k, transforms.v
    return dict(K_HAS_BASIS=k.basis is not None, K_HAS_OFFSET=k.offset is not None, K_HAS_SMOOTH=k.smooth is not None,
                V_HAS_BASIS=v.basis is not None, V_HAS_OFFSET=v.offset is not None)


def store(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
          layout: SlotLayout, transforms: LayerTransforms) -> None:
    """Encode keys/values [N', H, D] and scatter them to ``slot_mapping`` [N] (slots < 0 are padding).

    Same contract as :func:`vllm_lowrank.reference.store`: the first N = ``slot_mapping.shape[0]``
    tokens are stored. ``kv_cache``: uint8 [num_blocks, H, block_size, slot_bytes], dense pages.
    """
    n = slot_mapping.shape[0]
    if n == 0:
        return
    _, h, block_size = check_cache(kv_cache, layout)
    key, value = (x if x.stride(-1) == 1 else x.contiguous() for x in (key, value))
    k_basis, k_offset, k_smooth = transform_ptrs(transforms.k, key)
    v_basis, v_offset, _ = transform_ptrs(transforms.v, key)
    c = store_constexprs(layout, block_size, transform_flags(transforms), kv_cache.stride(1))
    _store_kernel[(triton.cdiv(n, BLOCK_T), h)](
        key, key.stride(0), key.stride(1), value, value.stride(0), value.stride(1),
        kv_cache, kv_cache.stride(0), c.pop("STRIDE_CHEAD"), slot_mapping, n,
        k_basis, k_offset, k_smooth, v_basis, v_offset, **c, num_warps=4)
def store_ring(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, ring_table: torch.Tensor,
               req_of_token: torch.Tensor, positions: torch.Tensor, seq_lens: torch.Tensor, window: int,
               sink: int, ring: SlotLayout, slots: list[torch.Tensor] | None = None) -> None:
    """Write new tokens' exact K/V [N, H, D] into their requests' rings (a layered cache), as slots of
    ``ring`` (:func:`vllm_lowrank.formats.ring_layout`) by :func:`store` on the ring pages.

    ``req_of_token`` int32 [N] (< 0: padding), ``positions`` [N], ``seq_lens`` int32 [R] (a request's
    length including its new tokens), ``ring_table`` int32 [R, ring blocks]. A token goes to ring index
    ``p % window`` if it is among its request's last ``window`` (``p >= seq_len - window``) and to
    ``window + p`` if ``p < sink``. Same bytes as :func:`vllm_lowrank.layered.store_exact` for tokens
    that end their request's sequence; no host sync (CUDA-graph safe). ``slots``: those targets as
    :func:`ring_store_targets` gives them, if already computed (by an earlier layer of the same step).
    """
    from vllm_lowrank.layered import ring_cache, ring_transforms

    if req_of_token.shape[0] == 0:
        return
    if slots is None:
        slots = ring_store_targets(kv_cache, ring_table, req_of_token, positions, seq_lens, window, sink, ring)
    cache = ring_cache(kv_cache, ring)
    for target in slots:
        store(key, value, cache, target, ring, ring_transforms(ring, kv_cache.shape[1]))


def ring_store_targets(kv_cache: torch.Tensor, ring_table: torch.Tensor, req_of_token: torch.Tensor,
                       positions: torch.Tensor, seq_lens: torch.Tensor, window: int, sink: int,
                       ring: SlotLayout) -> list[torch.Tensor]:
    """The ring-cache slots [N] (-1: not written) that :func:`store_ring` writes tokens to, one tensor per
    target (window, sink). The same for every layer whose pages hold as many ring slots: a step computes
    them once (torch ops, no host sync)."""
    from vllm_lowrank.layered import ring_cache, ring_store_slots

    last = seq_lens[req_of_token.long().clamp(min=0)].long() - 1
    per_block = ring_cache(kv_cache, ring).shape[2]
    return ring_store_slots(ring_table, req_of_token, positions, last, window, sink, per_block)
