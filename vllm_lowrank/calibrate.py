"""Calibrate a model inside vLLM and write its basis file (``python -m vllm_lowrank.calibrate --help``).

Runs the model through vLLM with the lowrank backend in calibration mode (``format: full``, so attention
is exact and uncompressed, and ``calibrate: true``, so every attention forward adds its Q/K/V to float64
sums in the worker), fetches the sums with ``llm.collective_rpc``, and writes:

- the statistics (``--stats``, float64 safetensors: the input of ``analyze_ranks.py``; not committed);
- the basis file (``--out``): eigenvectors (keys query-aware by default), eigenvalues, calibrated offsets,
  the chosen ranks, retained energy and what it was calibrated on.

Defaults work on the embedded SmolLM2-135M and the Wikipedia excerpt (calibration windows from the
beginning of the text, disjoint from the evaluation text at its end).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

from .textdata import STDLIB_FILES

REPO = Path(__file__).resolve().parent.parent
TEXT_NAMES = {"wiki": "gensim enwiki excerpt, calibration part (beginning)",
              "stdlib": "Python standard-library source, calibration files"}
CALIB_TEXTS = {"wiki": "gensim enwiki-latest-pages-articles1 excerpt (filter_wiki, no redirects): the text before "
                       "its last 200,000 characters",
               "stdlib": f"Python {sys.version.split()[0]} standard-library source: "
                         f"{', '.join(sorted(STDLIB_FILES['calibration']))} (the files' windows in turn)"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="calibrate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="HF model folder (default: the embedded SmolLM2-135M, bf16); "
                                                 "'qwen': Qwen2.5-Coder-1.5B-Instruct (models.qwen25_coder)")
    p.add_argument("--text", choices=("wiki", "stdlib"), default="wiki",
                   help="calibration text: the Wikipedia excerpt's calibration part, or the calibration files "
                        "of the Python standard-library text (textdata.STDLIB_FILES)")
    p.add_argument("--windows", type=int, default=24, help="calibration windows")
    p.add_argument("--window", type=int, default=1024, help="tokens per window")
    p.add_argument("--batch", type=int, default=4, help="windows per vLLM generate call")
    p.add_argument("--dtype", default="bfloat16", help="model dtype inside vLLM")
    p.add_argument("--stats", default=None, help="where to write the statistics (default out/<model>-stats.safetensors)")
    p.add_argument("--from-stats", default=None, help="skip vLLM: build the basis from a saved statistics file")
    p.add_argument("--out", default=None, help="basis file to write (default out/<model>-basis.safetensors)")
    p.add_argument("--key-basis", choices=("query", "pca"), default="query",
                   help="query: minimise the error of q.k (query-aware); pca: plain PCA of the keys")
    p.add_argument("--optimize-rank", type=int, default=None,
                   help="optimise the first R columns for attention (keys: score error weighted by the queries; "
                        "values: error after the output projection, read from the model's o_proj weights); "
                        "stores all columns")
    p.add_argument("--optimize-iters", type=int, default=300, help="gradient steps for --optimize-rank")
    p.add_argument("--no-center", action="store_true", help="do not subtract calibrated means (no offsets)")
    p.add_argument("--smooth-alpha", type=float, default=0.5,
                   help="exponent of the query-weighted key smoothing scales s = (E[k^2]/E[q^2])^(alpha/2) "
                        "written to the file (k.smooth.*, k.smooth_raw.*; used with the smooth_keys setting)")
    p.add_argument("--no-smooth", action="store_true", help="write no key smoothing scales")
    p.add_argument("--ranks", choices=("energy", "uniform", "budget", "plans"), default="energy",
                   help="how the file's ranks are chosen (see --energy, --rank, --budget-ratio, --plans)")
    p.add_argument("--energy", type=float, default=0.99, help="energy threshold for --ranks energy")
    p.add_argument("--rank", type=int, default=32, help="rank for --ranks uniform")
    p.add_argument("--budget-ratio", type=float, default=2.0,
                   help="--ranks budget: payload bytes = bf16 K+V bytes / this ratio, allocated by eigenvalue per byte")
    p.add_argument("--multiple", type=int, default=8, help="round ranks to multiples of this")
    p.add_argument("--store-rank", type=int, default=None,
                   help="basis columns stored per layer (default: the chosen rank, enough for any smaller rank)")
    p.add_argument("--plans", default=None,
                   help="JSON plans file (from sensitivity.py): store exactly the columns its r<N> formats use")
    p.add_argument("--plan-names", nargs="+", default=None,
                   help="with --plans: only these plans (e.g. 2x 4x) decide the stored columns")
    return p.parse_args(argv)


def gather_statistics(model: Path, windows: list[list[int]], batch: int, dtype: str, theta: float | None):
    """Run the windows through vLLM in calibration mode and return the accumulated statistics."""
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # collective_rpc with a callable
    from tqdm import tqdm
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from . import calibration as cal
    from .engine import vllm_llm

    from .engine import model_shape

    max_len = max(len(w) for w in windows) + 16
    n, _, h, d = model_shape(model)
    with vllm_llm(model, {"format": "full", "calibrate": True}, dtype=dtype, max_model_len=max_len,
                  kv_cache_memory_bytes=max(64 << 20, batch * max_len * n * h * d * 4 * 2)) as llm:
        llm.collective_rpc(cal.rpc_configure, args=(theta, theta is not None))
        sp = SamplingParams(max_tokens=1, temperature=0.0)
        for i in tqdm(range(0, len(windows), batch), desc="calibration", unit="batch"):
            llm.generate([TokensPrompt(prompt_token_ids=w) for w in windows[i:i + batch]], sp, use_tqdm=False)
        res = llm.collective_rpc(cal.rpc_collect)
    return cal.statistics_from_rpc(res)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from . import calibration as cal
    from .engine import rope_theta

    if args.model is None:
        from .models import smollm2

        model = smollm2(args.dtype if args.dtype in ("bfloat16", "float32") else "bfloat16")
    elif args.model == "qwen":
        from .models import qwen25_coder

        model = qwen25_coder("bfloat16")
    else:
        model = Path(args.model)
    name = model.name
    out_dir = REPO / "out"
    out_dir.mkdir(exist_ok=True)
    stats_path = Path(args.stats) if args.stats else out_dir / f"{name}-stats.safetensors"
    out_path = Path(args.out) if args.out else out_dir / f"{name}-basis.safetensors"

    if args.from_stats:
        stats = cal.Statistics.load(args.from_stats)
        print(f"statistics from {args.from_stats}: {int(stats.count[0])} tokens per layer")
    else:
        from transformers import AutoTokenizer

        from .textdata import calibration_windows

        tok = AutoTokenizer.from_pretrained(str(model))
        windows = calibration_windows(tok, args.windows, args.window, text=args.text)
        theta = rope_theta(model)
        t0 = time.time()
        stats = gather_statistics(model, windows, args.batch, args.dtype, theta)
        stats.meta.update({"model": name, "text": TEXT_NAMES[args.text],
                           "windows": args.windows, "window": args.window, "dtype": args.dtype,
                           "seconds": round(time.time() - t0, 1)})
        stats.save(stats_path)
        print(f"statistics: {int(stats.count[0])} tokens per layer -> {stats_path}")

    num_layers, h, d = stats.num_layers, stats.num_kv_heads, stats.head_dim
    if args.optimize_rank:
        from safetensors import safe_open

        files = sorted(Path(model).glob("*.safetensors"))
        o_projs = []
        for i in range(num_layers):
            key = f"model.layers.{i}.self_attn.o_proj.weight"
            for fpath in files:
                with safe_open(str(fpath), framework="pt") as f:
                    if key in f.keys():
                        o_projs.append(f.get_tensor(key).float())
                        break
        bases = cal.rank_optimized_bases(stats, args.optimize_rank, o_projs if len(o_projs) == num_layers else None,
                                         args.optimize_iters, smooth_alpha=None if args.no_smooth else args.smooth_alpha)
        args.ranks, args.rank, args.store_rank = "uniform", args.optimize_rank, d
    else:
        bases = cal.compute_bases(stats, key_method=args.key_basis, centered=not args.no_center,
                                  smooth_alpha=None if args.no_smooth else args.smooth_alpha)
    eigs = {"k": bases.column_energy("k"), "v": bases.column_energy("v")}
    store_per_layer = None
    if args.ranks == "energy":
        ranks = cal.energy_ranks(eigs, args.energy, args.multiple)
    elif args.ranks == "uniform":
        ranks = cal.uniform_ranks(num_layers, args.rank)
    elif args.ranks == "budget":
        budget = int(round(2 * num_layers * h * d * 2 / args.budget_ratio))
        budget -= budget % (args.multiple * h * 2)
        ranks = cal.budget_ranks(eigs, budget, 2, args.multiple)
    else:
        if not args.plans:
            raise SystemExit("--ranks plans needs --plans FILE")
        from .sensitivity import plans_ranks

        plans = json.loads(Path(args.plans).read_text())
        if args.plan_names:
            plans = {"plans": {k: v for k, v in plans["plans"].items() if k in args.plan_names}}
        ranks = plans_ranks(plans, num_layers)
        store_per_layer = {t: [max(1, r) for r in ranks[t]] for t in ranks}
        ranks = {t: [max(1, r) for r in ranks[t]] for t in ranks}
    calib = {"text": CALIB_TEXTS[args.text], "tokens_per_layer": int(stats.count[0]),
             "key_basis": f"query-optimised for rank {args.optimize_rank}" if args.optimize_rank else args.key_basis,
             "value_basis": f"output-optimised for rank {args.optimize_rank}" if args.optimize_rank else "pca", "centered": not args.no_center, "rank_rule": args.ranks,
             "date": datetime.date.today().isoformat(), **{k: v for k, v in stats.meta.items() if k in (
                 "windows", "window", "dtype")}}
    if args.plans:
        calib["plans"] = Path(args.plans).name + (f" ({', '.join(args.plan_names)})" if args.plan_names else "")
    smoothing = None if args.no_smooth else {
        "weight": "query", "alpha": args.smooth_alpha, "centered": not args.no_center or bool(args.optimize_rank),
        "formula": "s = (E[k^2]/E[q^2])^(alpha/2) per layer, KV head and post-RoPE channel, E[k^2] about the "
                   "calibrated mean when centered (k.smooth; k.smooth_raw: raw E[k^2], for use without "
                   "offsets), geometric mean 1 per head"}
    bf = cal.make_basis_file(stats, bases, ranks, store_rank=args.store_rank, model=name, calibration=calib,
                             store_per_layer=store_per_layer, key_smoothing=smoothing)
    bf.save(out_path)
    size = out_path.stat().st_size
    er = cal.effective_rank(eigs["k"]).float().mean(), cal.effective_rank(eigs["v"]).float().mean()
    print(f"basis file -> {out_path} ({size / 1024:.0f} KiB); ranks K {bf.ranks['k']}\n  V {bf.ranks['v']}")
    print(f"mean effective rank at 99% energy: K {er[0]:.1f}, V {er[1]:.1f} of {d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
