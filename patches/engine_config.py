"""Check the lowrank settings in the user's own process, when the engine config is made.

Wraps ``EngineArgs.create_engine_config`` (vllm/engine/arg_utils.py; ``AsyncEngineArgs`` inherits
it, so ``LLM(...)``, ``vllm serve`` and ``vllm bench`` all pass here). Without it, a bad setting
would surface only inside the engine-core worker, as a generic "engine core initialization failed".
The wrapped call returns the same config; it only raises, with a message that names the bad setting.
"""

from __future__ import annotations

from ._compat import require_vllm


def apply() -> None:
    require_vllm(__name__)
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.create_engine_config
    if getattr(original, "_lowrank_patched", False):
        return

    def create_engine_config(self, *args, **kwargs):
        vllm_config = original(self, *args, **kwargs)
        from vllm_lowrank.checks import check_engine_config

        check_engine_config(vllm_config)
        return vllm_config

    create_engine_config._lowrank_patched = True  # type: ignore[attr-defined]
    EngineArgs.create_engine_config = create_engine_config
