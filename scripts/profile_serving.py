#!/usr/bin/env python
"""Where the time goes in an offline vLLM batch: torch.profiler over ``LLM.generate``, per variant.

For each variant (the names of ``bench_serving.py``, with its settings: layered caches run with prefix
caching off, ``auto-ample`` with its larger KV cache), a fresh process runs the engine in-process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``), warms up, then profiles one batch of random prompts and prints
the KV cache size, wall time, output tokens/s, CUDA time by kernel family (ours, FlashAttention, GEMM,
other) and the top kernels and host ops. Each variant is printed (and ``profile.json`` written) as soon
as it is done, so a command cut short still shows what it measured; the lines starting with ``## ``
are the summary. GPU only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serving import derived_variants, is_layered, plugin_variants, replace_args  # noqa: E402

from vllm_lowrank.shapes import SHAPES, make_basis, make_model  # noqa: E402

FAMILIES = (("ours", ("_decode_", "_prefill_kernel", "_store_kernel")), ("flash", ("flash", "fmha", "FlashAttn")),
            ("gemm", ("gemm", "nvjet", "cutlass", "sm90_xmma")), ("vllm-triton", ("kernel_unified_attention",)))


def child(args) -> None:
    import torch
    from vllm import LLM, SamplingParams

    from vllm_lowrank.engine import kv_cache_tokens

    kw = json.loads(args.engine_kwargs)
    llm = LLM(model=str(args.model), load_format="dummy", max_model_len=args.max_model_len,
              kv_cache_memory_bytes=args.kv_cache_memory_bytes, **kw)
    gen = torch.Generator().manual_seed(0)
    prompts = [{"prompt_token_ids": torch.randint(100, 30000, (args.input_len,), generator=gen).tolist()}
               for _ in range(args.num_prompts)]
    sp = SamplingParams(max_tokens=args.output_len, ignore_eos=True, temperature=0.0)
    # warm-up on the whole batch (short outputs): the same prefill chunking as the profiled run, so that
    # every kernel variant it needs is compiled before profiling (Triton compiles on first use)
    llm.generate(prompts, SamplingParams(max_tokens=min(8, args.output_len), ignore_eos=True, temperature=0.0),
                 use_tqdm=False)
    torch.cuda.synchronize()
    import time

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        outs = llm.generate(prompts, sp, use_tqdm=False)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    ntok = sum(len(o.outputs[0].token_ids) for o in outs)
    events = prof.key_averages()
    kernels = sorted(((e.key, e.self_device_time_total / 1e3, e.count) for e in events
                      if e.self_device_time_total > 0), key=lambda x: -x[1])
    host = sorted(((e.key, e.self_cpu_time_total / 1e3, e.count) for e in events), key=lambda x: -x[1])
    fam: dict[str, float] = {}
    for name, ms, _ in kernels:
        f = next((f for f, keys in FAMILIES if any(k in name for k in keys)), "other")
        fam[f] = fam.get(f, 0.0) + ms
    res = {"kv_tokens": kv_cache_tokens(llm), "wall_s": wall, "out_tok_s": ntok / wall,
           "cuda_ms": sum(ms for _, ms, _ in kernels),
           "families_ms": fam, "top_kernels": kernels[:args.top], "top_host": host[:args.top]}
    Path(args.result).write_text(json.dumps(res, indent=1))


def print_result(name: str, r: dict) -> None:
    """One variant's summary line (``## ``) and its top kernels and host ops."""
    if "error" in r:
        print(f"\n## {name}: ERROR {r['error']}", flush=True)
        return
    fam = ", ".join(f"{k} {v:.0f}" for k, v in sorted(r["families_ms"].items(), key=lambda x: -x[1]))
    print(f"\n## {name}: {r['kv_tokens']:,} KV tokens, wall {r['wall_s']:.2f} s, {r['out_tok_s']:,.0f} out tok/s, "
          f"CUDA {r['cuda_ms']:.0f} ms ({fam})")
    for title, rows in (("kernels (ms, calls)", r["top_kernels"]), ("host ops, self (ms, calls)", r["top_host"])):
        print(f"  {title}:")
        for key, ms, n in rows:
            print(f"    {ms:9.1f} {n:7d}  {key[:110]}")
    sys.stdout.flush()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    ap.add_argument("--tokenizer", type=Path, default=Path("/tmp/smollm2"))
    ap.add_argument("--variants", default="auto,lr:int8", help="comma-separated names of bench_serving.py")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--kv-cache-memory-bytes", type=int, default=1 << 30)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--out", type=Path, default=Path("bench_out"))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--engine-kwargs", default="{}", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    from tqdm import tqdm

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.gettempdir()) / "profile_serving"  # scratch, outside --out (results only there)
    model = make_model(args.shape, args.tokenizer, work / f"model-{args.shape}")
    basis = make_basis(args.shape, work / f"basis-{args.shape}.safetensors")
    ours, derived = plugin_variants(args.shape, basis), derived_variants()
    results = {}
    for name in tqdm(args.variants.split(","), desc="profile"):
        base = derived[name].base if name in derived else name
        if base in ours:
            kw = {"attention_backend": "lowrank", "additional_config": {"lowrank": ours[base]}}
            if is_layered(ours[base]):
                kw["enable_prefix_caching"] = False
        else:
            kw = {"kv_cache_dtype": base}
        res = out / f"profile-{name.replace(':', '_')}.json"
        cmd = [sys.executable, __file__, "--child", "--model", str(model), "--engine-kwargs", json.dumps(kw),
               "--result", str(res), "--num-prompts", str(args.num_prompts), "--input-len", str(args.input_len),
               "--output-len", str(args.output_len), "--max-model-len", str(args.max_model_len),
               "--kv-cache-memory-bytes", str(args.kv_cache_memory_bytes), "--top", str(args.top)]
        if name in derived:
            cmd = replace_args(cmd, derived[name].replace)
        proc = subprocess.run(cmd, cwd=out, capture_output=True, text=True,
                              env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
        (out / f"profile-{name.replace(':', '_')}.log").write_text(proc.stdout + proc.stderr)
        results[name] = json.loads(res.read_text()) if proc.returncode == 0 and res.is_file() else {
            "error": (proc.stdout + proc.stderr).strip().splitlines()[-1:]}
        (out / "profile.json").write_text(json.dumps(results, indent=1))
        print_result(name, results[name])


if __name__ == "__main__":
    main()
