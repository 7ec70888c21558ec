"""KV formats and the byte layout of the compressed cache: the single source of truth.

A *tensor format* says how one of K or V is stored for one token and KV head:
an optional transform (none; a Hadamard rotation; projection onto ``r`` basis
vectors) followed by a storage type (the model dtype; ``int8`` or ``fp8`` e4m3 with
one scale per token and head; ``int4`` asymmetric with a scale and zero point,
two values a byte). A *layer format* pairs a K format with a V format, and its
:class:`SlotLayout` gives the fields of one (token, KV head) *slot*:

    slot = [K payload | V payload | scales, zero points], padded to alignment

so that ``page_bytes = block_size * num_kv_heads * slot_bytes``.

In the cache the slots are not stored one after another: a layer's cache is uint8
``[num_blocks, num_kv_heads, block_size, slot_bytes]`` by shape (:func:`cache_shape`), and the
``block_size * slot_bytes`` bytes of one (block, KV head) *page* hold each field of all its tokens
together (struct of arrays): the field at slot offset ``off`` of ``n`` bytes of token ``t`` lives at
page byte ``block_size * off + t * n`` (:meth:`SlotLayout.page_index`). Every field of a page then
starts 16-byte aligned (block sizes are multiples of 16) and a block's scales are contiguous, so the
kernels load payloads with wide vector loads whatever the slot size. One exception: a quantized V
payload (int8, fp8, int4: one byte a column) is stored *transposed*, byte column by byte column: byte
``j`` of token ``t`` at page byte ``block_size * off + j * block_size + t``. The attention kernels
reduce over tokens in ``P @ V``, and a tensor-core operand wants consecutive tokens of one channel
side by side; 16-bit payloads get that from the hardware's transposing loads, bytes do not
(``TensorSlot.transposed``). The KV cache spec, the PyTorch reference and the Triton kernels all read
offsets from here.

Textual form of a tensor format: ``[transform+]storage`` where transform is
``hadamard`` or ``r<N>`` (basis of rank N) and storage is ``model`` (alias
``bf16``/``fp16``/``fp32``: whatever the model's dtype is), ``int8``, ``fp8`` or
``int4``; a bare ``r<N>`` means ``r<N>+model``. Examples: ``int8``, ``r16``,
``r32+int8``, ``hadamard+int4``.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import torch

STORAGES = ("model", "int8", "fp8", "int4")
TRANSFORMS = ("none", "hadamard", "basis")
_MODEL_ALIASES = ("model", "bf16", "fp16", "fp32", "auto")
SCALE_DTYPE = torch.float16
SCALE_BYTES = 2

# preset name -> (K format, V format); ``{rk}``/``{rv}`` are filled with the ranks
PRESETS: dict[str, tuple[str, str]] = {
    "full": ("model", "model"),
    "int8": ("int8", "int8"),
    "fp8": ("fp8", "fp8"),
    "int4": ("hadamard+int4", "hadamard+int4"),
    "lowrank": ("r{rk}", "r{rv}"),
    "lowrank+int8": ("r{rk}+int8", "r{rv}+int8"),
    "lowrank+fp8": ("r{rk}+fp8", "r{rv}+fp8"),
}
RANKED_PRESETS = ("lowrank", "lowrank+int8", "lowrank+fp8")

_FORMAT_RE = re.compile(r"^(?:(hadamard|r(\d+))(?:\+(?=.)|$))?(model|bf16|fp16|fp32|auto|int8|fp8|int4)?$")


class FormatError(ValueError):
    """A KV format, rank or plan that cannot be used; the message says what can."""


@dataclass(frozen=True)
class TensorFormat:
    """How one of K or V is stored per token and KV head."""

    transform: str = "none"
    rank: int | None = None  # basis rank; None means head_dim (no reduction)
    storage: str = "model"

    @staticmethod
    def parse(text: str) -> "TensorFormat":
        m = _FORMAT_RE.match(text.strip().lower())
        if not m or not text.strip():
            raise FormatError(
                f"unknown KV tensor format {text!r}; expected [hadamard+|r<N>+]storage with storage one of "
                f"{', '.join(STORAGES)} (e.g. 'int8', 'r16', 'r32+int8', 'hadamard+int4')")
        tr, rank, storage = m.group(1), m.group(2), m.group(3)
        storage = "model" if storage in (None, *_MODEL_ALIASES) else storage
        if tr is None:
            return TensorFormat("none", None, storage)
        if tr == "hadamard":
            return TensorFormat("hadamard", None, storage)
        return TensorFormat("basis", int(rank), storage)

    def __str__(self) -> str:
        prefix = {"none": "", "hadamard": "hadamard+", "basis": f"r{self.rank}+"}[self.transform]
        return prefix + self.storage

    def latent_dim(self, head_dim: int) -> int:
        return self.rank if self.transform == "basis" else head_dim

    def validate(self, head_dim: int, what: str = "format") -> None:
        if self.storage not in STORAGES:
            raise FormatError(f"{what}: unknown storage {self.storage!r}; accepted: {', '.join(STORAGES)}")
        if self.transform not in TRANSFORMS:
            raise FormatError(f"{what}: unknown transform {self.transform!r}; accepted: {', '.join(TRANSFORMS)}")
        if self.transform == "basis":
            if self.rank is None or not 1 <= self.rank <= head_dim:
                raise FormatError(
                    f"{what}: rank {self.rank} is out of range; a rank must be an integer from 1 to "
                    f"head_dim={head_dim}")
        if self.transform == "hadamard" and head_dim & (head_dim - 1):
            raise FormatError(f"{what}: a Hadamard rotation needs a power-of-two head_dim, got {head_dim}")

    @property
    def has_scale(self) -> bool:
        return self.storage in ("int8", "fp8", "int4")

    @property
    def has_zero(self) -> bool:
        return self.storage == "int4"

    def payload_bytes(self, head_dim: int, model_dtype: torch.dtype) -> int:
        r = self.latent_dim(head_dim)
        if self.storage == "model":
            return r * _itemsize(model_dtype)
        if self.storage == "int4":
            return (r + 1) // 2
        return r

    def payload_align(self, model_dtype: torch.dtype) -> int:
        return _itemsize(model_dtype) if self.storage == "model" else 1


@dataclass(frozen=True)
class LayerFormat:
    """The K and V formats of one attention layer."""

    k: TensorFormat
    v: TensorFormat

    def __str__(self) -> str:
        return f"K={self.k} V={self.v}"

    @property
    def is_identity(self) -> bool:
        """True when the slot holds K and V unchanged in the model dtype (the ``full`` format)."""
        return all(f.transform == "none" and f.storage == "model" for f in (self.k, self.v))


@dataclass(frozen=True)
class TensorSlot:
    """Byte offsets of one tensor's fields inside a slot (-1 where absent)."""

    fmt: TensorFormat
    latent_dim: int
    payload_offset: int
    payload_bytes: int
    scale_offset: int = -1
    zero_offset: int = -1
    transposed: bool = False  # payload stored byte column by byte column in a page (see the module doc)


