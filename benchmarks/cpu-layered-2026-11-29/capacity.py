"""The layered cache's capacity per sequence, from the plugin's own block arithmetic (EVALUATION.md).

    python -P benchmarks/cpu-layered-2026-11-29/capacity.py

Per format and (W, S): ring blocks per sequence (the layer with the fewest exact tokens a block sets them,
``vllm_lowrank.layered.ring_blocks``), then bf16 K+V bytes over the bytes a sequence of L tokens holds
(its compressed slots plus the ring blocks, in every layer), for L = 1k, 8k, 32k. Also the ring blocks an
int8 ring (64 + 2 bytes per tensor and KV head instead of 128) would take.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from vllm_lowrank.config import ModelShape, expand_plan, parse
from vllm_lowrank.formats import SlotLayout
from vllm_lowrank.layered import ring_blocks, ring_tokens_per_block

PLANS = Path(__file__).resolve().parents[2] / "bases" / "smollm2-135m.plans.json"
SHAPE, BS, DT = ModelShape(30, 3, 64), 16, torch.bfloat16


def main() -> None:
    formats = {"plan:4x": expand_plan(f"{PLANS}:4x"), "int4": {"format": "int4"}}
    print("| format | W | S | ring blocks | 1k | 8k | 32k | ring blocks, int8 ring |")
    print("|---|---|---|---|---|---|---|---|")
    for name, settings in formats.items():
        cfg = parse(settings, SHAPE)
        slots = [SlotLayout.build(cfg.layer_format(i), SHAPE.head_dim, DT).slot_bytes for i in range(SHAPE.num_layers)]
        per_block = [ring_tokens_per_block(BS, s, SHAPE.head_dim, DT) for s in slots]
        int8_per_block = [BS * s // (2 * (SHAPE.head_dim + 2)) for s in slots]
        bf16 = SHAPE.num_layers * 2 * SHAPE.head_dim * DT.itemsize
        for w, sink in ((8, 1), (32, 1), (64, 1)):
            k = ring_blocks(w, sink, per_block)
            ratios = [bf16 * n / (n * sum(slots) + k * BS * sum(slots)) for n in (1024, 8192, 32768)]
            k8 = max(math.ceil((w + sink) / t) for t in int8_per_block)
            print(f"| {name} | {w} | {sink} | {k} | " + " | ".join(f"{r:.2f}x" for r in ratios) + f" | {k8} |")


if __name__ == "__main__":
    main()
