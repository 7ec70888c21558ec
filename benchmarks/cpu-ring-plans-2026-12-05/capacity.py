"""Capacity per sequence of the plans chosen inside a layered cache (each with its own window), beside
the old 4x and 8x plans with the first token and last 32 exact, from the plugin's block arithmetic.

    python -P benchmarks/cpu-ring-plans-2026-12-05/capacity.py [PLANS_FILE]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from vllm_lowrank.config import ModelShape
from vllm_lowrank.layered import capacity_ratio, ring_plan
from vllm_lowrank.sensitivity import load_plans, parse_plan, plan_config

REPO = Path(__file__).resolve().parents[2]
OLD = REPO / "bases" / "smollm2-135m.plans.json"
SHAPE, BS, DT = ModelShape(30, 3, 64), 16, torch.bfloat16


def main(plans: str = str(REPO / "bases" / "smollm2-135m.ring.plans.json")) -> None:
    print("| plan | W | S | ring | ring blocks | 1k | 8k | 32k |")
    print("|---|---|---|---|---|---|---|---|")
    rows = [(OLD, name, 32, 1) for name in ("4x", "8x")]
    rows += [(Path(plans), name, p["settings"]["exact_window"], p["settings"]["exact_sink"])
             for name, p in load_plans(plans)["plans"].items()]
    for path, name, w, sink in rows:
        layers = parse_plan(load_plans(path)["plans"][name]["layers"])
        for exact in ("model", "int8"):
            cfg = plan_config(layers, exact_window=w, exact_sink=sink, exact_dtype=exact)
            k = ring_plan(cfg, SHAPE.num_layers, SHAPE.head_dim, DT, BS)[0]
            ratios = [capacity_ratio(cfg, SHAPE.num_layers, SHAPE.head_dim, DT, BS, n) for n in (1024, 8192, 32768)]
            print(f"| {path.name}:{name} | {w} | {sink} | {exact} | {k} | " + " | ".join(f"{r:.2f}x" for r in ratios)
                  + " |")


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
