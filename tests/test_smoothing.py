"""Query-weighted key smoothing: keys stored as ``P^T ((k - c) / s)``, queries projected as ``P^T (s q)``.

No vLLM and no Triton here (the kernels with smoothing are in tests/test_kernels.py): the transform's
exactness, the PyTorch path (the CPU backend and the kernels' oracle) against float64 attention, the
calibrated scales, the basis file's ``k.smooth.*`` tensors and their checks, the ``smooth_keys`` setting,
and the simulation's codec against quantsim's.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vllm_lowrank import calibration as cal
from vllm_lowrank import reference
from vllm_lowrank.basis import BasisFile, BasisFileError, orthonormal_basis_file
from vllm_lowrank.config import LowRankConfigError, ModelShape, is_layered, parse
from vllm_lowrank.formats import LayerFormat, SlotLayout, TensorFormat, cache_shape
from vllm_lowrank.quantsim import VariantCodec, smoothing_scales
from vllm_lowrank.simulate import make_codec
from vllm_lowrank.transforms import LayerTransforms, TensorTransform, build_tensor_transform
from conftest import attention64

REPO = Path(__file__).resolve().parent.parent
BASIS = REPO / "bases" / "smollm2-135m.safetensors"
PLANS = REPO / "bases" / "smollm2-135m.plans.json"
SMOL = ModelShape(30, 3, 64)


@pytest.fixture
def gen() -> torch.Generator:
    seed = torch.seed() % (2**31)
    print(f"random seed {seed}")
    return torch.Generator().manual_seed(seed)


def _scales(h: int, d: int, gen: torch.Generator, spread: float = 0.8) -> torch.Tensor:
    return (torch.randn(h, d, generator=gen) * spread).exp()


def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


# ------------------------------------------------------------------------------------------- transform


@pytest.mark.parametrize("fmt", ["model", "hadamard", "r64", "r64+int8"])
def test_scores_exact_before_rounding(fmt, gen):
    """(P^T S q) . (P^T S^-1 (k - c)) = q . (k - c) for a square P (and for none), in float32."""
    h, g, d = 3, 3, 64
    tf = TensorFormat.parse(fmt)
    basis = torch.linalg.qr(torch.randn(h, d, d, generator=gen, dtype=torch.float64))[0].float()
    c, s = torch.randn(h, d, generator=gen), _scales(h, d, gen)
    tr = build_tensor_transform(tf, h, d, basis, c, s)
    assert not tr.is_identity and not tr.query_is_identity
    q, k = torch.randn(5, h * g, d, generator=gen), torch.randn(7, h, d, generator=gen)
    got = torch.einsum("qhr,nhr->hqn", tr.project_query(q, g), tr.project(k).repeat_interleave(g, 1))
    want = torch.einsum("qhd,nhd->hqn", q.double(), (k - c).double().repeat_interleave(g, 1))
    assert _rel(got, want) < 1e-5
    # reconstruct inverts project (the simulation rebuilds keys so)
    assert _rel(tr.reconstruct(tr.project(k), 1), k) < 1e-5


def test_values_cannot_be_smoothed(gen):
    s = _scales(2, 16, gen)
    with pytest.raises(ValueError, match="values cannot be smoothed"):
        LayerTransforms(TensorTransform(None, None), TensorTransform(None, None, s))
    with pytest.raises(ValueError, match="expected \\(2, 16\\)"):
        build_tensor_transform(TensorFormat.parse("int8"), 2, 16, None, None, torch.ones(2, 8))


# ------------------------------------------------------------------------------ reference path vs float64


def _layer(kfmt: str, vfmt: str, h: int, d: int, gen: torch.Generator, smooth: torch.Tensor | None,
           offsets: bool = False):
    fmt = LayerFormat(TensorFormat.parse(kfmt), TensorFormat.parse(vfmt))
    bf = orthonormal_basis_file(1, h, d, seed=int(torch.randint(0, 2**30, (1,), generator=gen)))
    parts = []
    for t, tf in (("k", fmt.k), ("v", fmt.v)):
        off = torch.randn(h, d, generator=gen) if offsets else None
        parts.append(build_tensor_transform(tf, h, d, bf.bases[t][0], off, smooth if t == "k" else None))
    return SlotLayout.build(fmt, d, torch.float32), LayerTransforms(*parts)


def _anisotropic(n: int, h: int, d: int, gen: torch.Generator, sk: torch.Tensor, sq: torch.Tensor, hq: int):
    """Keys with per-channel spreads ``sk`` [H, D], queries with ``sq`` (per KV head, repeated over the group)."""
    k = torch.randn(n, h, d, generator=gen) * sk
    v = torch.randn(n, h, d, generator=gen)
    q = torch.randn(n, hq, d, generator=gen) * sq.repeat_interleave(hq // h, 0)
    return q, k, v


# (K format, V format, tolerance against float64 attention over the original K/V): rank = head_dim with
# the model dtype (float32 here) is lossless up to rounding; quantized: test_reference's for rotated int4
# (0.25), int8 2e-2. Measured worst cases over 60 seeds (scales spread over ~10x, keys spread like s):
# lossless 5.5e-7, hadamard+int4 0.175, int8 formats 1.1e-2.
CASES = [("r64", "r64", 1e-5), ("model", "model", 1e-5), ("hadamard", "model", 1e-5),
         ("hadamard+int4", "hadamard+int4", 0.25), ("hadamard+int8", "int8", 2e-2), ("int8", "int8", 2e-2),
         ("r64+int8", "int8", 2e-2)]


@pytest.mark.parametrize("kfmt,vfmt,tol", CASES, ids=[f"{k}-{v}" for k, v, _ in CASES])
@pytest.mark.parametrize("offsets", [False, True], ids=["no-offset", "offset"])
def test_decode_and_paged_match_float64(kfmt, vfmt, tol, offsets, gen):
    h, hq, d, bs = 3, 9, 64, 16
    seq_lens = [1, 37, 70]
    s = _scales(h, d, gen, 0.6)
    layout, tr = _layer(kfmt, vfmt, h, d, gen, s, offsets)
    nblk = [math.ceil(n / bs) for n in seq_lens]
    table = torch.randperm(sum(nblk) + 2, generator=gen)[:sum(nblk)].int()
    table = torch.stack([torch.nn.functional.pad(x, (0, max(nblk) - len(x)))
                         for x in torch.split(table, nblk)])
    cache = torch.randint(0, 256, cache_shape(sum(nblk) + 2, bs, h, layout.slot_bytes), dtype=torch.uint8,
                          generator=gen)
    keys, values = [], []
    for r, n in enumerate(seq_lens):
        # keys spread like s and queries like 1/s: the data these scales would be calibrated on
        # (s = (E[k^2]/E[q^2])^(1/4)), so that k / s is isotropic like test_reference's inputs
        k, v = torch.randn(n, h, d, generator=gen) * s, torch.randn(n, h, d, generator=gen)
        if offsets:  # data around the offsets, as calibrated offsets are
            k, v = k + tr.k.offset, v + tr.v.offset
        reference.store(k, v, cache, reference.gather_slots(table[r], n, bs), layout, tr)
        keys.append(k)
        values.append(v)
    scale = d ** -0.5
    qs = 1 / s.repeat_interleave(hq // h, 0)
    q = torch.randn(len(seq_lens), hq, d, generator=gen) * qs
    out = torch.full_like(q, float("nan"))
    reference.decode_attention(q, cache, table, torch.tensor(seq_lens), layout, tr, scale, out)
    for r, n in enumerate(seq_lens):
        exact = attention64(q[r:r + 1], keys[r], values[r], torch.tensor([n - 1]), scale)
        assert _rel(out[r:r + 1], exact) < tol, f"decode, request {r} ({n} tokens)"
    # a chunk of queries over the same cache (continuation / prefix hit), causal
    r, n, ql = 2, seq_lens[2], 12
    qc = torch.randn(ql, hq, d, generator=gen) * qs
    outc = torch.full_like(qc, float("nan"))
    reference.paged_attention(qc, cache, table[r:r + 1], [n], [0, ql], layout, tr, scale, outc)
    exact = attention64(qc, keys[r], values[r], torch.arange(n - ql, n), scale)
    assert _rel(outc, exact) < tol, "paged"


def test_smoothing_cuts_the_int4_score_error_on_anisotropic_keys():
    """Keys with large channels where queries are small (and the reverse): the query-weighted scales
    calibrated from the data cut the error of rotated int4 attention; the unweighted direction hurts."""
    g = torch.Generator().manual_seed(0)
    h, hq, d, n = 2, 6, 64, 400
    sk = (torch.randn(h, d, generator=g) * 1.2).exp()
    sq = (torch.randn(h, d, generator=g) * 0.5).exp() / sk.sqrt()
    q, k, v = _anisotropic(n, h, d, g, sk, sq, hq)
    s = smoothing_scales(k.pow(2).mean(0), 0.5, q.pow(2).reshape(n, h, hq // h, d).mean((0, 2)))
    errs = {}
    for name, sm in (("none", None), ("query-weighted", s), ("inverse", 1 / s)):
        layout, tr = _layer("hadamard+int4", "model", h, d, g, sm)
        cache = torch.zeros(cache_shape(n // 16 + 1, 16, h, layout.slot_bytes), dtype=torch.uint8)
        table = torch.arange(n // 16 + 1, dtype=torch.int32)[None]
        reference.store(k, v, cache, reference.gather_slots(table[0], n, 16), layout, tr)
        out = torch.full_like(q, float("nan"))
        reference.paged_attention(q, cache, table, [n], [0, n], layout, tr, d ** -0.5, out)
        errs[name] = _rel(out, attention64(q, k, v, torch.arange(n), d ** -0.5))
    assert errs["query-weighted"] < 0.8 * errs["none"] < errs["inverse"], errs


# ------------------------------------------------------------------------------- calibration and the file


def _stats(num_layers=3, h=2, d=16, group=2, n=600, seed=0) -> cal.Statistics:
    g = torch.Generator().manual_seed(seed)
    acc = cal.Accumulator(rope_theta=10000.0)
    for layer in range(num_layers):
        sk = (torch.randn(h, d, generator=g)).exp()
        k = torch.randn(n, h, d, generator=g) * sk + torch.randn(h, d, generator=g)
        q = torch.randn(n, h * group, d, generator=g) * (torch.randn(h * group, d, generator=g) * 0.5).exp()
        acc.observe(layer, q, k, torch.randn(n, h, d, generator=g), torch.arange(n))
    return acc.statistics()


def test_calibrated_scales_match_the_simulation():
    st = _stats()
    s = cal.key_smoothing_scales(st)
    assert s.shape == (3, 2, 16) and bool((s > 0).all())
    m = st.second_moment("k", True).diagonal(dim1=-2, dim2=-1)
    w = st.second_moment("q").diagonal(dim1=-2, dim2=-1)
    assert torch.allclose(s, smoothing_scales(m, 0.5, w), rtol=1e-5)
    assert torch.allclose(s.log().mean(-1), torch.zeros(3, 2), atol=1e-5)  # geometric mean 1 per head
    raw = cal.key_smoothing_scales(st, centered=False)  # for keys without offsets
    assert torch.allclose(raw, smoothing_scales(st.second_moment("k").diagonal(dim1=-2, dim2=-1), 0.5, w), rtol=1e-5)
    b = cal.compute_bases(st)
    assert torch.equal(b.k_smooth, s) and torch.equal(b.k_smooth_raw, raw)
    assert cal.compute_bases(st, smooth_alpha=None).k_smooth is None
    assert cal.compute_bases(st, centered=False).k_smooth_raw is None  # no offsets: one set of scales


def test_basis_file_round_trip_with_scales(tmp_path):
    st = _stats()
    bases = cal.compute_bases(st)
    bf = cal.make_basis_file(st, bases, {"k": [8] * 3, "v": [8] * 3}, model="synthetic")
    assert bf.has_smoothing() and "key_smoothing" in bf.extra
    for path, save in ((tmp_path / "a.safetensors", bf.save), (tmp_path / "b.safetensors",
                                                                 lambda p: bf.save(p, torch.float16))):
        save(path)
        back = BasisFile.load(path)
        assert back.has_smoothing() and back.extra["key_smoothing"] == bf.extra["key_smoothing"]
        for i in range(3):
            assert torch.equal(back.smooth[i], bases.k_smooth[i])  # float32 in both forms
            assert torch.equal(back.smooth_raw[i], bases.k_smooth_raw[i])
        assert back.key_scales(True) is back.smooth and back.key_scales(False) is back.smooth_raw
    # a file without scales: no smoothing (off by default anyway; on request, refused)
    plain = cal.make_basis_file(st, cal.compute_bases(st, smooth_alpha=None), {"k": [8] * 3, "v": [8] * 3})
    plain.save(tmp_path / "plain.safetensors")
    assert not BasisFile.load(tmp_path / "plain.safetensors").has_smoothing()
    shape = ModelShape(3, 2, 16)
    assert not parse({"format": "int4", "basis": str(tmp_path / "plain.safetensors")}, shape).smooth_layer(0)
    with pytest.raises(LowRankConfigError, match="has no key smoothing scales"):
        parse({"format": "int4", "basis": str(tmp_path / "plain.safetensors"), "smooth_keys": True}, shape)
    assert parse({"format": "int4", "basis": str(tmp_path / "a.safetensors"), "smooth_keys": True},
                 shape).smooth_layer(2)
    assert not parse({"format": "int4", "basis": str(tmp_path / "a.safetensors")}, shape).smooth_layer(2)


def _rewrite(src: Path, dst: Path, change) -> None:
    with safe_open(str(src), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    change(tensors)
    save_file(tensors, str(dst), metadata=meta)


@pytest.mark.parametrize("change,message", [
    (lambda t: t.__setitem__("k.smooth.1", torch.ones(2, 8)), r"k\.smooth\.1\) have shape \(2, 8\), expected \(2, 16\)"),
    (lambda t: t.__setitem__("k.smooth.0", torch.ones(3, 2, 16)), r"k\.smooth\.0\) have shape \(3, 2, 16\)"),
    (lambda t: t.pop("k.smooth.2"), "not for layer 2"),
    (lambda t: t.__setitem__("k.smooth.0", -torch.ones(2, 16)), "positive and finite"),
    (lambda t: t.__setitem__("k.smooth.0", torch.full((2, 16), float("nan"))), "positive and finite"),
    (lambda t: t.__setitem__("v.smooth.0", torch.ones(2, 16)), "only keys"),
    (lambda t: t.__setitem__("k.smooth.3", torch.ones(2, 16)), "unexpected tensors"),
    (lambda t: t.__setitem__("k.smooth_raw.2", torch.ones(16, 2)), r"k\.smooth_raw\.2\) have shape \(16, 2\)"),
    (lambda t: [t.pop(f"k.smooth.{i}") for i in range(3)], "without k.smooth scales"),
], ids=["narrow", "stacked", "missing-layer", "negative", "nan", "values", "extra-layer", "raw-shape", "raw-alone"])
def test_malformed_scales_are_refused(tmp_path, change, message):
    st = _stats()
    bf = cal.make_basis_file(st, cal.compute_bases(st), {"k": [8] * 3, "v": [8] * 3})
    bf.save(tmp_path / "good.safetensors")
    _rewrite(tmp_path / "good.safetensors", tmp_path / "bad.safetensors", change)
    with pytest.raises(BasisFileError, match=message):
        BasisFile.load(tmp_path / "bad.safetensors")
    with pytest.raises(LowRankConfigError, match=message):  # through the plugin's settings too
        parse({"format": "int4", "basis": str(tmp_path / "bad.safetensors")}, ModelShape(3, 2, 16))


# -------------------------------------------------------------------------------------- the setting


def test_smooth_keys_setting_and_default_rule():
    b = str(BASIS)
    assert BasisFile.load(BASIS).has_smoothing()
    # layer 0's format varies (the committed file keeps 48 basis columns there, 1 elsewhere)
    default = {f: parse({"format": "int8", "layers": {"0": f}, "basis": b}, SMOL).smooth_layer(0)
               for f in ("int4", "hadamard+int8", "int8", "r32+int4", "full")}
    assert not any(default.values())  # off unless asked for
    on = {f: parse({"format": "int8", "layers": {"0": f}, "basis": b, "smooth_keys": True}, SMOL).smooth_layer(0)
          for f in ("int4", "int8", "r32+int4", "hadamard", "full")}
    assert on == {"int4": True, "int8": True, "r32+int4": True, "hadamard": True, "full": False}
    assert not parse({"format": "int4", "basis": b, "smooth_keys": False}, SMOL).smooth_layer(5)
    assert not parse({"format": "int4"}, SMOL).smooth_layer(5)  # no basis file: nothing to smooth with
    cfg = parse({"plan": f"{PLANS}:3.56x", "smooth_keys": True}, SMOL)  # the basis beside the plans has scales
    assert [cfg.smooth_layer(i) for i in range(3)] == [True, True, True]  # layer 0 is r32+int4
    assert "(K smoothed)" in cfg.describe(30)
    assert "(K smoothed)" not in parse({"plan": f"{PLANS}:3.56x"}, SMOL).describe(30)
    # a K that only has its V compressed is never smoothed
    assert not parse({"format": {"k": "model", "v": "int4"}, "basis": b}, SMOL).smooth_layer(0)


@pytest.mark.parametrize("settings,message", [
    ({"format": "int4", "smooth_keys": True}, "no basis file is set"),
    ({"format": "full", "basis": str(BASIS), "smooth_keys": True}, "no layer compresses K"),
    ({"format": "int4", "basis": str(BASIS), "smooth_keys": "on"}, "expected true or false"),
    ({"format": "int4", "basis": str(REPO / "bases" / "smollm2-135m-4x.safetensors"), "smooth_keys": True},
     "has no key smoothing scales"),
])
def test_bad_smoothing_setting_is_refused(settings, message):
    with pytest.raises(LowRankConfigError, match=message):
        parse(settings, SMOL)


# ------------------------------------------------------------------------------------------ simulation


def test_simulation_codec_equals_quantsim_variant():
    """The plugin's codec (what simulate.py runs) with offsets and scales = quantsim's ``off+sq0.5``."""
    g = torch.Generator().manual_seed(0)
    h, d = 3, 64
    x = torch.randn(97, h, d, generator=g) * (torch.randn(h, d, generator=g)).exp()
    bf = orthonormal_basis_file(2, h, d)
    off, s = torch.randn(h, d, generator=g), _scales(h, d, g)
    bf.offsets = {"k": [off, off], "v": [off, off]}
    raw = _scales(h, d, g)
    bf.smooth, bf.smooth_raw = [s, s], [raw, raw]
    plugin = make_codec("hadamard+int4", "k", 1, bf, d, h, smooth_keys=True)
    ours = VariantCodec(offset=off, smooth=s, rotate=True)
    assert torch.allclose(ours(x), plugin(x), atol=1e-4 * float(x.abs().max()), rtol=0)
    # without offsets the raw-moment scales (quantsim's k:sq0.5 with no offsets)
    no_off = make_codec("hadamard+int4", "k", 1, bf, d, h, use_offsets=False, smooth_keys=True)
    assert torch.allclose(VariantCodec(smooth=raw, rotate=True)(x), no_off(x), atol=1e-4 * float(x.abs().max()), rtol=0)
    plain = make_codec("hadamard+int4", "k", 1, bf, d, h)  # off by default
    assert plain.tr.smooth is None and not torch.allclose(plain(x), plugin(x), atol=1e-3, rtol=0)
    assert make_codec("hadamard+int4", "v", 1, bf, d, h, smooth_keys=True).tr.smooth is None  # values never


def test_simulation_plan_codecs_follow_the_settings(gen):
    """The sensitivity sweep measures each candidate under the plugin settings it is asked for."""
    from vllm_lowrank.simulate import plan_codecs

    h, d = 3, 64
    bf = orthonormal_basis_file(2, h, d)
    bf.offsets = {t: [torch.randn(h, d, generator=gen)] * 2 for t in ("k", "v")}
    s, raw = _scales(h, d, gen), _scales(h, d, gen)
    bf.smooth, bf.smooth_raw = [s, s], [raw, raw]
    plan = {0: ("int8", "hadamard+int4"), 1: ("model", "int8")}
    k0, v0 = plan_codecs(plan, bf, d, h, None, True)[0]
    assert torch.equal(k0.tr.smooth, s) and v0.tr.smooth is None and k0.tr.offset is not None
    k0, _ = plan_codecs(plan, bf, d, h, False, True)[0]
    assert torch.equal(k0.tr.smooth, raw) and k0.tr.offset is None
    k0, _ = plan_codecs(plan, bf, d, h, None, False)[0]
    assert k0.tr.smooth is None
    assert plan_codecs(plan, bf, d, h, None, True)[1][0].tr.smooth is None  # the model's own K: nothing to smooth


def _sweep_file(tmp_path: Path, cands: list[str], kl, settings: dict) -> Path:
    """A sensitivity sweep file for SmolLM2's 30 layers: KL ``kl(layer, format)`` for K and V alike,
    measured (its meta says) with the plugin settings ``settings``."""
    import json

    sweep = {"reference": {"nll": 3.0, "kl": 0.0, "tokens": 10}, "candidates": cands,
             "kl": {f"{i}.{t}.{f}": kl(i, f) for i in range(30) for t in "kv" for f in cands},
             "meta": {"settings": settings}}
    sweep["dnll"] = dict(sweep["kl"])
    f = tmp_path / "sweep.json"
    f.write_text(json.dumps(sweep))
    return f


def test_plans_record_their_sweeps_settings(tmp_path):
    """Plans chosen from a sweep measured with smoothing say so (the plugin then runs them that way), and
    sweeps measured under other settings are refused rather than merged."""
    import json

    from vllm_lowrank import sensitivity

    cands = ["int8", "hadamard+int4"]
    f = _sweep_file(tmp_path, cands, lambda i, f: (0.01 if f == "int8" else 0.1) * (i + 1), {"smooth_keys": True})
    out = tmp_path / "plans.json"
    common = ["--from-sweep", str(f), "--basis", str(BASIS), "--model", str(tmp_path), "--candidates", *cands,
              "--ratios", "2.5", "--out", str(out)]
    with pytest.raises(SystemExit, match="smooth_keys"):
        sensitivity.main(common)
    assert not out.exists()
    assert sensitivity.main([*common, "--smooth-keys"]) == 0
    plan = json.loads(out.read_text())["plans"]["2.5x"]
    assert plan["settings"] == {"smooth_keys": True}
    assert set(plan["layers"]["29"].values()) == {"int8"}  # the costliest layer keeps the cheaper loss


def test_plans_chosen_inside_a_layered_cache_carry_it(tmp_path):
    """A sweep measured with the last W and first S positions exact gives plans that turn that layered
    cache on in the plugin; merging it into a plan without them is refused."""
    import json

    from vllm_lowrank import sensitivity

    cands = ["int8", "hadamard+int4"]
    f = _sweep_file(tmp_path, cands, lambda i, f: 0.01 if f == "int8" else 0.1, {"exact_window": 32, "exact_sink": 1})
    out = tmp_path / "m.plans.json"
    common = ["--from-sweep", str(f), "--basis", str(BASIS), "--model", str(tmp_path), "--candidates", *cands,
              "--ratios", "3", "--out", str(out)]
    with pytest.raises(SystemExit, match="exact_window"):
        sensitivity.main([*common, "--exact-window", "32"])
    assert not out.exists()
    assert sensitivity.main([*common, "--exact-window", "32", "--exact-sink", "1"]) == 0
    plan = json.loads(out.read_text())["plans"]["3x"]
    assert plan["settings"] == {"exact_window": 32, "exact_sink": 1}
    cfg = parse({"plan": f"{out}:3x"}, SMOL)
    assert cfg.layered and cfg.exact_window == 32 and cfg.exact_sink == 1
    assert is_layered({"plan": f"{out}:3x"}) and not is_layered({"plan": f"{out}:3x", "exact_window": 0,
                                                                   "exact_sink": 0})


def test_plan_that_asks_for_smoothing_brings_its_basis_file(tmp_path):
    """A plan chosen with smoothing on and no offsets still gets the basis file beside its plans file
    (where the scales are), and runs smoothed."""
    import json
    import shutil

    from vllm_lowrank.config import expand_plan

    layers = {str(i): {"k": "hadamard+int4" if i == 0 else "int8", "v": "int8"} for i in range(30)}
    plans = tmp_path / "m.plans.json"
    plans.write_text(json.dumps({"plans": {"p": {"layers": layers, "settings": {"smooth_keys": True,
                                                                                 "offset": False}}}}))
    with pytest.raises(LowRankConfigError, match="no basis file is set"):
        parse({"plan": f"{plans}:p"}, SMOL)
    shutil.copy(BASIS, tmp_path / "m.safetensors")
    assert expand_plan(f"{plans}:p")["basis"] == str(tmp_path / "m.safetensors")
    cfg = parse({"plan": f"{plans}:p"}, SMOL)
    assert cfg.smooth_layer(0) and cfg.smooth_layer(29) and not cfg.use_offsets
