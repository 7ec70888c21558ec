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
    @PLAN:SPEC             a plan of the plans file (--plans): its hadamard+int4 tensors take SPEC, the
                           others keep the plan's format (the plugin's codec, offsets as the plugin uses
                           them: on with this basis), with SPEC's exact first tokens; @PLAN:plugin = as is

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


def parse_variant(arg: str) -> tuple[str, str, dict | str, dict | str, str | None]:
    name, _, spec = arg.rpartition("=") if "=" in arg else (arg, "", arg)
    if spec.startswith("@"):
        plan, _, rest = spec[1:].partition(":")
        if rest == "plugin":
            return name, spec, "plugin:int4", "plugin:int4", plan
        _, _, ko, vo, _ = parse_variant(rest)
        return name, spec, ko, vo, plan
    if spec.startswith("plugin:"):
        return name, spec, spec, spec, None
    if spec.startswith("k:"):
        k, _, v = spec[2:].partition("/v:")
        if not v:
            raise SystemExit(f"{arg!r}: write k:OPTS/v:OPTS")
        return name, spec, parse_opts(k), parse_opts(v), None
    o = parse_opts(spec)
    return name, spec, o, dict(o), None


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
    p.add_argument("--plans", default=str(REPO / "bases" / "smollm2-135m.plans.json"), help="plans file (for @PLAN:)")
    p.add_argument("--bf16-baseline", action="store_true", help="also run the exact model in bfloat16")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoTokenizer

    from vllm_lowrank.basis import BasisFile
    from vllm_lowrank.calibration import Statistics
    from vllm_lowrank.models import smollm2
    from vllm_lowrank.formats import PRESETS, SCALE_BYTES, TensorFormat
    from vllm_lowrank.quantsim import ExactPrefix, VariantCodec, smoothing_scales, tie_rope_pairs
    from vllm_lowrank.simulate import make_codec
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

    def plugin_bytes(fmt: str) -> int:
        tf = TensorFormat.parse(fmt)
        return tf.payload_bytes(D, torch.bfloat16) + SCALE_BYTES * (tf.has_scale + tf.has_zero)

    def per_tensor(fmt: str, o, t: str, i: int, offsets: bool):
        """(codec, bytes per token, bytes per token at --window context) of one tensor of layer i."""
        if isinstance(o, dict) and fmt == "hadamard+int4":
            c = codec(o, t, i)
            return c, c.bytes_per_token(D, H), c.bytes_per_token(D, H, args.window)
        # the plugin's own codec for the format, offsets as the plugin uses them with this basis
        c = make_codec(fmt, t, i, basis, D, H, offsets)
        b = plugin_bytes(fmt) * H
        sink = o["sink"] if isinstance(o, dict) else 0
        if sink:
            return ExactPrefix(c, sink), b, b + min(sink, args.window) * (2 * D - plugin_bytes(fmt)) * H / args.window
        return c, b, b

    plans = None
    rows = []
    for name, spec, ko, vo, plan_name in variants:
        t1 = time.time()
        if plan_name:
            plans = plans or json.loads(Path(args.plans).read_text())["plans"]
            layers = {int(i): (f["k"], f["v"]) for i, f in plans[plan_name]["layers"].items()}
            if ko == "plugin:int4":
                ko = vo = "plugin:int4+off"  # the plan as the plugin runs it (offsets on with this basis)
        else:
            fmt = ko.split(":", 1)[1].removesuffix("+off") if isinstance(ko, str) else "int4"
            kf, vf = PRESETS.get(fmt, (fmt, fmt))
            layers = {i: (kf, vf) for i in range(L)}
        codecs, per_tok, per_tok_ctx = {}, 0.0, 0.0
        for i in range(L):
            off = bool(plan_name) or ko == "plugin:int4+off"
            (kc, kb, kbc), (vc, vb, vbc) = (per_tensor(layers[i][0], ko, "k", i, off),
                                            per_tensor(layers[i][1], vo, "v", i, off))
            codecs[i] = (kc, vc)
            per_tok += kb + vb
            per_tok_ctx += kbc + vbc
        sim.set_codecs(codecs)
        r = sim.run(0)
        ppl = math.exp(r["nll"])
        row = {"name": name, "spec": spec, "bytes_per_token": per_tok, "vs_bf16": bf16_bytes / per_tok,
               f"bytes_per_token_at_{args.window}": per_tok_ctx, f"vs_bf16_at_{args.window}": bf16_bytes / per_tok_ctx,
               "nll": r["nll"], "ppl": ppl, "change_pct": 100 * (ppl / base_ppl - 1), "kl": r["kl"],
               "seconds": round(time.time() - t1, 1)}
        rows.append(row)
        ctx = row[f"vs_bf16_at_{args.window}"]
        print(f"{name:48s} {per_tok:7.0f} B {row['vs_bf16']:.2f}x (at {args.window}: {ctx:.3f}x)"
              f"  ppl {ppl:.4f}  {row['change_pct']:+.3f}%  KL {r['kl']:.5f}  ({row['seconds']} s)", flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    meta["seconds"] = round(time.time() - t0, 1)
    if args.out:
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
