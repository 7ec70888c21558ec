"""How far the fused store kernel's bytes are from the codec's where there is a basis (thirteenth session).

The kernel projects in its own float32 summation order, so a value on a rounding boundary can land one
step from the codec's. For 10 seeds per format (3 KV heads, head_dim 64, 64 tokens, random bases and
offsets as tests/test_kernels.py makes them), under Triton's interpreter on the CPU: the share of slot
bytes that differ, and the kernel-to-codec distance of the decoded latents over the codec's own
quantization error (what ``_check_store`` bounds at 2% and 0.5).

    python -P benchmarks/cpu-store-fused-2026-12-05/store_flips.py   # ~1 min; store_flips.log
"""

import os
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

import torch  # noqa: E402

import test_kernels as T  # noqa: E402
import vllm_lowrank.kernels as K  # noqa: E402
from vllm_lowrank import codec, reference  # noqa: E402
from vllm_lowrank.formats import cache_shape  # noqa: E402

for spec in ["int4", "lowrank+int8", "lowrank", "r15+int4/r9+fp8", "hadamard/int4"]:
    for dtype in (torch.bfloat16, torch.float16):
        differ, ratio = [], []
        for seed in range(10):
            torch.manual_seed(seed)
            h, d, bs, n = 3, 64, 16, 64
            layout, tr = T._setup(spec, h, d, dtype, "cpu")
            k, v = T._kv(n, h, d, dtype, "cpu")
            cache = torch.zeros(cache_shape(8, bs, h, layout.slot_bytes), dtype=torch.uint8)
            slots = torch.randperm(8 * bs)[:n]
            rows = codec.encode_layer(k, v, layout, tr)
            K.store(k, v, cache, slots, layout, tr)
            got = reference.read_slots(cache, slots, layout)
            differ.append((got != rows).float().mean().item())
            for a, b, x, t in zip(codec.decode_layer(got, layout), codec.decode_layer(rows, layout), (k, v),
                                  (tr.k, tr.v)):
                quant = T._rel(b, T._exact_latents(x, t))
                ratio.append(T._rel(a, b) / quant if quant > 0 else 0.0)
        print(f"{spec:18s} {str(dtype):15s} bytes differing: max {max(differ):.3%} mean {sum(differ) / len(differ):.3%};"
              f" kernel-vs-codec / codec-vs-float64: max {max(ratio):.3f}", flush=True)
