"""Per-layer linear transforms of K and V: ``lat = P^T S^-1 (x - c)``, per KV head.

``P`` is [H, D, r] with orthonormal columns (identity, a normalized Hadamard matrix, or the leading
``r`` calibrated eigenvectors); ``c`` is an optional constant offset [H, D]; ``S = diag(s)`` an
optional per-channel key smoothing [H, D] (keys only, s > 0; identity when absent). The math of DESIGN.md:

- keys: scores ``(P_k^T S q) . lat_k`` at the original softmax scale; with P square this is exactly
  ``q . (k - c)`` (``(S q) . (S^-1 k) = q . k``); the offset term ``q . c_k`` is the same for every
  cached token of a query, so softmax drops it;
- values: ``o = P_v (sum_j p_j lat_v_j) + c_v`` (the weights sum to one; values are never smoothed).

Query-weighted key smoothing, ``s_i = (E[(k_i - c_i)^2] / E[q_i^2])^(1/4)`` per layer, KV head and
post-RoPE channel (calibrated, stored in the basis file as ``k.smooth.{i}``), evens out the channels'
contributions to the score error before a Hadamard rotation and int4 rounding (EVALUATION.md). The store
divides by ``s`` before ``P^T`` (:meth:`TensorTransform.project`; the store kernel the same, itself), the
queries are multiplied by ``s`` before ``P_k^T`` (:meth:`TensorTransform.project_query`; the decode
kernel's ``load_query`` itself, the prefill's host-side ``project_queries``); the attention loops never
see ``s``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .formats import LayerFormat, TensorFormat


def hadamard(d: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The orthonormal Sylvester-Hadamard matrix of size d (a power of two)."""
    if d < 1 or d & (d - 1):
        raise ValueError(f"Hadamard size must be a power of two, got {d}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < d:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return (h / d**0.5).to(dtype)


@dataclass
class TensorTransform:
    """``P`` [H, D, r] (None: identity), offset ``c`` [H, D] (None: zero) and key smoothing ``s``
    [H, D] (None: no smoothing), float32.

    ``basis`` keeps its orthonormal meaning (and is what the kernels get for V); the smoothing is a
    separate diagonal applied on the host: ``project`` computes ``P^T ((x - c) / s)``,
    ``project_query`` computes ``P^T (s * q)``, ``reconstruct`` ``s * (P lat) + c``.
    """

    basis: torch.Tensor | None
    offset: torch.Tensor | None
    smooth: torch.Tensor | None = None

    @property
    def is_identity(self) -> bool:
        return self.basis is None and self.offset is None and self.smooth is None

    @property
    def query_is_identity(self) -> bool:
        """True when ``project_query`` returns the query unchanged (no basis and no smoothing)."""
        return self.basis is None and self.smooth is None

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Latent [N, H, r] (float32) of x [N, H, D]."""
        x = x.float()
        if self.offset is not None:
            x = x - self.offset
        if self.smooth is not None:
            x = x / self.smooth
        if self.basis is None:
            return x
        return torch.einsum("nhd,hdr->nhr", x, self.basis)

    def project_query(self, q: torch.Tensor, group: int) -> torch.Tensor:
        """``P^T S q`` [T, Hq, r] (float32) for queries [T, Hq, D]; query head h reads KV head h // group."""
        q = q.float()
        if self.smooth is not None:
            q = q * self.smooth.repeat_interleave(group, 0)
        if self.basis is None:
            return q
        return torch.einsum("thd,hdr->thr", q, self.basis.repeat_interleave(group, 0))

    def reconstruct(self, lat: torch.Tensor, group: int) -> torch.Tensor:
        """``S P lat + c`` [T, Hq, D] (float32) for latent outputs [T, Hq, r]."""
        out = lat if self.basis is None else torch.einsum(
            "thr,hdr->thd", lat, self.basis.repeat_interleave(group, 0))
        if self.smooth is not None:
            out = out * self.smooth.repeat_interleave(group, 0)
        if self.offset is not None:
            out = out + self.offset.repeat_interleave(group, 0)
        return out

    def to(self, device: torch.device | str) -> "TensorTransform":
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return TensorTransform(mv(self.basis), mv(self.offset), mv(self.smooth))


@dataclass
class LayerTransforms:
    k: TensorTransform
    v: TensorTransform

    def __post_init__(self) -> None:
        if self.v.smooth is not None:  # the kernels rebuild V with basis and offset only
            raise ValueError("values cannot be smoothed: only the key transform takes smoothing scales")

    def to(self, device: torch.device | str) -> "LayerTransforms":
        return LayerTransforms(self.k.to(device), self.v.to(device))


def build_tensor_transform(fmt: TensorFormat, num_kv_heads: int, head_dim: int,
                           basis: torch.Tensor | None, offset: torch.Tensor | None,
                           smooth: torch.Tensor | None = None) -> TensorTransform:
    """The transform of one tensor format; ``basis`` [H, D, >=r], ``offset`` [H, D] and the key
    smoothing ``smooth`` [H, D] (positive) from a basis file.

    A Hadamard rotation is made on the device of ``offset`` (or ``basis``), the CPU if neither is given.
    """
    if smooth is not None:
        if tuple(smooth.shape) != (num_kv_heads, head_dim):
            raise ValueError(f"key smoothing scales have shape {tuple(smooth.shape)}, expected "
                             f"({num_kv_heads}, {head_dim})")
        smooth = smooth.float().contiguous()
    if fmt.transform == "none":
        return TensorTransform(None, offset, smooth)
    if fmt.transform == "hadamard":
        like = offset if offset is not None else basis
        rot = hadamard(head_dim).to(like.device if like is not None else "cpu")
        return TensorTransform(rot.expand(num_kv_heads, head_dim, head_dim).contiguous(), offset, smooth)
    assert basis is not None, "a basis format needs basis vectors"
    return TensorTransform(basis[:, :, :fmt.rank].float().contiguous(), offset, smooth)


def smoothing_applies(fmt: TensorFormat) -> bool:
    """Whether ``smooth_keys: true`` smooths a K format: every lossy one (any transform or a quantized
    storage); a K kept exactly (``model`` storage, no transform) is left alone."""
    return not (fmt.transform == "none" and fmt.storage == "model")


def identity_transforms() -> LayerTransforms:
    return LayerTransforms(TensorTransform(None, None), TensorTransform(None, None))


def needs_basis(fmt: LayerFormat) -> bool:
    return fmt.k.transform == "basis" or fmt.v.transform == "basis"
