"""Triton kernels (store, decode, prefill) against the PyTorch oracle of :mod:`vllm_lowrank.reference`.

On a machine without a GPU the kernels run on CPU tensors in Triton's interpreter. ``TRITON_INTERPRET``
must be set before Triton decorates anything (its own ``tl.sum`` etc. included), so this module sets it
(``setdefault``) before importing Triton; vLLM's CPU build does not use Triton, so leaving it set for
the rest of the pytest process is harmless. If another test module imported Triton first (then in
compiled mode), the interpreter tests cannot run in this process: they are skipped here and run once,
whole, in a fresh subprocess by ``test_interpreter_subprocess``. With a GPU the same tests run compiled
on CUDA tensors, plus larger shapes; the CPU variants are skipped there.

Inputs are fresh random each run; the seed is printed and part of every assertion message (rerun one
with ``LOWRANK_TEST_SEED=<seed>``).

Tolerances (relative Frobenius error of the kernel against the oracle on the same compressed cache):
the oracle computes in float32 and rounds only the output; the kernels round the dot operands to the
model dtype (the query, and for a model-dtype V the probabilities) or, for a quantized tensor, to fp16
(the query scaled by a power of two; the probabilities times the V scales, over the tile's largest),
and accumulate in float32. Measured worst cases over many seeds: float32
3e-7, fp16 with a model-dtype V 1.5e-4, fp16 with scaled V 7e-3, bf16 1e-2 (one bf16 output rounding
on each side alone gives 2e-3 to 5e-3); the bounds (TOL) are 2-3x those. A wrong offset, scale,
nibble or mask gives O(1) errors.
"""

from __future__ import annotations

import os
import subprocess
import sys

import torch

_NO_GPU = not torch.cuda.is_available()
if _NO_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import triton.language  # noqa: E402

import vllm_lowrank.kernels as K  # noqa: E402
from vllm_lowrank.kernels.common import interpreted  # noqa: E402

# the interpreter works only if Triton's own jit functions were decorated in interpreter mode too
_INTERPRET = _NO_GPU and interpreted(triton.language.standard.sum)
_SUBPROCESS = _NO_GPU and not _INTERPRET and os.environ.get("LOWRANK_KERNEL_SUBPROCESS") != "1"

from vllm_lowrank import codec, reference  # noqa: E402
from vllm_lowrank.formats import (PRESETS, LayerFormat, SlotLayout, TensorFormat, cache_shape,  # noqa: E402
                                  preset_format)
from vllm_lowrank.transforms import LayerTransforms, build_tensor_transform, identity_transforms  # noqa: E402

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not _INTERPRET, reason=(
        "CPU runs need the Triton interpreter, set before Triton is imported (no GPU: see "
        "test_interpreter_subprocess); with a GPU the kernels are compiled for CUDA"))),
    pytest.param("cuda", marks=[pytest.mark.gpu,
                                pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]),
]
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 3e-2}
TOL_SCALED_V_FP16 = 2e-2  # fp16 model, scaled V: probabilities rounded to bf16


def _tol(dtype: torch.dtype, layout: SlotLayout) -> float:
    if dtype == torch.float16 and layout.v.fmt.storage != "model":
        return TOL_SCALED_V_FP16
    return TOL[dtype]


DTYPES = [pytest.param(t, id=str(t).replace("torch.", "")) for t in (torch.float32, torch.bfloat16, torch.float16)]


