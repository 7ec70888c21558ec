"""Accept ``lowrank`` as an attention backend name.

Replaces ``_AttentionBackendEnumMeta.__getitem__`` (vllm/v1/attention/backends/registry.py), which
``AttentionConfig.validate_backend_before`` uses to turn ``--attention-backend NAME`` into an enum
member. vLLM 0.26 has no way to add a member, and a new member would not unpickle in engine and
worker processes before they load plugins; so the name ``LOWRANK`` maps to ``CUSTOM``, which the
plugin registers, and the config stores ``CUSTOM``.
"""

from __future__ import annotations

from ._compat import require_vllm

ALIAS = "LOWRANK"


def apply() -> None:
    require_vllm(__name__)
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, _AttentionBackendEnumMeta

    original = _AttentionBackendEnumMeta.__getitem__
    if getattr(original, "_lowrank_patched", False):
        return

    def __getitem__(cls, name):  # noqa: N807
        if cls is AttentionBackendEnum and isinstance(name, str) and name.upper() == ALIAS:
            name = "CUSTOM"
        return original(cls, name)

    __getitem__._lowrank_patched = True  # type: ignore[attr-defined]
    _AttentionBackendEnumMeta.__getitem__ = __getitem__
