#!/usr/bin/env python
"""End-to-end smoke run: greedy outputs and KV capacity of vLLM's own backend and of lowrank formats.

For each variant, one offline ``LLM`` (CUDA graphs and torch.compile as vLLM defaults them, unless
``--eager``) generates greedy continuations of a fixed prompt set; the table gives vLLM's KV cache
size in tokens, the generation throughput, and agreement with the first variant (identical
continuations, mean matching prefix, and the top-2 log-probability gap where each first diverges).
Meant for the GPU (``--formats`` picks the lowrank formats), but runs anywhere vLLM does.
"""

from __future__ import annotations

import argparse
import json
import time

PROMPTS = [
    "The capital of France is", "Once upon a time, in a small village,", "The three primary colors are",
    "def fibonacci(n):", "Photosynthesis is the process by which", "The best way to learn a new language is",
    "In 1969, the first humans", "Water boils at a temperature of", "A haiku about the sea:",
    "The main difference between a virus and a bacterium is", "To make a cup of tea, first",
    "The largest planet in our solar system", "Machine learning is", "My favourite book is",
    "The stock market crashed because", "Here is a list of prime numbers: 2, 3, 5,",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder (default: the embedded SmolLM2-135M)")
    ap.add_argument("--formats", nargs="+", default=["full", "int8", "fp8", "int4"],
                    help="lowrank settings: preset names or JSON dicts (default: %(default)s)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--eager", action="store_true", help="no CUDA graphs / torch.compile")
    ap.add_argument("--kv-cache-memory-bytes", type=int, default=1 << 30)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=4, help="prompt set repeats (batch = 16 x repeat)")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()

    from tqdm import tqdm
    from vllm import SamplingParams

    from vllm_lowrank.engine import kv_cache_tokens, vllm_llm
    from vllm_lowrank.models import smollm2

    model = args.model or str(smollm2())
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, logprobs=2, ignore_eos=True)
    prompts = PROMPTS * args.repeat
    variants = [("vllm", None)] + [(f, json.loads(f) if f.startswith("{") else {"format": f}) for f in args.formats]
    rows = []
    ref = None
    for name, settings in tqdm(variants, desc="engines"):
        t0 = time.perf_counter()
        with vllm_llm(model, settings, backend=None if settings is None else "lowrank", dtype=args.dtype,
                      kv_cache_memory_bytes=args.kv_cache_memory_bytes, max_model_len=1024,
                      enforce_eager=args.eager) as llm:
            start = time.perf_counter() - t0
            llm.generate(prompts[:4], params, use_tqdm=False)  # warm-up
            t1 = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            gen = time.perf_counter() - t1
            tokens = kv_cache_tokens(llm)
        ids = [list(o.outputs[0].token_ids) for o in outs]
        row = {"variant": name, "kv_tokens": tokens, "start_s": start,
               "output_tok_per_s": sum(map(len, ids)) / gen}
        if ref is None:
            ref = (ids, outs)
        else:
            same, prefix, gaps = 0, 0, []
            for a, b, o in zip(ref[0], ids, ref[1]):
                i = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
                same += i == len(a)
                prefix += i
                if i < len(a):
                    top = sorted(o.outputs[0].logprobs[i].values(), key=lambda lp: -lp.logprob)[:2]
                    gaps.append(top[0].logprob - top[1].logprob)
            row.update(identical=f"{same}/{len(ids)}", mean_prefix=prefix / len(ids),
                       median_gap=sorted(gaps)[len(gaps) // 2] if gaps else None)
        rows.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    print(f"\n{'variant':<28} {'KV tokens':>10} {'x vllm':>7} {'start s':>8} {'out tok/s':>10} "
          f"{'identical':>10} {'prefix':>7} {'gap@div':>8}")
    for r in rows:
        gap = f"{r['median_gap']:.3f}" if r.get("median_gap") is not None else "-"
        print(f"{r['variant'][:28]:<28} {r['kv_tokens']:>10,} {r['kv_tokens'] / rows[0]['kv_tokens']:>7.2f} "
              f"{r['start_s']:>8.0f} {r['output_tok_per_s']:>10,.0f} {r.get('identical', '-'):>10} "
              f"{r.get('mean_prefix', args.max_tokens):>7.1f} {gap:>8}")


if __name__ == "__main__":
    main()
