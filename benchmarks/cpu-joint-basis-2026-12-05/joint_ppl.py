"""Perplexity of low rank with one basis per layer shared by the KV heads (joint) against one per KV
head, in the simulation of the HF model (SmolLM2-135M, float32, the plugin's own int8/int4 codec).

    python -P benchmarks/cpu-joint-basis-2026-12-05/joint_ppl.py --windows 8 --json out.json VARIANT...

A variant is ``KIND:KFMT:VFMT[:W:S]``: ``head`` (one PCA basis per KV head) or ``joint`` (one PCA basis
over the layer's concatenated heads ``[x_0 | x_1 | x_2]``, 192 wide; each token then stores one latent
for all its heads), the K and V formats (``r<N>+int4``, ``r<N>+int8``, ``r<N>``; for ``joint`` N counts
the latent dimensions of all heads together), and optionally the last W and first S positions exact (a
layered cache). Every layer gets the same formats. Bases and offsets (the mean) are fitted on
``--fit-windows`` calibration windows, disjoint from the evaluation windows. Bytes per token and layer
are the plugin's slot bytes (a joint latent is one slot of head_dim ``H * D``).
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
from vllm_lowrank.formats import LayerFormat, SlotLayout, TensorFormat
from vllm_lowrank.models import smollm2
from vllm_lowrank.textdata import calibration_windows, eval_windows
from vllm_lowrank.transforms import build_tensor_transform


class JointCodec:
    """A tensor codec over [N, H, D] that compresses [N, 1, H * D] (one latent per token)."""

    def __init__(self, inner: simulate.TensorCodec):
        self.inner = inner

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n, h, d = x.shape
        return self.inner(x.reshape(n, 1, h * d)).reshape(n, h, d)


def fit_bases(sim: simulate.Simulator, windows: list[list[int]]) -> dict[str, list[tuple[torch.Tensor, ...]]]:
    """Per tensor and layer: (per-head bases [H, D, D], per-head means [H, D], joint basis [1, HD, HD],
    joint mean [1, HD]), eigenvectors by descending eigenvalue."""
    caps = []
    for w in tqdm(windows, desc="fit"):
        simulate._STATE.capture_kv = {}
        sim.prepare([w])
        caps.append(simulate._STATE.capture_kv)
    simulate._STATE.capture_kv = None
    out: dict[str, list[tuple[torch.Tensor, ...]]] = {"k": [], "v": []}
    for layer in range(sim.num_layers):
        for t, i in (("k", 0), ("v", 1)):
            x = torch.cat([c[layer][i] for c in caps]).double()  # [T, H, D]
            mean = x.mean(0)
            xc = x - mean
            heads = torch.stack([torch.linalg.eigh(xc[:, h].T @ xc[:, h])[1].flip(1) for h in range(x.shape[1])])
            flat = xc.reshape(len(xc), -1)
            joint = torch.linalg.eigh(flat.T @ flat)[1].flip(1)[None]
            out[t].append((heads.float(), mean.float(), joint.float(), mean.reshape(1, -1).float()))
    return out


def codec(kind: str, fmt: str, basis: tuple[torch.Tensor, ...], h: int, d: int):
    tf = TensorFormat.parse(fmt)
    if kind == "head":
        b, m = basis[0], basis[1]
        return simulate.TensorCodec(tf, build_tensor_transform(tf, h, d, b, m), d)
    b, m = basis[2], basis[3]
    return JointCodec(simulate.TensorCodec(tf, build_tensor_transform(tf, 1, h * d, b, m), h * d))


def slot_bytes(kind: str, kf: str, vf: str, h: int, d: int) -> int:
    """Bytes per token and layer, all KV heads."""
    layout = LayerFormat(TensorFormat.parse(kf), TensorFormat.parse(vf))
    if kind == "head":
        return h * SlotLayout.build(layout, d, torch.bfloat16).slot_bytes
    return SlotLayout.build(layout, h * d, torch.bfloat16).slot_bytes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("variants", nargs="+")
    p.add_argument("--windows", type=int, default=8, help="evaluation windows of 1024 tokens")
    p.add_argument("--fit-windows", type=int, default=8, help="calibration windows the bases are fitted on")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    model = smollm2()
    tok = AutoTokenizer.from_pretrained(str(model))
    sim = simulate.Simulator(model)
    bases = fit_bases(sim, calibration_windows(tok, args.fit_windows))
    sim.prepare(eval_windows(tok, args.windows))
    ref = sim.reference()
    n, h, d = sim.num_layers, sim.num_kv_heads, sim.head_dim
    bf16 = h * 2 * d * 2
    rows = [{"variant": "exact", "ppl": math.exp(ref["nll"]), "change_pct": 0.0, "bytes": bf16, "ratio": 1.0}]
    print(f"exact: perplexity {rows[0]['ppl']:.4f} over {ref['tokens']} tokens")
    for v in tqdm(args.variants, desc="variants"):
        kind, kf, vf, *ring = v.split(":")
        w, s = (int(ring[0]), int(ring[1])) if ring else (0, 0)
        sim.set_codecs({i: (codec(kind, kf, bases["k"][i], h, d), codec(kind, vf, bases["v"][i], h, d))
                        for i in range(n)})
        sim.exact_window, sim.exact_sink = w, s
        t0 = time.time()
        r = sim.run(0)
        b = slot_bytes(kind, kf, vf, h, d)
        rows.append({"variant": v, "ppl": math.exp(r["nll"]), "change_pct": 100 * (math.exp(r["nll"] - ref["nll"]) - 1),
                     "kl": r["kl"], "bytes": b, "ratio": bf16 / b, "seconds": round(time.time() - t0, 1)})
        print(f"{v}: {b} B/token/layer ({bf16 / b:.2f}x), perplexity {rows[-1]['ppl']:.4f} "
              f"({rows[-1]['change_pct']:+.2f}%), KL {r['kl']:.4f}", flush=True)
    sim.exact_window = sim.exact_sink = 0
    print("| variant | bytes/token/layer | vs bf16 | perplexity | change | KL |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['bytes']} | {r['ratio']:.2f}x | {r['ppl']:.4f} | {r['change_pct']:+.2f}% | "
              f"{r.get('kl', 0):.4f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"windows": args.windows, "fit_windows": args.fit_windows,
                                               "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
