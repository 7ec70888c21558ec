"""The plugin's settings: ``additional_config={"lowrank": {...}}``, parsed and checked against the model.

Keys (all optional):

- ``format``: a preset (``full``, ``int8``, ``fp8``, ``int4``, ``lowrank``, ``lowrank+int8``,
  ``lowrank+fp8``), a tensor format used for both K and V (``r16+int8``), or ``{"k": ..., "v": ...}``.
  Default ``int8``.
- ``rank_k``, ``rank_v``: ranks for the ``lowrank*`` presets (default: the basis file's ranks).
- ``basis``: path of a basis file (needed by any ``r<N>`` format).
- ``layers``: per-layer overrides, ``{"0": {"k": "r16", "v": "int8"}, "5": "fp8", ...}``; each value
  takes the same forms as ``format``. Together with ``format`` this is a per-layer plan.
- ``plan``: ``"<plans file>:<name>"``, a per-layer plan chosen by ``scripts/choose_plan.py`` (e.g.
  ``bases/smollm2-135m.plans.json:2x``): its layers, settings and basis file, under any of the keys
  above that are also given.
- ``offset``: subtract the basis file's calibrated offsets (default: true when the file has them).
- ``smooth_keys``: query-weighted key smoothing with the basis file's scales (``k.smooth.*``, or
  ``k.smooth_raw.*`` with ``offset: false`` when the file has them): keys are divided per channel by
  ``s`` before their transform, queries multiplied by ``s`` (exact before rounding). ``true``: on for
  every layer whose K is compressed (any transform or quantized storage; a K kept exact is left alone);
  an error when the file has no scales. Default false: measured in vLLM on SmolLM2 (EVALUATION.md), it
  cuts rotated int4's cost without offsets (+3.65% -> +2.54%) but adds nothing to the offsets, which are
  on by default with a calibrated basis file.
- ``prefill_from_cache``: prefill attends over the stored (compressed) K/V instead of the prompt's own
  exact K/V, so that perplexity measures what decode sees (default false).
- ``exact_window``, ``exact_sink``: a layered cache (:mod:`vllm_lowrank.layered`): each sequence's last
  ``exact_window`` tokens and its first ``exact_sink`` tokens are also kept exact, in ring blocks at the
  front of its block-table row, and attention reads them exact (default 0 and 0: off). Needs prefix
  caching off. On CUDA, decode runs the Triton kernels (the ring is one more split); continuation
  chunks and ``prefill_from_cache`` prompts run the PyTorch path per request.
- ``exact_dtype``: how the ring keeps those tokens: ``model`` (the model dtype, default) or ``int8``
  (per-token scales: about half the ring blocks).
- ``calibrate``: accumulate per-layer statistics of Q, K (post- and pre-RoPE) and V for calibration
  (see :mod:`vllm_lowrank.calibration`; default false).
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .basis import BasisFile, BasisFileError
from .formats import RANKED_PRESETS, RING_DTYPES, FormatError, LayerFormat, PRESETS, TensorFormat, preset_format
from .transforms import smoothing_applies

CONFIG_KEY = "lowrank"
DEFAULT_FORMAT = "int8"
KNOWN_KEYS = ("format", "rank_k", "rank_v", "basis", "layers", "plan", "offset", "smooth_keys", "prefill_from_cache",
              "calibrate", "exact_window", "exact_sink", "exact_dtype")
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class LowRankConfigError(ValueError):
    """A bad ``lowrank`` setting; the message names the setting and what would be accepted."""


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    num_kv_heads: int  # total, before tensor-parallel sharding
    head_dim: int
    name: str = ""


@dataclass
class LowRankConfig:
    raw: dict[str, Any]
    default: LayerFormat
    overrides: dict[int, LayerFormat] = field(default_factory=dict)
    basis: BasisFile | None = None
    use_offsets: bool = False
    prefill_from_cache: bool = False
    calibrate: bool = False
    smooth_keys: bool = False
    exact_window: int = 0
    exact_sink: int = 0
    exact_dtype: str = "model"

    @property
    def layered(self) -> bool:
        """Whether some tokens of every sequence are also kept exact (:mod:`vllm_lowrank.layered`)."""
        return self.exact_window + self.exact_sink > 0

    def layer_format(self, layer: int) -> LayerFormat:
        return self.overrides.get(layer, self.default)

    def smooth_layer(self, layer: int) -> bool:
        """Whether layer ``layer``'s keys are smoothed with the basis file's scales."""
        return smooth_keys_for(self.layer_format(layer).k, self.smooth_keys)

    def describe(self, num_layers: int) -> str:
        fmts = [str(self.layer_format(i)) + (" (K smoothed)" if self.smooth_layer(i) else "")
                for i in range(num_layers)]
        if len(set(fmts)) == 1:
            return f"all {num_layers} layers {fmts[0]}"
        return "; ".join(f"layer {i}: {f}" for i, f in enumerate(fmts))


def smooth_keys_for(k_format: TensorFormat, setting: bool | None) -> bool:
    """The ``smooth_keys`` rule for one layer's K format (``setting``: the setting; None when absent: off)."""
    return bool(setting) and smoothing_applies(k_format)


