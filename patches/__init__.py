"""Monkeypatches of vLLM 0.26, one module each; installed as ``vllm_lowrank.patches``.

Each module names the vLLM function it replaces and why, refuses a vLLM version it was not written
for, and is idempotent. :func:`apply_all` is called by the plugin's ``register()`` in every process.
``bench_gate`` is not among them: only a benchmark worker (``vllm_lowrank.side_by_side``) applies it.
Nor is ``block_tables``: the backend applies it in the worker that builds a layered cache, so that no
other process imports vLLM's GPU model runner.
"""

from . import backend_alias, cpu_platform, engine_config, kv_cache_spec

ALL = (backend_alias, kv_cache_spec, cpu_platform, engine_config)


def apply_all() -> None:
    for module in ALL:
        module.apply()
