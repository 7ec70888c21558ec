"""The simulation-only int4 variants (vllm_lowrank.quantsim): no model needed, under a second."""

from __future__ import annotations

import pytest
import torch

from vllm_lowrank import calibration as cal
from vllm_lowrank.basis import orthonormal_basis_file
from vllm_lowrank.quantsim import (VariantCodec, int4_bytes, int4_fake_quant, smoothing_scales,
                                   tie_rope_pairs)
from vllm_lowrank.simulate import make_codec

H, D = 3, 64


def _kv(n=97, seed=0, outliers=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, H, D, generator=g)
    if outliers:
        x[..., 5] *= 20.0
        x[..., 40] += 7.0
    return x


def test_one_group_equals_plugin_hadamard_int4():
    """group = D, asymmetric, rotated = the plugin's hadamard+int4 (its own codec), with and without offsets."""
    x = _kv()
    plugin = make_codec("hadamard+int4", "k", 0, None, D, H)
    ours = VariantCodec(rotate=True)
    assert torch.allclose(ours(x), plugin(x), atol=1e-4, rtol=0)
    bf = orthonormal_basis_file(2, H, D)
    off = torch.randn(H, D, generator=torch.Generator().manual_seed(1))
    bf.offsets = {"k": [off, off], "v": [off, off]}
    plugin = make_codec("hadamard+int4", "k", 1, bf, D, H)
    ours = VariantCodec(offset=off, rotate=True)
    assert torch.allclose(ours(x), plugin(x), atol=1e-4, rtol=0)


def test_transforms_alone_are_exact():
    x = _kv()
    s = torch.rand(H, D, generator=torch.Generator().manual_seed(2)) + 0.1
    c = torch.randn(H, D, generator=torch.Generator().manual_seed(3))
    y = VariantCodec(offset=c, smooth=s, rotate=True, quant="none")(x)
    assert torch.allclose(y, x, atol=1e-4)


def test_exact_prefix_keeps_the_first_tokens():
    x = _kv()
    y = VariantCodec(exact_prefix=4)(x)
    assert torch.equal(y[:4], x[:4])
    assert not torch.allclose(y[4:], x[4:])
    assert torch.equal(y[4:], VariantCodec()(x)[4:])


def test_int4_levels_and_groups():
    x = _kv(outliers=True).reshape(-1, D)
    for group, sym in ((None, False), (32, False), (32, True), (16, True)):
        y = int4_fake_quant(x, group, sym)
        g = group or D
        for row_x, row_y in zip(x.reshape(-1, g)[:20], y.reshape(-1, g)[:20]):
            assert row_y.unique().numel() <= (15 if sym else 16)
            assert float((row_y - row_x).abs().max()) <= float(row_x.abs().max()) / 7 + 1e-3
    # smaller groups never do worse on data with a few large channels
    e64 = (int4_fake_quant(x) - x).pow(2).mean()
    e32 = (int4_fake_quant(x, 32) - x).pow(2).mean()
    assert e32 < e64
    # an all-zero vector stays zero
    assert torch.equal(int4_fake_quant(torch.zeros(2, D), 32, True), torch.zeros(2, D))


def test_bytes():
    assert int4_bytes(64) == 36  # the plugin's hadamard+int4: 32 payload + fp16 scale + fp16 zero
    assert int4_bytes(64, 32) == 40
    assert int4_bytes(64, 32, symmetric=True) == 36
    assert int4_bytes(64, None, symmetric=True) == 34
    c = VariantCodec(exact_prefix=1)
    assert c.bytes_per_token(D, H) == 36 * H
    assert abs(c.bytes_per_token(D, H, context=1024) - (36 * H + (128 - 36) * H / 1024)) < 1e-9


def test_tied_scales_commute_with_rope():
    x = _kv().double()
    s = tie_rope_pairs(torch.rand(H, D, generator=torch.Generator().manual_seed(4)).double() + 0.2)
    pos = torch.arange(x.shape[0])
    a = cal.apply_rope(x / s, pos, 10000.0)
    b = cal.apply_rope(x, pos, 10000.0) / s
    assert torch.allclose(a, b, atol=1e-10)


