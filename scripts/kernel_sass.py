#!/usr/bin/env python
"""The decode kernel's machine code, without a GPU: registers and the hot loop's instruction mix.

Compiles the split-KV decode kernel for an NVIDIA target (sm_90, the H200, by default) with Triton's own
compiler and disassembles it with the ``cuobjdump`` bundled with Triton, on any machine. For each
format it prints the registers per thread (which set how many programs share an SM), the shared
memory, and the instructions of the main loop (one ``BLOCK_N`` tile of cached tokens per iteration,
per thread) by opcode. A memory-bound loop must issue few instructions per byte; this is how the
kernel's per-token costs (payload conversion, address arithmetic, layout shuffles) were found and cut
between GPU sessions (KERNELS.md, "Reading the machine code").

Example: ``python scripts/kernel_sass.py --head-dim 128 --formats full,int8,fp8,int4,lowrank+int8:32:32``
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from vllm_lowrank.formats import LayerFormat, SlotLayout, TensorFormat, preset_format, ring_layout
from vllm_lowrank.kernels import decode
from vllm_lowrank.kernels.common import dot_dtypes, layout_constexprs, next_pow2, ring_constexprs

_INSN = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*?);")


def parse_format(spec: str) -> LayerFormat:
    """``preset[:rank_k:rank_v]`` (e.g. ``lowrank+int8:32:32``) or ``K-format/V-format`` (``int8/model``)."""
    if "/" in spec:
        kf, vf = spec.split("/")
        return LayerFormat(TensorFormat.parse(kf), TensorFormat.parse(vf))
    name, *ranks = spec.split(":")
    return preset_format(name, *(int(r) for r in ranks))


def compile_decode(fmt: LayerFormat, head_dim: int, group: int, block_size: int, block_n: int, num_warps: int,
                   num_stages: int, arch: int, model_dtype: torch.dtype = torch.bfloat16, token_rows: bool = False,
                   ring: tuple[int, int, str] = (0, 0, "model")):
    """The compiled split kernel of one layer format (pointers and strides 16-byte aligned, as at run time);
    ``ring`` = (window, sink, exact dtype) of a layered cache, whose ring program is then compiled in."""
    kernel = decode._decode_split_kernel
    layout = SlotLayout.build(fmt, head_dim, model_dtype)
    consts = {**layout_constexprs(layout), **dot_dtypes(layout), "G": group,
              "G_TILE": max(8 if token_rows else 16, next_pow2(group)), "BLOCK_SIZE": block_size, "BLOCK_N": block_n,
              "TILE_B": min(block_size, block_n), "STRIDE_CHEAD": block_size * layout.slot_bytes, "UPCAST": False,
              "TOKEN_ROWS": token_rows,
              "RING_W": ring[0], "RING_S": ring[1], "D": head_dim, "D_TILE": max(16, next_pow2(head_dim)),
              "RING_G_TILE": max(16, next_pow2(group)), "RING_N": 16, "HAS_K_OFFSET": True, "HAS_V_OFFSET": True,
              **ring_constexprs(ring_layout(head_dim, model_dtype, ring[2]), block_size, layout.slot_bytes)}
    model_type = {torch.bfloat16: "bf16", torch.float16: "fp16"}[model_dtype]
    q_type = "fp32" if fmt.k.transform == "basis" else model_type
    pointer_types = {"q_ptr": q_type, "cache_ptr": "u8", "block_table_ptr": "i32", "seq_lens_ptr": "i32",
                     "xq_ptr": model_type, "ring_ptr": "i32"}
    signature = {}
    for name in kernel.arg_names:
        if name in consts:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*" + pointer_types.get(name, "fp32")
        else:
            signature[name] = "fp32" if name == "qk_scale" else "i32"
    attrs = {(kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in kernel.arg_names
             if signature[n].startswith("*") or n.startswith("stride")}
    src = ASTSource(kernel, signature, constexprs={k: v for k, v in consts.items() if k in kernel.arg_names},
                    attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def disassemble(cubin: bytes) -> tuple[str, str]:
    """(SASS text, resource usage) of a cubin, with Triton's bundled cuobjdump."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        sass = subprocess.run([str(tool), "-sass", str(path)], capture_output=True, text=True, check=True).stdout
        res = subprocess.run([str(tool), "-res-usage", str(path)], capture_output=True, text=True, check=True).stdout
    return sass, res


