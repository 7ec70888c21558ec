"""Query projection kernel: ``P_k^T (s q)`` of raw queries, for the prefill kernel and a layered decode.

The decode split kernel projects its own queries (:func:`vllm_lowrank.kernels.common.load_query`),
except with a layered cache's ring (:func:`vllm_lowrank.kernels.decode.projects_query`); the prefill
kernel takes projected queries. This launch computes them: grid ``(cdiv(T * G, BLOCK_M), H)``, a program
takes ``BLOCK_M`` (token, query head) rows of one KV head's group, the same float32 (IEEE) dot as the
decode kernel's (:func:`project_query_rows`). One launch instead of the host's cast, copies and batched
matmul (:meth:`TensorTransform.project_query`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import next_pow2, project_query_rows, transform_ptrs

BLOCK_M = 16  # rows a program: the N dimension of the projection's dot


@triton.jit(do_not_specialize=["num_rows"])
def _project_query_kernel(
    q_ptr, stride_qt, stride_qh,  # raw queries [T, Hq, D] (model dtype)
    out_ptr,  # float32 [T, Hq, R], contiguous
    basis_ptr, smooth_ptr,  # P_k [H, D, R], s_k [H, D] float32
    num_rows,  # T * G
    G: tl.constexpr, D: tl.constexpr, R: tl.constexpr, R_TILE: tl.constexpr, BLOCK_M: tl.constexpr,
    HAS_SMOOTH: tl.constexpr,
):
    """``BLOCK_M`` rows (token ``r // G``, query head ``h * G + r % G``) of KV head ``h``: their latents."""
    r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    h = tl.program_id(1)
    row_mask = r < num_rows
    t = (r // G).to(tl.int64)
    head = h * G + r % G
    lat = project_query_rows(q_ptr + t * stride_qt + head * stride_qh, row_mask, h, basis_ptr, smooth_ptr, R_TILE, R,
                             D, HAS_SMOOTH)
    col = tl.arange(0, R_TILE)
    out_rows = out_ptr + (t * (tl.num_programs(1) * G) + head) * R
    tl.store(out_rows[:, None] + col[None, :], lat, mask=row_mask[:, None] & (col[None, :] < R))


def query_constexprs(group: int, head_dim: int, rank: int, has_smooth: bool) -> dict:
    """The projection kernel's constexprs, for its launch and for ``scripts/kernel_sass.py`` alike."""
    return dict(G=group, D=head_dim, R=rank, R_TILE=max(16, next_pow2(rank)), BLOCK_M=BLOCK_M,
                HAS_SMOOTH=has_smooth)


def project_queries(query: torch.Tensor, tr, num_kv_heads: int) -> torch.Tensor:
    """``P_k^T S q`` [T, Hq, r_k] (float32) of queries [T, Hq, D] (``S``: the key smoothing, when K has one);
    the query itself when K has neither basis nor smoothing (the K offset shifts every score of a query
    equally: softmax drops it). Same values as :meth:`TensorTransform.project_query` up to float32
    summation order."""
    if tr.query_is_identity:
        return query
    t, hq, d = query.shape
    g = hq // num_kv_heads
    if tr.basis is None:  # smoothing alone: elementwise
        return (query.reshape(t, num_kv_heads, g, d).float() * tr.smooth[None, :, None, :]).reshape(t, hq, d)
    if query.stride(-1) != 1:
        query = query.contiguous()
    basis, _, smooth = transform_ptrs(tr, query)
    r = basis.shape[-1]
    out = torch.empty(t, hq, r, dtype=torch.float32, device=query.device)
    if t == 0:
        return out
    _project_query_kernel[(triton.cdiv(t * g, BLOCK_M), num_kv_heads)](
        query, query.stride(0), query.stride(1), out, basis, smooth, t * g,
        **query_constexprs(g, d, r, tr.smooth is not None), num_warps=4)
    return out
