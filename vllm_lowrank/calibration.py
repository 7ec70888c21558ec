"""Calibration statistics, eigen-decomposition and rank selection.

Statistics (float64, per layer and KV head, memory independent of the number of tokens):

- ``kk`` = sum k k^T and ``k_sum`` = sum k of post-RoPE keys (what the backend stores);
- ``kp`` / ``kp_sum``: the same for pre-RoPE keys (RoPE undone with each token's position);
- ``vv`` / ``v_sum`` for values;
- ``qq`` = sum q q^T of the post-RoPE queries of the query heads that read this KV head (GQA group),
  and ``qp``: the same pre-RoPE;
- ``count``: tokens seen per layer.

Inside vLLM the backend's calibration mode calls :func:`observe` from every attention forward (worker
process); the module-level registry holds the sums, and :func:`rpc_collect` (run through
``llm.collective_rpc``) brings them back as a :class:`Statistics`. The same :class:`Accumulator` is
fed by the PyTorch simulations.

Bases: eigenvectors of the (optionally centred) second moment, by descending eigenvalue (Eckart-Young).
A query-aware key basis minimises the error of the scores ``q.k`` rather than of ``k``; see
:func:`key_basis`. Ranks: :func:`uniform_ranks`, :func:`energy_ranks`, :func:`budget_ranks` (one global
byte budget by largest eigenvalue per byte) and, by measured loss, :mod:`vllm_lowrank.sensitivity`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .basis import BasisFile

DTYPE = torch.float64
STAT_KEYS = ("kk", "k_sum", "kp", "kp_sum", "vv", "v_sum", "qq", "qp")


# ---------------------------------------------------------------------------------------------------
# RoPE (neox style, rotate-half: what vLLM's Llama uses)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [N, D/2] (float64) for neox-style RoPE with base ``theta``."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim))
    f = positions.to(torch.float32)[:, None] * inv[None, :]
    return f.cos().to(DTYPE), f.sin().to(DTYPE)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, theta: float, inverse: bool = False) -> torch.Tensor:
    """Rotate x [N, H, D] by RoPE at ``positions`` [N] (neox rotate-half); ``inverse`` undoes it."""
    d = x.shape[-1]
    cos, sin = rope_cos_sin(positions, d, theta)
    cos, sin = cos[:, None, :], sin[:, None, :]
    if inverse:
        sin = -sin
    x = x.to(DTYPE)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


# ---------------------------------------------------------------------------------------------------
# accumulation


@dataclass
class Statistics:
    """Per-layer sums; tensors are [L, H, D, D] (second moments) or [L, H, D] (sums), float64."""

    sums: dict[str, torch.Tensor]
    count: torch.Tensor  # [L] tokens per layer
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return self.sums["kk"].shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.sums["kk"].shape[1]

    @property
    def head_dim(self) -> int:
        return self.sums["kk"].shape[-1]

    def second_moment(self, name: str, centered: bool = False) -> torch.Tensor:
        """E[x x^T] [L, H, D, D] of ``k`` (post-RoPE), ``kp`` (pre-RoPE), ``v`` or ``q``/``qp``;
        ``centered`` subtracts the mean (covariance)."""
        key = {"k": "kk", "kp": "kp", "v": "vv", "q": "qq", "qp": "qp"}[name]
        n = self.count.clamp_min(1).to(DTYPE)[:, None, None, None]
        m = self.sums[key] / n
        if key in ("qq", "qp"):
            m = m / max(1, self.meta.get("group", 1))
        if centered:
            mu = self.mean(name)
            m = m - mu[..., :, None] * mu[..., None, :]
        return m

    def mean(self, name: str) -> torch.Tensor:
        key = {"k": "k_sum", "kp": "kp_sum", "v": "v_sum"}[name]
        return self.sums[key] / self.count.clamp_min(1).to(DTYPE)[:, None, None]

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        t = {k: v.contiguous() for k, v in self.sums.items()}
        t["count"] = self.count.to(DTYPE)
        save_file(t, str(path), metadata={"lowrank_stats": json.dumps(self.meta)})

    @staticmethod
    def load(path: str | Path) -> "Statistics":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("lowrank_stats", "{}"))
            t = {k: f.get_tensor(k) for k in f.keys()}
        count = t.pop("count").round().long()
        return Statistics({k: v.to(DTYPE) for k, v in t.items()}, count, meta)

    def to_dtype(self, dtype: torch.dtype) -> "Statistics":
        return Statistics({k: v.to(dtype) for k, v in self.sums.items()}, self.count, dict(self.meta))

    def merge(self, other: "Statistics") -> "Statistics":
        return Statistics({k: self.sums[k] + other.sums[k] for k in self.sums}, self.count + other.count,
                          dict(self.meta))


class Accumulator:
    """Float64 running sums per layer (created on first sight of a layer)."""

    def __init__(self, rope_theta: float | None = None, pre_rope: bool = True) -> None:
        self.rope_theta = rope_theta
        self.pre_rope = pre_rope and rope_theta is not None
        self.layers: dict[int, dict[str, torch.Tensor]] = {}
        self.count: dict[int, int] = {}
        self.group = 1

    def observe(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                positions: torch.Tensor | None) -> None:
        """Add tokens: q [N, Hq, D] and k [N, H, D] post-RoPE, v [N, H, D], positions [N]."""
        n, h, d = k.shape
        if n == 0:
            return
        group = q.shape[1] // h
        self.group = group
        st = self.layers.get(layer)
        if st is None:
            st = {key: torch.zeros((h, d, d) if key in ("kk", "kp", "vv", "qq", "qp") else (h, d), dtype=DTYPE)
                  for key in STAT_KEYS}
            self.layers[layer] = st
            self.count[layer] = 0
        k64, v64 = k.detach().to("cpu", DTYPE), v.detach().to("cpu", DTYPE)
        q64 = q.detach().to("cpu", DTYPE).reshape(n, h, group, d)
        st["kk"] += torch.einsum("nhd,nhe->hde", k64, k64)
        st["k_sum"] += k64.sum(0)
        st["vv"] += torch.einsum("nhd,nhe->hde", v64, v64)
        st["v_sum"] += v64.sum(0)
        st["qq"] += torch.einsum("nhgd,nhge->hde", q64, q64)
        if self.pre_rope and positions is not None:
            pos = positions.detach().to("cpu").reshape(-1)[:n]
            kp = apply_rope(k64, pos, self.rope_theta, inverse=True)
            qp = apply_rope(q64.reshape(n, h * group, d), pos, self.rope_theta, inverse=True).reshape(n, h, group, d)
            st["kp"] += torch.einsum("nhd,nhe->hde", kp, kp)
            st["kp_sum"] += kp.sum(0)
            st["qp"] += torch.einsum("nhgd,nhge->hde", qp, qp)
        self.count[layer] += n

    def statistics(self, meta: dict[str, Any] | None = None) -> Statistics:
        if not self.layers:
            raise RuntimeError("no statistics were accumulated: was the backend run with 'calibrate': true?")
        ls = sorted(self.layers)
        if ls != list(range(len(ls))):
            raise RuntimeError(f"statistics for layers {ls}: some layers were never observed")
        sums = {key: torch.stack([self.layers[i][key] for i in ls]) for key in STAT_KEYS}
        m = {"group": self.group, "rope_theta": self.rope_theta, "pre_rope": self.pre_rope, **(meta or {})}
        return Statistics(sums, torch.tensor([self.count[i] for i in ls]), m)

    def reset(self) -> None:
        self.layers.clear()
        self.count.clear()


# the registry the backend writes to inside a vLLM worker
_REGISTRY = Accumulator()


def configure(rope_theta: float | None, pre_rope: bool = True) -> None:
    global _REGISTRY
    _REGISTRY = Accumulator(rope_theta, pre_rope)


def observe(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor | None) -> None:
    """Called by the backend's forward when ``calibrate`` is on."""
    _REGISTRY.observe(layer, q, k, v, positions)