def test_smoothing_scales():
    m = torch.rand(2, H, D, generator=torch.Generator().manual_seed(5)) + 0.01
    for alpha in (0.5, 1.0):
        s = smoothing_scales(m, alpha)
        assert torch.allclose(s.log().mean(-1), torch.zeros(2, H), atol=1e-5)
        ratio = s / m.pow(alpha / 2)  # proportional to E[x^2]^(alpha/2) per head
        assert torch.allclose(ratio, ratio[..., :1].expand_as(ratio), rtol=1e-4)
    assert torch.allclose(smoothing_scales(m, 0.0), torch.ones(2, H, D))
    w = torch.rand(2, H, D, generator=torch.Generator().manual_seed(6)) + 0.01
    s = smoothing_scales(m, 0.5, weight=w)
    ratio = s / (m / w).pow(0.25)
    assert torch.allclose(ratio, ratio[..., :1].expand_as(ratio), rtol=1e-4)


def test_exact_prefix_wrapper():
    from vllm_lowrank.quantsim import ExactPrefix

    x = _kv()
    plugin = make_codec("int8", "v", 0, None, D, H)
    y = ExactPrefix(plugin, 2)(x)
    assert torch.equal(y[:2], x[:2]) and torch.equal(y[2:], plugin(x)[2:].float())


@pytest.mark.parametrize("window,prefix", [(1, 0), (5, 0), (64, 0), (3, 2), (0, 1)])
def test_recent_window_attention_against_float64(window, prefix):
    """The simulation's recent-window cache: query t reads its last ``window`` positions exact, older
    ones compressed; checked against a per-query float64 loop (and window >= T is exact attention)."""
    from vllm_lowrank.simulate import _recent_window_attention

    g = torch.Generator().manual_seed(torch.seed() % (2**31))
    b, hq, h, t, d = 1, 6, 2, 23, 16
    q, k, v = (torch.randn(b, n, t, d, generator=g) for n in (hq, h, h))
    kc, vc = k + 0.3 * torch.randn(k.shape, generator=g), v + 0.3 * torch.randn(v.shape, generator=g)
    got = _recent_window_attention(q, kc, vc, k, v, window, 0.25, prefix)
    ref = torch.empty(b, t, hq, d, dtype=torch.float64)
    for i in range(t):
        for head in range(hq):
            kv = head // (hq // h)
            keys = torch.stack([(k if i - j < window or j < prefix else kc)[0, kv, j] for j in range(i + 1)]).double()
            vals = torch.stack([(v if i - j < window or j < prefix else vc)[0, kv, j] for j in range(i + 1)]).double()
            p = (keys @ q[0, head, i].double() * 0.25).softmax(0)
            ref[0, i, head] = p @ vals
    assert torch.allclose(got.double(), ref, atol=1e-5, rtol=0)
    exact = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1),
                                                             is_causal=True, scale=0.25).transpose(1, 2)
    assert torch.allclose(_recent_window_attention(q, kc, vc, k, v, t, 0.25), exact, atol=1e-5, rtol=0)
    assert not torch.allclose(got, exact, atol=1e-3, rtol=0) or window >= t


def test_simulator_reads_a_layered_cache(smollm2):
    """The simulator's ``exact_window``/``exact_sink`` (the plugin's settings, used by sensitivity sweeps
    for layered caches): a window covering every position removes the loss of a lossy plan, a short one
    with the first token removes part of it."""
    from vllm_lowrank.simulate import Simulator

    sim = Simulator(smollm2)
    g = torch.Generator().manual_seed(torch.seed() % (2**31))
    t = 40
    sim.prepare([torch.randint(100, 20000, (t,), generator=g).tolist()])
    sim.set_plan({i: ("hadamard+int4", "hadamard+int4") for i in range(sim.num_layers)})
    lossy = sim.run(0)["kl"]
    sim.exact_window, sim.exact_sink = 8, 1
    partial = sim.run(0)["kl"]
    sim.exact_window, sim.exact_sink = t, 0
    exact = sim.run(0)["kl"]
    assert lossy > 1e-3
    assert exact < 1e-4 * lossy, (exact, lossy)
    assert 10 * exact < partial < lossy, (exact, partial, lossy)