@pytest.fixture
def seed() -> int:
    s = int(os.environ.get("LOWRANK_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    torch.manual_seed(s)
    print(f"seed={s}")
    return s


def _fmt(spec: str, rk: int = 24, rv: int = 16) -> LayerFormat:
    """A preset name (ranked ones take rk/rv) or ``"K-format/V-format"``."""
    if "/" in spec:
        kf, vf = spec.split("/")
        return LayerFormat(TensorFormat.parse(kf), TensorFormat.parse(vf))
    return preset_format(spec, rk, rv)


def _setup(spec: str, h: int, d: int, dtype: torch.dtype, device: str, offsets: bool = True,
           rk: int = 24, rv: int = 16, smooth: bool = False) -> tuple[SlotLayout, LayerTransforms]:
    """``smooth``: random positive key smoothing scales (spread over ~10x, as calibrated ones are)."""
    fmt = _fmt(spec, rk, rv)
    layout = SlotLayout.build(fmt, d, dtype)
    basis = torch.linalg.qr(torch.randn(h, d, d, dtype=torch.float64))[0].float()
    trs = []
    for t, f in (("k", fmt.k), ("v", fmt.v)):
        off = torch.randn(h, d) * 0.5 if offsets and torch.rand(()) < 0.7 else None
        sm = (torch.randn(h, d) * 0.6).exp() if smooth and t == "k" else None
        trs.append(build_tensor_transform(f, h, d, basis, off, sm))
    return layout, LayerTransforms(*trs).to(device)


def _kv(n: int, h: int, d: int, dtype: torch.dtype, device: str,
        v_mul: float = 1.0, k_mul: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys with a constant per-channel bias (what offsets remove) and plain values."""
    k = (torch.randn(n, h, d) + torch.randn(1, h, d)) * k_mul
    v = torch.randn(n, h, d) * 0.7 * v_mul
    return k.to(dtype).to(device), v.to(dtype).to(device)


def _paged_requests(seq_lens: list[int], h: int, d: int, block_size: int, layout: SlotLayout,
                    transforms: LayerTransforms, dtype: torch.dtype, device: str, spare_blocks: int = 3,
                    v_mul: float = 1.0, k_mul: float = 1.0):
    """A cache of random garbage with each request's tokens stored (by the oracle) in shuffled blocks."""
    nblk = [-(-s // block_size) for s in seq_lens]
    max_blocks = max(nblk) + 1
    num_blocks = sum(nblk) + spare_blocks
    cache = torch.randint(0, 256, cache_shape(num_blocks, block_size, h, layout.slot_bytes), dtype=torch.uint8)
    cache = cache.to(device)
    perm = torch.randperm(num_blocks)
    block_table = torch.zeros(len(seq_lens), max_blocks, dtype=torch.int32)
    used = 0
    for i, n in enumerate(nblk):
        block_table[i, :n] = perm[used:used + n]
        block_table[i, n:] = perm[-1]  # unused entries point at a garbage block
        used += n
    block_table = block_table.to(device)
    for i, s in enumerate(seq_lens):
        k, v = _kv(s, h, d, dtype, device, v_mul, k_mul)
        reference.store(k, v, cache, reference.gather_slots(block_table[i], s, block_size), layout, transforms)
    return cache, block_table


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _check_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, layout: SlotLayout, what: str) -> float:
    """Every output element written (outputs start as NaN) and within the tolerance of the oracle."""
    assert not out.isnan().any(), f"{what}: output not fully written"
    err = _rel(out, ref)
    tol = _tol(dtype, layout)
    assert err < tol, f"{what}: rel err {err:.2e} > {tol:.0e}"
    return err


# ------------------------------------------------------------------------------------------------ store

STORE_SPECS = ["full", "int8", "fp8", "int4", "lowrank", "lowrank+int8", "lowrank+fp8",
               "r16/int8", "r15+int4/r9+fp8", "hadamard/int4", "int8/model"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spec", STORE_SPECS)
def test_store_bytes_equal_codec(spec, dtype, device, seed):
    """Without a basis every byte of every stored slot equals codec.encode_layer; with one (the kernel
    projects in its own summation order) the slots decode to the codec's latents up to a rounding
    flip; other slots and padding untouched."""
    _check_store(spec, dtype, device, seed)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spec", ["full", "int4", "int8", "hadamard+int8/int8", "r16/int8"])
def test_store_smoothing(spec, device, seed):
    """With key smoothing the kernel divides K by s before the projection, as the codec does."""
    _check_store(spec, torch.bfloat16, device, seed, smooth=True)


def _exact_latents(x: torch.Tensor, t) -> torch.Tensor:
    """``P^T ((x - c) / s)`` in float64."""
    x = x.double()
    if t.offset is not None:
        x = x - t.offset.double()
    if t.smooth is not None:
        x = x / t.smooth.double()
    return x if t.basis is None else torch.einsum("nhd,hdr->nhr", x, t.basis.double())


def _check_store(spec, dtype, device, seed, smooth=False):
    h, d, bs = 2, 64, 16
    layout, tr = _setup(spec, h, d, dtype, device, smooth=smooth)
    n = 21  # two programs of BLOCK_T = 16 tokens, the second partly past N
    k, v = _kv(n + 3, h, d, dtype, device)  # rows past slot_mapping's length are not stored
    cache = torch.randint(0, 256, cache_shape(6, bs, h, layout.slot_bytes), dtype=torch.uint8, device=device)
    slots = torch.randperm(6 * bs)[:n].to(device)
    slots[torch.randperm(n)[:4]] = -1
    original = cache.clone()
    rows = codec.encode_layer(k[:n], v[:n], layout, tr)  # the same projection, all rows at once
    valid = slots >= 0
    K.store(k, v, cache, slots, layout, tr)
    got = reference.read_slots(cache, slots[valid], layout)
    if tr.k.basis is None and tr.v.basis is None:
        expected = original.clone()
        reference.write_slots(expected, slots[valid], rows[valid], layout)
        bad = (cache != expected).nonzero()
        assert bad.numel() == 0, f"seed={seed} {spec} {dtype}: {bad.shape[0]} bytes differ, first at {bad[:4].tolist()}"
    else:
        # the quantization alone, on the codec's own latents (the host projection, identity transforms
        # in the kernel): bit for bit
        exact = original.clone()
        K.store(tr.k.project(k[:n]), tr.v.project(v[:n]), exact, slots, layout, identity_transforms())
        assert torch.equal(reference.read_slots(exact, slots[valid], layout), rows[valid]), (
            f"seed={seed} {spec} {dtype}: the kernel's quantization of the codec's latents differs")
        outside = original.clone()  # every byte outside the valid slots untouched
        reference.write_slots(outside, slots[valid], got, layout)
        assert torch.equal(outside, cache), f"seed={seed} {spec} {dtype}: bytes outside the stored slots changed"
        if dtype != torch.float32:  # float32 latents kept whole differ in their low bits nearly everywhere
            differ = (got != rows[valid]).float().mean().item()
            assert differ < 0.02, f"seed={seed} {spec} {dtype}: {differ:.1%} of the slot bytes differ from the codec's"
        for name, a, b, x, t in zip("KV", codec.decode_layer(got, layout), codec.decode_layer(rows[valid], layout),
                                    (k[:n][valid], v[:n][valid]), (tr.k, tr.v)):
            exact = _exact_latents(x, t)
            err, quant = _rel(a, b), _rel(b, exact)
            # a rounding flip moves one element one step; at the measured flip rates (<0.1% of the
            # elements) the kernel-codec distance is ~0.1x the quantization error; a wrong basis
            # column, offset or precision (tf32) gives O(1) or flips most bytes (checked above)
            assert err <= 0.5 * quant + 1e-6, (f"seed={seed} {spec} {dtype} {name}: kernel vs codec {err:.2e}, "
                                                f"codec vs float64 {quant:.2e}")
    # and the oracle's own store (which projects only the valid rows) decodes to the same latents
    ref = torch.randint(0, 256, cache.shape, dtype=torch.uint8, device=device)
    reference.store(k, v, ref, slots, layout, tr)
    for a, b in zip(*(codec.decode_layer(reference.read_slots(c, slots[valid], layout), layout) for c in (cache, ref))):
        assert _rel(a, b) < 1e-2, f"seed={seed}"


@pytest.mark.parametrize("device", DEVICES)
def test_store_fp8_rounding_ties(device, seed):
    """e4m3 rounding of exact midpoints (ties to even), subnormals and the 448 boundary, bit for bit."""
    codes = torch.arange(0, 127, dtype=torch.uint8)  # all finite non-negative e4m3 values
    vals = codes.view(torch.float8_e4m3fn).float()
    mids = (vals[:-1] + vals[1:]) / 2
    pool = torch.cat((vals, mids, -vals, -mids, mids + 1e-6, mids - 1e-6, torch.tensor([0.0, -0.0])))
    pool = pool[torch.randperm(pool.numel())]
    d = 64
    n = -(-pool.numel() // (d - 1))
    x = torch.zeros(n * (d - 1))
    x[:pool.numel()] = pool
    x = torch.cat((x.view(n, d - 1), torch.full((n, 1), 448.0)), 1).view(n, 1, d)  # absmax 448: scale 1
    layout = SlotLayout.build(_fmt("fp8/fp8"), d, torch.float32)
    tr = LayerTransforms(build_tensor_transform(TensorFormat.parse("fp8"), 1, d, None, None),
                         build_tensor_transform(TensorFormat.parse("fp8"), 1, d, None, None))
    cache = torch.zeros(cache_shape(-(-n // 16), 16, 1, layout.slot_bytes), dtype=torch.uint8, device=device)
    x = x.to(device)
    slots = torch.arange(n, device=device)
    K.store(x, -x, cache, slots, layout, tr)
    expected = codec.encode_layer(x, -x, layout, tr)
    assert torch.equal(reference.read_slots(cache, slots, layout), expected), f"seed={seed}"


# ----------------------------------------------------------------------------------------------- query


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [DTYPES[1], DTYPES[2]])
@pytest.mark.parametrize("spec,group,smooth", [("lowrank", 3, False), ("hadamard+int8/int8", 4, True),
                                               ("r7+int4/int8", 1, True), ("int8", 2, True)])
def test_project_queries(spec, group, smooth, dtype, device, seed):
    """The query projection kernel (prefill; a layered decode) against float64 ``P_k^T (s q)``, every row of
    ragged token counts (the last program partly past the end)."""
    from vllm_lowrank.kernels.query import project_queries

    h, d = 2, 64
    _, tr = _setup(spec, h, d, dtype, device, smooth=smooth)
    for t in (1, 5, 37):
        q = (torch.randn(t, h * group, d) * 2).to(dtype).to(device)
        got = project_queries(q, tr.k, h)
        qq = q.double().reshape(t, h, group, d)
        if tr.k.smooth is not None:
            qq = qq * tr.k.smooth.double()[None, :, None, :]
        want = qq if tr.k.basis is None else torch.einsum("thgd,hdr->thgr", qq, tr.k.basis.double())
        want = want.reshape(t, h * group, -1)
        assert got.shape == want.shape and not got.isnan().any(), f"seed={seed} t={t}"
        err = _rel(got, want)
        assert err < 1e-6, f"seed={seed} {spec} t={t}: {err:.2e} from float64"


# ----------------------------------------------------------------------------------------------- decode

DECODE_SPECS = list(PRESETS) + ["r16/int8", "int4/model", "r7+int4/r9+fp8", "hadamard+int8/r20+int4"]


def _check_decode(spec, dtype, device, seed, *, h=2, group=3, d=64, block_size=16, seq_lens=(1, 37, 70, 16),
                  rk=24, rv=16, num_splits=3, block_n=16, workspace_extra=0, q_mul=1.0, v_mul=1.0,
                  token_rows=False, smooth=False, k_mul=1.0):
    layout, tr = _setup(spec, h, d, dtype, device, rk=rk, rv=rv, smooth=smooth)
    cache, bt = _paged_requests(list(seq_lens), h, d, block_size, layout, tr, dtype, device, v_mul=v_mul,
                                k_mul=k_mul)
    b = len(seq_lens)
    sl = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    q = (torch.randn(b, h * group, d) * q_mul).to(dtype).to(device)
    ref = torch.empty_like(q)
    reference.decode_attention(q, cache, bt, sl, layout, tr, d ** -0.5, ref)
    out = torch.full_like(q, float("nan"))
    ws = torch.full((K.workspace_numel(b, h * group, layout.v.latent_dim, num_splits) + workspace_extra,),
                    float("nan"), device=device)
    K.decode_attention(q, cache, bt, sl, layout, tr, d ** -0.5, out, num_splits=num_splits, workspace=ws,
                       block_n=block_n, token_rows=token_rows)
    err = _check_close(out, ref, dtype, layout, f"seed={seed} {spec} {dtype}")
    return err


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spec", DECODE_SPECS)
def test_decode_formats(spec, dtype, device, seed):
    _check_decode(spec, dtype, device, seed)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", [
    dict(d=128, rk=48, rv=64, group=4, block_size=32, spec="lowrank+int8", dtype=torch.bfloat16),
    dict(d=128, rk=8, rv=32, group=1, block_size=16, spec="lowrank", dtype=torch.float16),
    dict(d=64, group=8, block_size=128, spec="int4", dtype=torch.bfloat16, seq_lens=(5, 130, 17)),
    dict(d=128, spec="fp8", dtype=torch.float32, num_splits=1, block_n=32, seq_lens=(100, 3)),
    dict(d=64, spec="int8", dtype=torch.bfloat16, num_splits=8, seq_lens=(9, 2, 40), workspace_extra=100),
    dict(d=64, rk=64, rv=64, spec="lowrank+fp8", dtype=torch.float16, block_size=32, block_n=32),
], ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items() if k != "dtype") + f"-{c['dtype']}".replace("torch.", ""))
def test_decode_shapes(case, device, seed):
    case = dict(case)
    spec, dtype = case.pop("spec"), case.pop("dtype")
    _check_decode(spec, dtype, device, seed, **case)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spec", DECODE_SPECS)
def test_decode_token_rows(spec, dtype, device, seed):
    """The token-rows orientation (cached tokens as the dots' rows, the group padded to 8)."""
    _check_decode(spec, dtype, device, seed, token_rows=True)
    _check_decode(spec, dtype, device, seed, group=4, block_size=32, block_n=32, token_rows=True)


def test_default_token_rows(monkeypatch):
    """Token rows by default only where K and V are both 4-bit; the environment overrides; bad values
    are refused."""
    from vllm_lowrank.kernels.decode import TOKEN_ROWS_ENV, default_token_rows

    def layout(spec):
        return SlotLayout.build(_fmt(spec), 64, torch.bfloat16)

    monkeypatch.delenv(TOKEN_ROWS_ENV, raising=False)
    assert default_token_rows(layout("int4")) and default_token_rows(layout("int4/hadamard+int4"))
    assert not any(default_token_rows(layout(s)) for s in ("full", "int8", "fp8", "lowrank+int8", "int4/int8"))
    monkeypatch.setenv(TOKEN_ROWS_ENV, "1")
    assert default_token_rows(layout("int8"))
    monkeypatch.setenv(TOKEN_ROWS_ENV, "0")
    assert not default_token_rows(layout("int4"))
    monkeypatch.setenv(TOKEN_ROWS_ENV, "yes")
    with pytest.raises(ValueError, match=TOKEN_ROWS_ENV):
        default_token_rows(layout("int4"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spec", ["int8", "fp8", "int4", "lowrank+int8"])
def test_decode_extreme_ranges(spec, device, seed):
    """Quantized tensors run fp16 dots; the kernels must handle fp16's range exactly, whatever the model's.

    Queries up to ~1e5 (past fp16's 65504; the kernel scales each row by a power of two; the keys are
    scaled down as much, so that the logits stay O(1) and the softmax does not amplify the queries'
    ordinary fp16 rounding) and values of ~1e-3, whose scales (~1e-5) times the softmax weights fall
    below fp16's normal range (the kernel divides the weights by the tile's largest scale). Without
    either step the error is O(1).
    """
    for token_rows in (False, True):
        _check_decode(spec, torch.bfloat16, device, seed, q_mul=3e4, k_mul=1 / 3e4, seq_lens=(3, 70, 45),
                      token_rows=token_rows)
        _check_decode(spec, torch.bfloat16, device, seed, v_mul=1e-4, seq_lens=(300, 70, 45), token_rows=token_rows)


# query-weighted key smoothing: K stored as P^T ((k - c) / s), queries projected as P^T (s q) by the decode
# kernel itself (with and without a basis: int4/int8 is plain int4 K) and by the host for prefill
SMOOTH_SPECS = ["int4", "hadamard+int8/int8", "int8", "lowrank+int8", "r64/fp8", "int4/int8"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [DTYPES[0], DTYPES[1]])
@pytest.mark.parametrize("spec", SMOOTH_SPECS)
def test_decode_smoothing(spec, dtype, device, seed):
    _check_decode(spec, dtype, device, seed, smooth=True)


@pytest.mark.gpu
@pytest.mark.parametrize("device", [DEVICES[1]])
@pytest.mark.parametrize("spec", ["full", "int8", "fp8", "int4", "lowrank", "lowrank+int8"])
def test_decode_large_gpu(spec, device, seed):
    """Llama-3-8B attention shape, long ragged contexts, default tiles and split counts."""
    for dtype in (torch.bfloat16, torch.float16):
        for token_rows in (False, True):
            _check_decode(spec, dtype, device, seed, h=8, group=4, d=128, rk=64, rv=64,
                          seq_lens=(1, 4000, 333, 2048, 17, 1500), num_splits=16, block_n=64, token_rows=token_rows)


# ---------------------------------------------------------------------------------------------- prefill

PREFILL_SPECS = ["full", "int8", "fp8", "int4", "lowrank", "lowrank+int8", "r16/int8", "r7+int4/r9+fp8"]


def _check_prefill(spec, dtype, device, seed, *, h=2, group=3, d=64, block_size=16,
                   seq_q=((40, 7), (1, 1), (45, 45), (33, 16), (20, 1)), rk=24, rv=16, block_m=32, block_n=16,
                   smooth=False):
    """Requests given as (seq_len, q_len): decodes, whole prompts and continuation chunks."""
    seq_lens = [s for s, _ in seq_q]
    layout, tr = _setup(spec, h, d, dtype, device, rk=rk, rv=rv, smooth=smooth)
    cache, bt = _paged_requests(seq_lens, h, d, block_size, layout, tr, dtype, device)
    qsl = [0]
    for _, n in seq_q:
        qsl.append(qsl[-1] + n)
    q = torch.randn(qsl[-1], h * group, d).to(dtype).to(device)
    ref = torch.empty_like(q)
    reference.paged_attention(q, cache, bt, seq_lens, qsl, layout, tr, d ** -0.5, ref)
    out = torch.full_like(q, float("nan"))
    K.paged_attention(q, cache, bt, torch.tensor(seq_lens, dtype=torch.int32, device=device),
                      torch.tensor(qsl, dtype=torch.int32, device=device), max(n for _, n in seq_q), layout, tr,
                      d ** -0.5, out, block_m=block_m, block_n=block_n)
    err = _check_close(out, ref, dtype, layout, f"seed={seed} {spec} {dtype}")
    # a launch over requests 1.. only (the backend's runs) writes exactly their rows, the same values
    part = torch.full_like(q, float("nan"))
    K.paged_attention(q, cache, bt, torch.tensor(seq_lens, dtype=torch.int32, device=device),
                      torch.tensor(qsl, dtype=torch.int32, device=device), max(n for _, n in seq_q[1:]), layout,
                      tr, d ** -0.5, part, requests=(1, len(seq_q)), block_m=block_m, block_n=block_n)
    assert part[:qsl[1]].isnan().all() and not part[qsl[1]:].isnan().any(), f"seed={seed}: wrong rows written"
    assert torch.equal(part[qsl[1]:], out[qsl[1]:]), f"seed={seed}: a partial launch differs"
    return err


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spec", PREFILL_SPECS)
def test_prefill_formats(spec, dtype, device, seed):
    _check_prefill(spec, dtype, device, seed)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", [
    dict(d=128, rk=48, rv=64, group=4, block_size=32, spec="lowrank+fp8", dtype=torch.bfloat16, block_m=32),
    dict(d=64, group=1, block_size=128, spec="int4", dtype=torch.float16, block_n=32),
    dict(d=64, group=8, spec="hadamard+int8/int8", dtype=torch.float32, block_m=64, block_n=32,
         seq_q=((50, 50), (9, 3))),
], ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items() if k not in ("dtype", "seq_q"))
   + f"-{c['dtype']}".replace("torch.", ""))
def test_prefill_shapes(case, device, seed):
    case = dict(case)
    spec, dtype = case.pop("spec"), case.pop("dtype")
    _check_prefill(spec, dtype, device, seed, **case)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [DTYPES[0], DTYPES[1]])
@pytest.mark.parametrize("spec", SMOOTH_SPECS)
def test_prefill_smoothing(spec, dtype, device, seed):
    _check_prefill(spec, dtype, device, seed, smooth=True)


@pytest.mark.gpu
@pytest.mark.parametrize("device", [DEVICES[1]])
@pytest.mark.parametrize("spec", ["full", "int8", "int4", "lowrank+int8"])
def test_prefill_large_gpu(spec, device, seed):
    for dtype in (torch.bfloat16, torch.float16):
        _check_prefill(spec, dtype, device, seed, h=8, group=4, d=128, rk=64, rv=64, block_m=64, block_n=64,
                       seq_q=((3000, 512), (700, 700), (1, 1), (2049, 100), (513, 17)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("spec", ["int8", "lowrank+int8"])
def test_compile_prefill_gpu(spec, seed):
    """compile_prefill compiles exactly the variant that later launches over real metadata use: after
    it, ragged launches (various request ranges and chunk lengths) compile nothing more."""
    from vllm_lowrank.kernels.prefill import _prefill_kernel

    h, group, d, bs, dtype = 8, 4, 128, 16, torch.bfloat16
    seq_q = ((300, 64), (90, 90), (1, 1), (517, 17))
    seq_lens = [s for s, _ in seq_q]
    layout, tr = _setup(spec, h, d, dtype, "cuda", rk=64, rv=64)
    cache, bt = _paged_requests(seq_lens, h, d, bs, layout, tr, dtype, "cuda")
    wide = torch.zeros(bt.shape[0], 37, dtype=torch.int32, device="cuda")  # a width not a multiple of 16
    wide[:, :bt.shape[1]] = bt
    qsl = torch.tensor([0, 64, 154, 155, 172], dtype=torch.int32, device="cuda")
    lens = torch.tensor(seq_lens, dtype=torch.int32, device="cuda")
    q = torch.randn(172, h * group, d, device="cuda").to(dtype)
    out = torch.full_like(q, float("nan"))
    dev = torch.cuda.current_device()
    _prefill_kernel.device_caches.clear()
    K.compile_prefill(cache, wide.stride(0), h * group, dtype, layout, tr, d ** -0.5)
    compiled = set(_prefill_kernel.device_caches[dev][0])
    assert len(compiled) == 1
    for requests, max_q in (((0, 4), 90), ((1, 4), 90), ((3, 4), 17), ((1, 2), 90)):
        K.paged_attention(q, cache, wide, lens, qsl, max_q, layout, tr, d ** -0.5, out, requests=requests)
    assert set(_prefill_kernel.device_caches[dev][0]) == compiled, f"seed={seed}: launches compiled new variants"
    assert not out.isnan().any()


# ------------------------------------------------------------------------------------ layered cache ring

def _layered_requests(seq_lens, h, d, block_size, layout, tr, dtype, device, window, sink, ring, q_lens=None):
    """A poisoned cache with each request's tokens stored compressed and, all but its last ``q_lens[i]``
    (default 1: a decode), in its ring (by the PyTorch path, as slots of ``ring``); rows are ring blocks
    first, then compressed blocks, shuffled ids. Returns the cache, the table, the ring blocks and the K
    and V of the tokens not in the rings, concatenated over requests."""
    from vllm_lowrank.formats import ring_tokens_per_block
    from vllm_lowrank.layered import compressed_slot_mapping, ring_blocks, store_exact

    k = ring_blocks(window, sink, [ring_tokens_per_block(block_size, layout.slot_bytes, ring)])
    nblk = [-(-s // block_size) for s in seq_lens]
    num_blocks = len(seq_lens) * k + sum(nblk) + 3
    cache = torch.randint(0, 256, cache_shape(num_blocks, block_size, h, layout.slot_bytes), dtype=torch.uint8)
    cache = cache.to(device)
    perm = torch.randperm(num_blocks)
    table = torch.full((len(seq_lens), k + max(nblk) + 1), int(perm[-1]), dtype=torch.int32)
    used = 0
    for i, n in enumerate(nblk):
        table[i, :k + n] = perm[used:used + k + n]
        used += k + n
    table = table.to(device)
    last_k, last_v = [], []
    for i, s in enumerate(seq_lens):
        keys, values = _kv(s, h, d, dtype, device)
        keys[0] *= 4  # a sink worth keeping exact
        pos = torch.arange(s, device=device)
        req = torch.zeros(s, dtype=torch.long, device=device)
        reference.store(keys, values, cache, compressed_slot_mapping(table[i:i + 1], req, pos, k, block_size),
                        layout, tr)
        held = s - (q_lens[i] if q_lens else 1)
        store_exact(keys[:held], values[:held], cache, table[i:i + 1, :k], req[:held], pos[:held], window, sink, ring)
        last_k.append(keys[held:])
        last_v.append(values[held:])
    return cache, table, k, torch.cat(last_k), torch.cat(last_v)


LAYERED_CASES = [
    dict(spec="int4", window=8, sink=1, seq_lens=(1, 5, 9, 40, 70)),
    dict(spec="int4", window=8, sink=1, seq_lens=(1, 5, 9, 40, 70), exact="int8"),
    dict(spec="lowrank+int8", window=5, sink=2, seq_lens=(2, 7, 8, 33), dtype=torch.bfloat16, token_rows=True),
    dict(spec="hadamard+int8/r20+int4", window=0, sink=3, seq_lens=(1, 3, 4, 50), exact="int8"),
    dict(spec="r16/int8", window=33, sink=0, seq_lens=(20, 34, 35, 90), block_n=32, num_splits=2),
    dict(spec="int4", window=3, sink=20, seq_lens=(10, 22, 23, 24, 60), block_size=32, block_n=16, group=4,
         dtype=torch.float16, token_rows=True, exact="int8"),
]


def _check_layered_decode(spec, device, seed, *, window, sink, seq_lens, dtype=torch.float32, h=2, group=3,
                          d=64, block_size=16, block_n=16, num_splits=3, token_rows=False, exact="model"):
    from vllm_lowrank.formats import ring_layout
    from vllm_lowrank.layered import layered_attention, store_exact

    layout, tr = _setup(spec, h, d, dtype, device)
    ring = ring_layout(d, dtype, exact)
    cache, table, k, last_k, last_v = _layered_requests(seq_lens, h, d, block_size, layout, tr, dtype, device,
                                                        window, sink, ring)
    b, scale = len(seq_lens), d ** -0.5
    sl = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    q = _kv(b, h * group, d, dtype, device)[0]
    ref = torch.empty_like(q)
    for i, s in enumerate(seq_lens):  # the oracle attends before the new token enters the ring
        layered_attention(q[i:i + 1], last_k[i:i + 1], last_v[i:i + 1], cache, table[i], k, s, window, sink, layout,
                          tr, scale, ref[i:i + 1], ring)
    plain = torch.empty_like(q)
    reference.decode_attention(q, cache, table[:, k:], sl, layout, tr, scale, plain)
    tol = _tol(dtype, layout)
    assert _rel(plain, ref) > 3 * tol, f"seed={seed}: the ring would not be missed; the test could not fail"

    expected = cache.clone()
    req = torch.arange(b, device=device)
    store_exact(last_k, last_v, expected, table[:, :k], req, sl.long() - 1, window, sink, ring)
    K.store_ring(last_k, last_v, cache, table[:, :k], req.int(), sl.long() - 1, sl, window, sink, ring)
    assert torch.equal(cache, expected), f"seed={seed}: the ring store differs from the PyTorch path's"

    out = torch.full_like(q, float("nan"))
    ws = torch.full((K.workspace_numel(b, h * group, layout.v.latent_dim, num_splits, d),), float("nan"),
                    device=device)  # poisoned: the ring's partial must be written before the merge reads it
    K.decode_attention(q, cache, table[:, k:], sl, layout, tr, scale, out, num_splits=num_splits, workspace=ws,
                       block_n=block_n, token_rows=token_rows, ring_table=table[:, :k], window=window, sink=sink,
                       ring_slot=ring)
    _check_close(out, ref, dtype, layout, f"seed={seed} {spec} W={window} S={sink} ring {exact}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", LAYERED_CASES,
                         ids=lambda c: f"{c['spec']}-W{c['window']}-S{c['sink']}-{c.get('exact', 'model')}")
def test_decode_reads_the_ring(case, device, seed):
    """Decode with a layered cache: the last W and first S positions read exact from the ring (written by
    the ring-store kernel, bit-equal to the PyTorch path), the rest compressed; against the oracle's
    layered attention, with windows shorter and longer than the sequences, sink-only and window-only, and
    rings in the model dtype and in int8."""
    _check_layered_decode(case["spec"], device, seed, **{k: v for k, v in case.items() if k != "spec"})


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("exact", ["model", "int8"])
def test_store_ring_chunks_and_padding(device, exact, seed):
    """A prefill chunk longer than the window writes only its last W tokens (and the sink); padding
    tokens (request -1) and tokens past their request's length write nothing."""
    from vllm_lowrank.formats import ring_layout
    from vllm_lowrank.layered import store_exact

    h, d, bs, window, sink, dtype = 2, 64, 16, 6, 2, torch.bfloat16
    layout, tr = _setup("int4", h, d, dtype, device)
    ring = ring_layout(d, dtype, exact)
    cache, table, k, _, _ = _layered_requests([30, 12], h, d, bs, layout, tr, dtype, device, window, sink, ring)
    # request 0: chunk of positions 20..29 (len 30); request 1: whole prompt 0..11; then two padding tokens
    pos = torch.cat((torch.arange(20, 30), torch.arange(0, 12), torch.tensor([0, 5]))).to(device)
    req = torch.tensor([0] * 10 + [1] * 12 + [-1, -1], dtype=torch.int32, device=device)
    keys, values = _kv(pos.shape[0], h, d, dtype, device)
    sl = torch.tensor([30, 12], dtype=torch.int32, device=device)
    expected = cache.clone()
    real = req >= 0
    store_exact(keys[real], values[real], expected, table[:, :k], req[real].long(), pos[real], window, sink, ring)
    K.store_ring(keys, values, cache, table[:, :k], req, pos, sl, window, sink, ring)
    assert torch.equal(cache, expected), f"seed={seed}"



LAYERED_PREFILL_CASES = [
    # (seq_len, q_len): continuation chunks longer and shorter than the window, whole prompts read from
    # the cache (prefill_from_cache), a decode, prompts shorter than the window
    dict(spec="int4", window=8, sink=1, seq_q=((70, 30), (40, 3), (20, 20), (9, 1), (6, 2))),
    dict(spec="int4", window=8, sink=1, seq_q=((70, 30), (40, 3), (20, 20), (9, 1), (6, 2)), exact="int8",
         dtype=torch.bfloat16),
    dict(spec="lowrank+int8", window=5, sink=2, seq_q=((33, 12), (8, 8), (2, 1), (50, 40)), dtype=torch.float16,
         block_m=16),
    dict(spec="int8/int4", window=0, sink=3, seq_q=((50, 20), (4, 4), (30, 1)), exact="int8"),  # identity int4 V
    dict(spec="r16/int8", window=33, sink=0, seq_q=((90, 50), (34, 1), (35, 35)), block_n=32),
    dict(spec="r24+int8/int4", window=3, sink=20, seq_q=((60, 45), (23, 2), (10, 10)), block_size=32, block_n=16,
         group=4, dtype=torch.bfloat16),
]


def _check_layered_prefill(spec, device, seed, *, window, sink, seq_q, dtype=torch.float32, h=2, group=3, d=64,
                           block_size=16, block_n=16, block_m=32, exact="model"):
    from vllm_lowrank.formats import ring_layout
    from vllm_lowrank.layered import layered_attention

    layout, tr = _setup(spec, h, d, dtype, device)
    ring = ring_layout(d, dtype, exact)
    seq_lens, q_lens = [s for s, _ in seq_q], [n for _, n in seq_q]
    cache, table, k, keys, values = _layered_requests(seq_lens, h, d, block_size, layout, tr, dtype, device,
                                                      window, sink, ring, q_lens)
    qsl = [0]
    for n in q_lens:
        qsl.append(qsl[-1] + n)
    scale = d ** -0.5
    q = _kv(qsl[-1], h * group, d, dtype, device)[0]
    ref = torch.empty_like(q)
    for i, s in enumerate(seq_lens):
        a, b = qsl[i], qsl[i + 1]
        layered_attention(q[a:b], keys[a:b], values[a:b], cache, table[i], k, s, window, sink, layout, tr, scale,
                          ref[a:b], ring)
    plain = torch.empty_like(q)
    reference.paged_attention(q, cache, table[:, k:], seq_lens, qsl, layout, tr, scale, plain)
    tol = _tol(dtype, layout)
    assert _rel(plain, ref) > 3 * tol, f"seed={seed}: the ring would not be missed; the test could not fail"

    sl = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    qs = torch.tensor(qsl, dtype=torch.int32, device=device)
    before = cache.clone()
    kw = dict(block_m=block_m, block_n=block_n, ring_table=table[:, :k], window=window, sink=sink, ring_slot=ring,
              key=keys, value=values)
    out = torch.full_like(q, float("nan"))
    K.paged_attention(q, cache, table[:, k:], sl, qs, max(q_lens), layout, tr, scale, out, **kw)
    assert torch.equal(cache, before), f"seed={seed}: attention wrote to the cache"
    _check_close(out, ref, dtype, layout, f"seed={seed} {spec} W={window} S={sink} ring {exact}")
    part = torch.full_like(q, float("nan"))  # requests 1.. only (the backend's runs): exactly their rows
    K.paged_attention(q, cache, table[:, k:], sl, qs, max(q_lens[1:]), layout, tr, scale, part,
                      requests=(1, len(seq_q)), **kw)
    assert part[:qsl[1]].isnan().all() and torch.equal(part[qsl[1]:], out[qsl[1]:]), f"seed={seed}: partial launch"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", LAYERED_PREFILL_CASES,
                         ids=lambda c: f"{c['spec']}-W{c['window']}-S{c['sink']}-{c.get('exact', 'model')}")
def test_prefill_reads_the_ring(case, device, seed):
    """Chunked prefill with a layered cache: each query reads exact its last W and first S positions,
    from the ring (positions before the chunk) or from the chunk's own K/V (never from the ring, which
    the chunk would overwrite), the rest compressed; against the oracle's layered attention. Chunks
    longer and shorter than the window, sink-only and window-only, a sink past the first tile,
    identity int4 values, rings in the model dtype and in int8."""
    _check_layered_prefill(case["spec"], device, seed, **{k: v for k, v in case.items() if k != "spec"})

# --------------------------------------------------------------------------------------------- real K/V


def _calibrated(spec: str, k: torch.Tensor, v: torch.Tensor, rk: int, rv: int):
    """Layout and transforms with offsets = per-head means and bases = principal directions of k/v."""
    fmt = _fmt(spec, rk, rv)
    h, d = k.shape[1], k.shape[2]
    trs = []
    for f, x in ((fmt.k, k), (fmt.v, v)):
        x = x.double().cpu()
        mean = x.mean(0)
        cov = torch.einsum("nhd,nhe->hde", x - mean, x - mean)
        basis = torch.linalg.eigh(cov)[1].flip(-1).float()  # [H, D, D], leading directions first
        trs.append(build_tensor_transform(f, h, d, basis, mean.float()))
    return SlotLayout.build(fmt, d, k.dtype), LayerTransforms(*trs).to(k.device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spec", ["int4", "lowrank+fp8"])
def test_real_kv(request, spec, device, seed):
    """Real SmolLM2 post-RoPE Q/K/V (bf16), stored by the kernel (bytes equal to the oracle's), then
    prefill over the whole prompt and decode of its last token, against the oracle on that cache.
    Offsets and bases as calibration makes them (mean and principal directions of the same K/V)."""
    try:
        real_qkv = request.getfixturevalue("real_qkv")
    except Exception as e:  # noqa: BLE001  (no model or no transformers on this machine)
        pytest.skip(f"real SmolLM2 K/V unavailable: {type(e).__name__}: {e}")
    bs, d, dtype = 16, 64, torch.bfloat16
    for layer in (0, 7):
        q, k, v = (t.to(dtype).to(device) for t in real_qkv[layer])
        n, h = k.shape[0], k.shape[1]
        layout, tr = _calibrated(spec, k, v, rk=32, rv=32)
        nblk = -(-n // bs)
        table = torch.randperm(nblk + 2)[None, :nblk].int().to(device)
        slots = reference.gather_slots(table[0], n, bs)
        cache = torch.zeros(cache_shape(nblk + 2, bs, h, layout.slot_bytes), dtype=torch.uint8, device=device)
        ref_cache = torch.zeros_like(cache)
        K.store(k, v, cache, slots, layout, tr)
        reference.store(k, v, ref_cache, slots, layout, tr)
        if layout.k.fmt.transform != "basis" and layout.v.fmt.transform != "basis":
            assert torch.equal(cache, ref_cache), f"seed={seed} layer {layer}: stored bytes differ"
        tol = _tol(dtype, layout)
        ref, out = torch.empty_like(q), torch.full_like(q, float("nan"))
        reference.paged_attention(q, cache, table, [n], [0, n], layout, tr, d ** -0.5, ref)
        qsl = torch.tensor([0, n], dtype=torch.int32, device=device)
        sl = torch.tensor([n], dtype=torch.int32, device=device)
        K.paged_attention(q, cache, table, sl, qsl, n, layout, tr, d ** -0.5, out, block_m=64, block_n=32)
        err = _rel(out, ref)
        assert not out.isnan().any() and err < tol, f"seed={seed} layer {layer} prefill: {err:.2e}"
        out1 = torch.full_like(q[-1:], float("nan"))
        K.decode_attention(q[-1:], cache, table, sl, layout, tr, d ** -0.5, out1, num_splits=2, block_n=32)
        err = _rel(out1, ref[-1:])
        assert not out1.isnan().any() and err < tol, f"seed={seed} layer {layer} decode: {err:.2e}"


@pytest.mark.skipif(not _SUBPROCESS, reason="only when Triton was imported in compiled mode before this module")
def test_interpreter_subprocess():
    """Run this module in a fresh interpreter-mode Python (Triton was imported earlier without it)."""
    env = dict(os.environ, TRITON_INTERPRET="1", LOWRANK_KERNEL_SUBPROCESS="1")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