def registry() -> Accumulator:
    return _REGISTRY


# callables for ``llm.collective_rpc`` (each runs in a worker, with the worker as first argument)


def rpc_configure(worker: Any, rope_theta: float | None, pre_rope: bool = True) -> bool:
    configure(rope_theta, pre_rope)
    return True


def rpc_reset(worker: Any) -> bool:
    _REGISTRY.reset()
    return True


def rpc_collect(worker: Any) -> dict[str, Any]:
    """The worker's sums as plain tensors (float64) and counts."""
    st = _REGISTRY.statistics()
    return {"sums": {k: v.clone() for k, v in st.sums.items()}, "count": st.count.clone(), "meta": st.meta}


def statistics_from_rpc(results: list[dict[str, Any]], meta: dict[str, Any] | None = None) -> Statistics:
    """Merge the per-worker results of :func:`rpc_collect` (one worker without tensor parallelism)."""
    if len(results) != 1:
        raise NotImplementedError("calibration collects from one worker; run it with tensor_parallel_size=1")
    r = results[0]
    return Statistics({k: torch.as_tensor(v).to(DTYPE) for k, v in r["sums"].items()},
                      torch.as_tensor(r["count"]).long(), {**r["meta"], **(meta or {})})


# ---------------------------------------------------------------------------------------------------
# spectra and bases


