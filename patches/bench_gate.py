"""Hold a benchmark's engine at the start line, so that ``vllm bench`` runs start up side by side and
measure one at a time.

Wraps ``LLM.__init__`` (vllm/entrypoints/llm.py) in a benchmark worker process only; the plugin's
``register()`` never installs it. Once the engine is built, the wrapper creates ``<gate>/ready`` and
blocks until ``<gate>/go`` exists. ``vllm bench throughput`` and ``vllm bench latency`` build their
``LLM`` before they start a clock or a warm-up, so nothing they time changes. What changes is that
start-up (about two minutes a variant on the H200: compilation, CUDA graph capture) overlaps across
variants, while the parent (scripts/bench_serving.py) lets exactly one engine run at a time, and only
once every other engine is idle at its gate or gone.
"""

from __future__ import annotations

import time
from pathlib import Path

from ._compat import require_vllm

READY = "ready"
GO = "go"


def wait_at_gate(gate: Path, poll_s: float = 0.05) -> None:
    """Announce readiness in ``gate`` and block until the parent opens it."""
    gate.mkdir(parents=True, exist_ok=True)
    (gate / READY).touch()
    while not (gate / GO).exists():
        time.sleep(poll_s)


def apply(gate: Path) -> None:
    """Gate the first ``LLM`` this process builds (later ones, if any, pass straight through)."""
    require_vllm(__name__)
    from vllm.entrypoints.llm import LLM

    original = LLM.__init__
    if getattr(original, "_lowrank_gated", False):
        return
    state = {"waited": False}

    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if not state["waited"]:
            state["waited"] = True
            wait_at_gate(gate)

    __init__._lowrank_gated = True  # type: ignore[attr-defined]
    LLM.__init__ = __init__
