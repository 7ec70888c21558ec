"""Simulation-only int4 variants of the KV cache (not plugin formats yet): for :mod:`vllm_lowrank.simulate`.

A :class:`VariantCodec` compresses and decompresses one of K/V [N, H, D] of one layer (a whole window,
token 0 first) as

    y = H^T Q(H ((x - c) / s)) * s + c          (rows < exact_prefix: x unchanged)

with ``c`` an optional calibrated offset [H, D] (the basis file's), ``s`` optional static per-channel
scales [H, D] (key or value smoothing), ``H`` the normalized Hadamard rotation (optional) and ``Q`` an
int4 quantizer per token and head: asymmetric (scale and zero point, fp16) or symmetric (scale only, fp16),
over groups of ``group`` channels (``group = D``: one group, which is the plugin's ``hadamard+int4`` up to
float rounding order: tested). Every step but ``Q`` is exact in infinite precision:

- keys: ``q . (s * k') = (s * q) . k'`` (the query is scaled instead, after RoPE), and ``q . c`` is the
  same for every cached token of a query, so softmax drops it;
- values: the attention output is ``s * (sum_j p_j v'_j) + c`` (the weights sum to one), so ``s`` and ``c``
  fold into ``o_proj`` (columns and bias) and ``v_proj`` (rows and bias).

Per-channel key scales tied across the RoPE pairs ``(i, i + D/2)`` (HF ``rotate_half`` layout) commute with
RoPE, so they fold into the rows of ``q_proj`` and ``k_proj`` with no change to the cache or kernels
(:func:`tie_rope_pairs`).

Bytes per token and KV head of one tensor: :func:`int4_bytes` (payload ``D/2`` plus 2 bytes per scale and
per zero point and group).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .formats import SCALE_DTYPE
from .transforms import hadamard

INT4_LEVELS = 15.0  # asymmetric: q in [0, 15]
INT4_SYM_MAX = 7.0  # symmetric: q in [-7, 7]
_TINY = 1e-8


def _fp16(x: torch.Tensor) -> torch.Tensor:
    return x.to(SCALE_DTYPE).float()


def _scale(x: torch.Tensor) -> torch.Tensor:
    """A scale as stored (fp16), never zero (as :mod:`vllm_lowrank.codec` does)."""
    s = _fp16(x.clamp_min(_TINY))
    return torch.where(s > 0, s, torch.full_like(s, _TINY))


def int4_fake_quant(lat: torch.Tensor, group: int | None = None, symmetric: bool = False) -> torch.Tensor:
    """Quantize ``lat`` [..., D] (float32) to int4 per group of ``group`` consecutive channels (None: all D)
    and back. Asymmetric: ``scale = (max - min) / 15``, ``zero = min``; symmetric: ``scale = absmax / 7``,
    levels -7..7. Scales and zero points are rounded to fp16, as stored."""
    d = lat.shape[-1]
    g = group or d
    if d % g:
        raise ValueError(f"group {g} does not divide {d}")
    x = lat.float().reshape(*lat.shape[:-1], d // g, g)
    if symmetric:
        scale = _scale(x.abs().amax(-1, keepdim=True) / INT4_SYM_MAX)
        y = (x / scale).round().clamp(-INT4_SYM_MAX, INT4_SYM_MAX) * scale
    else:
        lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
        scale = _scale((hi - lo) / INT4_LEVELS)
        zero = _fp16(lo)
        y = ((x - zero) / scale).round().clamp(0, INT4_LEVELS) * scale + zero
    return y.reshape(lat.shape)


def int4_bytes(head_dim: int, group: int | None = None, symmetric: bool = False) -> int:
    """Bytes per token and KV head of one int4 tensor: payload plus fp16 scale (and zero point) per group."""
    groups = head_dim // (group or head_dim)
    return head_dim // 2 + groups * (2 if symmetric else 4)


@dataclass
class VariantCodec:
    """Compress-decompress one of K/V [N, H, D] of a layer; see the module docstring.

    ``quant``: ``"int4"`` or ``"none"`` (no quantization: the transforms alone, which must be exact).
    """

    offset: torch.Tensor | None = None  # [H, D]
    smooth: torch.Tensor | None = None  # [H, D], > 0
    rotate: bool = True
    quant: str = "int4"
    group: int | None = None
    symmetric: bool = False
    exact_prefix: int = 0  # tokens at the start of the window kept unchanged (attention sinks)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1]
        y = x.float()
        if self.offset is not None:
            y = y - self.offset
        if self.smooth is not None:
            y = y / self.smooth
        rot = hadamard(d).to(y.device) if self.rotate else None
        if rot is not None:
            y = y @ rot
        if self.quant == "int4":
            y = int4_fake_quant(y, self.group, self.symmetric)
        elif self.quant != "none":
            raise ValueError(f"unknown quant {self.quant!r}")
        if rot is not None:
            y = y @ rot.T
        if self.smooth is not None:
            y = y * self.smooth
        if self.offset is not None:
            y = y + self.offset
        if self.exact_prefix:
            n = min(self.exact_prefix, y.shape[0])
            y = torch.cat((x[:n].float(), y[n:]), 0)
        return y

    def bytes_per_token(self, head_dim: int, num_kv_heads: int, context: int | None = None,
                        exact_bytes: int = 2) -> float:
        """Bytes per token of this tensor over all KV heads; with ``context``, the exact prefix (stored
        in ``exact_bytes`` per value, bf16 by default) amortized over that many tokens."""
        if self.quant == "none":
            per = head_dim * exact_bytes
        else:
            per = int4_bytes(head_dim, self.group, self.symmetric)
        b = float(per * num_kv_heads)
        if context and self.exact_prefix:
            n = min(self.exact_prefix, context)
            b += n * (head_dim * exact_bytes - per) * num_kv_heads / context
        return b


def tie_rope_pairs(s: torch.Tensor) -> torch.Tensor:
    """Scales [..., D] made equal on each RoPE pair ``(i, i + D/2)`` (geometric mean): such scales commute
    with RoPE, so key scales fold into the ``q_proj``/``k_proj`` weights."""
    h = s.shape[-1] // 2
    m = (s[..., :h] * s[..., h:]).sqrt()
    return torch.cat((m, m), -1)


def smoothing_scales(second_moment: torch.Tensor, alpha: float, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Static per-channel scales ``s = E[x^2]^(alpha/2)`` [..., D] from per-channel second moments
    ``E[x^2]`` [..., D]; with ``weight`` (e.g. the queries' ``E[q^2]``), ``s = (E[x^2] / weight)^(alpha/2)``.

    With the int4 error after the rotation roughly isotropic and proportional to ``|x / s|``, the expected
    score error ``sum_i w_i s_i^2 * sum_j E[x_j^2] / s_j^2`` is smallest at ``s^2 ~ sqrt(E[x^2] / w)``,
    i.e. ``alpha = 0.5`` with the query weighting. Normalized to geometric mean 1 per head (int4 per-token
    scales make the overall size irrelevant)."""
    m = second_moment.double().clamp_min(1e-12)
    if weight is not None:
        m = m / weight.double().clamp_min(1e-12)
    s = m.pow(alpha / 2)
    s = s / s.log().mean(-1, keepdim=True).exp()
    return s.float()


@dataclass
class ExactPrefix:
    """Any K/V codec (e.g. the plugin's, :class:`vllm_lowrank.simulate.TensorCodec`) with the first
    ``n`` tokens of the window kept unchanged."""

    codec: object
    n: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = self.codec(x).float()
        n = min(self.n, y.shape[0])
        return torch.cat((x[:n].float(), y[n:]), 0) if n else y
