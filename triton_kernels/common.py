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

from vllm_lowrank.formats import STORAGES, SlotLayout, TensorSlot, ring_tokens_per_block

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


def layout_constexprs(layout: SlotLayout, minimum_tile: int = 32) -> dict:
    """The per-layout kernel constexprs: storage codes, field offsets and sizes, latent dims, tiles.

    Channel tiles are at least ``minimum_tile`` wide (padding is masked, never read): the attention
    kernels' dots over 16-wide latents compile to CUDA-core FMAs instead of tensor cores, 2x the loop's
    instructions (``scripts/kernel_sass.py``: lowrank+int8 r16 at head_dim 64, 1107 against 537).
    """
    out = {}
    for name, ts in (("K", layout.k), ("V", layout.v)):
        out.update({
            f"{name}_STORAGE": STORAGES.index(ts.fmt.storage),
            f"{name}_OFF": ts.payload_offset,
            f"{name}_BYTES": ts.payload_bytes,
            f"{name}_SCALE_OFF": max(ts.scale_offset, 0),
            f"{name}_ZERO_OFF": max(ts.zero_offset, 0),
            f"{name}_T": ts.transposed,
            f"R{name}": ts.latent_dim,
            f"R{name}_TILE": latent_tile(ts, minimum_tile),
        })
    out["MODEL_DTYPE"] = TORCH_TO_TL[layout.model_dtype]
    return out


def check_cache(kv_cache: torch.Tensor, layout: SlotLayout) -> tuple[int, int, int]:
    """(num_blocks, num_kv_heads, block_size) of a cache for ``layout``; its pages must be dense, each
    starting 16-byte aligned (a layered cache's ring pages use a prefix of each page: ``stride(1)`` may
    exceed ``block_size * slot_bytes``)."""
    num_blocks, h, block_size, slot_bytes = kv_cache.shape
    assert kv_cache.dtype == torch.uint8 and slot_bytes == layout.slot_bytes, "cache does not match the layout"
    assert kv_cache.stride()[2:] == (slot_bytes, 1), "cache pages must be dense"
    assert kv_cache.stride(1) >= block_size * slot_bytes and kv_cache.stride(1) % 16 == 0, "pages overlap"
    return num_blocks, h, block_size


def dot_dtypes(layout: SlotLayout) -> dict:
    """Operand dtypes of the two attention dots.

    A model-dtype tensor keeps the model dtype (no conversion at all). A quantized one uses fp16: int8,
    4-bit and e4m3 codes are exact in fp16 and convert to it cheaply (:func:`to_dot`), unlike bf16, and
    fp16 has 3 more mantissa bits. Its range is handled exactly: queries are scaled by a power of two
    per row (:func:`load_query`), and the weights ``p * v_scale`` divided by the tile's largest V scale
    (:func:`tile_pv`). A float32 model uses exact float32 dots.
    """
    md = layout.model_dtype
    if md == torch.float32:
        return {"QK_DTYPE": tl.float32, "PV_DTYPE": tl.float32}
    qk = TORCH_TO_TL[md] if layout.k.fmt.storage == "model" else tl.float16
    pv = TORCH_TO_TL[md] if layout.v.fmt.storage == "model" else tl.float16
    return {"QK_DTYPE": qk, "PV_DTYPE": pv}


@triton.jit
def rint(y):
    """Round to the nearest integer, ties to even (|y| < 2**22)."""
    return (y + _RINT_MAGIC) - _RINT_MAGIC


@triton.jit
def stored_scale(s):
    """The fp16 scale as the codec stores it, and its float32 value used to divide (never zero)."""
    s16 = tl.maximum(s, TINY).to(tl.float16)
    s32 = s16.to(tl.float32)
    return s16, tl.where(s32 > 0, s32, TINY)


@triton.jit
def int8_codes(x):
    """The codec's int8 of float32 rows ``x`` [N, R] (zero past the real columns): the stored fp16 scales
    [N] and the codes [N, R] as float32 (IEEE division, round half to even, in [-127, 127])."""
    s16, scale = stored_scale(tl.math.div_rn(tl.max(tl.abs(x), axis=1), INT8_MAX))
    return s16, tl.clamp(rint(tl.math.div_rn(x, scale[:, None])), -INT8_MAX, INT8_MAX)


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


# byte -> fp16 on the bits, four bytes a 32-bit register: prmt puts bytes 0, 1 (then 2, 3) of ``u`` under
# the fp16 exponent byte 0x64, giving 1024 + u, and one packed subtraction removes the bias
def _bytes_to_f16_asm(pick: str, bias: str) -> tl.constexpr:
    return tl.constexpr("{ .reg .b32 u, bias; " + pick + " prmt.b32 $0, u, 0x64646464, 0x4140;"
                        f" prmt.b32 $1, u, 0x64646464, 0x4342; mov.b32 bias, {bias};"
                        " sub.f16x2 $0, $0, bias; sub.f16x2 $1, $1, bias; }")


# int8 x: u = x ^ 0x80 = x + 128, minus 1152 (0x6480); 4-bit codes: u = the nibble, minus 1024 (0x6400)
_INT8_F16_ASM = _bytes_to_f16_asm("xor.b32 u, $2, 0x80808080;", "0x64806480")
_LOW_NIBBLE_F16_ASM = _bytes_to_f16_asm("and.b32 u, $2, 0x0F0F0F0F;", "0x64006400")
_HIGH_NIBBLE_F16_ASM = _bytes_to_f16_asm("shr.b32 u, $2, 4; and.b32 u, u, 0x0F0F0F0F;", "0x64006400")


