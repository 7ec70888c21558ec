"""Calibration: statistics, bases and ranks, the basis file, plan choice, and the evaluation harness."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch

from vllm_lowrank import calibration as cal
from vllm_lowrank.basis import BasisFile, BasisFileError
from vllm_lowrank.config import LowRankConfigError, ModelShape, parse

REPO = Path(__file__).resolve().parent.parent
BASIS = REPO / "bases" / "smollm2-135m.safetensors"
PLANS = REPO / "bases" / "smollm2-135m.plans.json"
RING_PLANS = REPO / "bases" / "smollm2-135m.ring.plans.json"


def _subspace(d: int, r: int, g: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return q[:, :r]


def _synthetic_stats(num_layers=2, h=2, d=16, hq_group=2, rk=5, rv=3, rp=4, n=3000, theta=10000.0, seed=0):
    """Accumulate tokens whose post-RoPE keys have rank rk, values rank rv, pre-RoPE keys of a second set
    rank rp (the post-RoPE keys of that set are full rank: RoPE mixes them with the position)."""
    g = torch.Generator().manual_seed(seed)
    acc = cal.Accumulator(rope_theta=theta)
    truth = {}
    for layer in range(num_layers):
        uk = torch.stack([_subspace(d, rk, g) for _ in range(h)])  # [H, D, rk]
        uv = torch.stack([_subspace(d, rv, g) for _ in range(h)])
        truth[layer] = (uk, uv)
        for chunk in range(3):
            m = n // 3
            pos = torch.randint(0, 4096, (m,), generator=g)
            k = torch.einsum("hdr,nhr->nhd", uk, torch.randn(m, h, rk, generator=g, dtype=torch.float64) * torch.linspace(3, 1, rk, dtype=torch.float64))
            v = torch.einsum("hdr,nhr->nhd", uv, torch.randn(m, h, rv, generator=g, dtype=torch.float64))
            q = torch.randn(m, h * hq_group, d, generator=g, dtype=torch.float64)
            acc.observe(layer, q.float(), k.float(), v.float(), pos)
    return acc, truth


def test_synthetic_rank_and_subspace_recovered():
    acc, truth = _synthetic_stats()
    st = acc.statistics()
    assert st.count.tolist() == [3000, 3000]
    bases = cal.compute_bases(st, key_method="pca", centered=False)
    ranks = cal.energy_ranks({"k": bases.k_eigs, "v": bases.v_eigs}, energy=0.9999, multiple=1, per_head=True)
    assert ranks["k"] == [[5, 5], [5, 5]]
    assert ranks["v"] == [[3, 3], [3, 3]]
    for layer, (uk, uv) in truth.items():
        for u, b, r in ((uk, bases.k[layer], 5), (uv, bases.v[layer], 3)):
            p = b[..., :r]
            err = (p @ p.transpose(-1, -2) - u @ u.transpose(-1, -2)).norm(dim=(-2, -1))
            assert float(err.max()) < 1e-6
    # the query-aware basis spans the same subspace when K is exactly of rank 5
    kb, _ = cal.key_basis(st.second_moment("k"), st.second_moment("q"), "query")
    p = kb[0, :, :, :5]
    assert float((p @ p.transpose(-1, -2) - truth[0][0] @ truth[0][0].transpose(-1, -2)).norm()) < 1e-6


def test_pre_rope_rank_recovered_from_post_rope_keys():
    """Keys of rank 4 before RoPE, observed after RoPE (full rank there), are found of rank 4 pre-RoPE."""
    g = torch.Generator().manual_seed(1)
    h, d, r, n, theta = 2, 16, 4, 4000, 10000.0
    u = torch.stack([_subspace(d, r, g) for _ in range(h)])
    pos = torch.randint(0, 2048, (n,), generator=g)
    kpre = torch.einsum("hdr,nhr->nhd", u, torch.randn(n, h, r, generator=g, dtype=torch.float64))
    kpost = cal.apply_rope(kpre, pos, theta)
    acc = cal.Accumulator(rope_theta=theta)
    acc.observe(0, torch.randn(n, 2 * h, d), kpost.float(), kpost.float(), pos)
    st = acc.statistics()
    e_pre, _ = cal.eig_desc(st.second_moment("kp"))
    e_post, _ = cal.eig_desc(st.second_moment("k"))
    assert cal.effective_rank(e_pre, 0.9999).tolist() == [[r, r]]
    assert all(x > 2 * r for x in cal.effective_rank(e_post, 0.9999)[0].tolist())


def test_rope_matches_vllm():
    """Our neox-style RoPE is vLLM's (Llama) rotary embedding."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import RotaryEmbedding

    d, theta = 64, 100000.0
    with set_current_vllm_config(VllmConfig()):
        rope = RotaryEmbedding(d, d, 4096, theta, True, torch.float32)
    pos = torch.tensor([0, 1, 7, 100, 1023, 4000])
    q = torch.randn(6, 2 * d)
    k = torch.randn(6, d)
    q2, k2 = rope.forward_native(pos, q.clone(), k.clone())
    ours = cal.apply_rope(k.view(6, 1, d), pos, theta).float().view(6, d)
    assert torch.allclose(ours, k2, atol=1e-4)
    back = cal.apply_rope(k2.view(6, 1, d).double(), pos, theta, inverse=True).float().view(6, d)
    assert torch.allclose(back, k, atol=1e-4)


