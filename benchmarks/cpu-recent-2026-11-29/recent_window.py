"""What a recent-window (layered) cache would buy at 3.5-4x: each query reads its last W positions exact
and everything older compressed (the plugin's codecs), in the PyTorch simulation of the HF model.

    python recent_window.py --windows 16 --out run.json int4:0 int4:64 plan:3.56x:128 ...

A variant is ``FORMAT:W`` or ``FORMAT:W:S``: ``int4`` (rotated int4 on every K and V), ``plan:NAME`` (a
plan of bases/smollm2-135m.plans.json), with smoothing (``+s``, e.g. ``int4+s:64``) where the basis file
has scales; W recent positions and the first S positions (attention sinks) exact. Bytes: asymptotic (the compressed slot) and at the window length (W tokens at bf16 size).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoTokenizer

from vllm_lowrank import simulate
from vllm_lowrank.basis import BasisFile
from vllm_lowrank.config import expand_plan
from vllm_lowrank.models import smollm2
from vllm_lowrank.sensitivity import parse_plan, plan_bytes
from vllm_lowrank.textdata import eval_windows

REPO = Path(__file__).resolve().parents[2]
PLANS = REPO / "bases" / "smollm2-135m.plans.json"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("variants", nargs="+")
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--out", default=None)
    p.add_argument("--plans", default=str(PLANS), help="the plans file that plan:NAME variants come from")
    args = p.parse_args()
    torch.set_num_threads(1)
    model = smollm2()
    tok = AutoTokenizer.from_pretrained(str(model))
    wins = eval_windows(tok, args.windows, args.window)
    sim = simulate.Simulator(model)
    sim.prepare(wins)
    ref = sim.reference()
    n, h, d = sim.num_layers, sim.num_kv_heads, sim.head_dim
    full = 2 * d * 2  # bf16 K+V bytes per token and KV head
    rows = [{"variant": "exact", "ppl": math.exp(ref["nll"]), "change_pct": 0.0}]
    print(f"exact: perplexity {rows[0]['ppl']:.4f} over {ref['tokens']} tokens")
    for v in tqdm(args.variants, desc="variants"):
        parts = v.split(":")
        n_fmt = 2 if parts[0] == "plan" else 1
        fmt, nums = ":".join(parts[:n_fmt]), [int(x) for x in parts[n_fmt:]]
        w, sink = nums[0], (nums[1] if len(nums) > 1 else 0)
        smooth = fmt.endswith("+s")
        fmt = fmt.removesuffix("+s")
        if fmt.startswith("plan:"):
            settings = expand_plan(f"{args.plans}:{fmt[5:]}")
            plan = parse_plan(settings["layers"])
            basis = BasisFile.load(settings["basis"]) if "basis" in settings else None
            offsets = settings.get("offset")
        else:
            plan = {i: (fmt if fmt != "int4" else "hadamard+int4",) * 2 for i in range(n)}
            basis = BasisFile.load(REPO / "bases" / "smollm2-135m.safetensors")
            offsets = None
        sim.basis, sim.use_offsets, sim.smooth_keys = basis, offsets, smooth
        sim.set_plan(plan)
        sim.exact_window, sim.exact_sink = w, sink
        t0 = time.time()
        r = sim.run(0)
        per_head = plan_bytes(plan, h, d) / (n * h)
        exact_tokens = min(w + sink, args.window)
        at_len = (exact_tokens * full + (args.window - exact_tokens) * per_head) / args.window
        row = {"variant": v, "ppl": math.exp(r["nll"]), "change_pct": 100 * (math.exp(r["nll"] - ref["nll"]) - 1),
               "kl": r["kl"], "ratio_asymptotic": full / per_head, "ratio_at_window": full / at_len,
               "seconds": round(time.time() - t0, 1)}
        rows.append(row)
        tqdm.write(f"{v}: perplexity {row['ppl']:.4f} ({row['change_pct']:+.3f}%), KL {row['kl']:.4f}, "
                   f"{row['ratio_asymptotic']:.2f}x asymptotic, {row['ratio_at_window']:.2f}x at {args.window} tokens")
    print("| variant | vs bf16 (asymptotic) | at %d tokens | perplexity | change | KL |" % args.window)
    print("|---|---|---|---|---|---|")
    for r in rows[1:]:
        print(f"| `{r['variant']}` | {r['ratio_asymptotic']:.2f}x | {r['ratio_at_window']:.2f}x | {r['ppl']:.4f} | "
              f"{r['change_pct']:+.2f}% | {r['kl']:.4f} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"windows": args.windows, "window": args.window, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
