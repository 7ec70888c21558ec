"""Start-up checks: the lowrank settings and the model's features, before any process is spawned."""

from __future__ import annotations

from typing import Any

from vllm.config import VllmConfig

from .config import CONFIG_KEY, LowRankConfigError, raw_settings

_ALIBI_MODEL_TYPES = {"bloom", "jais"}  # ALiBi is implied by the architecture, not a config flag


def lowrank_selected(vllm_config: VllmConfig) -> bool:
    """True when the attention backend asked for is CUSTOM and CUSTOM is this plugin's backend."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from .backend import BACKEND_PATH

    ac = vllm_config.attention_config
    chosen = {ac.backend, *(ac.backend_per_kind or {}).values()}
    return AttentionBackendEnum.CUSTOM in chosen and AttentionBackendEnum.CUSTOM.get_path() == BACKEND_PATH


def unsupported_model_features(vllm_config: VllmConfig) -> list[str]:
    """Model features the lowrank backend cannot run (yet), in words."""
    mc = vllm_config.model_config
    hf: Any = mc.hf_text_config
    found = []
    if mc.use_mla:
        found.append("MLA (multi-head latent attention)")
    if mc.is_encoder_decoder:
        found.append("encoder-decoder attention")
    window = getattr(hf, "sliding_window", None)
    if window and getattr(hf, "use_sliding_window", True) is not False:
        found.append(f"sliding-window attention (window {window})")
    if any(t != "full_attention" for t in (getattr(hf, "layer_types", None) or [])):
        found.append(f"mixed layer types {sorted(set(hf.layer_types))}")
    attn_cfg = getattr(hf, "attn_config", None)
    if (getattr(hf, "model_type", None) in _ALIBI_MODEL_TYPES or getattr(hf, "alibi", False)
            or getattr(hf, "position_embedding_type", None) == "alibi"
            or getattr(attn_cfg, "alibi", False) or (isinstance(attn_cfg, dict) and attn_cfg.get("alibi"))):
        found.append("ALiBi position biases")
    for key in ("attn_logit_softcapping", "attn_logit_softcap"):
        if getattr(hf, key, None):
            found.append(f"attention logit soft-capping ({key}={getattr(hf, key)})")
    return found


def check_engine_config(vllm_config: VllmConfig) -> None:
    """Raise :class:`LowRankConfigError` on any setting or model feature the backend would not honour."""
    selected = lowrank_selected(vllm_config)
    raw = raw_settings(vllm_config.additional_config)
    if not selected:
        if raw is not None:
            raise LowRankConfigError(
                f"additional_config['{CONFIG_KEY}'] is set but the attention backend is "
                f"{vllm_config.attention_config.backend}; add --attention-backend lowrank (or "
                f"attention_backend='lowrank'), or drop the '{CONFIG_KEY}' settings")
        return
    if vllm_config.model_config.runner_type != "generate":
        raise LowRankConfigError(f"the lowrank backend serves generative decoder models, not runner "
                                 f"{vllm_config.model_config.runner_type!r}")
    features = unsupported_model_features(vllm_config)
    if features:
        raise LowRankConfigError(f"the lowrank backend does not support {', '.join(features)} "
                                 f"(model {vllm_config.model_config.model}); use another attention backend")
    cache_dtype = vllm_config.cache_config.cache_dtype
    if cache_dtype != "auto":
        raise LowRankConfigError(
            f"--kv-cache-dtype {cache_dtype} cannot be combined with the lowrank backend, which stores "
            f"the cache in its own formats: keep kv_cache_dtype='auto' and choose e.g. "
            f"additional_config={{'lowrank': {{'format': 'fp8'}}}}")
    from .plan import plugin_config

    check_layered(vllm_config, plugin_config(vllm_config))  # parses and checks formats, ranks, basis file


def check_layered(vllm_config: VllmConfig, cfg) -> None:
    """A layered cache (``exact_window``/``exact_sink``) needs prefix caching off: its rings are per request
    and a prefix-cache hit would find its tokens missing from the ring."""
    if not cfg.layered:
        return
    if vllm_config.cache_config.enable_prefix_caching:
        raise LowRankConfigError("exact_window/exact_sink (a layered cache) need prefix caching off: pass "
                                 "--no-enable-prefix-caching (LLM(..., enable_prefix_caching=False))")
