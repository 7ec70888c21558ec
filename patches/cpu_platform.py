"""Let the CPU platform run the lowrank backend when, and only when, it was asked for.

Replaces ``CpuPlatform.get_attn_backend_cls`` (vllm/platforms/cpu.py), which ignores the selected
backend and always returns CPU_ATTN. When the selection is ``CUSTOM`` and CUSTOM is registered to
this plugin, it checks the configuration as the CUDA platform does (``validate_configuration``) and
returns the lowrank backend; any other selection goes to the original.
"""

from __future__ import annotations

from ._compat import require_vllm


def apply() -> None:
    require_vllm(__name__)
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    original = CpuPlatform.get_attn_backend_cls.__func__
    if getattr(original, "_lowrank_patched", False):
        return

    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
        from vllm_lowrank.backend import BACKEND_PATH, LowRankBackend
        from vllm_lowrank.config import LowRankConfigError

        if selected_backend != AttentionBackendEnum.CUSTOM or AttentionBackendEnum.CUSTOM.get_path() != BACKEND_PATH:
            return original(cls, selected_backend, attn_selector_config, num_heads)
        reasons = LowRankBackend.validate_configuration(
            device_capability=None, **attn_selector_config._asdict())
        if reasons:
            raise LowRankConfigError(
                f"the lowrank attention backend cannot run this model: {', '.join(reasons)}")
        return BACKEND_PATH

    get_attn_backend_cls._lowrank_patched = True  # type: ignore[attr-defined]
    CpuPlatform.get_attn_backend_cls = classmethod(get_attn_backend_cls)
