"""Store kernel: encode new tokens' K and V into their compressed slots, in one launch per layer.

The transform ``lat = P^T (x - c)`` runs on the host as one batched matmul (exactly
:meth:`TensorTransform.project`, so that the bytes equal :func:`vllm_lowrank.codec.encode_layer` bit
for bit); the kernel then quantizes per token and KV head and writes every field of the slot (payload,
scale, zero point) at ``slot_mapping`` (slots < 0 are padding and left alone). One program per token,
all KV heads at once: a [H, r] tile, the quantization is a row reduction.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_lowrank.formats import SlotLayout
from vllm_lowrank.transforms import LayerTransforms

from .common import (FP8_MAX, INT4, INT4_MAX, INT8, MODEL, check_cache, column_stride, field_ptr, int8_codes,
                     layout_constexprs, next_pow2, rint, stored_scale)


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
def _encode_tensor(src_ptr, stride_sn, stride_sh, tok, cache_ptr, page, within, head_mask,
                   STORAGE: tl.constexpr, OFF: tl.constexpr, NBYTES: tl.constexpr, SCALE_OFF: tl.constexpr,
                   ZERO_OFF: tl.constexpr, TRANSPOSED: tl.constexpr, R: tl.constexpr, R_TILE: tl.constexpr,
                   BLOCK_SIZE: tl.constexpr, MODEL_DTYPE: tl.constexpr, H_TILE: tl.constexpr):
    """Quantize the latents of one token [H, R] (rows of ``src``) and write them into its pages."""
    hh = tl.arange(0, H_TILE)
    c = tl.arange(0, R_TILE)
    src = src_ptr + tok.to(tl.int64) * stride_sn + hh[:, None] * stride_sh
    scale_ptr = field_ptr(cache_ptr, page, within, SCALE_OFF, 2, BLOCK_SIZE, tl.float16)
    col = c[None, :] * column_stride(TRANSPOSED, BLOCK_SIZE)
    if STORAGE == INT4:
        ev = 2 * c
        ma = head_mask[:, None] & (ev[None, :] < R)
        mb = head_mask[:, None] & (ev[None, :] + 1 < R)
        xa = tl.load(src + ev[None, :], mask=ma, other=0.0).to(tl.float32)
        xb = tl.load(src + ev[None, :] + 1, mask=mb, other=0.0).to(tl.float32)
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
        payload = field_ptr(cache_ptr, page[:, None], within, OFF, NBYTES, BLOCK_SIZE, tl.uint8, TRANSPOSED)
        tl.store(payload + col, qa | (qb << 4), mask=ma)
        tl.store(scale_ptr, s16, mask=head_mask)
        tl.store(field_ptr(cache_ptr, page, within, ZERO_OFF, 2, BLOCK_SIZE, tl.float16), z16, mask=head_mask)
    else:
        m = head_mask[:, None] & (c[None, :] < R)
        x = tl.load(src + c[None, :], mask=m, other=0.0)
        if STORAGE == MODEL:
            payload = field_ptr(cache_ptr, page[:, None], within, OFF, NBYTES, BLOCK_SIZE, MODEL_DTYPE, TRANSPOSED)
            tl.store(payload + col, _cast_rtne(x, MODEL_DTYPE), mask=m)
        else:
            x = x.to(tl.float32)
            payload = field_ptr(cache_ptr, page[:, None], within, OFF, NBYTES, BLOCK_SIZE, tl.uint8, TRANSPOSED)
            if STORAGE == INT8:
                s16, q = int8_codes(x)
                q = q.to(tl.int8).to(tl.uint8, bitcast=True)
            else:
                s16, scale = stored_scale(tl.math.div_rn(tl.max(tl.abs(x), axis=1), FP8_MAX))
                y = tl.math.div_rn(x, scale[:, None])
                q = _fp8e4m3_bits(tl.clamp(y, -FP8_MAX, FP8_MAX))
            tl.store(payload + col, q, mask=m)
            tl.store(scale_ptr, s16, mask=head_mask)


@triton.jit
def _zero_gap(cache_ptr, page, within, head_mask, OFF: tl.constexpr, LEN: tl.constexpr,
              BLOCK_SIZE: tl.constexpr, H_TILE: tl.constexpr):
    """Zero the ``LEN`` (< 4) padding bytes at slot offset ``OFF`` of one token in its pages."""
    if LEN > 0:
        g = tl.arange(0, 4)
        gap = field_ptr(cache_ptr, page[:, None], within, OFF, LEN, BLOCK_SIZE, tl.uint8)
        tl.store(gap + g[None, :], tl.zeros((H_TILE, 4), dtype=tl.uint8),
                 mask=head_mask[:, None] & (g[None, :] < LEN))


@triton.jit
def _store_kernel(
    k_ptr, stride_kn, stride_kh,  # K source [N, H, RK]: latents (float32) or the raw keys
    v_ptr, stride_vn, stride_vh,  # V source [N, H, RV]
    cache_ptr, stride_cblk,  # uint8 [num_blocks, H, BLOCK_SIZE, slot_bytes], pages field by field
    STRIDE_CHEAD: tl.constexpr,  # page bytes (BLOCK_SIZE * slot_bytes)
    slot_mapping_ptr,  # [N] int, < 0: padding
    H: tl.constexpr, H_TILE: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    K_STORAGE: tl.constexpr, K_OFF: tl.constexpr, K_BYTES: tl.constexpr, K_SCALE_OFF: tl.constexpr,
    K_ZERO_OFF: tl.constexpr, K_T: tl.constexpr, RK: tl.constexpr, RK_TILE: tl.constexpr,
    V_STORAGE: tl.constexpr, V_OFF: tl.constexpr, V_BYTES: tl.constexpr, V_SCALE_OFF: tl.constexpr,
    V_ZERO_OFF: tl.constexpr, V_T: tl.constexpr, RV: tl.constexpr, RV_TILE: tl.constexpr, MODEL_DTYPE: tl.constexpr,
    GAP0: tl.constexpr, GAP0_LEN: tl.constexpr, GAP1: tl.constexpr, GAP1_LEN: tl.constexpr,
    GAP2: tl.constexpr, GAP2_LEN: tl.constexpr,
):
    """One program per token: quantize K and V of all its KV heads and scatter them into its pages.

    Alignment gaps of the slot (``GAPi``: slot offset, ``GAPi_LEN`` < 4 bytes) are zeroed, so every
    byte of a stored slot is defined, as in the codec.
    """
    tok = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + tok).to(tl.int64)
    hh = tl.arange(0, H_TILE)
    head_mask = (hh < H) & (slot >= 0)
    slot = tl.maximum(slot, 0)
    page = (slot // BLOCK_SIZE) * stride_cblk + hh.to(tl.int64) * STRIDE_CHEAD
    within = slot % BLOCK_SIZE
    _encode_tensor(k_ptr, stride_kn, stride_kh, tok, cache_ptr, page, within, head_mask, K_STORAGE, K_OFF, K_BYTES,
                   K_SCALE_OFF, K_ZERO_OFF, K_T, RK, RK_TILE, BLOCK_SIZE, MODEL_DTYPE, H_TILE)
    _encode_tensor(v_ptr, stride_vn, stride_vh, tok, cache_ptr, page, within, head_mask, V_STORAGE, V_OFF, V_BYTES,
                   V_SCALE_OFF, V_ZERO_OFF, V_T, RV, RV_TILE, BLOCK_SIZE, MODEL_DTYPE, H_TILE)
    _zero_gap(cache_ptr, page, within, head_mask, GAP0, GAP0_LEN, BLOCK_SIZE, H_TILE)
    _zero_gap(cache_ptr, page, within, head_mask, GAP1, GAP1_LEN, BLOCK_SIZE, H_TILE)
    _zero_gap(cache_ptr, page, within, head_mask, GAP2, GAP2_LEN, BLOCK_SIZE, H_TILE)


def store_constexprs(layout: SlotLayout, num_kv_heads: int, block_size: int, stride_chead: int | None = None) -> dict:
    """The store kernel's constexprs, for its launch and for ``scripts/kernel_sass.py`` alike
    (``stride_chead``: the cache's ``stride(1)``, by default dense pages)."""
    c = layout_constexprs(layout, minimum_tile=1)
    gaps = layout.gaps()
    assert len(gaps) <= 3 and all(nbytes < 4 for _, nbytes in gaps), f"unexpected slot padding {gaps}"
    gaps += [(0, 0)] * 3
    for i, (off, nbytes) in enumerate(gaps[:3]):
        c[f"GAP{i}"], c[f"GAP{i}_LEN"] = off, nbytes
    return dict(STRIDE_CHEAD=stride_chead or block_size * layout.slot_bytes, H=num_kv_heads,
                H_TILE=next_pow2(num_kv_heads), BLOCK_SIZE=block_size, **c)


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
    srcs = []
    for x, tr in ((key[:n], transforms.k), (value[:n], transforms.v)):
        src = x if tr.is_identity else tr.project(x)  # float32 latents [N, H, r]
        if src.stride(-1) != 1:
            src = src.contiguous()
        srcs.append(src)
    ks, vs = srcs
    c = store_constexprs(layout, h, block_size, kv_cache.stride(1))
    _store_kernel[(n,)](
        ks, ks.stride(0), ks.stride(1), vs, vs.stride(0), vs.stride(1),
        kv_cache, kv_cache.stride(0), c.pop("STRIDE_CHEAD"), slot_mapping, **c, num_warps=4)


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