def test_rank_optimised_basis_beats_pca_on_weighted_error():
    """With W = I the optimum is the PCA subspace; with a query weight it lowers tr(Pi W Pi C)."""
    g = torch.Generator().manual_seed(3)
    d, r = 16, 6
    a = torch.randn(2, d, d, generator=g, dtype=torch.float64)
    c = a @ a.transpose(-1, -2) / d
    b = torch.randn(2, d, d, generator=g, dtype=torch.float64) * torch.linspace(2, 0.1, d, dtype=torch.float64)
    w = b @ b.transpose(-1, -2) / d
    _, u = cal.eig_desc(c)
    p_id = cal.optimize_basis(c, torch.eye(d, dtype=torch.float64).expand(2, d, d), r, iters=200)
    proj = lambda m: m[..., :r] @ m[..., :r].transpose(-1, -2)  # noqa: E731
    assert float((proj(p_id) - proj(u)).norm()) < 1e-4
    p_w = cal.optimize_basis(c, w, r, iters=300)
    assert torch.allclose(p_w.transpose(-1, -2) @ p_w, torch.eye(d, dtype=torch.float64).expand(2, d, d), atol=1e-10)
    assert bool((cal.score_error(p_w[..., :r], c, w) < 0.99 * cal.score_error(u[..., :r], c, w)).all())


def _real_eigs() -> dict[str, torch.Tensor]:
    bf = BasisFile.load(BASIS)
    return {t: torch.stack(bf.eigenvalues[t]).double() for t in ("k", "v")}


def test_budget_allocator_exact_and_beats_uniform():
    eigs = _real_eigs()  # the committed SmolLM2 calibration: real spectra [30, 3, 64]
    num_layers, h, d = eigs["k"].shape
    for r in (16, 32, 48):
        uni = cal.uniform_ranks(num_layers, r)
        budget = cal.payload_bytes(uni, h)
        ranks = cal.budget_ranks(eigs, budget, elem_bytes=2, multiple=8)
        assert cal.payload_bytes(ranks, h) == budget  # exactly the budget
        assert all(x % 8 == 0 for t in ranks for x in ranks[t])
        assert cal.total_retained(eigs, ranks) > cal.total_retained(eigs, uni)
    # a budget that is not a multiple of a step is never exceeded
    odd = cal.payload_bytes(cal.uniform_ranks(num_layers, 24), h) + 100
    assert cal.payload_bytes(cal.budget_ranks(eigs, odd), h) <= odd


def test_energy_ranks_real_statistics():
    eigs = _real_eigs()
    r = cal.energy_ranks(eigs, 0.99, multiple=8)
    assert all(x % 8 == 0 and 8 <= x <= 64 for t in r for x in r[t])
    # values are nearly full rank on SmolLM2
    assert sum(r["v"]) / len(r["v"]) >= 56


