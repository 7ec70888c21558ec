"""Formats and slot layouts: every field inside the slot, aligned for its dtype, none overlapping."""

from __future__ import annotations

import itertools

import pytest
import torch

from vllm_lowrank.formats import (
    PRESETS, FormatError, LayerFormat, SlotLayout, TensorFormat, preset_format)

TENSOR_FORMATS = ["model", "int8", "fp8", "int4", "hadamard+int4", "hadamard+int8", "r16", "r24+int8",
                  "r8+fp8", "r13+int4", "r7+int8", "r64", "r33"]


def _fields(layout: SlotLayout) -> list[tuple[int, int, int]]:
    """(offset, bytes, alignment) of every field."""
    out = []
    for ts in (layout.k, layout.v):
        align = layout.model_dtype.itemsize if ts.fmt.storage == "model" else 1
        out.append((ts.payload_offset, ts.payload_bytes, align))
        if ts.scale_offset >= 0:
            out.append((ts.scale_offset, 2, 2))
        if ts.zero_offset >= 0:
            out.append((ts.zero_offset, 2, 2))
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_layout_fields_fit_aligned_and_disjoint(dtype, head_dim):
    for kf, vf in itertools.product(TENSOR_FORMATS, repeat=2):
        fmt = LayerFormat(TensorFormat.parse(kf), TensorFormat.parse(vf))
        layout = SlotLayout.build(fmt, head_dim, dtype)
        fields = _fields(layout)
        used = torch.zeros(layout.slot_bytes, dtype=torch.int32)
        for off, nbytes, align in fields:
            assert off % align == 0, (kf, vf, off, align)
            assert 0 <= off and off + nbytes <= layout.slot_bytes
            used[off:off + nbytes] += 1
        assert int(used.max()) == 1, f"overlapping fields in {fmt}"
        # the slot is even (spec head_size = slot / 2) and aligned for its widest field
        assert layout.slot_bytes % max(2, *(a for _, _, a in fields)) == 0
        # no more padding than alignment can require
        assert layout.slot_bytes - int(used.sum()) < 2 * max(a for _, _, a in fields) + 2


def test_payload_sizes():
    d = 64
    assert TensorFormat.parse("model").payload_bytes(d, torch.bfloat16) == 128
    assert TensorFormat.parse("int8").payload_bytes(d, torch.bfloat16) == 64
    assert TensorFormat.parse("hadamard+int4").payload_bytes(d, torch.bfloat16) == 32
    assert TensorFormat.parse("r13+int4").payload_bytes(d, torch.bfloat16) == 7
    assert TensorFormat.parse("r16").payload_bytes(d, torch.float32) == 64


@pytest.mark.parametrize("name,ratio", [("full", 1.0), ("int8", 128 / 66), ("fp8", 128 / 66), ("int4", 128 / 36)])
def test_preset_compression(name, ratio):
    assert SlotLayout.build(preset_format(name), 64, torch.bfloat16).compression_vs() == pytest.approx(ratio)


def test_lowrank_preset_compression():
    assert SlotLayout.build(preset_format("lowrank", 16, 16), 64, torch.bfloat16).compression_vs() == 4.0
    assert SlotLayout.build(preset_format("lowrank+int8", 32, 32), 128, torch.bfloat16).compression_vs() == \
        pytest.approx(512 / 68)


def test_page_bytes():
    layout = SlotLayout.build(preset_format("int8"), 64, torch.bfloat16)
    assert layout.page_bytes(16, 3) == 16 * 3 * 132
    assert layout.spec_head_size * 2 == layout.slot_bytes


@pytest.mark.parametrize("text", ["", "int5", "r", "rank16", "r16+int9", "hadamard+", "bf8", "r-3"])
def test_bad_tensor_format(text):
    with pytest.raises(FormatError, match="unknown KV tensor format"):
        TensorFormat.parse(text)


def test_round_trip_text():
    for t in TENSOR_FORMATS:
        assert TensorFormat.parse(str(TensorFormat.parse(t))) == TensorFormat.parse(t)


def test_every_preset_builds():
    for name in PRESETS:
        SlotLayout.build(preset_format(name, 16, 8), 64, torch.bfloat16)


@pytest.mark.parametrize("block_size", [16, 32])
def test_page_index_is_field_major_permutation(block_size):
    """A page holds each field of all its tokens together: a permutation of the slots' bytes in which
    every field (and gap) of the slot is one array starting at ``block_size * offset``, 16-byte aligned;
    token-major except a quantized V payload, stored byte column by byte column."""
    for kf, vf in itertools.product(TENSOR_FORMATS, repeat=2):
        layout = SlotLayout.build(LayerFormat(TensorFormat.parse(kf), TensorFormat.parse(vf)), 64, torch.bfloat16)
        idx = layout.page_index(block_size)
        assert torch.equal(idx.flatten().sort().values, torch.arange(block_size * layout.slot_bytes))
        segs = layout.segments()
        assert segs[0][0] == 0 and sum(n for _, n in segs) == layout.slot_bytes
        for (off, n), (nxt, _) in zip(segs, segs[1:] + [(layout.slot_bytes, 0)]):
            assert off + n == nxt
            region = idx[:, off:off + n]
            assert int(region[0, 0]) == block_size * off and (block_size * off) % 16 == 0
            transposed = off == layout.v.payload_offset and TensorFormat.parse(vf).storage != "model"
            assert layout.v.transposed == (TensorFormat.parse(vf).storage != "model") and not layout.k.transposed
            flat = (region.T if transposed else region).flatten()
            assert torch.equal(flat, torch.arange(block_size * off, block_size * (off + n)))
        assert {off for off, _ in layout.gaps()}.isdisjoint(
            {layout.k.payload_offset, layout.v.payload_offset, layout.k.scale_offset, layout.v.scale_offset})
