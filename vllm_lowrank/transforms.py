"""Per-layer linear transforms of K and V: ``lat = P^T (x - c)``, per KV head.

``P`` is [H, D, r] with orthonormal columns (identity, a normalized Hadamard matrix, or the leading
``r`` calibrated eigenvectors); ``c`` is an optional constant offset [H, D]. The math of DESIGN.md:

- keys: scores ``(P_k^T q) . lat_k`` at the original softmax scale; the offset term ``q . c_k`` is
  the same for every cached token of a query, so softmax drops it;
- values: ``o = P_v (sum_j p_j lat_v_j) + c_v`` (the weights sum to one).
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
    """``P`` [H, D, r] (None: identity) and offset ``c`` [H, D] (None: zero), float32."""

    basis: torch.Tensor | None
    offset: torch.Tensor | None

    @property
    def is_identity(self) -> bool:
        return self.basis is None and self.offset is None

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Latent [N, H, r] (float32) of x [N, H, D]."""
        x = x.float()
        if self.offset is not None:
            x = x - self.offset
        if self.basis is None:
            return x
        return torch.einsum("nhd,hdr->nhr", x, self.basis)

    def project_query(self, q: torch.Tensor, group: int) -> torch.Tensor:
        """``P^T q`` [T, Hq, r] (float32) for queries [T, Hq, D]; query head h reads KV head h // group."""
        if self.basis is None:
            return q.float()
        return torch.einsum("thd,hdr->thr", q.float(), self.basis.repeat_interleave(group, 0))

    def reconstruct(self, lat: torch.Tensor, group: int) -> torch.Tensor:
        """``P lat + c`` [T, Hq, D] (float32) for latent outputs [T, Hq, r]."""
        out = lat if self.basis is None else torch.einsum(
            "thr,hdr->thd", lat, self.basis.repeat_interleave(group, 0))
        if self.offset is not None:
            out = out + self.offset.repeat_interleave(group, 0)
        return out

    def to(self, device: torch.device | str) -> "TensorTransform":
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return TensorTransform(mv(self.basis), mv(self.offset))


@dataclass
class LayerTransforms:
    k: TensorTransform
    v: TensorTransform

    def to(self, device: torch.device | str) -> "LayerTransforms":
        return LayerTransforms(self.k.to(device), self.v.to(device))


def build_tensor_transform(fmt: TensorFormat, num_kv_heads: int, head_dim: int,
                           basis: torch.Tensor | None, offset: torch.Tensor | None) -> TensorTransform:
    """The transform of one tensor format; ``basis`` [H, D, >=r] and ``offset`` [H, D] from a basis file.

    A Hadamard rotation is made on the device of ``offset`` (or ``basis``), the CPU if neither is given.
    """
    if fmt.transform == "none":
        return TensorTransform(None, offset)
    if fmt.transform == "hadamard":
        like = offset if offset is not None else basis
        rot = hadamard(head_dim).to(like.device if like is not None else "cpu")
        return TensorTransform(rot.expand(num_kv_heads, head_dim, head_dim).contiguous(), offset)
    assert basis is not None, "a basis format needs basis vectors"
    return TensorTransform(basis[:, :, :fmt.rank].float().contiguous(), offset)


def identity_transforms() -> LayerTransforms:
    return LayerTransforms(TensorTransform(None, None), TensorTransform(None, None))


def needs_basis(fmt: LayerFormat) -> bool:
    return fmt.k.transform == "basis" or fmt.v.transform == "basis"
