"""Pieces shared by the store, decode and prefill kernels: slot-field constants and tile helpers.

Every byte offset comes from :class:`vllm_lowrank.formats.SlotLayout` (the single source of truth);
:func:`layout_constexprs` turns a layout into the ``tl.constexpr`` arguments the kernels take, so
that each layout compiles to a kernel with its offsets folded in. The cache is uint8
[num_blocks, H, BLOCK_SIZE, slot_bytes] with each (block, head) page stored field by field: the field at
slot offset ``OFF`` of ``NBYTES`` bytes of token ``t`` is at page byte ``BLOCK_SIZE * OFF + t * NBYTES``
(:func:`field_ptr`), so payload rows are 16-byte aligned and a block's scales are contiguous.

Conventions of the attention helpers (decode and prefill):

- a *row* is one (query token, query head) pair, ``M`` rows per program (``M >= 16`` for ``tl.dot``);
- a tile of ``BLOCK_N`` cached tokens of one KV head is addressed by ``page`` (int64 byte offsets of
  their pages) and ``within`` (their index inside the block), both from :func:`token_rows`;
- int4 latents are handled as two half-width tiles: channel ``2c`` (low nibble of byte ``c``) and
  channel ``2c + 1`` (high nibble), so nothing is ever interleaved inside the kernel;
- scores are ``q . k`` with the per-token K scale applied after the dot and, for int4,
  ``q . k = scale * (q . q4) + zero * sum(q)``; V scales are folded into the probabilities and
  the int4 V zero point is accumulated as ``sum_j p_j zero_j`` (added to every latent channel).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_lowrank.formats import STORAGES, SlotLayout, TensorSlot

# storage codes as the kernels see them (index into formats.STORAGES)
MODEL: tl.constexpr = tl.constexpr(STORAGES.index("model"))
INT8: tl.constexpr = tl.constexpr(STORAGES.index("int8"))
FP8: tl.constexpr = tl.constexpr(STORAGES.index("fp8"))
INT4: tl.constexpr = tl.constexpr(STORAGES.index("int4"))

# the codec's quantization constants, repeated here only as kernel constexprs (checked by the tests)
INT8_MAX: tl.constexpr = tl.constexpr(127.0)
FP8_MAX: tl.constexpr = tl.constexpr(448.0)
INT4_MAX: tl.constexpr = tl.constexpr(15.0)
TINY: tl.constexpr = tl.constexpr(1e-8)
# adding then subtracting 1.5 * 2**23 rounds a float32 |y| < 2**22 to the nearest integer, ties to
# even, exactly like torch.round (libdevice.rint is not available in the interpreter)
_RINT_MAGIC: tl.constexpr = tl.constexpr(12582912.0)

LOG2E = 1.4426950408889634

TORCH_TO_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def latent_tile(ts: TensorSlot, minimum: int = 16) -> int:
    """Width of the channel tile of one tensor: half the latent dim for int4 (two nibble tiles)."""
    width = (ts.latent_dim + 1) // 2 if ts.fmt.storage == "int4" else ts.latent_dim
    return max(minimum, next_pow2(width))


def layout_constexprs(layout: SlotLayout, minimum_tile: int = 16) -> dict:
    """The per-layout kernel constexprs: storage codes, field offsets and sizes, latent dims, tiles."""
    out = {}
    for name, ts in (("K", layout.k), ("V", layout.v)):
        out.update({
            f"{name}_STORAGE": STORAGES.index(ts.fmt.storage),
            f"{name}_OFF": ts.payload_offset,
            f"{name}_BYTES": ts.payload_bytes,
            f"{name}_SCALE_OFF": max(ts.scale_offset, 0),
            f"{name}_ZERO_OFF": max(ts.zero_offset, 0),
            f"R{name}": ts.latent_dim,
            f"R{name}_TILE": latent_tile(ts, minimum_tile),
        })
    out["MODEL_DTYPE"] = TORCH_TO_TL[layout.model_dtype]
    return out


def check_cache(kv_cache: torch.Tensor, layout: SlotLayout) -> tuple[int, int, int]:
    """(num_blocks, num_kv_heads, block_size) of a cache for ``layout``; its pages must be dense."""
    num_blocks, h, block_size, slot_bytes = kv_cache.shape
    assert kv_cache.dtype == torch.uint8 and slot_bytes == layout.slot_bytes, "cache does not match the layout"
    assert kv_cache.stride()[1:] == (block_size * slot_bytes, slot_bytes, 1), "cache pages must be dense"
    return num_blocks, h, block_size


def dot_dtypes(layout: SlotLayout) -> dict:
    """Operand dtypes of the two attention dots.

    QK: the model dtype (int8/fp8/int4 payloads are exact in fp16 and bf16). PV: the model dtype for a
    model-dtype V; bf16 when V scales are folded into the probabilities (``p * scale`` can be far below
    fp16's range, bf16 keeps float32's exponent). A float32 model uses exact float32 dots.
    """
    md = layout.model_dtype
    if md == torch.float32:
        return {"QK_DTYPE": tl.float32, "PV_DTYPE": tl.float32}
    pv = TORCH_TO_TL[md] if layout.v.fmt.storage == "model" else tl.bfloat16
    return {"QK_DTYPE": TORCH_TO_TL[md], "PV_DTYPE": pv}


@triton.jit
def rint(y):
    """Round to the nearest integer, ties to even (|y| < 2**22)."""
    return (y + _RINT_MAGIC) - _RINT_MAGIC


def interpreted(kernel) -> bool:
    """True when ``kernel`` runs in Triton's CPU interpreter (``TRITON_INTERPRET=1`` at decoration)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)


