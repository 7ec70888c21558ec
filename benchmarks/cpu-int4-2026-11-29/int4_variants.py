"""Cheap int4 variants of SmolLM2's KV cache in the PyTorch simulation (vllm_lowrank.simulate + quantsim).

Every cached K/V of every layer goes through a VariantCodec (or, for ``plugin:`` variants, the plugin's own
codec); every query attends over the compressed K/V of its predecessors and itself (what the plugin's
``prefill_from_cache`` evaluation measures). Windows: the first N evaluation windows (the last 200,000
characters of the Wikipedia excerpt, 1024 tokens each), as ``evaluate.py --windows N`` uses.

Variant syntax (one argument each, optionally ``name=`` in front):

    plugin:int4            the plugin's hadamard+int4 on K and V (its codec), no offsets
    plugin:int4+off        the same with the basis file's offsets
    OPTS                   the same options for K and V
    k:OPTS/v:OPTS          per tensor

OPTS: ``+``-joined, from: ``int4`` (default: Hadamard + asymmetric int4, one group), ``off`` (the basis
file's calibrated offset), ``sA`` (static per-channel smoothing s = E[x^2]^(A/2), from the calibration
statistics; centred second moment when ``off`` is set), ``sqA`` (keys: weighted by the queries' E[q^2],
s = (E[k^2]/E[q^2])^(A/2)), ``swA`` (values: weighted by o_proj's squared column norms), ``t`` (tie the
scales across RoPE pairs i, i+32: foldable into q_proj/k_proj), ``gN`` (scale/zero groups of N channels),
``sym`` (symmetric int4, scale only), ``sinkN`` (first N tokens of each window kept exact), ``norot``
(no Hadamard rotation), ``exact`` (no quantization).

Example:  python int4_variants.py --windows 4 --out run.json plugin:int4 int4 off sink1 k:off+s0.5/v:off
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

DEFAULT_VARIANTS = [
    "plugin:int4", "plugin:int4+off", "int4", "off",
    "k:off/v:int4", "k:int4/v:off",
    "sink1", "sink4", "off+sink1", "off+sink4",
    "k:s0.5/v:int4", "k:s1/v:int4", "k:sq0.5/v:int4", "k:s0.5+t/v:int4",
    "k:off+s0.5/v:off", "k:off+s1/v:off", "k:off+sq0.5/v:off", "k:off+s0.5+t/v:off",
    "g32", "sym+g32", "sym", "off+g32", "off+sym+g32",
    "k:off+s0.5/v:off+s0.5", "k:off+s0.5/v:off+sw0.5",
    "k:off+s0.5+sink1/v:off+sink1", "k:off+s0.5+sym+g32+sink1/v:off+sym+g32+sink1",
]


def parse_opts(text: str) -> dict:
    o = {"off": False, "smooth": None, "tie": False, "group": None, "sym": False, "sink": 0, "rotate": True,
         "quant": "int4"}
    for tok in filter(None, text.split("+")):
        if tok == "int4":
            continue
        elif tok == "off":
            o["off"] = True
        elif tok == "t":
            o["tie"] = True
        elif tok == "sym":
            o["sym"] = True
        elif tok == "norot":
            o["rotate"] = False
        elif tok == "exact":
            o["quant"] = "none"
        elif m := re.fullmatch(r"s([qw]?)(\d*\.?\d+)", tok):
            o["smooth"] = (m.group(1) or "plain", float(m.group(2)))
        elif m := re.fullmatch(r"g(\d+)", tok):
            o["group"] = int(m.group(1))
        elif m := re.fullmatch(r"sink(\d+)", tok):
            o["sink"] = int(m.group(1))
        else:
            raise SystemExit(f"unknown option {tok!r} in {text!r}")
    return o


def parse_variant(arg: str) -> tuple[str, str, dict | str, dict | str]:
    name, _, spec = arg.rpartition("=") if "=" in arg else (arg, "", arg)
    if spec.startswith("plugin:"):
        return name, spec, spec, spec
    if spec.startswith("k:"):
        k, _, v = spec[2:].partition("/v:")
        if not v:
            raise SystemExit(f"{arg!r}: write k:OPTS/v:OPTS")
        return name, spec, parse_opts(k), parse_opts(v)
    o = parse_opts(spec)
    return name, spec, o, dict(o)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("variants", nargs="*", help=f"variants (default: {len(DEFAULT_VARIANTS)} of them, see the source)")
    p.add_argument("--windows", type=int, default=4, help="evaluation windows (default 4)")
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--basis", default=str(REPO / "bases" / "smollm2-135m.safetensors"),
                   help="basis file with calibrated offsets (default: the shipped SmolLM2 basis)")
    p.add_argument("--stats", default=str(REPO / "out" / "smollm2-135m-instruct-bfloat16-stats.safetensors"),
                   help="calibration statistics (calibrate.py output; needed for smoothing)")
    p.add_argument("--bf16-baseline", action="store_true", help="also run the exact model in bfloat16")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoTokenizer

    from vllm_lowrank.basis import BasisFile
    from vllm_lowrank.calibration import Statistics
    from vllm_lowrank.models import smollm2
    from vllm_lowrank.quantsim import VariantCodec, smoothing_scales, tie_rope_pairs
    from vllm_lowrank.simulate import Simulator
    from vllm_lowrank.textdata import eval_windows

    variants = [parse_variant(a) for a in (args.variants or DEFAULT_VARIANTS)]
    model = smollm2()
    tok = AutoTokenizer.from_pretrained(str(model))
    wins = eval_windows(tok, args.windows, args.window)
    basis = BasisFile.load(args.basis)
    stats = Statistics.load(args.stats) if Path(args.stats).is_file() else None

    t0 = time.time()
    sim = Simulator(model, basis)
    L, H, D = sim.num_layers, sim.num_kv_heads, sim.head_dim
    bf16_bytes = L * H * 2 * D * 2
    sim.prepare(wins)
    ref = sim.reference()
    base_ppl = math.exp(ref["nll"])
    print(f"baseline float32: nll {ref['nll']:.6f} ppl {base_ppl:.4f} ({ref['tokens']} tokens, "
          f"{time.time() - t0:.0f} s)", flush=True)
    meta = {"model": str(model.name), "windows": args.windows, "window": args.window, "tokens": ref["tokens"],
            "basis": args.basis, "stats": args.stats if stats else None, "threads": args.threads,
            "torch": torch.__version__, "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"),
            "baseline_float32": {"nll": ref["nll"], "ppl": base_ppl}, "bf16_bytes_per_token": bf16_bytes}
    if args.bf16_baseline:
        sb = Simulator(model, None, dtype=torch.bfloat16)
        sb.prepare(wins)
        rb = sb.reference()
        meta["baseline_bfloat16"] = {"nll": rb["nll"], "ppl": math.exp(rb["nll"])}
        print(f"baseline bfloat16: nll {rb['nll']:.6f} ppl {math.exp(rb['nll']):.4f}", flush=True)
        del sb

    # per-channel second moments [L, H, D] from the calibration statistics
    moments = {}
    if stats is not None:
        for name in ("k", "v", "q"):
            for centered in (False, True):
                if name == "q" and centered:
                    continue
                moments[(name, centered)] = stats.second_moment(name, centered).diagonal(dim1=-2, dim2=-1).float()
        wo = sim.model.model.layers[0].self_attn.o_proj.weight  # [hidden, Hq*D]
        hq = wo.shape[1] // D
        moments[("wo", False)] = torch.stack([
            l.self_attn.o_proj.weight.detach().float().pow(2).sum(0).reshape(H, hq // H, D).sum(1)
            for l in sim.model.model.layers])

    def codec(o: dict, t: str, layer: int) -> VariantCodec:
        off = basis.offsets[t][layer] if o["off"] else None
        s = None
        if o["smooth"] is not None:
            if stats is None:
                raise SystemExit(f"smoothing needs --stats ({args.stats} is missing)")
            kind, alpha = o["smooth"]
            m = moments[(t, o["off"])][layer]
            w = {"plain": None, "q": moments[("q", False)][layer], "w": moments[("wo", False)][layer]}[kind]
            if (kind == "q") != (t == "k") and kind != "plain":
                raise SystemExit(f"s{kind} is for {'keys' if kind == 'q' else 'values'} only")
            s = smoothing_scales(m, alpha, w)
            if o["tie"]:
                s = tie_rope_pairs(s)
        return VariantCodec(offset=off, smooth=s, rotate=o["rotate"], quant=o["quant"], group=o["group"],
                            symmetric=o["sym"], exact_prefix=o["sink"])

    rows = []
    for name, spec, ko, vo in variants:
        t1 = time.time()
        if isinstance(ko, str):  # plugin:FMT[+off]
            fmt = ko.split(":", 1)[1]
            use_off = fmt.endswith("+off")
            fmt = fmt.removesuffix("+off")
            from vllm_lowrank.formats import PRESETS
            from vllm_lowrank.simulate import make_codec

            kf, vf = PRESETS[fmt] if fmt in PRESETS else (fmt, fmt)
            sim.set_codecs({i: (make_codec(kf, "k", i, basis, D, H, use_off), make_codec(vf, "v", i, basis, D, H, use_off))
                            for i in range(L)})
            c = VariantCodec()  # bytes of the plugin's hadamard+int4 (36 B per head)
            per_tok = per_tok_ctx = 2 * L * c.bytes_per_token(D, H)
        else:
            codecs = {i: (codec(ko, "k", i), codec(vo, "v", i)) for i in range(L)}
            sim.set_codecs(codecs)
            kc, vc = codecs[0]
            per_tok = L * (kc.bytes_per_token(D, H) + vc.bytes_per_token(D, H))
            per_tok_ctx = L * (kc.bytes_per_token(D, H, args.window) + vc.bytes_per_token(D, H, args.window))
        r = sim.run(0)
        ppl = math.exp(r["nll"])
        row = {"name": name, "spec": spec, "bytes_per_token": per_tok, "vs_bf16": bf16_bytes / per_tok,
               f"bytes_per_token_at_{args.window}": per_tok_ctx, f"vs_bf16_at_{args.window}": bf16_bytes / per_tok_ctx,
               "nll": r["nll"], "ppl": ppl, "change_pct": 100 * (ppl / base_ppl - 1), "kl": r["kl"],
               "seconds": round(time.time() - t1, 1)}
        rows.append(row)
        print(f"{name:48s} {per_tok:7.0f} B {row['vs_bf16']:.2f}x (at {args.window}: {row[f'vs_bf16_at_{args.window}']:.3f}x)"
              f"  ppl {ppl:.4f}  {row['change_pct']:+.3f}%  KL {r['kl']:.5f}  ({row['seconds']} s)", flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    meta["seconds"] = round(time.time() - t0, 1)
    if args.out:
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
