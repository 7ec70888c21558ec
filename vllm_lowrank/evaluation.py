"""Perplexity, greedy agreement and capacity of KV formats, measured inside vLLM.

A *format spec* names what to run:

- ``vllm``: vLLM's own attention backend, uncompressed (the baseline); ``vllm-fp8``, ``vllm-<dtype>``:
  vLLM's own ``kv_cache_dtype`` options (on the CPU build only ``fp8``);
- ``full``, ``int8``, ``fp8``, ``int4``: the plugin's presets;
- ``lowrank:<rk>[:<rv>]``, ``lowrank+int8:<rk>[:<rv>]``: uniform low rank with the basis file;
- ``plan:<name>``: a per-layer plan from the plans file (``bases/smollm2-135m.plans.json``), e.g. ``plan:4x``;
- a JSON dict: the ``lowrank`` settings themselves.

Every plugin format is evaluated with ``prefill_from_cache: true``: each prompt token attends to its
predecessors (and itself) as stored in the compressed cache, which is what decode sees.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import is_layered
from .engine import kv_cache_tokens, model_shape, vllm_llm


@dataclass
class FormatSpec:
    name: str
    settings: dict[str, Any] | None  # None: vLLM's own backend
    kv_cache_dtype: str = "auto"


@dataclass
class FormatResult:
    name: str
    bytes_per_token: int
    ratio_vs_bf16: float
    kv_tokens: int
    nll: float
    tokens: int
    top1: list[list[int]] = field(default_factory=list, repr=False)
    seconds: float = 0.0
    settings: dict[str, Any] | None = None

    @property
    def ppl(self) -> float:
        return math.exp(self.nll)


def resolve(spec: str, basis: str | None, plans_path: str | None, plan_basis: str | None = None) -> FormatSpec:
    """The settings of one ``--formats`` spec; ``basis`` serves the presets with ranks, ``plan_basis``
    (``--basis`` when given) replaces the basis file beside the plans file for plans without their own."""
    s = spec.strip()
    if s == "vllm":
        return FormatSpec(s, None)
    if s.startswith("vllm-"):
        vllm_vector_bytes(s[len("vllm-"):], 64)  # refuse an unknown dtype before any engine starts
        return FormatSpec(s, None, s[len("vllm-"):])
    if s.startswith("{"):
        return FormatSpec(s, {"prefill_from_cache": True, **json.loads(s)})
    if s.startswith("plan:"):
        if not plans_path:
            raise ValueError(f"{s} needs a plans file (--plans)")
        from .config import expand_plan

        key = s[len("plan:"):]
        plan = json.loads(Path(plans_path).read_text())["plans"].get(key, {})
        settings = {"format": "int8", **expand_plan(f"{plans_path}:{key}"), "prefill_from_cache": True}
        if plan_basis and "basis" in settings and not plan.get("basis"):
            settings["basis"] = plan_basis
        return FormatSpec(s, settings)
    if ":" in s:
        preset, *ranks = s.split(":")
        rk = int(ranks[0])
        rv = int(ranks[1]) if len(ranks) > 1 else rk
        if not basis:
            raise ValueError(f"{s} needs a basis file (--basis)")
        return FormatSpec(s, {"format": preset, "rank_k": rk, "rank_v": rv, "basis": basis, "prefill_from_cache": True})
    settings = {"format": s, "prefill_from_cache": True}
    return FormatSpec(s, settings)


def vllm_vector_bytes(kv_cache_dtype: str, head_dim: int) -> int:
    """Bytes of one head's K (or V) vector of one token in vLLM's own cache of ``kv_cache_dtype``; the
    per-token-head dtypes keep a float32 scale beside the codes."""
    if kv_cache_dtype in ("auto", "bfloat16", "float16", "half"):
        return 2 * head_dim
    if kv_cache_dtype in ("fp8", "fp8_e4m3", "fp8_e5m2"):
        return head_dim
    per_token_head = {"int8_per_token_head": head_dim, "fp8_per_token_head": head_dim,
                      "int4_per_token_head": (head_dim + 1) // 2}
    if kv_cache_dtype not in per_token_head:
        raise ValueError(f"unknown vLLM kv_cache_dtype {kv_cache_dtype!r}")
    return per_token_head[kv_cache_dtype] + 4


def bytes_per_token(model: str | Path, spec: FormatSpec) -> int:
    """KV bytes per token over all layers (bf16 model dtype for the plugin's model-dtype payloads)."""
    n, _, h, d = model_shape(model)
    if spec.settings is None:
        return n * h * 2 * vllm_vector_bytes(spec.kv_cache_dtype, d)
    from .config import ModelShape, parse
    from .formats import SlotLayout

    cfg = parse(dict(spec.settings), ModelShape(n, h, d))
    return sum(h * SlotLayout.build(cfg.layer_format(i), d, torch.bfloat16).slot_bytes for i in range(n))


def run_format(model: str | Path, spec: FormatSpec, windows: list[list[int]], dtype: str = "bfloat16",
               kv_cache_memory_bytes: int = 512 << 20, batch: int = 8, **engine_kwargs: Any) -> FormatResult:
    """Prompt log-probabilities of every window under one format (``engine_kwargs``: more ``LLM`` arguments)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    n, _, h, d = model_shape(model)
    t0 = time.time()
    max_len = max(len(w) for w in windows) + 16
    kwargs: dict[str, Any] = dict(engine_kwargs)
    if spec.settings is None:
        backend = None
        if spec.kv_cache_dtype != "auto":
            kwargs["kv_cache_dtype"] = spec.kv_cache_dtype
    else:
        backend = "lowrank"
        if is_layered(spec.settings):
            kwargs.setdefault("enable_prefix_caching", False)
    nll, count = 0.0, 0
    top1: list[list[int]] = []
    with vllm_llm(model, spec.settings, dtype=dtype, max_model_len=max_len,
                  kv_cache_memory_bytes=kv_cache_memory_bytes, backend=backend, **kwargs) as llm:
        cap = kv_cache_tokens(llm)
        sp = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1)
        for i in range(0, len(windows), batch):
            chunk = windows[i:i + batch]
            outs = llm.generate([TokensPrompt(prompt_token_ids=w) for w in chunk], sp, use_tqdm=False)
            for w, o in zip(chunk, outs):
                tops = []
                for j, lp in enumerate(o.prompt_logprobs):
                    if lp is None:
                        continue
                    nll -= lp[w[j]].logprob
                    count += 1
                    tops.append(min(lp.items(), key=lambda kv: kv[1].rank)[0])
                top1.append(tops)
    bpt = bytes_per_token(model, spec)
    cap = int(cap * max_len / (max_len + ring_tokens(model, spec)))
    return FormatResult(spec.name, bpt, n * h * 2 * d * 2 / bpt, cap, nll / max(count, 1), count, top1,
                        time.time() - t0, spec.settings)


def ring_tokens(model: str | Path, spec: FormatSpec, block_size: int = 16) -> int:
    """Token slots of a layered cache's ring blocks per sequence (0 without one). vLLM counts them in its
    KV cache size, so the capacity column takes them off, for sequences of the windows' length."""
    if not is_layered(spec.settings):
        return 0
    from .config import ModelShape, parse
    from .layered import ring_plan

    n, _, h, d = model_shape(model)
    k, _ = ring_plan(parse(dict(spec.settings), ModelShape(n, h, d)), n, d, torch.bfloat16, block_size)
    return k * block_size


def agreement(a: FormatResult, b: FormatResult) -> float:
    """Fraction of positions whose greedy (top-1) next token is the same in both runs."""
    same = tot = 0
    for x, y in zip(a.top1, b.top1):
        same += sum(int(p == q) for p, q in zip(x, y))
        tot += min(len(x), len(y))
    return same / max(tot, 1)


def table(results: list[FormatResult], baseline: FormatResult) -> str:
    rows = ["| format | bytes/token | vs bf16 | capacity ratio | perplexity | change | greedy agreement |",
            "|---|---|---|---|---|---|---|"]
    for r in results:
        change = 100 * (r.ppl / baseline.ppl - 1)
        rows.append(f"| {r.name} | {r.bytes_per_token} | {r.ratio_vs_bf16:.2f}x | {r.kv_tokens / baseline.kv_tokens:.2f}x "
                    f"| {r.ppl:.4f} | {change:+.3f}% | {100 * agreement(r, baseline):.2f}% |")
    return "\n".join(rows)