@triton.jit
def dot(a, b, acc, IS_F32: tl.constexpr, UPCAST: tl.constexpr):
    """``acc + a @ b``; float32 operands use exact (IEEE) float32, not TF32.

    ``UPCAST`` (interpreter only: its ``tl.dot`` cannot multiply bf16) widens the already-rounded
    16-bit operands to float32 first, which gives the tensor-core result: exact products, float32 sums.
    """
    if IS_F32:
        return tl.dot(a, b, acc, input_precision="ieee")
    elif UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def to_dot(x, DTYPE: tl.constexpr):
    """Convert a loaded payload tile to a dot operand dtype (integers through float32, which is exact
    and also what the interpreter needs: it has no direct integer -> bf16 conversion)."""
    if x.dtype.is_int():
        return x.to(tl.float32).to(DTYPE)
    else:
        return x.to(DTYPE)


@triton.jit
def field_ptr(cache_ptr, page, within, OFF: tl.constexpr, NBYTES: tl.constexpr, BLOCK_SIZE: tl.constexpr,
              DTYPE: tl.constexpr):
    """Pointer(s) to the field at slot offset ``OFF`` (``NBYTES`` per token) of tokens ``within`` of
    pages ``page``, typed ``DTYPE``."""
    return (cache_ptr + page + BLOCK_SIZE * OFF + within * NBYTES).to(tl.pointer_type(DTYPE))