def layer_index(layer_name: str) -> int:
    """The decoder layer number in a vLLM attention layer name (``model.layers.7.self_attn.attn``)."""
    m = _LAYER_RE.search(layer_name)
    if m is None:
        raise LowRankConfigError(f"cannot tell the layer number of attention layer {layer_name!r}")
    return int(m.group(1))


def _parse_layer_format(value: Any, what: str, rank_k: int | None, rank_v: int | None) -> LayerFormat:
    if isinstance(value, dict):
        unknown = set(value) - {"k", "v"}
        if unknown or not value:
            raise LowRankConfigError(f"{what}: a per-tensor format is {{'k': ..., 'v': ...}}, got {value!r}")
        k = TensorFormat.parse(str(value.get("k", "model")))
        v = TensorFormat.parse(str(value.get("v", "model")))
        return LayerFormat(k, v)
    if not isinstance(value, str):
        raise LowRankConfigError(f"{what}: expected a format name or {{'k': ..., 'v': ...}}, got {value!r}")
    if value.strip().lower() in PRESETS:
        return preset_format(value, rank_k, rank_v)
    try:
        t = TensorFormat.parse(value)
    except FormatError as e:
        raise LowRankConfigError(f"{what}: unknown format {value!r}; accepted: a preset ({', '.join(PRESETS)}), "
                                 f"a tensor format such as 'r16+int8', or {{'k': ..., 'v': ...}}") from e
    return LayerFormat(t, t)


def _check_rank(name: str, r: Any, head_dim: int) -> None:
    if r is None:
        return
    if not isinstance(r, int) or isinstance(r, bool) or not 1 <= r <= head_dim:
        raise LowRankConfigError(f"{name}={r!r} is out of range: a rank must be an integer from 1 to "
                                 f"head_dim={head_dim}")