@triton.jit
def _int8_to_f16(x):
    """int8 -> fp16, exact, four a register."""
    return tl.inline_asm_elementwise(_INT8_F16_ASM, "=r,=r,r", [x], dtype=tl.float16, is_pure=True, pack=4)


@triton.jit
def _nibbles_to_f16(b, HIGH: tl.constexpr):
    """The low (or high) 4-bit codes of bytes ``b`` -> fp16, exact, four bytes a register."""
    if HIGH:
        return tl.inline_asm_elementwise(_HIGH_NIBBLE_F16_ASM, "=r,=r,r", [b], dtype=tl.float16, is_pure=True,
                                         pack=4)
    else:
        return tl.inline_asm_elementwise(_LOW_NIBBLE_F16_ASM, "=r,=r,r", [b], dtype=tl.float16, is_pure=True,
                                         pack=4)


@triton.jit
def to_dot(x, DTYPE: tl.constexpr, UPCAST: tl.constexpr):
    """Convert a loaded payload tile to a dot operand dtype.

    int8 -> fp16 on the bits, four at a time, with no conversion instruction (the hardware's run 16 a
    clock per SM, too few for a memory-bound loop; e4m3 -> fp16 has a packed one). The interpreter
    (``UPCAST``) has no inline assembly: there, integers go through float32, which is exact too.
    """
    if DTYPE == tl.float16 and x.dtype == tl.int8 and not UPCAST:
        return _int8_to_f16(x)
    elif x.dtype.is_int():
        return x.to(tl.float32).to(DTYPE)
    else:
        return x.to(DTYPE)


@triton.jit
def nibbles_to_dot(b, HIGH: tl.constexpr, DTYPE: tl.constexpr, UPCAST: tl.constexpr):
    """The low (or high) 4-bit codes of a byte tile as a dot operand (see :func:`to_dot`)."""
    if DTYPE == tl.float16 and not UPCAST:
        return _nibbles_to_f16(b, HIGH)
    elif HIGH:
        return (b >> 4).to(tl.float32).to(DTYPE)
    else:
        return (b & 15).to(tl.float32).to(DTYPE)


@triton.jit
def field_ptr(cache_ptr, page, within, OFF: tl.constexpr, NBYTES: tl.constexpr, BLOCK_SIZE: tl.constexpr,
              DTYPE: tl.constexpr, TRANSPOSED: tl.constexpr = False):
    """Pointer(s) to column 0 of the field at slot offset ``OFF`` (``NBYTES`` per token) of tokens
    ``within`` of pages ``page``, typed ``DTYPE``; column ``c`` is at ``+ c * column_stride(...)``."""
    if TRANSPOSED:
        return (cache_ptr + page + BLOCK_SIZE * OFF + within).to(tl.pointer_type(DTYPE))
    else:
        return (cache_ptr + page + BLOCK_SIZE * OFF + within * NBYTES).to(tl.pointer_type(DTYPE))


