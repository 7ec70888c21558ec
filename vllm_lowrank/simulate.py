"""A fast PyTorch simulation of the compressed cache on the Hugging Face model (transformers).

Every cached K and V of a layer goes through the plugin's own encode/decode (:mod:`vllm_lowrank.codec`,
:mod:`vllm_lowrank.transforms`, same basis file, same offsets rule as the plugin: offsets apply to every
format when the file has them), and every query attends over the compressed K/V, its own token
included: what decode sees, and what the plugin's ``prefill_from_cache`` evaluation measures. Used for
the sensitivity sweep (one layer's K or V compressed at a time, running only the layers from that one
on, the earlier hidden states being cached) and to check plans before they are measured inside vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .basis import BasisFile
from .codec import decode_tensor, encode_tensor
from .formats import SlotLayout, TensorFormat
from .transforms import TensorTransform, build_tensor_transform

ATTN_NAME = "lowrank_sim"


@dataclass
class SimState:
    """What the attention function applies: per layer, a (K transform, V transform) pair of codecs."""

    codecs: dict[int, tuple[Any, Any]] = field(default_factory=dict)
    capture: dict[int, torch.Tensor] | None = None  # layer -> attention probabilities [Hq, T, T]
    capture_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None  # layer -> post-RoPE K, V [T, H, D]
    recent_window: int = 0  # each query reads its last ``recent_window`` positions (itself included) exact
    exact_prefix: int = 0  # the first positions (attention sinks) are read exact too


_STATE = SimState()


class TensorCodec:
    """Compress-decompress one of K/V [N, H, D] exactly as the plugin stores and reads it."""

    def __init__(self, fmt: TensorFormat, transform: TensorTransform, head_dim: int):
        self.fmt, self.tr = fmt, transform
        from .formats import LayerFormat

        self.slot = SlotLayout.build(LayerFormat(fmt, fmt), head_dim, torch.float32).k

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n, h, d = x.shape
        if self.fmt.storage == "model" and self.tr.is_identity:
            return x
        lat = self.tr.project(x)
        if self.fmt.storage != "model":
            rows = torch.zeros(n, h, max(self.slot.zero_offset, self.slot.scale_offset) + 2, dtype=torch.uint8)
            encode_tensor(lat, self.slot, rows)
            lat = decode_tensor(rows, self.slot, torch.float32)
        return self.tr.reconstruct(lat, 1)


def make_codec(fmt: str | TensorFormat, t: str, layer: int, basis: BasisFile | None, head_dim: int,
               num_kv_heads: int, use_offsets: bool | None = None, smooth_keys: bool = False) -> TensorCodec:
    """``smooth_keys``: the plugin's setting of that name (keys only)."""
    from .config import smooth_keys_for

    tf = TensorFormat.parse(fmt) if isinstance(fmt, str) else fmt
    tf.validate(head_dim)
    if use_offsets is None:
        use_offsets = basis is not None and basis.has_offsets()
    b = basis.bases[t][layer] if basis is not None else None
    off = basis.offsets[t][layer] if (basis is not None and use_offsets) else None
    if tf.transform == "basis" and (b is None or b.shape[-1] < tf.rank):
        raise ValueError(f"layer {layer} {t.upper()} format {tf} needs {tf.rank} basis columns")
    smooth = None
    if t == "k" and smooth_keys_for(tf, smooth_keys):
        if basis is None or not basis.has_smoothing():
            raise ValueError("smooth_keys=true needs a basis file with key smoothing scales")
        smooth = basis.key_scales(use_offsets)[layer]
    return TensorCodec(tf, build_tensor_transform(tf, num_kv_heads, head_dim, b, off, smooth), head_dim)


def plan_codecs(plan: dict[int, tuple[str, str]], basis: BasisFile | None, head_dim: int, num_kv_heads: int,
                use_offsets: bool | None = None, smooth_keys: bool = False) -> dict[int, tuple[TensorCodec, TensorCodec]]:
    """Per layer of ``plan`` (layer -> (K format, V format)), its (K, V) codecs under the plugin's settings."""
    return {int(i): (make_codec(kf, "k", int(i), basis, head_dim, num_kv_heads, use_offsets, smooth_keys),
                     make_codec(vf, "v", int(i), basis, head_dim, num_kv_heads, use_offsets, smooth_keys))
            for i, (kf, vf) in plan.items()}