def parse(raw: dict[str, Any] | None, shape: ModelShape) -> LowRankConfig:
    """Parse and check the settings for a model of the given shape; raise with a clear message."""
    raw = dict(raw or {})
    unknown = sorted(set(raw) - set(KNOWN_KEYS))
    if unknown:
        raise LowRankConfigError(f"unknown lowrank setting(s) {unknown}; accepted: {', '.join(KNOWN_KEYS)}")
    if raw.get("plan") is not None:
        raw = {**expand_plan(str(raw["plan"]), raw.get("offset")), **{k: v for k, v in raw.items() if k != "plan"}}
    d = shape.head_dim
    basis = None
    if raw.get("basis") is not None:
        try:
            basis = BasisFile.load(raw["basis"])
            basis.check_model(shape.num_layers, shape.num_kv_heads, d)
        except BasisFileError as e:
            raise LowRankConfigError(str(e)) from e

    rank_k, rank_v = raw.get("rank_k"), raw.get("rank_v")
    _check_rank("rank_k", rank_k, d)
    _check_rank("rank_v", rank_v, d)
    fmt_value = raw.get("format", DEFAULT_FORMAT)
    if (isinstance(fmt_value, str) and fmt_value.strip().lower() in RANKED_PRESETS
            and (rank_k is None or rank_v is None) and basis is not None and basis.ranks):
        # default ranks from the basis file: uniform only (per-layer ranks go through ``layers``)
        rk, rv = set(basis.ranks.get("k", [])), set(basis.ranks.get("v", []))
        if len(rk) == 1 and len(rv) == 1:
            rank_k = rank_k if rank_k is not None else rk.pop()
            rank_v = rank_v if rank_v is not None else rv.pop()
        else:
            overrides_from_file = {i: preset_format(fmt_value, basis.ranks["k"][i], basis.ranks["v"][i])
                                   for i in range(shape.num_layers)}
            raw.setdefault("layers", {})
            raw["layers"] = {**{str(i): {"k": str(f.k), "v": str(f.v)} for i, f in overrides_from_file.items()},
                             **raw["layers"]}
            rank_k = rank_k if rank_k is not None else max(basis.ranks["k"])
            rank_v = rank_v if rank_v is not None else max(basis.ranks["v"])
    try:
        default = _parse_layer_format(fmt_value, "format", rank_k, rank_v)
    except FormatError as e:
        raise LowRankConfigError(str(e)) from e

    layers = raw.get("layers") or {}
    if not isinstance(layers, dict):
        raise LowRankConfigError(f"layers: expected {{layer number: format}}, got {layers!r}")
    overrides: dict[int, LayerFormat] = {}
    for key, value in layers.items():
        try:
            i = int(key)
        except (TypeError, ValueError):
            raise LowRankConfigError(f"layers: {key!r} is not a layer number") from None
        if not 0 <= i < shape.num_layers:
            raise LowRankConfigError(f"layers: layer {i} does not exist; the model has layers 0.."
                                     f"{shape.num_layers - 1}")
        try:
            overrides[i] = _parse_layer_format(value, f"layers[{i}]", rank_k, rank_v)
        except FormatError as e:
            raise LowRankConfigError(f"layers[{i}]: {e}") from e

    ranked = [v for v in (fmt_value, *layers.values()) if isinstance(v, str) and v.strip().lower() in RANKED_PRESETS]
    if (raw.get("rank_k") is not None or raw.get("rank_v") is not None) and not ranked:
        raise LowRankConfigError(f"rank_k/rank_v are set, but no format takes them: they are the ranks of the presets "
                                 f"{', '.join(RANKED_PRESETS)}, and format {fmt_value!r} has none (for int8 with a "
                                 f"rank use 'lowrank+int8'; a tensor format carries its own rank, e.g. 'r32+int8')")
    use_offsets = raw.get("offset")
    if use_offsets is not None and not isinstance(use_offsets, bool):
        raise LowRankConfigError(f"offset={use_offsets!r}: expected true or false")
    if use_offsets is None:
        use_offsets = basis is not None and basis.has_offsets()
    elif use_offsets and (basis is None or not basis.has_offsets()):
        raise LowRankConfigError("offset=true needs a basis file with calibrated offsets; "
                                 "set 'basis' to one made by scripts/calibrate.py, or drop 'offset'")
    smooth = raw.get("smooth_keys")
    if smooth is not None and not isinstance(smooth, bool):
        raise LowRankConfigError(f"smooth_keys={smooth!r}: expected true or false (the default)")
    if smooth and (basis is None or not basis.has_smoothing()):
        where = "no basis file is set" if basis is None else f"the basis file {basis.path!r} has no key smoothing scales"
        raise LowRankConfigError(f"smooth_keys=true needs a basis file with key smoothing scales (k.smooth.*), but "
                                 f"{where}; make one with scripts/calibrate.py (it writes them unless --no-smooth), "
                                 f"or drop 'smooth_keys'")
    exact = {}
    for key in ("exact_window", "exact_sink"):
        n = raw.get(key, 0)
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise LowRankConfigError(f"{key}={n!r}: expected a number of tokens (an integer >= 0)")
        exact[key] = n
    exact["exact_dtype"] = raw.get("exact_dtype", "model")
    if exact["exact_dtype"] not in RING_DTYPES:
        raise LowRankConfigError(f"exact_dtype={exact['exact_dtype']!r}: expected one of {', '.join(RING_DTYPES)} "
                                 f"(how a layered cache keeps its exact tokens; default 'model')")
    if "exact_dtype" in raw and not exact["exact_window"] + exact["exact_sink"]:
        raise LowRankConfigError("exact_dtype is set but no token is kept exact: set exact_window and/or "
                                 "exact_sink (a layered cache), or drop exact_dtype")
    cfg = LowRankConfig(raw, default, overrides, basis, bool(use_offsets), bool(raw.get("prefill_from_cache")),
                        bool(raw.get("calibrate")), bool(smooth), **exact)

    for i in range(shape.num_layers):
        fmt = cfg.layer_format(i)
        for t, tf in (("k", fmt.k), ("v", fmt.v)):
            where = f"layer {i} {t.upper()} format {tf}"
            try:
                tf.validate(d, where)
            except FormatError as e:
                raise LowRankConfigError(str(e)) from e
            if tf.transform == "basis":
                if basis is None:
                    raise LowRankConfigError(f"{where} projects onto a basis, but no basis file is set; add "
                                             f"'basis': '/path/to/basis.safetensors' (made by "
                                             f"scripts/calibrate.py)")
                if tf.rank > basis.stored_rank(t, i):
                    raise LowRankConfigError(f"{where}: rank {tf.rank} exceeds the {basis.stored_rank(t, i)} "
                                             f"basis vectors stored for layer {i} in {basis.path!r}")
    if smooth and not any(cfg.smooth_layer(i) for i in range(shape.num_layers)):
        raise LowRankConfigError("smooth_keys=true, but no layer compresses K (every K format is the model's own "
                                 "values): there is nothing to smooth; drop 'smooth_keys'")
    return cfg


