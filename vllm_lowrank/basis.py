"""The basis file: per layer and KV head, the calibrated bases and offsets of K and V.

One safetensors file. Tensors, for ``t`` in ``k``, ``v`` and each layer ``i``:

- ``{t}.basis.{i}``: [H, D, R] float32, orthonormal columns, by decreasing eigenvalue (R <= D
  columns kept; any rank up to R can be used);
- ``{t}.eigenvalues.{i}``: [H, D] float32, the second-moment spectrum (descending);
- ``{t}.offset.{i}``: [H, D] float32, optional calibrated mean, subtracted before the transform;
- ``k.smooth.{i}``: [H, D] float32, optional (keys only; every layer or none), positive query-weighted
  key smoothing scales ``s``: keys are divided by ``s`` after the offset and before the transform, the
  queries multiplied by ``s`` (:mod:`vllm_lowrank.transforms`); made for use with the file's offsets
  (from the keys' second moments about the calibrated mean) when it has offsets; metadata
  ``key_smoothing`` says how they were made;
- ``k.smooth_raw.{i}``: [H, D] float32, optional (only beside ``k.smooth``): the same scales from the
  keys' raw second moments, used instead when the offsets are not subtracted (``offset: false``).

Metadata (JSON under the safetensors metadata key ``lowrank``): ``format_version``, ``model``,
``num_layers``, ``num_kv_heads``, ``head_dim``, ``ranks`` (``{"k": [...], "v": [...]}`` per layer:
the ranks the calibration chose), ``retained_energy`` (same shape), ``basis_space``
(``post_rope``), and ``calibration`` (what it was calibrated on).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

FORMAT_VERSION = 1
META_KEY = "lowrank"
TENSORS = ("k", "v")


class BasisFileError(ValueError):
    """A basis file that is missing, unreadable, malformed or does not match the model."""


@dataclass
class BasisFile:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    bases: dict[str, list[torch.Tensor]]  # "k"/"v" -> per layer [H, D, R]
    eigenvalues: dict[str, list[torch.Tensor]]  # "k"/"v" -> per layer [H, D]
    offsets: dict[str, list[torch.Tensor | None]] = field(default_factory=dict)
    ranks: dict[str, list[int]] = field(default_factory=dict)
    model: str = ""
    basis_space: str = "post_rope"
    extra: dict[str, Any] = field(default_factory=dict)  # retained_energy, calibration, ...
    path: str = ""
    smooth: list[torch.Tensor] | None = None  # per layer [H, D]: key smoothing scales (None: absent)
    smooth_raw: list[torch.Tensor] | None = None  # the same for keys without offsets (None: use ``smooth``)

    def stored_rank(self, t: str, layer: int) -> int:
        return self.bases[t][layer].shape[-1]

    def has_offsets(self) -> bool:
        return any(o is not None for t in TENSORS for o in self.offsets.get(t, []))

    def has_smoothing(self) -> bool:
        return self.smooth is not None

    def key_scales(self, use_offsets: bool) -> list[torch.Tensor]:
        """The key smoothing scales per layer [H, D] for keys with (or without) the offsets subtracted."""
        assert self.smooth is not None, "this basis file has no key smoothing scales"
        return self.smooth if use_offsets or self.smooth_raw is None else self.smooth_raw

    def metadata(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, "model": self.model, "num_layers": self.num_layers,
                "num_kv_heads": self.num_kv_heads, "head_dim": self.head_dim, "ranks": self.ranks,
                "basis_space": self.basis_space, **self.extra}

    def save(self, path: str | Path, basis_dtype: torch.dtype = torch.float32) -> None:
        """``basis_dtype``: that of the stored basis columns. float16 halves a file (:meth:`load` reads
        them back as float32); its rounding, about 5e-4 relative, is far below the bf16 rounding of the cache
        itself. Spectra, offsets and scales stay float32."""
        from safetensors.torch import save_file

        tensors: dict[str, torch.Tensor] = {}
        for t in TENSORS:
            for i in range(self.num_layers):
                tensors[f"{t}.basis.{i}"] = self.bases[t][i].to(basis_dtype).contiguous()
                tensors[f"{t}.eigenvalues.{i}"] = self.eigenvalues[t][i].float().contiguous()
                off = self.offsets.get(t, [None] * self.num_layers)[i]
                if off is not None:
                    tensors[f"{t}.offset.{i}"] = off.float().contiguous()
        tensors.update(self.smooth_tensors())
        meta = self.metadata()
        if basis_dtype != torch.float32:
            meta["basis_dtype"] = str(basis_dtype).removeprefix("torch.")
        save_file(tensors, str(path), metadata={META_KEY: json.dumps(meta)})

    def smooth_tensors(self) -> dict[str, torch.Tensor]:
        """The ``k.smooth.{i}`` tensors to save (none when the file has no smoothing)."""
        out: dict[str, torch.Tensor] = {}
        if self.smooth_raw is not None and self.smooth is None:
            raise BasisFileError("k.smooth_raw scales need k.smooth scales beside them")
        for name, scales in (("smooth", self.smooth), ("smooth_raw", self.smooth_raw)):
            if scales is not None:
                check_smoothing(scales, self.num_layers, self.num_kv_heads, self.head_dim, self.path or "<new>",
                                name)
                out.update({f"k.{name}.{i}": s.float().contiguous() for i, s in enumerate(scales)})
        return out

    @staticmethod
    def load(path: str | Path) -> "BasisFile":
        from safetensors import safe_open

        p = Path(path)
        if not p.is_file():
            raise BasisFileError(f"basis file {str(p)!r} does not exist; give the path of a file made by "
                                 f"scripts/calibrate.py")
        try:
            with safe_open(str(p), framework="pt") as f:
                raw = (f.metadata() or {}).get(META_KEY)
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises several types for a bad file
            raise BasisFileError(f"basis file {str(p)!r} is not a readable safetensors file: {e}") from e
        if raw is None:
            raise BasisFileError(f"basis file {str(p)!r} has no '{META_KEY}' metadata; it was not made by "
                                 f"vllm-lowrank")
        try:
            meta = json.loads(raw)
            n, h, d = int(meta["num_layers"]), int(meta["num_kv_heads"]), int(meta["head_dim"])
        except (ValueError, KeyError, TypeError) as e:
            raise BasisFileError(f"basis file {str(p)!r}: bad metadata ({e})") from e
        if meta.get("format_version") != FORMAT_VERSION:
            raise BasisFileError(f"basis file {str(p)!r} has format_version {meta.get('format_version')}, "
                                 f"this plugin reads version {FORMAT_VERSION}")
        bases: dict[str, list[torch.Tensor]] = {}
        eig: dict[str, list[torch.Tensor]] = {}
        offs: dict[str, list[torch.Tensor | None]] = {}
        for t in TENSORS:
            bases[t], eig[t], offs[t] = [], [], []
            for i in range(n):
                b, e = tensors.get(f"{t}.basis.{i}"), tensors.get(f"{t}.eigenvalues.{i}")
                if b is None or e is None:
                    raise BasisFileError(f"basis file {str(p)!r} lacks the {t.upper()} basis of layer {i}")
                if b.ndim != 3 or b.shape[:2] != (h, d) or not 1 <= b.shape[2] <= d or e.shape != (h, d):
                    raise BasisFileError(f"basis file {str(p)!r}: {t.upper()} basis of layer {i} has shape "
                                         f"{tuple(b.shape)}, expected ({h}, {d}, R<= {d})")
                bases[t].append(b.float())
                eig[t].append(e.float())
                o = tensors.get(f"{t}.offset.{i}")
                offs[t].append(None if o is None else o.float())
        if any(k.startswith("v.smooth") for k in tensors):
            raise BasisFileError(f"basis file {str(p)!r} has value smoothing scales (v.smooth*): only keys "
                                 f"can be smoothed")
        smooth, smooth_raw = (_load_scales(tensors, name, n, h, d, str(p)) for name in ("smooth", "smooth_raw"))
        if smooth_raw is not None and smooth is None:
            raise BasisFileError(f"basis file {str(p)!r} has k.smooth_raw scales without k.smooth scales")
        extra = {k: v for k, v in meta.items() if k not in (
            "format_version", "model", "num_layers", "num_kv_heads", "head_dim", "ranks", "basis_space")}
        return BasisFile(n, h, d, bases, eig, offs, meta.get("ranks") or {}, meta.get("model", ""),
                         meta.get("basis_space", "post_rope"), extra, str(p), smooth, smooth_raw)

    def check_model(self, num_layers: int, num_kv_heads: int, head_dim: int) -> None:
        """Raise :class:`BasisFileError` naming every way this file does not fit the model."""
        wrong = [f"{what}: file has {mine}, model has {theirs}" for what, mine, theirs in (
            ("layers", self.num_layers, num_layers), ("KV heads", self.num_kv_heads, num_kv_heads),
            ("head_dim", self.head_dim, head_dim)) if mine != theirs]
        if wrong:
            raise BasisFileError(f"basis file {self.path!r} (calibrated on {self.model or 'unknown model'}) "
                                 f"does not match the model: " + "; ".join(wrong))
        if self.basis_space != "post_rope":
            raise BasisFileError(f"basis file {self.path!r} is a {self.basis_space!r} basis; this backend "
                                 f"uses post-RoPE bases")


def _load_scales(tensors: dict[str, torch.Tensor], name: str, n: int, h: int, d: int,
                 where: str) -> list[torch.Tensor] | None:
    """The ``k.{name}.{i}`` scales of every layer (None when the file has none), checked."""
    prefix = f"k.{name}."
    found = sorted(k for k in tensors if k.startswith(prefix))
    if not found:
        return None
    scales = []
    for i in range(n):
        s = tensors.get(f"{prefix}{i}")
        if s is None:
            raise BasisFileError(f"basis file {where!r} has key smoothing scales ({prefix}*) for some layers but "
                                 f"not for layer {i}: a file has them for every layer or none")
        scales.append(s.float())
    extra_keys = set(found) - {f"{prefix}{i}" for i in range(n)}
    if extra_keys:
        raise BasisFileError(f"basis file {where!r}: unexpected tensors {sorted(extra_keys)} (the file has {n} "
                             f"layers)")
    check_smoothing(scales, n, h, d, where, name)
    return scales


def check_smoothing(smooth: list[torch.Tensor], num_layers: int, num_kv_heads: int, head_dim: int,
                    where: str, name: str = "smooth") -> None:
    """Raise :class:`BasisFileError` unless ``smooth`` holds ``num_layers`` positive finite [H, D] scales."""
    if len(smooth) != num_layers:
        raise BasisFileError(f"basis file {where!r}: key smoothing scales (k.{name}.*) for {len(smooth)} layers, "
                             f"the file has {num_layers}")
    for i, s in enumerate(smooth):
        if tuple(s.shape) != (num_kv_heads, head_dim):
            raise BasisFileError(f"basis file {where!r}: key smoothing scales of layer {i} (k.{name}.{i}) have "
                                 f"shape {tuple(s.shape)}, expected ({num_kv_heads}, {head_dim}) (KV heads, "
                                 f"head_dim)")
        if not bool(torch.isfinite(s).all()) or not bool((s > 0).all()):
            raise BasisFileError(f"basis file {where!r}: key smoothing scales of layer {i} (k.{name}.{i}) must "
                                 f"be positive and finite")


def orthonormal_basis_file(num_layers: int, num_kv_heads: int, head_dim: int, *, seed: int = 0,
                           rank: int | None = None, model: str = "random") -> BasisFile:
    """A basis file of random orthonormal bases (for tests and ablations: no calibration)."""
    g = torch.Generator().manual_seed(seed)
    r = rank or head_dim
    bases: dict[str, list[torch.Tensor]] = {t: [] for t in TENSORS}
    eig: dict[str, list[torch.Tensor]] = {t: [] for t in TENSORS}
    for t in TENSORS:
        for _ in range(num_layers):
            q, _ = torch.linalg.qr(torch.randn(num_kv_heads, head_dim, head_dim, generator=g, dtype=torch.float64))
            bases[t].append(q[..., :r].float())
            eig[t].append(torch.ones(num_kv_heads, head_dim))
    ranks = {t: [r] * num_layers for t in TENSORS}
    return BasisFile(num_layers, num_kv_heads, head_dim, bases, eig, {}, ranks, model)
