"""Plain PyTorch encoding of K/V into slot bytes and back (the oracle for the Triton store kernel).

Per token and KV head: ``lat = P^T (x - c)`` (P and c from :class:`~vllm_lowrank.transforms.TensorTransform`),
then the storage type of the format:

- ``model``: ``lat`` in the model dtype;
- ``int8``: ``scale = absmax / 127`` (rounded to fp16 first), ``q = round(lat / scale)`` in [-127, 127];
- ``fp8``: ``scale = absmax / 448``, ``q = e4m3(lat / scale)``;
- ``int4``: asymmetric, ``scale = (max - min) / 15``, ``zero = min`` (both fp16),
  ``q = round((lat - zero) / scale)`` in [0, 15], two a byte, even index in the low nibble.
"""

from __future__ import annotations

import torch

from .formats import SCALE_DTYPE, SlotLayout, TensorSlot

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
INT8_MAX = 127.0
INT4_MAX = 15.0
_TINY = 1e-8  # scale used for an all-zero vector, so that 0 / scale stays 0


def _div(x: torch.Tensor, divisor: float) -> torch.Tensor:
    """``x / divisor`` correctly rounded on every device: on CUDA, torch divides by a Python scalar as
    a product with its reciprocal, one rounding more, which moved a stored scale by an ulp against the
    store kernel's IEEE division (a GPU-only, seed-dependent byte mismatch)."""
    return x / torch.full_like(x, divisor)


def _rounded_scale(scale: torch.Tensor) -> torch.Tensor:
    """The scale as stored (fp16), back in float32, never zero."""
    s = scale.clamp_min(_TINY).to(SCALE_DTYPE).float()
    return torch.where(s > 0, s, torch.full_like(s, _TINY))


def encode_tensor(lat: torch.Tensor, ts: TensorSlot, out: torch.Tensor) -> None:
    """Write latent vectors ``lat`` [N, H, r] (float32) into the slot bytes ``out`` [N, H, slot_bytes] (uint8)."""
    st = ts.fmt.storage
    p0, p1 = ts.payload_offset, ts.payload_offset + ts.payload_bytes
    if st == "model":
        raise AssertionError("model-dtype payloads are written by encode_layer")
    if st in ("int8", "fp8"):
        qmax = INT8_MAX if st == "int8" else FP8_MAX
        scale = _rounded_scale(_div(lat.abs().amax(dim=-1), qmax))
        y = lat / scale[..., None]
        if st == "int8":
            q = y.round().clamp(-INT8_MAX, INT8_MAX).to(torch.int8).view(torch.uint8)
        else:
            q = y.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).view(torch.uint8)
        out[..., p0:p1] = q
        out[..., ts.scale_offset:ts.scale_offset + 2] = scale.to(SCALE_DTYPE).unsqueeze(-1).view(torch.uint8)
        return
    if st == "int4":
        lo, hi = lat.amin(dim=-1), lat.amax(dim=-1)
        scale = _rounded_scale(_div(hi - lo, INT4_MAX))
        zero = lo.to(SCALE_DTYPE).float()
        q = ((lat - zero[..., None]) / scale[..., None]).round().clamp(0, INT4_MAX).to(torch.uint8)
        if q.shape[-1] % 2:
            q = torch.nn.functional.pad(q, (0, 1))
        packed = q[..., 0::2] | (q[..., 1::2] << 4)
        out[..., p0:p1] = packed
        out[..., ts.scale_offset:ts.scale_offset + 2] = scale.to(SCALE_DTYPE).unsqueeze(-1).view(torch.uint8)
        out[..., ts.zero_offset:ts.zero_offset + 2] = zero.to(SCALE_DTYPE).unsqueeze(-1).view(torch.uint8)
        return
    raise AssertionError(f"unknown storage {st}")


def decode_tensor(rows: torch.Tensor, ts: TensorSlot, model_dtype: torch.dtype) -> torch.Tensor:
    """Latent vectors [..., r] in float32 from slot bytes ``rows`` [..., slot_bytes] (uint8)."""
    st = ts.fmt.storage
    payload = rows[..., ts.payload_offset:ts.payload_offset + ts.payload_bytes]
    if st == "model":
        return payload.contiguous().view(model_dtype).float()
    scale = rows[..., ts.scale_offset:ts.scale_offset + 2].contiguous().view(SCALE_DTYPE).float()
    if st == "int8":
        return payload.contiguous().view(torch.int8).float() * scale
    if st == "fp8":
        return payload.contiguous().view(FP8_DTYPE).float() * scale
    if st == "int4":
        zero = rows[..., ts.zero_offset:ts.zero_offset + 2].contiguous().view(SCALE_DTYPE).float()
        q = torch.stack((payload & 0xF, payload >> 4), dim=-1).flatten(-2)[..., :ts.latent_dim]
        return q.float() * scale + zero
    raise AssertionError(f"unknown storage {st}")


def encode_layer(key: torch.Tensor, value: torch.Tensor, layout: SlotLayout, transforms) -> torch.Tensor:
    """Slot bytes [N, H, slot_bytes] for keys and values [N, H, D] of one layer."""
    n, h, _ = key.shape
    out = torch.zeros(n, h, layout.slot_bytes, dtype=torch.uint8, device=key.device)
    for x, ts, tr in ((key, layout.k, transforms.k), (value, layout.v, transforms.v)):
        if ts.fmt.storage == "model" and tr.is_identity:
            # bit-exact copy of the model's own values: the lossless path
            lat_bytes = x.to(layout.model_dtype).contiguous().view(torch.uint8)
            out[..., ts.payload_offset:ts.payload_offset + ts.payload_bytes] = lat_bytes
            continue
        lat = tr.project(x)
        if ts.fmt.storage == "model":
            out[..., ts.payload_offset:ts.payload_offset + ts.payload_bytes] = (
                lat.to(layout.model_dtype).contiguous().view(torch.uint8))
        else:
            encode_tensor(lat, ts, out)
    return out


def decode_layer(rows: torch.Tensor, layout: SlotLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """Latent K and V in float32 from slot bytes [..., slot_bytes]."""
    return decode_tensor(rows, layout.k, layout.model_dtype), decode_tensor(rows, layout.v, layout.model_dtype)