def _attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """query [B, Hq, T, D], key/value [B, H, T, D] post-RoPE; B must be 1."""
    layer = module.layer_idx
    b, h, t, d = key.shape
    codec = _STATE.codecs.get(layer)
    if codec is not None:
        kc, vc = codec
        k2 = key[0].transpose(0, 1).float()
        v2 = value[0].transpose(0, 1).float()
        exact = key, value
        key = kc(k2).transpose(0, 1)[None].to(query.dtype)
        value = vc(v2).transpose(0, 1)[None].to(query.dtype)
        if _STATE.recent_window > 0 or _STATE.exact_prefix > 0:
            return _recent_window_attention(query, key, value, *exact, _STATE.recent_window, scaling,
                                            _STATE.exact_prefix), None
    if _STATE.capture_kv is not None:
        _STATE.capture_kv[layer] = (key[0].transpose(0, 1).float().clone(), value[0].transpose(0, 1).float().clone())
    g = query.shape[1] // h
    k = key.repeat_interleave(g, 1)
    v = value.repeat_interleave(g, 1)
    if _STATE.capture is not None:
        s = torch.einsum("bhqd,bhkd->bhqk", query.float(), k.float()) * scaling
        s = s.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
        p = s.softmax(-1)
        _STATE.capture[layer] = p[0].clone()
        out = torch.einsum("bhqk,bhkd->bhqd", p, v.float()).to(query.dtype)
    else:
        out = F.scaled_dot_product_attention(query, k, v, is_causal=True, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def _recent_window_attention(query: torch.Tensor, k_c: torch.Tensor, v_c: torch.Tensor, k_e: torch.Tensor,
                             v_e: torch.Tensor, window: int, scaling: float, prefix: int = 0) -> torch.Tensor:
    """Causal attention in which query ``t`` reads positions ``t - window + 1 .. t`` and the first
    ``prefix`` positions from the exact K/V and the others from the compressed K/V (a recent-window cache
    with attention sinks, in float32); [B, T, Hq, D] out."""
    t = query.shape[2]
    g = query.shape[1] // k_c.shape[1]
    q = query.float()
    s_c, s_e = (torch.einsum("bhqd,bhkd->bhqk", q, k.float().repeat_interleave(g, 1)) for k in (k_c, k_e))
    pos = torch.arange(t)
    age = pos[:, None] - pos[None, :]
    recent = (age >= 0) & ((age < window) | (pos[None, :] < prefix))
    s = torch.where(recent, s_e, s_c) * scaling
    p = s.masked_fill(age < 0, float("-inf")).softmax(-1)
    out = (torch.einsum("bhqk,bhkd->bhqd", p * recent, v_e.float().repeat_interleave(g, 1))
           + torch.einsum("bhqk,bhkd->bhqd", p * ~recent, v_c.float().repeat_interleave(g, 1)))
    return out.to(query.dtype).transpose(1, 2).contiguous()


def load_model(model: str | Path, dtype: torch.dtype = torch.float32):
    from transformers import AttentionInterface, AutoModelForCausalLM

    AttentionInterface.register(ATTN_NAME, _attention)
    m = AutoModelForCausalLM.from_pretrained(str(model), dtype=dtype)
    m.config._attn_implementation = ATTN_NAME
    for layer in m.model.layers:
        layer.self_attn.config._attn_implementation = ATTN_NAME
    m.eval()
    return m


class Simulator:
    """Runs windows through the HF model with a chosen compression per layer."""

    def __init__(self, model_path: str | Path, basis: BasisFile | None = None, dtype: torch.dtype = torch.float32,
                 use_offsets: bool | None = None, smooth_keys: bool = False, exact_window: int = 0,
                 exact_sink: int = 0):
        """``use_offsets``, ``smooth_keys``, ``exact_window`` and ``exact_sink``: the plugin's settings of
        those names (``use_offsets=None``: the plugin's default, offsets whenever the basis file has them;
        the exact tokens of a layered cache are read in float32, as a model-dtype ring holds them)."""
        self.model = load_model(model_path, dtype)
        self.use_offsets, self.smooth_keys = use_offsets, smooth_keys
        self.exact_window, self.exact_sink = exact_window, exact_sink
        cfg = self.model.config
        self.num_layers = cfg.num_hidden_layers
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.basis = basis
        self._cache: list[dict[str, Any]] = []

    def set_plan(self, plan: dict[int, tuple[str, str]] | None) -> None:
        """plan: layer -> (K format, V format); layers left out stay exact."""
        _STATE.codecs = plan_codecs(plan or {}, self.basis, self.head_dim, self.num_kv_heads, self.use_offsets,
                                    self.smooth_keys)

    def set_codecs(self, codecs: dict[int, tuple[Any, Any]]) -> None:
        _STATE.codecs = dict(codecs)

    @torch.no_grad()
    def prepare(self, windows: list[list[int]]) -> None:
        """Run the exact model once per window; cache each layer's input and the reference log-probs."""
        self.set_plan(None)
        self._cache = []
        m = self.model.model
        for w in windows:
            ids = torch.tensor([w])
            pos = torch.arange(len(w))[None]
            h = m.embed_tokens(ids)
            pe = m.rotary_emb(h, pos)
            inputs = []
            for layer in m.layers:
                inputs.append(h)
                h = layer(h, attention_mask=None, position_ids=pos, position_embeddings=pe)
            logp = self._logp(h)
            self._cache.append({"ids": ids, "pos": pos, "pe": pe, "inputs": inputs,
                                "ref_logp": logp})

    def _logp(self, h: torch.Tensor) -> torch.Tensor:
        h = self.model.model.norm(h)
        return torch.log_softmax(self.model.lm_head(h)[0, :-1].float(), -1)

    @torch.no_grad()
    def run(self, start_layer: int = 0) -> dict[str, float]:
        """Mean NLL and mean KL(reference || compressed) per predicted token over the prepared windows,
        recomputing only layers >= ``start_layer`` (correct when every compressed layer is >= it)."""
        m = self.model.model
        nll = kl = 0.0
        n = 0
        _STATE.recent_window, _STATE.exact_prefix = self.exact_window, self.exact_sink
        for c in self._cache:
            h = c["inputs"][start_layer]
            for layer in m.layers[start_layer:]:
                h = layer(h, attention_mask=None, position_ids=c["pos"], position_embeddings=c["pe"])
            logp = self._logp(h)
            tgt = c["ids"][0, 1:]
            nll += float(-logp.gather(-1, tgt[:, None]).sum())
            ref = c["ref_logp"].float()
            kl += float((ref.exp() * (ref - logp)).sum())
            n += tgt.numel()
        return {"nll": nll / n, "kl": kl / n, "tokens": n}

    def reference(self) -> dict[str, float]:
        self.set_plan(None)
        return self.run(0)
