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
import importlib
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
from vllm_lowrank.kernels import decode, prefill, query

store = importlib.import_module("vllm_lowrank.kernels.store")  # the module (the package exports its function)

# pointer element types that do not depend on the format (the others default to float32)
INDEX_POINTERS = {"cache_ptr": "u8", "block_table_ptr": "i32", "seq_lens_ptr": "i32", "query_start_ptr": "i32",
                  "ring_ptr": "i32", "slot_mapping_ptr": "i64"}

_INSN = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*?);")


def parse_format(spec: str) -> LayerFormat:
    """``preset[:rank_k:rank_v]`` (e.g. ``lowrank+int8:32:32``) or ``K-format/V-format`` (``int8/model``)."""
    if "/" in spec:
        kf, vf = spec.split("/")
        return LayerFormat(TensorFormat.parse(kf), TensorFormat.parse(vf))
    name, *ranks = spec.split(":")
    return preset_format(name, *(int(r) for r in ranks))


def compile_kernel(kernel, consts: dict, pointer_types: dict[str, str], arch: int, num_warps: int = 4,
                   num_stages: int = 2, float_args: tuple[str, ...] = ("qk_scale",)):
    """Compile a ``@triton.jit`` kernel for ``sm_<arch>`` without a GPU. ``consts``: its constexprs;
    pointers (``*_ptr``) have the element types of ``pointer_types`` (then :data:`INDEX_POINTERS`, else
    float32) and, like every stride, 16-byte alignment, as at run time; other arguments are int32
    (``float_args``: float32)."""
    pointer_types = {**INDEX_POINTERS, **pointer_types}
    signature = {}
    for name in kernel.arg_names:
        if name in consts:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*" + pointer_types.get(name, "fp32")
        else:
            signature[name] = "fp32" if name in float_args else "i32"
    attrs = {(kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in kernel.arg_names
             if signature[n].startswith("*") or n.startswith("stride")}
    src = ASTSource(kernel, signature, constexprs={k: v for k, v in consts.items() if k in kernel.arg_names},
                    attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def _types(fmt: LayerFormat, model_dtype: torch.dtype) -> tuple[str, str]:
    """(model dtype, projected query dtype) as Triton signature types."""
    model_type = {torch.bfloat16: "bf16", torch.float16: "fp16"}[model_dtype]
    return model_type, "fp32" if fmt.k.transform != "none" else model_type


def compile_decode(fmt: LayerFormat, head_dim: int, group: int, block_size: int, block_n: int, num_warps: int,
                   num_stages: int, arch: int, model_dtype: torch.dtype = torch.bfloat16, token_rows: bool = False,
                   ring: tuple[int, int, str] = (0, 0, "model")):
    """The compiled split kernel of one layer format, with the constexprs of its launch
    (:func:`decode.split_constexprs`); ``ring`` = (window, sink, exact dtype) of a layered cache, whose
    ring program is then compiled in."""
    layout = SlotLayout.build(fmt, head_dim, model_dtype)
    consts = decode.split_constexprs(layout, group, block_size, block_n, token_rows, ring[0], ring[1],
                                     ring_layout(head_dim, model_dtype, ring[2]), True, True)
    model_type, q_type = _types(fmt, model_dtype)
    if decode.projects_query(ring[0] + ring[1] > 0):
        q_type = model_type  # the raw query: the kernel projects it
    return compile_kernel(decode._decode_split_kernel, consts,
                          {"q_ptr": q_type, "xq_ptr": model_type}, arch, num_warps, num_stages)


def compile_merge(fmt: LayerFormat, head_dim: int, group: int, arch: int, ring: bool = False,
                  model_dtype: torch.dtype = torch.bfloat16):
    """The compiled merge kernel of one layer format (with a basis and offsets when the format's V is
    transformed)."""
    layout = SlotLayout.build(fmt, head_dim, model_dtype)
    has_basis = fmt.v.transform != "none"
    consts = decode.merge_constexprs(layout, group, has_basis, has_basis, ring)
    return compile_kernel(decode._decode_merge_kernel, consts, {"out_ptr": _types(fmt, model_dtype)[0]}, arch,
                          decode.merge_num_warps(head_dim))


def compile_prefill(fmt: LayerFormat, head_dim: int, group: int, block_size: int, arch: int,
                    ring: tuple[int, int, str] = (0, 0, "model"), model_dtype: torch.dtype = torch.bfloat16,
                    block_m: int = 64, block_n: int = 64, num_warps: int = 4, num_stages: int = 2):
    """The compiled prefill kernel of one layer format, with the constexprs of its launch
    (:func:`prefill.prefill_constexprs`); ``ring`` as for :func:`compile_decode`."""
    layout = SlotLayout.build(fmt, head_dim, model_dtype)
    has_basis = fmt.v.transform != "none"
    consts = prefill.prefill_constexprs(layout, group, block_size, block_m, block_n, ring[0], ring[1],
                                        ring_layout(head_dim, model_dtype, ring[2]), has_basis, has_basis, True)
    model_type, q_type = _types(fmt, model_dtype)
    return compile_kernel(prefill._prefill_kernel, consts,
                          {"q_ptr": q_type, "out_ptr": model_type, "xq_ptr": model_type, "xk_ptr": model_type,
                           "xv_ptr": model_type}, arch, num_warps, num_stages)


def compile_store(fmt: LayerFormat, head_dim: int, block_size: int, arch: int,
                  model_dtype: torch.dtype = torch.bfloat16):
    """The compiled store kernel of one layer format (raw K/V in the model dtype; a basis and an offset
    wherever the format has a transform, as calibrated layers have)."""
    layout = SlotLayout.build(fmt, head_dim, model_dtype)
    model_type = _types(fmt, model_dtype)[0]
    return compile_kernel(store._store_kernel, store.store_constexprs(layout, block_size),
                          {"k_ptr": model_type, "v_ptr": model_type}, arch)


def compile_query(fmt: LayerFormat, head_dim: int, group: int, arch: int, model_dtype: torch.dtype = torch.bfloat16):
    """The compiled query projection kernel for the key basis of one layer format (with smoothing)."""
    layout = SlotLayout.build(fmt, head_dim, model_dtype)
    consts = query.query_constexprs(group, head_dim, layout.k.latent_dim, True)
    return compile_kernel(query._project_query_kernel, consts, {"q_ptr": _types(fmt, model_dtype)[0]}, arch)


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


def every_kernel(head_dim: int, group: int, block_size: int, arch: int) -> dict:
    """One compile of each kernel variant that serving launches (store, query projection, decode split and
    merge, prefill; with and without a layered cache's ring in the model dtype and int8), by name. Decode as
    it runs: int4 with tokens as the dots' rows, the others with the query group as rows."""
    f = parse_format
    ring_m, ring_8 = (32, 1, "model"), (64, 1, "int8")
    return {
        "store int8": lambda: compile_store(f("int8"), head_dim, block_size, arch),
        "store fp8": lambda: compile_store(f("fp8"), head_dim, block_size, arch),
        "store int4": lambda: compile_store(f("int4"), head_dim, block_size, arch),
        "store lowrank+int8": lambda: compile_store(f("lowrank+int8:32:32"), head_dim, block_size, arch),
        "decode int4": lambda: compile_decode(f("int4"), head_dim, group, block_size, 128, 4, 2, arch,
                                              token_rows=True),
        "decode int4, model ring": lambda: compile_decode(f("int4"), head_dim, group, block_size, 128, 4, 2, arch,
                                                          token_rows=True, ring=ring_m),
        "decode int4, int8 ring": lambda: compile_decode(f("int4"), head_dim, group, block_size, 128, 4, 2, arch,
                                                         token_rows=True, ring=ring_8),
        "decode lowrank+int8": lambda: compile_decode(f("lowrank+int8:16:16"), head_dim, group, block_size, 128, 4, 2,
                                                      arch),
        "decode lowrank+int8, int8 ring": lambda: compile_decode(f("lowrank+int8:16:16"), head_dim, group, block_size,
                                                                 128, 4, 2, arch, ring=ring_8),
        "query int4": lambda: compile_query(f("int4"), head_dim, group, arch),
        "query lowrank+int8": lambda: compile_query(f("lowrank+int8:16:16"), head_dim, group, arch),
        "merge int4": lambda: compile_merge(f("int4"), head_dim, group, arch),
        "merge int4, ring": lambda: compile_merge(f("int4"), head_dim, group, arch, ring=True),
        "prefill int8": lambda: compile_prefill(f("int8"), head_dim, group, block_size, arch),
        "prefill int4": lambda: compile_prefill(f("int4"), head_dim, group, block_size, arch),
        "prefill int4, model ring": lambda: compile_prefill(f("int4"), head_dim, group, block_size, arch, ring_m),
        "prefill int8/int4 (identity V), int8 ring": lambda: compile_prefill(f("int8/int4"), head_dim, group,
                                                                              block_size, arch, ring_8),
        "prefill lowrank+int8, int8 ring": lambda: compile_prefill(f("lowrank+int8:16:16"), head_dim, group,
                                                                    block_size, arch, ring_8),
    }


def resources(cubin: bytes) -> dict[str, int]:
    """Registers per thread, stack and spill bytes of a compiled kernel (``cuobjdump -res-usage``)."""
    _, res = disassemble(cubin)
    return {key: int(m.group(1)) if (m := re.search(rf"{key}:(\d+)", res)) else -1
            for key in ("REG", "STACK", "LOCAL")}


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
    ap.add_argument("--every-kernel", action="store_true",
                    help="instead: compile every kernel variant that serving launches (store, decode split and "
                         "merge, prefill, with and without a layered cache's ring) and list registers, stack and "
                         "spills; a compile error fails the command (--json: the same as JSON)")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("unset TRITON_INTERPRET: this compiles the kernels")

    from tqdm import tqdm

    if args.every_kernel:
        found = {}
        for name, build in tqdm(every_kernel(args.head_dim, args.group, args.block_size, args.arch).items(),
                                desc="compile"):
            k = build()
            found[name] = {**resources(k.asm["cubin"]), "shared_bytes": k.metadata.shared}
        if args.json:
            args.json.write_text(json.dumps(found, indent=1))
        print(f"\nsm_{args.arch}, head_dim {args.head_dim}, group {args.group}, block_size {args.block_size}")
        print(f"{'kernel':<44} {'regs':>5} {'stack':>6} {'spill':>6} {'smem':>7}")
        for name, r in found.items():
            print(f"{name:<44} {r['REG']:>5} {r['STACK']:>6} {r['LOCAL']:>6} {r['shared_bytes']:>7}")
        return 0

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
