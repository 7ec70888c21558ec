"""Capacity per sequence of rotated int4 with a ring of exact tokens (first token and last W), from the
plugin's block arithmetic (``layered.capacity_ratio``): the capacity column of EVALUATION.md, "Smaller
int8 rings for int4".

    python -P benchmarks/cpu-int4-ring-2026-12-05/capacity.py
"""

from __future__ import annotations

import torch

from vllm_lowrank.config import ModelShape, parse
from vllm_lowrank.layered import capacity_ratio, ring_plan
from vllm_lowrank.sensitivity import BLOCK_SIZE

SHAPE, DT = ModelShape(30, 3, 64), torch.bfloat16  # SmolLM2-135M (the 1B shape gives the same ratios)
RINGS = [(0, 0, "model"), (8, 1, "int8"), (16, 1, "int8"), (32, 1, "int8"), (32, 1, "model")]


def main() -> None:
    print("| W | S | ring | ring blocks | 1k | 1,280 | 8k |")
    print("|---|---|---|---|---|---|---|")
    for w, s, exact in RINGS:
        raw = {"format": "int4", **({"exact_window": w, "exact_sink": s, "exact_dtype": exact} if w + s else {})}
        cfg = parse(raw, SHAPE)
        k = ring_plan(cfg, SHAPE.num_layers, SHAPE.head_dim, DT, BLOCK_SIZE)[0] if cfg.layered else 0
        ratios = [capacity_ratio(cfg, SHAPE.num_layers, SHAPE.head_dim, DT, BLOCK_SIZE, n) for n in (1024, 1280, 8192)]
        print(f"| {w} | {s} | {exact} | {k} | " + " | ".join(f"{r:.2f}x" for r in ratios) + " |")


if __name__ == "__main__":
    main()