def hot_loop(sass: str) -> list[str]:
    """The instructions of the longest backward-branch region: the loop over tiles."""
    insns = [(int(m.group(1), 16), m.group(2).strip()) for m in map(_INSN.match, sass.splitlines()) if m]
    loops = []
    for addr, text in insns:
        if "BRA" in text:
            target = re.search(r"0x([0-9a-f]+)", text.split("BRA", 1)[1])
            if target and int(target.group(1), 16) < addr:
                loops.append((int(target.group(1), 16), addr))
    if not loops:
        return []
    start, end = max(loops, key=lambda ab: ab[1] - ab[0])
    return [text for addr, text in insns if start <= addr <= end]


def opcode(text: str) -> str:
    return re.sub(r"^@!?U?P\w+\s+", "", text).split()[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--formats", default="full,int8,fp8,int4,lowrank:32:32,lowrank+int8:32:32,lowrank+int8:16:16",
                    help="comma list: preset[:rank_k:rank_v] or K-format/V-format")
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--group", type=int, default=4, help="query heads per KV head")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--block-n", type=int, default=128)
    ap.add_argument("--num-warps", type=int, default=4)
    ap.add_argument("--num-stages", type=int, default=2)
    ap.add_argument("--token-rows", action="store_true", help="the decode variant with tokens as the dots' rows")
    ap.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (H100/H200), 80 (A100)")
    ap.add_argument("--top", type=int, default=8, help="opcodes listed per format")
    ap.add_argument("--dump", type=Path, default=None, help="write each format's SASS and PTX into this folder")
    ap.add_argument("--json", type=Path, default=None, help="write registers and the loop's full opcode counts")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("unset TRITON_INTERPRET: this compiles the kernels")

    from tqdm import tqdm

    rows = []
    for spec in tqdm(args.formats.split(","), desc="compile"):
        k = compile_decode(parse_format(spec), args.head_dim, args.group, args.block_size, args.block_n,
                           args.num_warps, args.num_stages, args.arch, token_rows=args.token_rows)
        sass, res = disassemble(k.asm["cubin"])
        regs = re.search(r"REG:(\d+)", res)
        loop = hot_loop(sass)
        mix = collections.Counter(opcode(t) for t in loop)
        rows.append((spec, int(regs.group(1)) if regs else -1, k.metadata.shared, len(loop), mix))
        if args.dump:
            args.dump.mkdir(parents=True, exist_ok=True)
            stem = re.sub(r"[^\w+.-]", "_", spec)
            (args.dump / f"{stem}.sass").write_text(sass)
            (args.dump / f"{stem}.ptx").write_text(k.asm["ptx"])
    if args.json:
        args.json.write_text(json.dumps({spec: {"registers": regs, "shared_bytes": smem, "loop_instructions": n,
                                                "opcodes": dict(mix)} for spec, regs, smem, n, mix in rows}, indent=1))
    variant = " (token rows)" if args.token_rows else ""
    print(f"\ndecode split kernel{variant}, sm_{args.arch}, head_dim {args.head_dim}, group {args.group}, block_size "
          f"{args.block_size}, BLOCK_N {args.block_n}, {args.num_warps} warps; loop = instructions per thread "
          f"per tile of {args.block_n} tokens")
    print(f"{'format':<22} {'regs':>5} {'smem':>7} {'loop':>6}  top opcodes")
    for spec, regs, smem, n, mix in rows:
        top = ", ".join(f"{op} {c}" for op, c in mix.most_common(args.top))
        print(f"{spec:<22} {regs:>5} {smem:>7} {n:>6}  {top}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
