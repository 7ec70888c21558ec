"""Perplexity and greedy agreement per KV format, inside vLLM (``python -m vllm_lowrank.evaluate --help``).

Held-out text: the last 200,000 characters of the gensim Wikipedia excerpt, in windows of 1024 tokens
(the first ``--windows`` of them; all 40 on the GPU machine, fewer on the CPU); ``--text stdlib``: the
evaluation part of the Python standard-library text (``textdata.STDLIB_FILES``), for code models. The baseline is vLLM's
own attention backend, uncompressed. Prints one table: format, bytes per token, compression vs bf16,
capacity ratio (vLLM's own KV cache size in tokens at a fixed memory, vs the baseline; for a layered
cache, less its ring blocks, for sequences of the windows' length), perplexity, change in %, and
greedy agreement with the baseline.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

from . import bundled

REPO = Path(__file__).resolve().parent.parent
DEFAULT_BASIS = Path(bundled("smollm2-135m.safetensors"))
FULL_BASIS = REPO / "out" / "smollm2-135m-instruct-bfloat16-basis.safetensors"  # calibrate.py's default output
DEFAULT_PLANS = Path(bundled("smollm2-135m.plans.json"))
DEFAULT_FORMATS = ["vllm", "full", "int8", "fp8", "int4", "plan:2x", "plan:3x", "plan:4x"]


def _device() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"{platform.machine()} CPU"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="HF model folder (default: the embedded SmolLM2-135M, bf16); "
                                                 "'qwen': Qwen2.5-Coder-1.5B-Instruct (models.qwen25_coder)")
    p.add_argument("--text", choices=("wiki", "stdlib"), default="wiki",
                   help="held-out text: the Wikipedia excerpt, or Python standard-library source")
    p.add_argument("--formats", nargs="+", default=DEFAULT_FORMATS,
                   help="format specs: vllm, vllm-<kv_cache_dtype> (vLLM's own cache, e.g. vllm-fp8, "
                        "vllm-int8_per_token_head), full, int8, fp8, int4, lowrank:RK[:RV], "
                        "lowrank+int8:RK[:RV], plan:NAME, or a JSON dict of lowrank settings")
    p.add_argument("--windows", type=int, default=4, help="evaluation windows (40 = the whole held-out text)")
    p.add_argument("--window", type=int, default=1024, help="tokens per window")
    p.add_argument("--dtype", default="bfloat16", help="model dtype in vLLM")
    p.add_argument("--basis", default=None,
                   help="basis file for the low-rank presets (lowrank:RK[:RV], ...; default: calibrate.py's full "
                        "output if present, else the committed one, which keeps only the plans' columns); when "
                        "given, it also replaces the basis file beside the plans file for plans without their own")
    p.add_argument("--plans", default=str(DEFAULT_PLANS), help="plans file (from sensitivity.py)")
    p.add_argument("--kv-cache-memory-bytes", type=int, default=512 << 20,
                   help="KV cache memory for every format (capacity ratios are measured at this size)")
    p.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="vLLM's start-up check of free GPU memory (default: vLLM's); lower it to share the GPU")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--save-token-windows", default=None,
                   help="write the evaluation windows (token ids, JSON) here and stop: for --token-windows")
    p.add_argument("--token-windows", default=None,
                   help="evaluate on the windows of this file (from --save-token-windows; its first --windows) "
                        "instead of tokenizing --text: for a machine without gensim, e.g. the GPU machine")
    args = p.parse_args(argv)

    from transformers import AutoTokenizer

    from .evaluation import agreement, resolve, run_format, table
    from .textdata import eval_windows

    if args.model is None:
        from .models import smollm2

        model = smollm2("bfloat16")
    elif args.model == "qwen":
        from .models import qwen25_coder

        model = qwen25_coder("bfloat16")
    else:
        model = Path(args.model)
    if args.token_windows:
        saved = json.loads(Path(args.token_windows).read_text())
        windows = saved["windows"][:args.windows]
        if len(windows) < args.windows or any(len(w) != args.window for w in windows):
            p.error(f"{args.token_windows} has {len(saved['windows'])} windows of {len(saved['windows'][0])} "
                    f"tokens; asked for {args.windows} of {args.window}")
    else:
        tok = AutoTokenizer.from_pretrained(str(model))
        windows = eval_windows(tok, args.windows, args.window, text=args.text)
    if args.save_token_windows:
        Path(args.save_token_windows).write_text(json.dumps({"model": model.name, "text": args.text,
                                                             "windows": windows}))
        print(f"{len(windows)} windows of {args.window} tokens written to {args.save_token_windows}")
        return 0
    if args.basis is not None and not Path(args.basis).is_file():
        p.error(f"--basis {args.basis}: no such file")
    default_basis = FULL_BASIS if FULL_BASIS.is_file() else DEFAULT_BASIS
    basis = args.basis or (str(default_basis) if default_basis.is_file() else None)
    plans = args.plans if Path(args.plans).is_file() else None
    specs = [resolve(f, basis, plans, args.basis) for f in args.formats]
    if specs[0].name != "vllm":
        specs.insert(0, resolve("vllm", basis, plans))
    from tqdm import tqdm

    results = []
    extra = {} if args.gpu_memory_utilization is None else {"gpu_memory_utilization": args.gpu_memory_utilization}
    for spec in tqdm(specs, desc="formats", unit="format"):
        r = run_format(model, spec, windows, args.dtype, args.kv_cache_memory_bytes, **extra)
        results.append(r)
        tqdm.write(f"{r.name}: perplexity {r.ppl:.4f} over {r.tokens} tokens ({r.seconds:.0f} s)")
    base = results[0]
    header = (f"{model.name}, {args.text} text, {len(windows)} windows x {args.window} tokens ({base.tokens} predicted), dtype "
              f"{args.dtype}, {datetime.date.today().isoformat()}, {_device()}, vLLM 0.26.0")
    print(header)
    print(table(results, base))
    if args.json:
        Path(args.json).write_text(json.dumps({"header": header, "results": [
            {"name": r.name, "bytes_per_token": r.bytes_per_token, "ratio": r.ratio_vs_bf16, "kv_tokens": r.kv_tokens,
             "perplexity": r.ppl, "nll": r.nll, "tokens": r.tokens, "change_pct": 100 * (r.ppl / base.ppl - 1),
             "agreement": agreement(r, base), "seconds": r.seconds, "settings": r.settings} for r in results]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
