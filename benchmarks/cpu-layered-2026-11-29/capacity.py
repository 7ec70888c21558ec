"""The layered cache's capacity per sequence, from the plugin's own block arithmetic (EVALUATION.md).

    python -P benchmarks/cpu-layered-2026-11-29/capacity.py

Per format, (W, S) and ring dtype (``exact_dtype``): ring blocks per sequence (the layer with the fewest
exact tokens a block sets them, ``vllm_lowrank.layered.ring_plan``), then bf16 K+V bytes over the bytes a
sequence of L tokens holds (its compressed slots plus the ring blocks, in every layer), for L = 1k, 8k, 32k.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vllm_lowrank.config import ModelShape, expand_plan, parse
from vllm_lowrank.layered import capacity_ratio, ring_plan

PLANS = Path(__file__).resolve().parents[2] / "bases" / "smollm2-135m.plans.json"
SHAPE, BS, DT = ModelShape(30, 3, 64), 16, torch.bfloat16


def main() -> None:
    formats = {"plan:4x": expand_plan(f"{PLANS}:4x"), "int4": {"format": "int4"}}
    print("| format | W | S | ring | ring blocks | 1k | 8k | 32k |")
    print("|---|---|---|---|---|---|---|---|")
    for name, settings in formats.items():
        for exact in ("model", "int8"):
            for w, sink in ((8, 1), (32, 1), (64, 1)):
                cfg = parse({**settings, "exact_window": w, "exact_sink": sink, "exact_dtype": exact}, SHAPE)
                k, _ = ring_plan(cfg, SHAPE.num_layers, SHAPE.head_dim, DT, BS)
                ratios = [capacity_ratio(cfg, SHAPE.num_layers, SHAPE.head_dim, DT, BS, n) for n in (1024, 8192, 32768)]
                print(f"| {name} | {w} | {sink} | {exact} | {k} | " + " | ".join(f"{r:.2f}x" for r in ratios) + " |")


if __name__ == "__main__":
    main()