@dataclass(frozen=True)
class SlotLayout:
    """Exact byte layout of one (token, KV head) slot of a layer."""

    k: TensorSlot
    v: TensorSlot
    slot_bytes: int
    head_dim: int
    model_dtype: torch.dtype

    @staticmethod
    def build(fmt: LayerFormat, head_dim: int, model_dtype: torch.dtype) -> "SlotLayout":
        fmt.k.validate(head_dim, "K format")
        fmt.v.validate(head_dim, "V format")
        # fields as (key, bytes, alignment), placed in this order, each at an offset aligned to
        # its element size so that it can be viewed in its dtype: payloads first, then scales
        fields = [
            ("k.payload", fmt.k.payload_bytes(head_dim, model_dtype), fmt.k.payload_align(model_dtype)),
            ("v.payload", fmt.v.payload_bytes(head_dim, model_dtype), fmt.v.payload_align(model_dtype)),
        ]
        for name, f in (("k", fmt.k), ("v", fmt.v)):
            if f.has_scale:
                fields.append((f"{name}.scale", SCALE_BYTES, SCALE_BYTES))
            if f.has_zero:
                fields.append((f"{name}.zero", SCALE_BYTES, SCALE_BYTES))
        offsets: dict[str, int] = {}
        pos = 0
        for key, nbytes, align in fields:
            pos = -(-pos // align) * align
            offsets[key] = pos
            pos += nbytes
        slot_align = max(2, max(a for _, _, a in fields))
        slot_bytes = -(-pos // slot_align) * slot_align

        def tslot(name: str, f: TensorFormat) -> TensorSlot:
            return TensorSlot(f, f.latent_dim(head_dim), offsets[f"{name}.payload"],
                              f.payload_bytes(head_dim, model_dtype),
                              offsets.get(f"{name}.scale", -1), offsets.get(f"{name}.zero", -1),
                              transposed=name == "v" and f.storage != "model")

        return SlotLayout(tslot("k", fmt.k), tslot("v", fmt.v), slot_bytes, head_dim, model_dtype)

    def page_bytes(self, block_size: int, num_kv_heads: int) -> int:
        return block_size * num_kv_heads * self.slot_bytes

    def segments(self) -> list[tuple[int, int]]:
        """(slot offset, bytes) of every field and every alignment gap, in order: they tile the slot.

        Each segment is one array of a page (``block_size`` elements of ``bytes``), gaps included, so
        that the page is a permutation of its slots' bytes.
        """
        out: list[tuple[int, int]] = []
        pos = 0
        for off, n in sorted(self._fields()) + [(self.slot_bytes, 0)]:
            if off > pos:
                out.append((pos, off - pos))
            if n:
                out.append((off, n))
            pos = off + n
        return out

    def gaps(self) -> list[tuple[int, int]]:
        """(slot offset, bytes) of the alignment padding of a slot (no field covers it)."""
        fields = set(self._fields())
        return [seg for seg in self.segments() if seg not in fields]

    def _fields(self) -> list[tuple[int, int]]:
        """(slot offset, bytes) of every field present: payloads, scales, zero points."""
        return [(off, n) for ts in (self.k, self.v) for off, n in (
            (ts.payload_offset, ts.payload_bytes), (ts.scale_offset, SCALE_BYTES), (ts.zero_offset, SCALE_BYTES))
            if off >= 0]

    def page_index(self, block_size: int, device: torch.device | str | None = None) -> torch.Tensor:
        """int64 [block_size, slot_bytes]: the page byte that holds byte ``b`` of token ``t``'s slot."""
        idx = torch.empty(block_size, self.slot_bytes, dtype=torch.int64)
        t = torch.arange(block_size)[:, None]
        transposed = {ts.payload_offset for ts in (self.k, self.v) if ts.transposed}
        for off, n in self.segments():
            j = torch.arange(n)[None, :]
            idx[:, off:off + n] = block_size * off + (t + j * block_size if off in transposed else t * n + j)
        return idx.to(device)

    @property
    def spec_head_size(self) -> int:
        """``head_size`` of the uint8 KV cache spec: K and V each get half of the slot."""
        return self.slot_bytes // 2

    def compression_vs(self, dtype: torch.dtype = torch.bfloat16) -> float:
        """Uncompressed K+V bytes in ``dtype`` divided by this slot's bytes."""
        return 2 * self.head_dim * _itemsize(dtype) / self.slot_bytes


def cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, slot_bytes: int) -> tuple[int, ...]:
    """Shape of a layer's uint8 cache; each [block, head] page of ``block_size * slot_bytes`` bytes is
    laid out field by field (see the module docstring), not slot by slot."""
    return (num_blocks, num_kv_heads, block_size, slot_bytes)


RING_DTYPES = ("model", "int8")  # how a layered cache keeps its exact tokens (setting ``exact_dtype``)


@functools.lru_cache(maxsize=None)
def ring_layout(head_dim: int, model_dtype: torch.dtype, exact_dtype: str = "model") -> SlotLayout:
    """The slot of one exact token of a layered cache's ring (:mod:`vllm_lowrank.layered`): the ``full``
    format (K and V in the model dtype) or ``int8`` (per-token scales, 2x smaller), never transformed.
    A ring page holds :func:`ring_tokens_per_block` such slots laid out field by field, like a cache
    page of that many tokens, so the codec, the store kernel and the attention loads serve it as is."""
    if exact_dtype not in RING_DTYPES:
        raise FormatError(f"exact_dtype={exact_dtype!r}; accepted: {', '.join(RING_DTYPES)}")
    return SlotLayout.build(preset_format("full" if exact_dtype == "model" else "int8"), head_dim, model_dtype)


def ring_tokens_per_block(block_size: int, slot_bytes: int, ring: SlotLayout) -> int:
    """Exact tokens (slots of ``ring``) that one page of ``block_size`` compressed slots of ``slot_bytes``
    holds."""
    return block_size * slot_bytes // ring.slot_bytes


def preset_format(name: str, rank_k: int | None = None, rank_v: int | None = None) -> LayerFormat:
    """The layer format of a named preset (``lowrank*`` presets need ranks)."""
    key = name.strip().lower()
    if key not in PRESETS:
        raise FormatError(f"unknown format {name!r}; accepted presets: {', '.join(PRESETS)} "
                          f"(or a per-layer plan, or a tensor format such as 'r16+int8')")
    kf, vf = PRESETS[key]
    if key in RANKED_PRESETS:
        if rank_k is None or rank_v is None:
            raise FormatError(f"format {name!r} needs ranks: set 'rank_k' and 'rank_v', or give a basis "
                              f"file whose metadata carries ranks")
        for what, r in (("rank_k", rank_k), ("rank_v", rank_v)):
            if not isinstance(r, int) or isinstance(r, bool):
                raise FormatError(f"{what} must be an integer, got {r!r}")
        kf, vf = kf.format(rk=rank_k), vf.format(rv=rank_v)
    return LayerFormat(TensorFormat.parse(kf), TensorFormat.parse(vf))


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