@triton.jit
def column_stride(TRANSPOSED: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """Elements between consecutive columns of a field: 1, or ``BLOCK_SIZE`` bytes when transposed."""
    if TRANSPOSED:
        return BLOCK_SIZE
    else:
        return 1


@triton.jit
def tile_pages(bt_row, t0, end, stride_blk, head_off, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
               TILE_B: tl.constexpr, MASKED: tl.constexpr):
    """The pages of a tile of ``BLOCK_N`` tokens ``t0 ..`` (``t0`` a multiple of ``BLOCK_N``) of one KV head.

    The tile is ``NB = BLOCK_N // TILE_B`` rows of ``TILE_B = min(BLOCK_SIZE, BLOCK_N)`` consecutive tokens
    of one block each: one block-table read per row, never per token. Returns ``page`` [NB] (int64 byte
    offsets of the (block, head) pages; block 0's for rows past ``end``), ``w0`` (the index within its
    block of a row's first token: 0 unless a block spans several tiles) and ``mask`` [NB, TILE_B] (tokens
    before ``end``; a constant true unless ``MASKED``, for tiles known to end before ``end``).
    """
    first = t0 + tl.arange(0, BLOCK_N // TILE_B) * TILE_B
    if MASKED:
        blk = tl.load(bt_row + first // BLOCK_SIZE, mask=first < end, other=0).to(tl.int64)
        mask = (first[:, None] + tl.arange(0, TILE_B)[None, :]) < end
    else:
        blk = tl.load(bt_row + first // BLOCK_SIZE).to(tl.int64)
        mask = tl.full((BLOCK_N // TILE_B, TILE_B), 1, dtype=tl.int1)
    if TILE_B < BLOCK_SIZE:
        w0 = t0 % BLOCK_SIZE
    else:
        w0 = 0
    return blk * stride_blk + head_off, w0, mask


@triton.jit
def tile_field(cache_ptr, page, w0, OFF: tl.constexpr, NBYTES: tl.constexpr, NCOL: tl.constexpr,
               TILE_B: tl.constexpr, BLOCK_SIZE: tl.constexpr, DTYPE: tl.constexpr,
               TRANSPOSED: tl.constexpr = False, CHANNELS_FIRST: tl.constexpr = False):
    """Pointers to columns ``0 .. NCOL`` of a field of a tile's tokens (see tile_pages).

    Token-major fields: [BLOCK_N, NCOL], contiguous along columns. Transposed fields: [NB, TILE_B, NCOL]
    (or [NCOL, NB, TILE_B] if ``CHANNELS_FIRST``), so that the compiler sees a block's tokens contiguous
    (and loads them as vectors); the caller reshapes the loaded tile.
    """
    if TRANSPOSED:
        if CHANNELS_FIRST:
            t = w0 + tl.arange(0, TILE_B)[None, None, :]
            c = tl.arange(0, NCOL)[:, None, None]
            pg = page[None, :, None]
        else:
            t = w0 + tl.arange(0, TILE_B)[None, :, None]
            c = tl.arange(0, NCOL)[None, None, :]
            pg = page[:, None, None]
        return field_ptr(cache_ptr, pg, t, OFF, NBYTES, BLOCK_SIZE, DTYPE, True) + c * BLOCK_SIZE
    else:
        n: tl.constexpr = page.shape[0] * TILE_B
        # page byte offsets are multiples of 16 (cache_shape); the reshape hides it from the compiler
        page_tok = tl.multiple_of(tl.reshape(tl.broadcast_to(page[:, None], (page.shape[0], TILE_B)), (n,)), 16)
        t = w0 + tl.arange(0, n) % TILE_B
        c = tl.arange(0, NCOL)[None, :]
        return field_ptr(cache_ptr, page_tok[:, None], t[:, None], OFF, NBYTES, BLOCK_SIZE, DTYPE) + c


@triton.jit
def tile_scales(cache_ptr, page, w0, mask, OFF: tl.constexpr, TILE_B: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """The fp16 scales (or zero points) at slot offset ``OFF`` of a tile's tokens, float32 [BLOCK_N],
    zero past the end.

    Loaded as 32-bit words of two scales, unmasked (every page of a tile is a real one, block 0's past
    the end), then split: Triton's pipeliner turns only loads of 4 bytes or more a thread into
    asynchronous copies, and 2-byte loads stayed synchronous in the loop's machine code (``LDG.E.U16``,
    ``scripts/kernel_sass.py``); what that costs in time is for ``scripts/h200.sh scales-ab`` to measure.
    """
    n: tl.constexpr = mask.shape[0] * TILE_B
    base = tl.multiple_of(page + BLOCK_SIZE * OFF + 2 * w0, 4)
    words = (cache_ptr + base[:, None]).to(tl.pointer_type(tl.uint32)) + tl.arange(0, TILE_B // 2)[None, :]
    w = tl.load(words)
    lo = (w & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True)
    hi = (w >> 16).to(tl.uint16).to(tl.float16, bitcast=True)
    x = tl.where(mask, tl.reshape(tl.join(lo, hi), (mask.shape[0], TILE_B)), 0.0)
    return tl.reshape(x, (n,)).to(tl.float32)


@triton.jit
def even_odd(x):
    """Columns ``0, 2, 4, ..`` and ``1, 3, 5, ..`` of ``x`` [M, 2C]: int4's two nibble tiles."""
    return tl.split(tl.reshape(x, (x.shape[0], x.shape[1] // 2, 2)))


@triton.jit
def project_query_rows(q_rows, row_mask, h, basis_ptr, smooth_ptr, C: tl.constexpr, RK: tl.constexpr,
                       D: tl.constexpr, HAS_SMOOTH: tl.constexpr):
    """``P_k^T (s q)`` [M, C] in float32 of the raw query rows ``q_rows`` [M] of KV head ``h`` (``basis_ptr``:
    P_k [H, D, RK], ``smooth_ptr``: s [H, D], float32; columns from ``RK`` on are zero). A float32 (IEEE)
    dot over head_dim chunks of 16, computed transposed, ``P^T [C, 16] @ q^T [16, M]``, so that the
    latent columns are the dot's M dimension (16 or more) while the query rows may be 8."""
    col = tl.arange(0, C)
    acc = tl.zeros((C, q_rows.shape[0]), dtype=tl.float32)
    for d0 in range(0, D, 16):
        d = d0 + tl.arange(0, 16)
        d_mask = d < D
        qt = tl.load(q_rows[None, :] + d[:, None], mask=d_mask[:, None] & row_mask[None, :], other=0.0)
        qt = qt.to(tl.float32)
        if HAS_SMOOTH:
            qt = qt * tl.load(smooth_ptr + h * D + d, mask=d_mask, other=0.0)[:, None]
        pt = tl.load(basis_ptr + (h * D + d)[None, :] * RK + col[:, None], mask=(col < RK)[:, None] & d_mask[None, :],
                     other=0.0)
        acc = tl.dot(pt, qt, acc, input_precision="ieee")
    return tl.trans(acc)


@triton.jit
def load_query(q_rows, row_mask, K_STORAGE: tl.constexpr, RK: tl.constexpr, RK_TILE: tl.constexpr,
               QK_DTYPE: tl.constexpr, h, basis_ptr, smooth_ptr, D: tl.constexpr, HAS_BASIS: tl.constexpr,
               HAS_SMOOTH: tl.constexpr):
    """Query tiles [M, RK_TILE] in ``QK_DTYPE`` from row pointers ``q_rows``, ``sum(q)`` and the scale
    of each row's scores.

    With ``HAS_BASIS`` / ``HAS_SMOOTH`` the rows are raw queries [D] of KV head ``h``'s group and the
    projection ``P_k^T (s * q)`` (``basis_ptr``: P_k [H, D, RK], ``smooth_ptr``: s [H, D], float32) is
    done here, a float32 (IEEE) dot over head_dim chunks, instead of on the host; otherwise the rows
    are already what the dots take.

    Returns ``(q_a, q_b, q_sum, q_mul)``: for int4 K, ``q_a``/``q_b`` hold the even/odd channels;
    otherwise ``q_a`` is the whole query and ``q_b`` is ``q_a``. ``q_sum`` (the int4 zero-point term) is
    summed over the rounded query, so that its rounding error cancels with the dot's. For fp16 dots a
    row is first multiplied by a power of two that brings its largest element into [256, 512) (exact,
    and safe from fp16 overflow whatever the model's range); ``q_mul`` [M] undoes it on the scores.
    """
    c = tl.arange(0, RK_TILE)
    if HAS_BASIS:
        C: tl.constexpr = 2 * RK_TILE if K_STORAGE == INT4 else RK_TILE
        q = project_query_rows(q_rows, row_mask, h, basis_ptr, smooth_ptr, C, RK, D, HAS_SMOOTH)
        if K_STORAGE == INT4:
            q_a, q_b = even_odd(q)
        else:
            q_a = q
            q_b = q
    elif K_STORAGE == INT4:
        ev = 2 * c
        q_a = tl.load(q_rows[:, None] + ev[None, :], mask=row_mask[:, None] & (ev[None, :] < RK), other=0.0)
        q_b = tl.load(q_rows[:, None] + ev[None, :] + 1, mask=row_mask[:, None] & (ev[None, :] + 1 < RK),
                      other=0.0)
        if HAS_SMOOTH:
            q_a = q_a.to(tl.float32) * tl.load(smooth_ptr + h * D + ev, mask=ev < RK, other=0.0)[None, :]
            q_b = q_b.to(tl.float32) * tl.load(smooth_ptr + h * D + ev + 1, mask=ev + 1 < RK, other=0.0)[None, :]
    else:
        q_a = tl.load(q_rows[:, None] + c[None, :], mask=row_mask[:, None] & (c[None, :] < RK), other=0.0)
        if HAS_SMOOTH:
            q_a = q_a.to(tl.float32) * tl.load(smooth_ptr + h * D + c, mask=c < RK, other=0.0)[None, :]
        q_b = q_a
    q_a = q_a.to(tl.float32)
    q_b = q_b.to(tl.float32)
    q_mul = tl.full((q_rows.shape[0],), 1.0, dtype=tl.float32)
    if QK_DTYPE == tl.float16:
        amax = tl.maximum(tl.max(tl.abs(q_a), axis=1), tl.max(tl.abs(q_b), axis=1))
        e = tl.minimum(tl.maximum((amax.to(tl.int32, bitcast=True) >> 23) & 0xFF, 9), 253)  # biased exponent
        q_a = q_a * ((262 - e) << 23).to(tl.float32, bitcast=True)[:, None]  # * 2**(135 - e)
        q_b = q_b * ((262 - e) << 23).to(tl.float32, bitcast=True)[:, None]
        q_mul = ((e - 8) << 23).to(tl.float32, bitcast=True)  # 2**(e - 135)
    q_a = q_a.to(QK_DTYPE)
    q_b = q_b.to(QK_DTYPE)
    if K_STORAGE == INT4:
        q_sum = tl.sum(q_a.to(tl.float32), axis=1) + tl.sum(q_b.to(tl.float32), axis=1)
    else:
        q_sum = tl.zeros((q_rows.shape[0],), dtype=tl.float32)
    return q_a, q_b, q_sum, q_mul


@triton.jit
def load_payload(cache_ptr, page, w0, mask, STORAGE: tl.constexpr, OFF: tl.constexpr, NBYTES: tl.constexpr,
                 NVALID: tl.constexpr, NCOL: tl.constexpr, TILE_B: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                 MODEL_DTYPE: tl.constexpr, TRANSPOSED: tl.constexpr, MASK_TOKENS: tl.constexpr,
                 CHANNELS_FIRST: tl.constexpr = False):
    """The payloads [BLOCK_N, NCOL] of a tile of tokens in their stored dtype (model dtype, int8, e4m3;
    int4 as raw bytes of two channels each), zero past column ``NVALID`` and, if ``MASK_TOKENS``, at
    tokens past the end (otherwise whatever their page holds: callers mask the scores or the weights).
    ``CHANNELS_FIRST``: the tile as [NCOL, BLOCK_N] (a transposed field is loaded that way directly)."""
    if STORAGE == MODEL:
        dtype: tl.constexpr = MODEL_DTYPE
    elif STORAGE == INT8:
        dtype: tl.constexpr = tl.int8
    elif STORAGE == FP8:
        dtype: tl.constexpr = tl.float8e4nv
    else:
        dtype: tl.constexpr = tl.uint8
    ptr = tile_field(cache_ptr, page, w0, OFF, NBYTES, NCOL, TILE_B, BLOCK_SIZE, dtype, TRANSPOSED,
                     CHANNELS_FIRST and TRANSPOSED)
    n: tl.constexpr = mask.shape[0] * TILE_B
    zero = tl.zeros((1, 1), dtype=dtype)
    c = tl.arange(0, NCOL)[None, :]
    if TRANSPOSED:  # 3-d pointers: load, then reshape
        zero = zero[None]
        if CHANNELS_FIRST:
            c = tl.arange(0, NCOL)[:, None, None]
            mask = mask[None, :, :]
        else:
            c = c[None]
            mask = mask[:, :, None]
    else:
        mask = tl.reshape(mask, (n,))[:, None]
    if MASK_TOKENS:
        x = tl.load(ptr, mask=mask & (c < NVALID), other=zero)
    elif NVALID < NCOL:
        x = tl.load(ptr, mask=c < NVALID, other=zero)
    else:
        x = tl.load(ptr)
    if not CHANNELS_FIRST:
        return tl.reshape(x, (n, NCOL))
    elif TRANSPOSED:
        return tl.reshape(x, (NCOL, n))
    else:
        return tl.trans(tl.reshape(x, (n, NCOL)))


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
def tile_scores(cache_ptr, page, w0, mask, q_a, q_b, q_sum,
                K_STORAGE: tl.constexpr, K_OFF: tl.constexpr, K_BYTES: tl.constexpr, K_SCALE_OFF: tl.constexpr,
                K_ZERO_OFF: tl.constexpr, K_T: tl.constexpr, RK: tl.constexpr, RK_TILE: tl.constexpr,
                TILE_B: tl.constexpr, BLOCK_SIZE: tl.constexpr, MODEL_DTYPE: tl.constexpr, QK_DTYPE: tl.constexpr,
                UPCAST: tl.constexpr):
    """Raw scores ``q . k_j`` [M, BLOCK_N] (float32) of query tiles against a tile of cached keys.

    ``q_a``/``q_b`` are already in ``QK_DTYPE``. Columns of tokens past the end are arbitrary (their
    keys are not masked): the caller masks the scores.
    """
    IS_F32: tl.constexpr = QK_DTYPE == tl.float32
    zero = tl.zeros((q_a.shape[0], mask.shape[0] * TILE_B), dtype=tl.float32)
    if K_STORAGE == INT4:
        b = load_payload(cache_ptr, page, w0, mask, K_STORAGE, K_OFF, K_BYTES, (RK + 1) // 2, RK_TILE, TILE_B,
                         BLOCK_SIZE, MODEL_DTYPE, K_T, False)
        s = dot(q_a, tl.trans(nibbles_to_dot(b, False, QK_DTYPE, UPCAST)), zero, IS_F32, UPCAST)
        s = dot(q_b, tl.trans(nibbles_to_dot(b, True, QK_DTYPE, UPCAST)), s, IS_F32, UPCAST)
    else:
        k = load_payload(cache_ptr, page, w0, mask, K_STORAGE, K_OFF, K_BYTES, RK, RK_TILE, TILE_B, BLOCK_SIZE,
                         MODEL_DTYPE, K_T, False)
        s = dot(q_a, tl.trans(to_dot(k, QK_DTYPE, UPCAST)), zero, IS_F32, UPCAST)
    if K_STORAGE != MODEL:
        s = s * tile_scales(cache_ptr, page, w0, mask, K_SCALE_OFF, TILE_B, BLOCK_SIZE)[None, :]
    if K_STORAGE == INT4:
        s += q_sum[:, None] * tile_scales(cache_ptr, page, w0, mask, K_ZERO_OFF, TILE_B, BLOCK_SIZE)[None, :]
    return s


@triton.jit
def tile_pv(p, acc_a, acc_b, acc_z, cache_ptr, page, w0, mask,
            V_STORAGE: tl.constexpr, V_OFF: tl.constexpr, V_BYTES: tl.constexpr, V_SCALE_OFF: tl.constexpr,
            V_ZERO_OFF: tl.constexpr, V_T: tl.constexpr, RV: tl.constexpr, RV_TILE: tl.constexpr,
            TILE_B: tl.constexpr, BLOCK_SIZE: tl.constexpr, MODEL_DTYPE: tl.constexpr, PV_DTYPE: tl.constexpr,
            UPCAST: tl.constexpr):
    """Accumulate ``sum_j p_j v_j`` of a tile of cached values into the latent accumulators.

    ``p`` [M, BLOCK_N] float32 (zero at tokens past the end). ``acc_a`` [M, RV_TILE] takes all channels
    (even channels for int4), ``acc_b`` the odd channels of int4 and ``acc_z`` [M] the int4 zero term
    ``sum_j p_j zero_j``, added to every latent channel at the end. Past the end, scales read as zero
    and model-dtype payloads as zero; int8 and int4 payloads are finite whatever the page holds, and
    e4m3 ones are zeroed after the load (a stale byte may be NaN).
    """
    IS_F32: tl.constexpr = PV_DTYPE == tl.float32
    if V_STORAGE == MODEL:
        v = load_payload(cache_ptr, page, w0, mask, V_STORAGE, V_OFF, V_BYTES, RV, RV_TILE, TILE_B, BLOCK_SIZE,
                         MODEL_DTYPE, V_T, True)
        return dot(p.to(PV_DTYPE), v.to(PV_DTYPE), acc_a, IS_F32, UPCAST), acc_b, acc_z
    # the V scales are folded into the weights; for fp16 weights divided by the tile's largest one
    # (multiplied back on the products) so that they stay in [0, 1]: fp16 cannot hold p * scale
    v_scale = tile_scales(cache_ptr, page, w0, mask, V_SCALE_OFF, TILE_B, BLOCK_SIZE)
    if PV_DTYPE == tl.float16:
        s_max = tl.max(v_scale, axis=0)
        s_max = tl.where(s_max > 0, s_max, 1.0)
    else:
        s_max = 1.0
    pv = (p * (v_scale / s_max)[None, :]).to(PV_DTYPE)
    zero = tl.zeros(acc_a.shape, dtype=tl.float32)
    if V_STORAGE == INT4:
        b = load_payload(cache_ptr, page, w0, mask, V_STORAGE, V_OFF, V_BYTES, (RV + 1) // 2, RV_TILE, TILE_B,
                         BLOCK_SIZE, MODEL_DTYPE, V_T, False)
        acc_a += s_max * dot(pv, nibbles_to_dot(b, False, PV_DTYPE, UPCAST), zero, IS_F32, UPCAST)
        acc_b += s_max * dot(pv, nibbles_to_dot(b, True, PV_DTYPE, UPCAST), zero, IS_F32, UPCAST)
        # zero term with the same rounded weights as the nibble dot: v = s * (q4 + zero / s), so that
        # the rounding error of p * s multiplies v (not the much larger q4 * s; they cancel otherwise)
        v_zero = tile_scales(cache_ptr, page, w0, mask, V_ZERO_OFF, TILE_B, BLOCK_SIZE)
        z_over_s = tl.where(v_scale > 0, v_zero / tl.where(v_scale > 0, v_scale, 1.0), 0.0)
        acc_z += tl.sum(tl.where(v_scale[None, :] > 0, s_max * pv.to(tl.float32) * z_over_s[None, :],
                                 p * v_zero[None, :]), axis=1)
    else:
        v = to_dot(load_payload(cache_ptr, page, w0, mask, V_STORAGE, V_OFF, V_BYTES, RV, RV_TILE, TILE_B,
                                BLOCK_SIZE, MODEL_DTYPE, V_T, False), PV_DTYPE, UPCAST)
        if V_STORAGE == FP8:
            v = tl.where(tl.reshape(mask, (mask.shape[0] * TILE_B,))[:, None], v, 0.0)
        acc_a += s_max * dot(pv, v, zero, IS_F32, UPCAST)
    return acc_a, acc_b, acc_z


@triton.jit
def attend_tile(t0, begin, end, pos, m_i, l_i, acc_a, acc_b, acc_z, cache_ptr, bt_row, stride_blk, head_off,
                q_a, q_b, q_sum, qk_row,
                K_STORAGE: tl.constexpr, K_OFF: tl.constexpr, K_BYTES: tl.constexpr, K_SCALE_OFF: tl.constexpr,
                K_ZERO_OFF: tl.constexpr, K_T: tl.constexpr, RK: tl.constexpr, RK_TILE: tl.constexpr,
                V_STORAGE: tl.constexpr, V_OFF: tl.constexpr, V_BYTES: tl.constexpr, V_SCALE_OFF: tl.constexpr,
                V_ZERO_OFF: tl.constexpr, V_T: tl.constexpr, RV: tl.constexpr, RV_TILE: tl.constexpr,
                BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, TILE_B: tl.constexpr, MODEL_DTYPE: tl.constexpr,
                QK_DTYPE: tl.constexpr, PV_DTYPE: tl.constexpr, UPCAST: tl.constexpr, MASKED: tl.constexpr,
                CAUSAL: tl.constexpr):
    """One step of the attention loop over the tile of cached tokens ``t0 .. t0 + BLOCK_N``: scores,
    online softmax, values. Returns the updated ``(m_i, l_i, acc_a, acc_b, acc_z)``.

    ``MASKED``: the tile may reach past ``end`` or start before ``begin`` (or, if ``CAUSAL``, reach past a
    row's position ``pos`` [M]); the loops run their other tiles unmasked, which keeps every predicate
    out of the hot loop.
    """
    page, w0, mask = tile_pages(bt_row, t0, end, stride_blk, head_off, BLOCK_SIZE, BLOCK_N, TILE_B, MASKED)
    s = tile_scores(cache_ptr, page, w0, mask, q_a, q_b, q_sum, K_STORAGE, K_OFF, K_BYTES, K_SCALE_OFF,
                    K_ZERO_OFF, K_T, RK, RK_TILE, TILE_B, BLOCK_SIZE, MODEL_DTYPE, QK_DTYPE, UPCAST) * qk_row[:, None]
    if MASKED:
        tok = t0 + tl.arange(0, BLOCK_N)
        inside = (tok < end) & (tok >= begin)
        if CAUSAL:
            s = tl.where(inside[None, :] & (tok[None, :] <= pos[:, None]), s, float("-inf"))
        else:
            s = tl.where(inside[None, :], s, float("-inf"))
    p, m_i, l_i, acc_a, acc_b, acc_z = softmax_step(s, m_i, l_i, acc_a, acc_b, acc_z, V_STORAGE)
    acc_a, acc_b, acc_z = tile_pv(p, acc_a, acc_b, acc_z, cache_ptr, page, w0, mask, V_STORAGE, V_OFF, V_BYTES,
                                  V_SCALE_OFF, V_ZERO_OFF, V_T, RV, RV_TILE, TILE_B, BLOCK_SIZE, MODEL_DTYPE,
                                  PV_DTYPE, UPCAST)
    return m_i, l_i, acc_a, acc_b, acc_z


@triton.jit
def store_output(o_a, o_b, out_rows, row_mask, basis_ptr, offset_ptr, h,
                 RV: tl.constexpr, RV_TILE: tl.constexpr, D: tl.constexpr, D_TILE: tl.constexpr,
                 SPLIT_HALVES: tl.constexpr, HAS_BASIS: tl.constexpr, HAS_OFFSET: tl.constexpr,
                 extra=None, HAS_EXTRA: tl.constexpr = False):
    """Rebuild ``o = P_v o_lat + c_v`` (plus ``extra`` [M, D_TILE] if ``HAS_EXTRA``) for [M] rows and
    store it at row pointers ``out_rows``.

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
        o = tl.dot(o_a, pt_a, input_precision="tf32x3")
        if SPLIT_HALVES:
            pt_b = tl.load(p_base + ch_b[:, None], mask=(ch_b[:, None] < RV) & (d[None, :] < D), other=0.0)
            o = tl.dot(o_b, pt_b, o, input_precision="tf32x3")
        if HAS_OFFSET:
            o += tl.load(offset_ptr + h * D + d, mask=d < D, other=0.0)[None, :]
        if HAS_EXTRA:
            o += extra
        tl.store(out_rows[:, None] + d[None, :], o.to(out_rows.dtype.element_ty),
                 mask=row_mask[:, None] & (d[None, :] < D))
    else:  # identity transform: RV == D
        o_a_out = o_a
        if HAS_OFFSET:
            o_a_out += tl.load(offset_ptr + h * D + ch_a, mask=ch_a < D, other=0.0)[None, :]
        if HAS_EXTRA:  # not with SPLIT_HALVES: RV_TILE == D_TILE here
            o_a_out += extra
        tl.store(out_rows[:, None] + ch_a[None, :], o_a_out.to(out_rows.dtype.element_ty),
                 mask=row_mask[:, None] & (ch_a[None, :] < D))
        if SPLIT_HALVES:
            o_b_out = o_b
            if HAS_OFFSET:
                o_b_out += tl.load(offset_ptr + h * D + ch_b, mask=ch_b < D, other=0.0)[None, :]
            tl.store(out_rows[:, None] + ch_b[None, :], o_b_out.to(out_rows.dtype.element_ty),
                     mask=row_mask[:, None] & (ch_b[None, :] < D))


# --- a layered cache's ring: exact tokens beside the compressed ones ----------------------------------
# Ring index ``j`` of a request is slot ``j % RING_T`` of ring page ``ring_row[j // RING_T]``: a page of
# ``RING_T`` slots of the ring layout (the model dtype, or int8 with per-token scales), field by field like
# a cache page. Once a request's first ``n`` tokens are stored, index ``p % RING_W`` holds position ``p``
# of ``[n - RING_W, n)`` and index ``RING_W + p`` position ``p < RING_S`` (only where the window does not
# hold it). Exact scores are ``q . (k - c_k)`` and exact values enter as ``v - c_v``, as the compressed
# ones approximate them; float32 (IEEE) dots: the exact tokens are a few dozen a query.


def ring_constexprs(ring: SlotLayout, block_size: int, slot_bytes: int) -> dict:
    """The ``RING_*`` constexprs of ring slots ``ring`` (:func:`vllm_lowrank.formats.ring_layout`) on the
    pages of a cache of ``block_size`` slots of ``slot_bytes``."""
    c = layout_constexprs(ring)
    out = {f"RING_{k}": c[k] for k in ("K_OFF", "K_BYTES", "K_SCALE_OFF", "K_T", "V_OFF", "V_BYTES", "V_SCALE_OFF",
                                       "V_T")}
    out["RING_T"] = max(1, ring_tokens_per_block(block_size, slot_bytes, ring))
    out["RING_INT8"] = ring.k.fmt.storage == "int8"
    return out


@triton.jit
def ring_rows(cache_ptr, page, tok, valid, d, d_mask, OFF: tl.constexpr, NBYTES: tl.constexpr,
              SCALE_OFF: tl.constexpr, TRANSPOSED: tl.constexpr, RING_INT8: tl.constexpr, RING_T: tl.constexpr,
              MODEL_DTYPE: tl.constexpr):
    """K or V rows of ring slots ``tok`` of pages ``page`` (zero where not ``valid``): ``(x, scale)``, ``x``
    [N, D_TILE] in the model dtype, the values themselves or, in an int8 ring, their codes (exact in
    every model dtype), and ``scale`` [N] float32 (int8 rings only; ones otherwise)."""
    m = valid[:, None] & d_mask[None, :]
    col = d[None, :] * column_stride(TRANSPOSED, RING_T)
    if RING_INT8:
        x = tl.load(field_ptr(cache_ptr, page[:, None], tok[:, None], OFF, NBYTES, RING_T, tl.int8, TRANSPOSED) + col,
                    mask=m, other=0).to(tl.float32).to(MODEL_DTYPE)  # (the interpreter botches int8 -> bf16)
        scale = tl.load(field_ptr(cache_ptr, page, tok, SCALE_OFF, 2, RING_T, tl.float16), mask=valid, other=0.0)
        return x, scale.to(tl.float32)
    else:
        x = tl.load(field_ptr(cache_ptr, page[:, None], tok[:, None], OFF, NBYTES, RING_T, MODEL_DTYPE, TRANSPOSED)
                    + col, mask=m, other=0.0)
        return x, tl.full((x.shape[0],), 1.0, dtype=tl.float32)


@triton.jit
def ring_tile(j0, stored, cache_ptr, ring_row, stride_cblk, head_off, d, d_mask,
              RING_W: tl.constexpr, RING_S: tl.constexpr, RING_T: tl.constexpr, RING_N: tl.constexpr,
              RING_INT8: tl.constexpr, RING_K_OFF: tl.constexpr, RING_K_BYTES: tl.constexpr,
              RING_K_SCALE_OFF: tl.constexpr, RING_K_T: tl.constexpr, RING_V_OFF: tl.constexpr,
              RING_V_BYTES: tl.constexpr, RING_V_SCALE_OFF: tl.constexpr, RING_V_T: tl.constexpr,
              MODEL_DTYPE: tl.constexpr):
    """Ring indices ``j0 .. j0 + RING_N`` of a request whose first ``stored`` tokens are in its ring: their
    positions [RING_N], whether they hold one, and their K and V rows as :func:`ring_rows` gives them
    (``k, k_scale, v, v_scale``)."""
    j = j0 + tl.arange(0, RING_N)
    if RING_W > 0:
        recent = stored - RING_W  # the window's first position (may be negative)
        in_window = j < RING_W
        p = tl.where(in_window, recent + ((j - recent) % RING_W + RING_W) % RING_W, j - RING_W)
        valid = tl.where(in_window, p >= 0, (j - RING_W < RING_S) & (j - RING_W < recent))
    else:
        p = j
        valid = (j < RING_S) & (j < stored)
    page = tl.load(ring_row + j // RING_T, mask=valid, other=0).to(tl.int64) * stride_cblk + head_off
    tok = j % RING_T
    k, k_scale = ring_rows(cache_ptr, page, tok, valid, d, d_mask, RING_K_OFF, RING_K_BYTES, RING_K_SCALE_OFF,
                           RING_K_T, RING_INT8, RING_T, MODEL_DTYPE)
    v, v_scale = ring_rows(cache_ptr, page, tok, valid, d, d_mask, RING_V_OFF, RING_V_BYTES, RING_V_SCALE_OFF,
                           RING_V_T, RING_INT8, RING_T, MODEL_DTYPE)
    return p, valid, k, k_scale, v, v_scale


@triton.jit
def exact_start(q_rows, row_mask, k_offset_ptr, v_offset_ptr, h, D: tl.constexpr, D_TILE: tl.constexpr,
                HAS_K_OFFSET: tl.constexpr, HAS_V_OFFSET: tl.constexpr):
    """What attention over exact tokens (:func:`exact_step`) starts from, for [M] rows: the raw queries
    [M, D_TILE] (in their dtype, the model's; zero where not ``row_mask``), ``q . c_k`` [M] (float32),
    ``c_v`` [D_TILE] (float32; zero without offsets) and an empty online softmax ``(m_i, l_i, acc)``."""
    d = tl.arange(0, D_TILE)
    d_mask = d < D
    m: tl.constexpr = q_rows.shape[0]
    q = tl.load(q_rows[:, None] + d[None, :], mask=row_mask[:, None] & d_mask[None, :], other=0.0)
    if HAS_K_OFFSET:
        c_k = tl.load(k_offset_ptr + h * D + d, mask=d_mask, other=0.0)
        qc = tl.sum(q.to(tl.float32) * c_k[None, :], axis=1)
    else:
        qc = tl.zeros((m,), dtype=tl.float32)
    if HAS_V_OFFSET:
        c_v = tl.load(v_offset_ptr + h * D + d, mask=d_mask, other=0.0)
    else:
        c_v = tl.zeros((D_TILE,), dtype=tl.float32)
    m_i = tl.full((m,), float("-inf"), dtype=tl.float32)
    return q, qc, c_v, m_i, tl.zeros((m,), dtype=tl.float32), tl.zeros((m, D_TILE), dtype=tl.float32)


@triton.jit
def exact_step(q, qc, c_v, k, k_scale, v, v_scale, keep, m_i, l_i, acc_x, qk_scale, RING_INT8: tl.constexpr,
               HAS_V_OFFSET: tl.constexpr, UPCAST: tl.constexpr):
    """One online-softmax step over exact tokens, ``acc_x`` [M, D_TILE] += ``sum_j p_j (v_j - c_v)``.

    Raw queries ``q`` [M, D_TILE] and exact K/V rows [N, D_TILE] in the model dtype (an int8 ring: codes,
    with per-token ``k_scale``/``v_scale`` [N]), ``qc = q . c_k`` [M] (float32), ``keep`` [M, N] the pairs
    that attend. The dots run on tensor cores with the operands as stored (exact products, float32 sums,
    as the compressed tiles' ``full`` path: the weights are rounded to the model dtype for ``P @ V``);
    ``c_v`` is taken off with the same rounded weights, so the offset cancels exactly. Float32 models:
    IEEE float32 dots. NaN-safe for rows with nothing kept yet. Returns ``(m_i, l_i, acc_x)``.
    """
    IS_F32: tl.constexpr = q.dtype == tl.float32
    s = dot(q, tl.trans(k), tl.zeros((q.shape[0], k.shape[0]), dtype=tl.float32), IS_F32, UPCAST)
    if RING_INT8:
        s = s * k_scale[None, :]
    s = tl.where(keep, (s - qc[:, None]) * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    zero = tl.zeros(acc_x.shape, dtype=tl.float32)
    if RING_INT8:  # weights p_j s_j over the tile's largest scale, in [0, 1] (no fp16 underflow)
        s_max = tl.max(v_scale, axis=0)
        s_max = tl.where(s_max > 0, s_max, 1.0)
        w = (p * (v_scale / s_max)[None, :]).to(v.dtype)
        pv = s_max * dot(w, v, zero, IS_F32, UPCAST)
        if HAS_V_OFFSET:  # the weights the codes got: w_j s_max / s_j (p_j where the row is all zero)
            back = s_max / tl.where(v_scale > 0, v_scale, 1.0)
            used = tl.where(v_scale[None, :] > 0, w.to(tl.float32) * back[None, :], p)
            pv -= tl.sum(used, axis=1)[:, None] * c_v[None, :]
    else:
        w = p.to(v.dtype)
        pv = dot(w, v, zero, IS_F32, UPCAST)
        if HAS_V_OFFSET:
            pv -= tl.sum(w.to(tl.float32), axis=1)[:, None] * c_v[None, :]
    return m_new, l_i, acc_x * alpha[:, None] + pv


def transform_ptrs(tr, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(basis, offset, smooth) kernel arguments of a TensorTransform: float32, contiguous, ``like`` for an
    absent part (its pointer is then never read)."""
    return tuple(like if t is None else t.float().contiguous() for t in (tr.basis, tr.offset, tr.smooth))


def transform_args(tr, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool, bool]:
    """(basis, offset, HAS_BASIS, HAS_OFFSET) kernel arguments of a TensorTransform (float32)."""
    basis, offset, _ = transform_ptrs(tr, like)
    return basis, offset, tr.basis is not None, tr.offset is not None