@triton.jit
def token_rows(block_table_ptr, tok, tok_mask, BLOCK_SIZE: tl.constexpr, stride_blk, head_off):
    """(page, within) of tokens ``tok`` (a request's positions) of one KV head: int64 byte offsets of
    their (block, head) pages (``head_off`` = head * page bytes) and their index inside the block."""
    blk = tl.load(block_table_ptr + tok // BLOCK_SIZE, mask=tok_mask, other=0).to(tl.int64)
    return blk * stride_blk + head_off, (tok % BLOCK_SIZE).to(tl.int64)


@triton.jit
def load_query(q_rows, row_mask, K_STORAGE: tl.constexpr, RK: tl.constexpr, RK_TILE: tl.constexpr,
               QK_DTYPE: tl.constexpr):
    """Query tiles [M, RK_TILE] in ``QK_DTYPE`` from row pointers ``q_rows``, and ``sum(q)`` per row.

    Returns ``(q_a, q_b, q_sum)``: for int4 K, ``q_a``/``q_b`` hold the even/odd channels; otherwise
    ``q_a`` is the whole query and ``q_b`` is ``q_a``. ``q_sum`` (the int4 zero-point term) is summed
    over the rounded query, so that its rounding error cancels with the dot's.
    """
    c = tl.arange(0, RK_TILE)
    if K_STORAGE == INT4:
        ev = 2 * c
        q_a = tl.load(q_rows[:, None] + ev[None, :], mask=row_mask[:, None] & (ev[None, :] < RK),
                      other=0.0).to(QK_DTYPE)
        q_b = tl.load(q_rows[:, None] + ev[None, :] + 1, mask=row_mask[:, None] & (ev[None, :] + 1 < RK),
                      other=0.0).to(QK_DTYPE)
        q_sum = tl.sum(q_a.to(tl.float32), axis=1) + tl.sum(q_b.to(tl.float32), axis=1)
    else:
        q_a = tl.load(q_rows[:, None] + c[None, :], mask=row_mask[:, None] & (c[None, :] < RK),
                      other=0.0).to(QK_DTYPE)
        q_b = q_a
        q_sum = tl.zeros((q_rows.shape[0],), dtype=tl.float32)
    return q_a, q_b, q_sum


@triton.jit
def load_payload(cache_ptr, page, within, tok_mask, STORAGE: tl.constexpr, OFF: tl.constexpr,
                 NBYTES: tl.constexpr, R: tl.constexpr, R_TILE: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                 MODEL_DTYPE: tl.constexpr):
    """Latent payloads [BLOCK_N, R_TILE] of a tile of tokens in their stored dtype (model dtype, int8 or
    e4m3; not int4), zero at masked tokens and padded channels."""
    c = tl.arange(0, R_TILE)
    m = tok_mask[:, None] & (c[None, :] < R)
    if STORAGE == MODEL:
        ptr = field_ptr(cache_ptr, page[:, None], within[:, None], OFF, NBYTES, BLOCK_SIZE, MODEL_DTYPE)
        return tl.load(ptr + c[None, :], mask=m, other=0.0)
    elif STORAGE == INT8:
        ptr = field_ptr(cache_ptr, page[:, None], within[:, None], OFF, NBYTES, BLOCK_SIZE, tl.int8)
        return tl.load(ptr + c[None, :], mask=m, other=0)
    else:
        ptr = field_ptr(cache_ptr, page[:, None], within[:, None], OFF, NBYTES, BLOCK_SIZE, tl.float8e4nv)
        return tl.load(ptr + c[None, :], mask=m, other=0.0)


@triton.jit
def softmax_step(s, m_i, l_i, acc_a, acc_b, acc_z, V_STORAGE: tl.constexpr):
    """One online-softmax step over a tile of scores ``s`` [M, BLOCK_N] (log2 units, -inf where masked):
    returns the tile's weights ``p`` and the running max, sum and accumulators rescaled to the new max."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc_a = acc_a * alpha[:, None]
    if V_STORAGE == INT4:
        acc_b = acc_b * alpha[:, None]
        acc_z = acc_z * alpha
    return p, m_new, l_i, acc_a, acc_b, acc_z


@triton.jit
def tile_scores(cache_ptr, page, within, tok_mask, q_a, q_b, q_sum,
                K_STORAGE: tl.constexpr, K_OFF: tl.constexpr, K_BYTES: tl.constexpr, K_SCALE_OFF: tl.constexpr,
                K_ZERO_OFF: tl.constexpr, RK: tl.constexpr, RK_TILE: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                MODEL_DTYPE: tl.constexpr, QK_DTYPE: tl.constexpr, UPCAST: tl.constexpr):
    """Raw scores ``q . k_j`` [M, BLOCK_N] (float32) of query tiles against a tile of cached keys.

    ``q_a``/``q_b`` are already in ``QK_DTYPE``; masked tokens read as zero keys.
    """
    c = tl.arange(0, RK_TILE)
    IS_F32: tl.constexpr = QK_DTYPE == tl.float32
    zero = tl.zeros((q_a.shape[0], page.shape[0]), dtype=tl.float32)
    if K_STORAGE == INT4:
        m = tok_mask[:, None] & (c[None, :] < (RK + 1) // 2)
        b = tl.load(field_ptr(cache_ptr, page[:, None], within[:, None], K_OFF, K_BYTES, BLOCK_SIZE, tl.uint8)
                    + c[None, :], mask=m, other=0)
        s = dot(q_a, tl.trans(to_dot(b & 15, QK_DTYPE)), zero, IS_F32, UPCAST)
        s = dot(q_b, tl.trans(to_dot(b >> 4, QK_DTYPE)), s, IS_F32, UPCAST)
    else:
        k = load_payload(cache_ptr, page, within, tok_mask, K_STORAGE, K_OFF, K_BYTES, RK, RK_TILE,
                         BLOCK_SIZE, MODEL_DTYPE)
        s = dot(q_a, tl.trans(to_dot(k, QK_DTYPE)), zero, IS_F32, UPCAST)
    if K_STORAGE != MODEL:
        k_scale = tl.load(field_ptr(cache_ptr, page, within, K_SCALE_OFF, 2, BLOCK_SIZE, tl.float16),
                          mask=tok_mask, other=0.0)
        s = s * k_scale.to(tl.float32)[None, :]
    if K_STORAGE == INT4:
        k_zero = tl.load(field_ptr(cache_ptr, page, within, K_ZERO_OFF, 2, BLOCK_SIZE, tl.float16),
                         mask=tok_mask, other=0.0)
        s += q_sum[:, None] * k_zero.to(tl.float32)[None, :]
    return s


@triton.jit
def tile_pv(p, acc_a, acc_b, acc_z, cache_ptr, page, within, tok_mask,
            V_STORAGE: tl.constexpr, V_OFF: tl.constexpr, V_BYTES: tl.constexpr, V_SCALE_OFF: tl.constexpr,
            V_ZERO_OFF: tl.constexpr, RV: tl.constexpr, RV_TILE: tl.constexpr, BLOCK_SIZE: tl.constexpr,
            MODEL_DTYPE: tl.constexpr, PV_DTYPE: tl.constexpr, UPCAST: tl.constexpr):
    """Accumulate ``sum_j p_j v_j`` of a tile of cached values into the latent accumulators.

    ``p`` [M, BLOCK_N] float32 (zero at masked tokens). ``acc_a`` [M, RV_TILE] takes all channels
    (even channels for int4), ``acc_b`` the odd channels of int4 and ``acc_z`` [M] the int4 zero term
    ``sum_j p_j zero_j``, added to every latent channel at the end.
    """
    c = tl.arange(0, RV_TILE)
    IS_F32: tl.constexpr = PV_DTYPE == tl.float32
    if V_STORAGE != MODEL:
        v_scale = tl.load(field_ptr(cache_ptr, page, within, V_SCALE_OFF, 2, BLOCK_SIZE, tl.float16),
                          mask=tok_mask, other=0.0)
        pv = (p * v_scale.to(tl.float32)[None, :]).to(PV_DTYPE)
    else:
        pv = p.to(PV_DTYPE)
    if V_STORAGE == INT4:
        m = tok_mask[:, None] & (c[None, :] < (RV + 1) // 2)
        b = tl.load(field_ptr(cache_ptr, page[:, None], within[:, None], V_OFF, V_BYTES, BLOCK_SIZE, tl.uint8)
                    + c[None, :], mask=m, other=0)
        acc_a = dot(pv, to_dot(b & 15, PV_DTYPE), acc_a, IS_F32, UPCAST)
        acc_b = dot(pv, to_dot(b >> 4, PV_DTYPE), acc_b, IS_F32, UPCAST)
        # zero term with the same rounded weights as the nibble dot: v = s * (q4 + zero / s), so that
        # the rounding error of p * s multiplies v (not the much larger q4 * s; they cancel otherwise)
        v_zero = tl.load(field_ptr(cache_ptr, page, within, V_ZERO_OFF, 2, BLOCK_SIZE, tl.float16),
                         mask=tok_mask, other=0.0).to(tl.float32)
        vs = v_scale.to(tl.float32)
        z_over_s = tl.where(vs > 0, v_zero / tl.where(vs > 0, vs, 1.0), 0.0)
        acc_z += tl.sum(tl.where(vs[None, :] > 0, pv.to(tl.float32) * z_over_s[None, :], p * v_zero[None, :]), axis=1)
    else:
        v = load_payload(cache_ptr, page, within, tok_mask, V_STORAGE, V_OFF, V_BYTES, RV, RV_TILE,
                         BLOCK_SIZE, MODEL_DTYPE)
        acc_a = dot(pv, to_dot(v, PV_DTYPE), acc_a, IS_F32, UPCAST)
    return acc_a, acc_b, acc_z


@triton.jit
def store_output(o_a, o_b, out_rows, row_mask, basis_ptr, offset_ptr, h,
                 RV: tl.constexpr, RV_TILE: tl.constexpr, D: tl.constexpr, D_TILE: tl.constexpr,
                 SPLIT_HALVES: tl.constexpr, HAS_BASIS: tl.constexpr, HAS_OFFSET: tl.constexpr):
    """Rebuild ``o = P_v o_lat + c_v`` for [M] rows and store it at row pointers ``out_rows``.

    ``o_a`` [M, RV_TILE] float32 holds the latent output (its even channels when ``SPLIT_HALVES``,
    with ``o_b`` the odd ones). ``basis_ptr``: P_v [H, D, RV] float32; ``offset_ptr``: c_v [H, D].
    """
    c = tl.arange(0, RV_TILE)
    d = tl.arange(0, D_TILE)
    if SPLIT_HALVES:
        ch_a = 2 * c
        ch_b = 2 * c + 1
    else:
        ch_a = c
        ch_b = c
    if HAS_BASIS:
        # P^T tiles [RV_TILE, D_TILE]: pt[c, d] = P[h, d, ch(c)]
        p_base = basis_ptr + h * (D * RV) + d[None, :] * RV
        pt_a = tl.load(p_base + ch_a[:, None], mask=(ch_a[:, None] < RV) & (d[None, :] < D), other=0.0)
        o = tl.dot(o_a, pt_a, input_precision="ieee")
        if SPLIT_HALVES:
            pt_b = tl.load(p_base + ch_b[:, None], mask=(ch_b[:, None] < RV) & (d[None, :] < D), other=0.0)
            o = tl.dot(o_b, pt_b, o, input_precision="ieee")
        if HAS_OFFSET:
            o += tl.load(offset_ptr + h * D + d, mask=d < D, other=0.0)[None, :]
        tl.store(out_rows[:, None] + d[None, :], o.to(out_rows.dtype.element_ty),
                 mask=row_mask[:, None] & (d[None, :] < D))
    else:  # identity transform: RV == D
        o_a_out = o_a
        if HAS_OFFSET:
            o_a_out += tl.load(offset_ptr + h * D + ch_a, mask=ch_a < D, other=0.0)[None, :]
        tl.store(out_rows[:, None] + ch_a[None, :], o_a_out.to(out_rows.dtype.element_ty),
                 mask=row_mask[:, None] & (ch_a[None, :] < D))
        if SPLIT_HALVES:
            o_b_out = o_b
            if HAS_OFFSET:
                o_b_out += tl.load(offset_ptr + h * D + ch_b, mask=ch_b < D, other=0.0)[None, :]
            tl.store(out_rows[:, None] + ch_b[None, :], o_b_out.to(out_rows.dtype.element_ty),
                     mask=row_mask[:, None] & (ch_b[None, :] < D))


def transform_args(tr, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool, bool]:
    """(basis, offset, HAS_BASIS, HAS_OFFSET) kernel arguments of a TensorTransform (float32)."""
    basis = tr.basis.float().contiguous() if tr.basis is not None else like
    offset = tr.offset.float().contiguous() if tr.offset is not None else like
    return basis, offset, tr.basis is not None, tr.offset is not None


def project_queries(query: torch.Tensor, tr, num_kv_heads: int) -> torch.Tensor:
    """``P_k^T q`` [T, Hq, r_k] (float32) with one batched matmul over KV heads; the query itself
    when K has no basis (the K offset shifts every score of a query equally: softmax drops it)."""
    if tr.basis is None:
        return query
    t, hq, d = query.shape
    g = hq // num_kv_heads
    q = query.reshape(t, num_kv_heads, g, d).float()
    return torch.einsum("thgd,hdr->thgr", q, tr.basis.float()).reshape(t, hq, -1)
