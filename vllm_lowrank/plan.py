"""The per-layer plan resolved for one vLLM model: settings + model shape -> slot layouts and transforms.

Used by the KV cache spec patch (page sizes), the backend (store/attention state) and the start-up
checks, so that all three see the same layout for a layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from vllm.config import VllmConfig

from .config import LowRankConfig, LowRankConfigError, ModelShape, cached_parse, raw_settings
from .formats import SlotLayout
from .transforms import LayerTransforms, build_tensor_transform


@dataclass
class LayerState:
    layout: SlotLayout
    transforms: LayerTransforms


def model_shape(vllm_config: VllmConfig) -> ModelShape:
    mc = vllm_config.model_config
    return ModelShape(num_layers=mc.get_total_num_hidden_layers(),
                      num_kv_heads=mc.get_total_num_kv_heads(),
                      head_dim=mc.get_head_size(), name=str(mc.model))


def plugin_config(vllm_config: VllmConfig) -> LowRankConfig:
    """The parsed ``lowrank`` settings for this model (raises :class:`LowRankConfigError`)."""
    return cached_parse(raw_settings(vllm_config.additional_config), model_shape(vllm_config))


def layer_layout(cfg: LowRankConfig, layer: int, head_dim: int, model_dtype: torch.dtype) -> SlotLayout:
    return SlotLayout.build(cfg.layer_format(layer), head_dim, model_dtype)


def kv_head_range(total_kv_heads: int, local_kv_heads: int) -> range:
    """The KV heads of the full model that this tensor-parallel rank holds."""
    from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

    try:
        rank, world = get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
    except (AssertionError, RuntimeError):  # no distributed state (unit tests)
        rank, world = 0, 1
    if local_kv_heads == total_kv_heads:
        return range(total_kv_heads)
    if total_kv_heads >= world:
        return range(rank * local_kv_heads, (rank + 1) * local_kv_heads)
    head = rank * total_kv_heads // world  # replicated KV heads
    return range(head, head + 1)


def build_layer_state(cfg: LowRankConfig, layer: int, local_kv_heads: int, head_dim: int,
                      vllm_config: VllmConfig, device: torch.device) -> LayerState:
    """Slot layout and transforms (on ``device``) of one layer for this rank's KV heads."""
    fmt = cfg.layer_format(layer)
    layout = layer_layout(cfg, layer, head_dim, vllm_config.model_config.dtype)
    total = model_shape(vllm_config).num_kv_heads
    heads = kv_head_range(total, local_kv_heads)
    b = cfg.basis
    parts = []
    for t, tf in (("k", fmt.k), ("v", fmt.v)):
        basis = offset = None
        if b is not None:
            basis = b.bases[t][layer][heads.start:heads.stop]
            if cfg.use_offsets:
                off = b.offsets[t][layer]
                if off is None:
                    raise LowRankConfigError(f"basis file {b.path!r} has no {t.upper()} offset for layer {layer}")
                offset = off[heads.start:heads.stop]
        smooth = None
        if t == "k" and cfg.smooth_layer(layer):
            smooth = b.key_scales(cfg.use_offsets)[layer][heads.start:heads.stop]
        parts.append(build_tensor_transform(tf, local_kv_heads, head_dim, basis, offset, smooth))
    return LayerState(layout, LayerTransforms(*parts).to(device))