def test_basis_file_round_trip_and_model_check(tmp_path):
    acc, _ = _synthetic_stats(num_layers=3, h=2, d=16)
    st = acc.statistics()
    bases = cal.compute_bases(st, key_method="query", centered=True)
    ranks = {"k": [8, 16, 8], "v": [16, 8, 8]}
    bf = cal.make_basis_file(st, bases, ranks, model="synthetic", calibration={"text": "random"},
                             store_per_layer={"k": [8, 16, 8], "v": [16, 8, 8]})
    path = tmp_path / "b.safetensors"
    bf.save(path)
    back = BasisFile.load(path)
    assert (back.num_layers, back.num_kv_heads, back.head_dim) == (3, 2, 16)
    assert back.ranks == ranks and back.model == "synthetic"
    assert back.extra["calibration"] == {"text": "random"}
    assert len(back.extra["retained_energy"]["k"]) == 3
    for t in ("k", "v"):
        for i in range(3):
            assert torch.equal(back.bases[t][i], bf.bases[t][i])
            assert back.bases[t][i].shape == (2, 16, ranks[t][i])
            assert torch.allclose(back.offsets[t][i], bf.offsets[t][i])
            b = back.bases[t][i]
            assert torch.allclose(b.transpose(-1, -2) @ b, torch.eye(ranks[t][i]).expand(2, -1, -1), atol=1e-5)
    back.check_model(3, 2, 16)
    # the compact (float16 columns) form loads as float32, within fp16 rounding
    bf.save(tmp_path / "c.safetensors", torch.float16)
    small = BasisFile.load(tmp_path / "c.safetensors")
    assert small.ranks == ranks and small.bases["k"][0].dtype == torch.float32
    assert max(float((small.bases[t][i] - bf.bases[t][i]).abs().max()) for t in ("k", "v") for i in range(3)) < 1e-3
    with pytest.raises(BasisFileError, match="layers: file has 3, model has 30"):
        back.check_model(30, 2, 16)
    with pytest.raises(BasisFileError, match="head_dim"):
        back.check_model(3, 2, 64)
    # through the plugin's settings: a mismatched model is refused with a clear message
    with pytest.raises(LowRankConfigError, match="does not match the model"):
        parse({"format": "lowrank", "rank_k": 8, "rank_v": 8, "basis": str(path)}, ModelShape(30, 3, 64))
    # a rank beyond the stored columns is refused
    with pytest.raises(LowRankConfigError, match="exceeds"):
        parse({"format": "int8", "layers": {"0": {"k": "r16", "v": "int8"}}, "basis": str(path)}, ModelShape(3, 2, 16))


def test_committed_basis_fits_smollm2_and_plans_parse():
    bf = BasisFile.load(BASIS)
    bf.check_model(30, 3, 64)
    assert bf.extra["calibration"]["tokens_per_layer"] > 10_000
    from vllm_lowrank.sensitivity import load_plans, parse_plan, plan_bytes

    checked = 0
    plans = [(name, p) for f in (PLANS, RING_PLANS) for name, p in load_plans(f)["plans"].items()]
    for name, p in plans:
        path = REPO / p.get("basis", str(BASIS))
        if not path.is_file():  # plans that need the full (uncommitted) basis
            assert "out/" in p["basis"], name
            continue
        settings = {"format": "int8", "layers": p["layers"], "basis": str(path), **p.get("settings", {})}
        cfg = parse(settings, ModelShape(30, 3, 64))
        assert len(cfg.overrides) == 30, name
        assert plan_bytes(parse_plan(p["layers"]), 3, 64) == p["bytes_per_token"], name
        checked += 1
    assert checked >= 5
    # the default basis, the 4x plan's and the layered 4x plan's (float16 columns): a few hundred KB each
    assert sum(f.stat().st_size for f in (REPO / "bases").glob("*.safetensors")) < 1_000_000


def test_plan_chooser_meets_budget_and_is_optimal():
    """The knapsack picks the cheapest-loss plan within the budget (checked by brute force, 3 layers)."""
    from vllm_lowrank.sensitivity import choose_plan, plan_bytes

    cands = ("int8", "hadamard+int4", "r32+int4")
    g = torch.Generator().manual_seed(0)
    sens = {"candidates": list(cands), "kl": {}}
    for i in range(3):
        for t in ("k", "v"):
            base = float(torch.rand(1, generator=g)) + 0.1
            sens["kl"][f"{i}.{t}.int8"] = 0.01 * base
            sens["kl"][f"{i}.{t}.hadamard+int4"] = 0.2 * base
            sens["kl"][f"{i}.{t}.r32+int4"] = 2.0 * base * float(torch.rand(1, generator=g))
    h, d = 3, 64
    full = 3 * h * 2 * d * 2
    opts = ["model", *cands]

    def loss(plan):
        return sum(0 if f == "model" else sens["kl"][f"{i}.{t}.{f}"] for i, (kf, vf) in plan.items()
                   for t, f in (("k", kf), ("v", vf)))

    for ratio in (2, 3, 4, 6):
        budget = full // ratio
        plan = choose_plan(sens, budget, 3, h, d)
        assert plan_bytes(plan, h, d) <= budget
        best = min((loss(dict(enumerate(p))) for p in itertools.product(itertools.product(opts, opts), repeat=3)
                    if plan_bytes(dict(enumerate(p)), h, d) <= budget), default=math.inf)
        assert math.isclose(loss(plan), best, rel_tol=1e-12)