def eig_desc(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending, clamped at 0) and eigenvectors (columns) of symmetric m [..., D, D]."""
    w, u = torch.linalg.eigh(0.5 * (m + m.transpose(-1, -2)))
    return w.flip(-1).clamp_min(0), u.flip(-1)


def effective_rank(eigs: torch.Tensor, energy: float = 0.99) -> torch.Tensor:
    """Smallest r with sum(eigs[:r]) >= energy * sum(eigs), per row of [..., D] (descending eigs)."""
    c = eigs.cumsum(-1) / eigs.sum(-1, keepdim=True).clamp_min(1e-300)
    return (c < energy - 1e-12).sum(-1) + 1


def stable_rank(eigs: torch.Tensor) -> torch.Tensor:
    """||A||_F^2 / ||A||_2^2 from the eigenvalues of A^T A (= sum / max)."""
    return eigs.sum(-1) / eigs.amax(-1).clamp_min(1e-300)


def retained_energy(eigs: torch.Tensor, rank: int | torch.Tensor) -> torch.Tensor:
    """Fraction of sum(eigs) in the first ``rank`` eigenvalues."""
    c = eigs.cumsum(-1) / eigs.sum(-1, keepdim=True).clamp_min(1e-300)
    r = torch.as_tensor(rank, device=eigs.device).clamp(1, eigs.shape[-1]) - 1
    if r.ndim == 0:
        return c[..., r]
    return c.gather(-1, r[..., None].expand(*c.shape[:-1], 1).long()).squeeze(-1)


def score_error(p: torch.Tensor, ck: torch.Tensor, cq: torch.Tensor) -> torch.Tensor:
    """E[(q.k - q.P P^T k)^2] = tr(Pi Cq Pi Ck), Pi = I - P P^T, for independent q and k; p [..., D, r]."""
    d = ck.shape[-1]
    pi = torch.eye(d, dtype=ck.dtype) - p @ p.transpose(-1, -2)
    return torch.einsum("...ij,...jk,...kl,...li->...", pi, cq, pi, ck)


def key_basis(ck: torch.Tensor, cq: torch.Tensor | None = None, method: str = "query") -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal key basis [..., D, D] (columns nested: any prefix is a rank-r basis) and the
    eigenvalues of Ck that go with it (Ck's spectrum, descending, kept for the file's energy figures).

    ``pca``: eigenvectors of Ck. ``query``: eigenvectors of the symmetrised score-error weight
    ``(Cq Ck + Ck Cq) / 2``, the first-order term of :func:`score_error` (a nested approximation of the
    basis that minimises the error of q.k), each head falling back to PCA at the ranks where that is
    better (checked at r = D/4, D/2, 3D/4: the head keeps the basis with the smaller mean score error).
    """
    eigs, u = eig_desc(ck)
    if method == "pca" or cq is None:
        return u, eigs
    if method != "query":
        raise ValueError(f"unknown key basis method {method!r}: 'pca' or 'query'")
    # scale-free: normalise Cq so that its trace matches Ck's
    cqn = cq * (ck.diagonal(dim1=-2, dim2=-1).sum(-1) / cq.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(1e-300))[..., None, None]
    m = 0.5 * (cqn @ ck + ck @ cqn)
    _, uq = eig_desc(m)
    d = ck.shape[-1]
    err_p = sum(score_error(u[..., :r], ck, cq) for r in (d // 4, d // 2, 3 * d // 4))
    err_q = sum(score_error(uq[..., :r], ck, cq) for r in (d // 4, d // 2, 3 * d // 4))
    use_q = (err_q < err_p)[..., None, None]
    return torch.where(use_q, uq, u), eigs


@dataclass
class Bases:
    """Per layer: K and V bases [L, H, D, D], Ck/Cv spectra [L, H, D], offsets [L, H, D] or None."""

    k: torch.Tensor
    v: torch.Tensor
    k_eigs: torch.Tensor
    v_eigs: torch.Tensor
    k_offset: torch.Tensor | None
    v_offset: torch.Tensor | None
    k_colvar: torch.Tensor | None = None  # [L, H, D] diag(U^T C U): energy captured by each basis column
    v_colvar: torch.Tensor | None = None
    k_smooth: torch.Tensor | None = None  # [L, H, D] query-weighted key smoothing scales (key_smoothing_scales)
    k_smooth_raw: torch.Tensor | None = None  # the same from raw (uncentred) moments, for keys without offsets

    def column_energy(self, t: str) -> torch.Tensor:
        """Energy per basis column [L, H, D] (equals the eigenvalues for a PCA basis)."""
        c = self.k_colvar if t == "k" else self.v_colvar
        return c if c is not None else (self.k_eigs if t == "k" else self.v_eigs)


def key_smoothing_scales(stats: Statistics, alpha: float = 0.5, centered: bool = True) -> torch.Tensor:
    """Query-weighted key smoothing scales [L, H, D] (float32, positive): per layer, KV head and
    post-RoPE channel, ``s_i = (E[k_i^2] / E[q_i^2])^(alpha/2)`` (``alpha = 0.5``: the fourth root),
    ``E[k_i^2]`` the keys' second moment about the calibrated mean when ``centered`` (what is left after
    the offsets), ``E[q_i^2]`` the mean over the query heads of the KV head's group; normalised to
    geometric mean 1 per head (per-token scales make the overall size irrelevant).

    Why: after the Hadamard rotation the int4 error is about isotropic and proportional to the smoothed
    key ``k / s``; the expected score error ``sum_i E[q_i^2] s_i^2 * sum_j E[k_j^2] / s_j^2`` is
    smallest at ``s_i^2 ~ sqrt(E[k_i^2] / E[q_i^2])`` (EVALUATION.md; :func:`vllm_lowrank.quantsim.smoothing_scales`).
    """
    m = stats.second_moment("k", centered).diagonal(dim1=-2, dim2=-1).clamp_min(1e-12)
    w = stats.second_moment("q").diagonal(dim1=-2, dim2=-1).clamp_min(1e-12)
    sc = (m / w).pow(alpha / 2)
    sc = sc / sc.log().mean(-1, keepdim=True).exp()
    return sc.float()


def compute_bases(stats: Statistics, key_method: str = "query", centered: bool = True,
                  smooth_alpha: float | None = 0.5) -> Bases:
    """Eigenbases of K (post-RoPE; query-aware by default) and V; ``centered`` subtracts the calibrated
    means (stored as offsets: exact under attention, see DESIGN.md) before the decomposition;
    ``smooth_alpha``: also the query-weighted key smoothing scales (:func:`key_smoothing_scales`; None: none).
    The bases are those of the unsmoothed keys (smoothing is meant for rotated, quantized keys)."""
    ck = stats.second_moment("k", centered)
    cv = stats.second_moment("v", centered)
    cq = stats.second_moment("q") if key_method == "query" else None
    kb, ke = key_basis(ck, cq, key_method)
    ve, vb = eig_desc(cv)
    ko = stats.mean("k") if centered else None
    vo = stats.mean("v") if centered else None
    kc = torch.einsum("lhdr,lhde,lher->lhr", kb, ck, kb)
    ks = None if smooth_alpha is None else key_smoothing_scales(stats, smooth_alpha, centered)
    kr = None if smooth_alpha is None or not centered else key_smoothing_scales(stats, smooth_alpha, False)
    return Bases(kb, vb, ke, ve, ko, vo, kc, ve, ks, kr)


# ---------------------------------------------------------------------------------------------------
# rank selection


def round_rank(r: int | float, multiple: int, d: int) -> int:
    """Round up to a multiple of ``multiple`` (at least ``multiple``), at most d."""
    if multiple <= 1:
        return int(min(max(1, math.ceil(r)), d))
    return int(min(d, max(multiple, math.ceil(r / multiple) * multiple)))


def uniform_ranks(num_layers: int, rank_k: int, rank_v: int | None = None) -> dict[str, list[int]]:
    return {"k": [int(rank_k)] * num_layers, "v": [int(rank_v if rank_v is not None else rank_k)] * num_layers}


def energy_ranks(eigs: dict[str, torch.Tensor], energy: float = 0.99, multiple: int = 8,
                 per_head: bool = False) -> dict[str, Any]:
    """Per layer (max over heads, since a layer has one format) or per head: the smallest rank keeping
    ``energy`` of the spectrum, rounded up to ``multiple``. ``eigs[t]`` is [L, H, D]."""
    out: dict[str, Any] = {}
    for t, e in eigs.items():
        r = effective_rank(e, energy)  # [L, H]
        d = e.shape[-1]
        if per_head:
            out[t] = [[round_rank(int(x), multiple, d) for x in row] for row in r.tolist()]
        else:
            out[t] = [round_rank(int(x), multiple, d) for x in r.amax(-1).tolist()]
    return out


def rank_bytes(rank: int, num_kv_heads: int, elem_bytes: float) -> float:
    return rank * num_kv_heads * elem_bytes


def budget_ranks(eigs: dict[str, torch.Tensor], budget_bytes: int, elem_bytes: int = 2, multiple: int = 8,
                 min_rank: int | None = None, normalize: bool = True) -> dict[str, list[int]]:
    """One global budget of payload bytes per token (all layers, KV heads, K and V) allocated greedily by
    largest eigenvalue per byte, in steps of ``multiple`` columns per layer and tensor (all heads of a
    layer share a rank). ``normalize``: eigenvalues as fractions of each (layer, tensor)'s total, so
    that K and V and all layers weigh alike. With equal step costs and descending eigenvalues the greedy
    choice is optimal for the retained energy. Uses exactly ``budget_bytes`` when it is a multiple of one
    step (``multiple * H * elem_bytes``); never more.
    """
    min_rank = multiple if min_rank is None else min_rank
    ts = list(eigs)
    num_layers, h, d = eigs[ts[0]].shape
    step_cost = multiple * h * elem_bytes
    ranks = {t: [min_rank] * num_layers for t in ts}
    used = sum(rank_bytes(min_rank, h, elem_bytes) for t in ts for _ in range(num_layers))
    if used > budget_bytes:
        raise ValueError(f"budget {budget_bytes} B is below the minimum of rank {min_rank} everywhere ({used} B)")
    gains = {}
    for t in ts:
        e = eigs[t].to(DTYPE)
        if normalize:
            e = e / e.sum(-1, keepdim=True).clamp_min(1e-300)
        gains[t] = e.sum(1)  # [L, D]: summed over the heads that share the rank
    import heapq

    def gain(t: str, i: int, r: int) -> float:
        return float(gains[t][i, r:r + multiple].sum())

    heap = [(-gain(t, i, min_rank), t, i) for t in ts for i in range(num_layers) if min_rank < d]
    heapq.heapify(heap)
    while heap and used + step_cost <= budget_bytes + 1e-9:
        _, t, i = heapq.heappop(heap)
        ranks[t][i] = min(d, ranks[t][i] + multiple)
        used += step_cost
        if ranks[t][i] < d:
            heapq.heappush(heap, (-gain(t, i, ranks[t][i]), t, i))
    return ranks


def total_retained(eigs: dict[str, torch.Tensor], ranks: dict[str, list[int]]) -> float:
    """Mean over layers, heads and K/V of the retained energy fraction."""
    vals = []
    for t, e in eigs.items():
        r = torch.tensor(ranks[t])[:, None].expand(e.shape[0], e.shape[1])
        vals.append(retained_energy(e, r).mean())
    return float(torch.stack(vals).mean())


def payload_bytes(ranks: dict[str, list[int]], num_kv_heads: int, elem_bytes: int = 2) -> int:
    return int(sum(r * num_kv_heads * elem_bytes for t in ranks for r in ranks[t]))


# ---------------------------------------------------------------------------------------------------
# the basis file


def make_basis_file(stats: Statistics, bases: Bases, ranks: dict[str, list[int]], store_rank: int | None = None,
                    model: str = "", calibration: dict[str, Any] | None = None,
                    store_per_layer: dict[str, list[int]] | None = None,
                    key_smoothing: dict[str, Any] | None = None) -> BasisFile:
    """A :class:`BasisFile` keeping, per layer and tensor, the chosen rank's columns (any smaller rank can
    be used too), or ``store_rank`` columns, or ``store_per_layer[t][i]``. Ranks above the stored columns
    are clipped in the file's ``ranks`` (the unclipped ones go to ``chosen_ranks``)."""
    num_layers, h, d = stats.num_layers, stats.num_kv_heads, stats.head_dim
    b: dict[str, list[torch.Tensor]] = {"k": [], "v": []}
    e: dict[str, list[torch.Tensor]] = {"k": [], "v": []}
    o: dict[str, list[torch.Tensor | None]] = {"k": [], "v": []}
    energy: dict[str, list[float]] = {"k": [], "v": []}
    ranks = {t: list(ranks[t]) for t in ranks}
    chosen: dict[str, list[int]] = {}
    for t, basis, eigs, off in (("k", bases.k, bases.k_eigs, bases.k_offset), ("v", bases.v, bases.v_eigs, bases.v_offset)):
        col = bases.column_energy(t)
        for i in range(num_layers):
            keep = store_rank or ranks[t][i]
            if store_per_layer is not None:
                keep = store_per_layer[t][i]
            keep = max(1, min(d, keep))
            if ranks[t][i] > keep:  # the file's ranks never exceed its stored columns
                chosen.setdefault(t, list(ranks[t]))
                ranks[t][i] = keep
            b[t].append(basis[i, :, :, :keep].float().contiguous())
            e[t].append(eigs[i].float().contiguous())
            o[t].append(None if off is None else off[i].float().contiguous())
            energy[t].append(round(float((col[i, :, :ranks[t][i]].sum(-1) / eigs[i].sum(-1)).mean()), 6))
    extra = {"retained_energy": energy, "calibration": calibration or {}}
    if chosen:
        extra["chosen_ranks"] = {t: chosen.get(t, ranks[t]) for t in ("k", "v")}
    smooth = smooth_raw = None
    if bases.k_smooth is not None:
        smooth = [bases.k_smooth[i].float().contiguous() for i in range(num_layers)]
        if bases.k_smooth_raw is not None:
            smooth_raw = [bases.k_smooth_raw[i].float().contiguous() for i in range(num_layers)]
        extra["key_smoothing"] = key_smoothing if key_smoothing is not None else {
            "weight": "query", "formula": "(E[k^2]/E[q^2])^(alpha/2), geometric mean 1 per head"}
    return BasisFile(num_layers, h, d, b, e, o, ranks, model, "post_rope", extra, smooth=smooth,
                     smooth_raw=smooth_raw)


# ---------------------------------------------------------------------------------------------------
# bases optimised for one rank: minimise the error that attention actually sees


def optimize_basis(c: torch.Tensor, w: torch.Tensor, rank: int, iters: int = 300,
                   init: torch.Tensor | None = None) -> torch.Tensor:
    """Orthonormal basis [..., D, D] whose first ``rank`` columns span the subspace minimising
    ``tr(Pi W Pi C)`` (Pi = I - P P^T), by Riemannian gradient descent on the Grassmannian from PCA.

    Keys: C = Ck (centred), W = Cq: the error of the scores q.k. Values: C = Cv, W = sum over the query
    heads of the group of Wo_h^T Wo_h: the error after the output projection. The remaining columns
    are the PCA of C in the orthogonal complement (so smaller ranks are still usable, though only
    ``rank`` is optimised).
    """
    c = c.to(DTYPE)
    w = w.to(DTYPE)
    d = c.shape[-1]
    eye = torch.eye(d, dtype=DTYPE)
    if init is None:
        _, u = eig_desc(c)
        init = u[..., :rank]
    p = init.to(DTYPE)
    for _ in range(iters):
        pi = eye - p @ p.transpose(-1, -2)
        g = w @ pi @ c + c @ pi @ w
        grad = -2 * pi @ g @ p
        step = 0.5 / (torch.linalg.matrix_norm(g, 2)[..., None, None] + 1e-300)
        p, _ = torch.linalg.qr(p - step * grad)
    pi = eye - p @ p.transpose(-1, -2)
    _, rest = eig_desc(pi @ c @ pi)
    full = torch.cat((p, rest[..., : d - rank]), -1)
    q, r = torch.linalg.qr(full)  # re-orthonormalise; keep column signs
    return q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[..., None, :]


def output_weight(o_proj: torch.Tensor, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """[H, D, D]: sum over the query heads reading each KV head of Wo_h^T Wo_h (o_proj [hidden, Hq*D])."""
    hq = o_proj.shape[1] // head_dim
    g = hq // num_kv_heads
    wo = o_proj.to(DTYPE).view(o_proj.shape[0], hq, head_dim)
    per = torch.einsum("ohd,ohe->hde", wo, wo)  # [Hq, D, D]
    return per.view(num_kv_heads, g, head_dim, head_dim).sum(1)


def rank_optimized_bases(stats: Statistics, rank: int, o_projs: list[torch.Tensor] | None,
                         iters: int = 300, smooth_alpha: float | None = 0.5) -> Bases:
    """Bases whose first ``rank`` columns are optimised for attention (K: scores; V: output, when the
    output projections are given, else PCA); offsets = calibrated means."""
    ck = stats.second_moment("k", True)
    cv = stats.second_moment("v", True)
    cq = stats.second_moment("q")
    kb = optimize_basis(ck, cq, rank, iters)
    if o_projs is not None:
        wv = torch.stack([output_weight(o, stats.num_kv_heads, stats.head_dim) for o in o_projs])
        vb = optimize_basis(cv, wv, rank, iters)
    else:
        _, vb = eig_desc(cv)
    ke, _ = eig_desc(ck)
    ve, _ = eig_desc(cv)
    kc = torch.einsum("lhdr,lhde,lher->lhr", kb, ck, kb)
    vc = torch.einsum("lhdr,lhde,lher->lhr", vb, cv, vb)
    ks = None if smooth_alpha is None else key_smoothing_scales(stats, smooth_alpha, True)
    kr = None if smooth_alpha is None else key_smoothing_scales(stats, smooth_alpha, False)
    return Bases(kb, vb, ke, ve, stats.mean("k"), stats.mean("v"), kc, vc, ks, kr)


