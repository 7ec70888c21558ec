"""Capacity per sequence of the 2x plan with a small ring (the plugin's block arithmetic, as
``benchmarks/cpu-layered-2026-11-29/capacity.py``), beside int8 without one.

    python -P benchmarks/cpu-2x-sink-2026-12-04/capacity.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from vllm_lowrank.config import ModelShape, expand_plan, parse
from vllm_lowrank.layered import capacity_ratio, ring_plan

PLANS = Path(__file__).resolve().parents[2] / "bases" / "smollm2-135m.plans.json"
SHAPE, BS, DT = ModelShape(30, 3, 64), 16, torch.bfloat16


def main() -> None:
    print("| format | W | S | ring | ring blocks | 1k | 8k | 32k |")
    print("|---|---|---|---|---|---|---|---|")
    for name, settings, rings in (("int8", {"format": "int8"}, [(0, 0, "model")]),
                                  ("plan:2x", expand_plan(f"{PLANS}:2x"),
                                   [(0, 0, "model"), (0, 1, "model"), (16, 1, "model"), (16, 1, "int8")])):
        for w, sink, exact in rings:
            ring = {"exact_window": w, "exact_sink": sink, "exact_dtype": exact} if w + sink else {}
            cfg = parse({**settings, **ring}, SHAPE)
            k = ring_plan(cfg, SHAPE.num_layers, SHAPE.head_dim, DT, BS)[0] if w + sink else 0
            ratios = [capacity_ratio(cfg, SHAPE.num_layers, SHAPE.head_dim, DT, BS, n) for n in (1024, 8192, 32768)]
            print(f"| {name} | {w} | {sink} | {exact if w + sink else '-'} | {k} | "
                  + " | ".join(f"{r:.2f}x" for r in ratios) + " |")


if __name__ == "__main__":
    sys.exit(main())