def test_layered_plan_chooser_counts_the_ring_and_is_optimal():
    """For a layered cache the plan must hold ``capacity`` times the sequences of L tokens, the ring's
    blocks (set by the layer with the smallest slot) counted: checked against every plan by brute force
    with the plugin's own capacity arithmetic (3 layers, a ring that small slots make costly)."""
    from vllm_lowrank.layered import capacity_ratio
    from vllm_lowrank.sensitivity import choose_layered_plan, choose_plan, plan_config

    cands = ("int8", "hadamard+int4", "r32+int4", "r8+int4")
    g = torch.Generator().manual_seed(torch.seed() % (2**31))
    sens = {"candidates": list(cands), "kl": {}}
    for i in range(3):
        for t in ("k", "v"):
            base = float(torch.rand(1, generator=g)) + 0.1
            for f, scale in zip(cands, (0.01, 0.2, 2.0, 4.0)):
                sens["kl"][f"{i}.{t}.{f}"] = scale * base * (float(torch.rand(1, generator=g)) + 0.5)
    h, d, bs = 3, 64, 16
    opts = ["model", *cands]

    def loss(plan):
        return sum(0 if f == "model" else sens["kl"][f"{i}.{t}.{f}"] for i, (kf, vf) in plan.items()
                   for t, f in (("k", kf), ("v", vf)))

    def capacity(plan, tokens, window, sink, dtype):
        cfg = plan_config(plan, exact_window=window, exact_sink=sink, exact_dtype=dtype)
        return capacity_ratio(cfg, 3, d, torch.bfloat16, bs, tokens)

    all_plans = [dict(enumerate(p)) for p in itertools.product(itertools.product(opts, opts), repeat=3)]
    differs = False
    for tokens, window, sink, dtype, ratio in ((1024, 32, 1, "int8", 4), (1024, 64, 1, "model", 3.5),
                                              (8192, 32, 1, "int8", 6), (256, 16, 0, "int8", 3)):
        plan = choose_layered_plan(sens, ratio, tokens, window, sink, 3, h, d, dtype, bs)
        assert capacity(plan, tokens, window, sink, dtype) >= ratio * (1 - 1e-9)
        best = min(loss(p) for p in all_plans if capacity(p, tokens, window, sink, dtype) >= ratio * (1 - 1e-9))
        assert math.isclose(loss(plan), best, rel_tol=1e-12), (tokens, window, ratio, plan)
        naive = choose_plan(sens, int(3 * h * 2 * d * 2 / ratio), 3, h, d)
        differs |= capacity(naive, tokens, window, sink, dtype) < ratio
    assert differs  # choosing by slot bytes alone misses the capacity in some case


@pytest.mark.vllm
def test_full_format_reproduces_uncompressed_perplexity(smollm2):
    """The plugin's lossless ``full`` format (prefill from cache) gives vLLM's own perplexity."""
    from transformers import AutoTokenizer

    from vllm_lowrank.evaluation import agreement, resolve, run_format
    from vllm_lowrank.textdata import eval_windows

    tok = AutoTokenizer.from_pretrained(str(smollm2))
    windows = eval_windows(tok, 2, 256)
    base = run_format(smollm2, resolve("vllm", None, None), windows, dtype="float32", kv_cache_memory_bytes=64 << 20)
    full = run_format(smollm2, resolve("full", None, None), windows, dtype="float32", kv_cache_memory_bytes=64 << 20)
    assert base.tokens == full.tokens == 2 * 255
    assert abs(full.ppl / base.ppl - 1) < 2e-4, (full.ppl, base.ppl)
    assert agreement(full, base) > 0.99
    assert full.ratio_vs_bf16 == 1.0 and base.ratio_vs_bf16 == 1.0


def test_evaluate_token_windows_round_trip(smollm2, tmp_path):
    """--save-token-windows writes the evaluation windows (for a machine without gensim); --token-windows
    refuses a file with fewer or shorter windows than asked for (before any engine starts)."""
    from transformers import AutoTokenizer

    from vllm_lowrank.evaluate import main
    from vllm_lowrank.textdata import eval_windows

    path = tmp_path / "windows.json"
    assert main(["--model", str(smollm2), "--windows", "3", "--window", "256", "--save-token-windows", str(path)]) == 0
    saved = json.loads(path.read_text())
    assert saved["windows"] == eval_windows(AutoTokenizer.from_pretrained(str(smollm2)), 3, 256)
    for bad in (["--windows", "4", "--window", "256"], ["--windows", "3", "--window", "512"]):
        with pytest.raises(SystemExit):
            main(["--model", str(smollm2), "--token-windows", str(path), *bad])
