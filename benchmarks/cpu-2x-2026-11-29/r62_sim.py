"""Simulation check behind EVALUATION.md's rank-62 table: one or two basis directions dropped (2 windows),
after the share of energy in the last one and two directions (layers 5 and 15, per KV head).

    python -P benchmarks/cpu-2x-2026-11-29/r62_sim.py   # needs out/smollm2-135m-full-smooth.safetensors
"""
import math

import torch
from transformers import AutoTokenizer
from vllm_lowrank import simulate
from vllm_lowrank.basis import BasisFile
from vllm_lowrank.models import smollm2
from vllm_lowrank.textdata import eval_windows
torch.set_num_threads(2)
model = smollm2(); tok = AutoTokenizer.from_pretrained(str(model))
sim = simulate.Simulator(model); sim.prepare(eval_windows(tok, 2, 1024)); ref = sim.reference()
B = BasisFile.load("out/smollm2-135m-full-smooth.safetensors")
for layer in (5, 15):
    for t in "kv":
        e = B.eigenvalues[t][layer]
        print(f"layer {layer} {t}: last two {[f'{x:.4f}' for x in (e[:, -2:].sum(1) / e.sum(1)).tolist()]}, "
              f"last one {[f'{x:.4f}' for x in (e[:, -1] / e.sum(1)).tolist()]}", flush=True)
n = sim.num_layers
for k, v, smooth in [("int8","int8",True), ("r64+int8","r64+int8",True), ("r62+int8","int8",True), ("int8","r62+int8",True),
                     ("r62+int8","int8",False), ("r64+int8","int8",False), ("r63+int8","int8",False)]:
    sim.basis, sim.use_offsets, sim.smooth_keys = B, None, smooth
    sim.set_plan({i: (k, v) for i in range(n)})
    r = sim.run(0)
    print(k, v, "smooth" if smooth else "", f"{100*(math.exp(r['nll']-ref['nll'])-1):+.3f}%  KL {r['kl']:.4f}", flush=True)
