"""The ``vllm.general_plugins`` entry point: runs in every vLLM process before the model is built."""

from __future__ import annotations

_registered = False


def register() -> None:
    """Register the lowrank backend as ``AttentionBackendEnum.CUSTOM`` and apply the patches."""
    global _registered
    if _registered:
        return
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    from vllm_lowrank.backend import BACKEND_PATH
    from vllm_lowrank.layered import register as register_layered_spec
    from vllm_lowrank.patches import apply_all

    apply_all()
    register_backend(AttentionBackendEnum.CUSTOM, BACKEND_PATH)
    register_layered_spec()
    _registered = True