def is_layered(raw: dict[str, Any] | None) -> bool:
    """Whether these settings, a plan's own settings included, make a layered cache (its rings are per
    request, so vLLM must run it with prefix caching off: :func:`vllm_lowrank.checks.check_layered`)."""
    if not raw:
        return False
    if raw.get("plan") is not None:
        raw = {**expand_plan(str(raw["plan"]), raw.get("offset")), **raw}
    return bool(raw.get("exact_window") or raw.get("exact_sink"))


def expand_plan(ref: str, offset: bool | None = None) -> dict[str, Any]:
    """The settings of plan ``<plans file>:<name>``: its ``layers``, its ``settings`` and its basis file.

    A bare file name that does not exist here names a plans file shipped with the plugin
    (``smollm2-135m.plans.json:2x`` works wherever the plugin is installed).

    A plan's own ``basis`` (a path relative to the plans file's folder or its parent) wins; otherwise a
    plan whose formats, offsets or key smoothing need one gets ``<name>.safetensors`` beside ``<name>.plans.json``
    (``offset``: the user's ``offset`` setting, which overrides the plan's).
    """
    path_text, sep, name = ref.rpartition(":")
    path = Path(path_text)
    if sep and not path.is_file() and path.name == path_text:
        from . import bundled

        shipped = Path(bundled(path_text))
        path = shipped if shipped.is_file() else path
    if not sep or not path.is_file():
        raise LowRankConfigError(f"plan={ref!r}: expected '<plans file>:<plan name>' naming an existing plans "
                                 f"file (made by scripts/choose_plan.py), e.g. 'bases/smollm2-135m.plans.json:2x', "
                                 f"or one shipped with the plugin by its file name ('smollm2-135m.plans.json:2x')")
    try:
        plans = json.loads(path.read_text())["plans"]
    except (ValueError, KeyError, TypeError) as e:
        raise LowRankConfigError(f"plan={ref!r}: {path} is not a plans file ({e})") from e
    if name not in plans:
        raise LowRankConfigError(f"plan={ref!r}: no plan {name!r} in {path}; it has {', '.join(plans)}")
    plan = plans[name]
    settings: dict[str, Any] = {"layers": plan["layers"], **plan.get("settings", {})}
    own = plan.get("basis")
    if own:
        candidates = [path.parent / own, path.parent.parent / own, Path(own)]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise LowRankConfigError(f"plan={ref!r} needs the basis file {own}, which is missing"
                                     f"{': ' + plan['note'] if plan.get('note') else ''}")
        settings["basis"] = str(found)
    else:
        beside = path.with_name(path.name.replace(".plans.json", ".safetensors"))
        formats = [str(f) for kv in plan["layers"].values() for f in (kv.values() if isinstance(kv, dict) else [kv])]
        wants_offset = settings.get("offset", True) if offset is None else offset
        if beside.is_file() and (any(f.startswith("r") for f in formats) or wants_offset
                                 or settings.get("smooth_keys")):
            settings["basis"] = str(beside)
    return settings


def raw_settings(additional_config: dict[str, Any] | None) -> dict[str, Any] | None:
    """The ``lowrank`` dict of vLLM's ``additional_config`` (None when absent)."""
    if not additional_config:
        return None
    raw = additional_config.get(CONFIG_KEY)
    if raw is None:
        return None
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as e:
            raise LowRankConfigError(f"additional_config['{CONFIG_KEY}'] is not valid JSON: {e}") from e
    if not isinstance(raw, dict):
        raise LowRankConfigError(f"additional_config['{CONFIG_KEY}'] must be a dict, got {type(raw).__name__}")
    return raw


@functools.lru_cache(maxsize=8)
def _cached(raw_json: str, shape: ModelShape) -> LowRankConfig:
    return parse(json.loads(raw_json), shape)


def cached_parse(raw: dict[str, Any] | None, shape: ModelShape) -> LowRankConfig:
    """:func:`parse`, memoized per process (each layer asks; the basis file is read once)."""
    return _cached(json.dumps(raw or {}, sort_keys=True), shape)
