#!/usr/bin/env python3
"""Decode-attention and store benchmark on one GPU: our compressed-KV kernels against vLLM 0.26's own.

In one run, for the Llama-3-8B attention shape (32 query heads, 8 KV heads, head_dim 128) and the 1B
shape (32 / 8, head_dim 64), block size 16, random paged block tables, batch 1/16/64/256 x context
1k/8k/32k (every request at the full context):

- our decode kernel (``vllm_lowrank.kernels.decode_attention``) per KV format;
- vLLM's Triton unified attention in bf16 and with its int8/fp8/int4 per-token-head caches, and
  FlashAttention-3 (bf16, and fp8 with per-tensor scales) through ``vllm.vllm_flash_attn``;
- the bytes each must read (K and V payloads, scales and zero points of every cached token, once),
  achieved bandwidth against a device-to-device copy measured in the same run, and time ratios;
- our store kernel's cost per token, and against our decode step at batch 64 x 8k.

Times are medians of ``triton.testing.do_bench_cudagraph`` (decode runs under CUDA graphs in vLLM; no
host launch overhead): one graph runs the call over several block tables of disjoint blocks, together
larger than L2, and the time is divided by their number (``--eager`` for plain ``do_bench``). A
variant that fails or does not fit prints an error row and the run goes on. All numbers go to a JSON
file (``--out``, default ``$OUT/bench_kernels.json``); the short table comes last.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

import torch

MODELS = {"llama3-8b": (32, 8, 128), "llama-1b": (32, 8, 64)}  # query heads, KV heads, head_dim
BATCHES = (1, 16, 64, 256)
CONTEXTS = (1024, 8192, 32768)
BLOCK_SIZE = 16
L2_BYTES = 50 << 20
VLLM_VARIANTS = ("vllm-triton bf16", "vllm-triton int8_pth", "vllm-triton fp8_pth", "vllm-triton int4_pth",
                 "FA3 bf16", "FA3 fp8")
SHORT_COLUMNS = ("FA3 bf16", "vllm-triton bf16", "vllm-triton int8_pth", "vllm-triton int4_pth", "full", "int8",
                 "fp8", "int4", "lowrank 1/2", "lowrank+int8 1/2", "lowrank+int8 1/4")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="JSON output path (default: $OUT/bench_kernels.json or ./)")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma list of {list(MODELS)}")
    p.add_argument("--batches", default=",".join(map(str, BATCHES)))
    p.add_argument("--contexts", default=",".join(map(str, CONTEXTS)))
    p.add_argument("--rep", type=int, default=10, help="do_bench_cudagraph repetition time per variant (ms)")
    p.add_argument("--warmup", type=int, default=10, help="eager do_bench warm-up time (ms)")
    p.add_argument("--eager", action="store_true", help="time without CUDA graphs (includes launch overhead)")
    p.add_argument("--no-vllm", action="store_true", help="skip vLLM's kernels")
    p.add_argument("--vllm-variants", default=",".join(VLLM_VARIANTS),
                   help="comma list of vLLM's kernels to run (default: all)")
    p.add_argument("--no-tune", action="store_true", help="skip the tile sweep; use the kernel defaults")
    p.add_argument("--token-rows", action="store_true",
                   help="also time each of our formats with decode_attention(token_rows=True), as '<format> [tr]'")
    p.add_argument("--formats", default=None, help="comma list of our format names to run (default: all)")
    p.add_argument("--stages", default=None, metavar="S[:BN],...",
                   help="also time each of our formats with num_stages=S (software-pipeline depth) and, if given, "
                        "block_n=BN, as '<format> [sS]' or '<format> [sS nBN]'")
    p.add_argument("--ring", default=None, metavar="W,S",
                   help="also time each of our formats as a layered cache keeping its last W and first S tokens "
                        "exact, with the ring in bf16 ('<format> +ring') and in int8 ('<format> +ring8')")
    p.add_argument("--time-budget", type=float, default=330.0,
                   help="seconds; past it, the remaining (largest) shapes are skipped with an error row")
    return p.parse_args()


# --------------------------------------------------------------------------------------------- helpers


def bench(call: Callable[[torch.Tensor], None], tables: list[torch.Tensor], args) -> tuple[float, str]:
    """Median milliseconds of one ``call(block_table)``, run over every table in turn.

    As vLLM runs decode: captured in a CUDA graph (``do_bench_cudagraph``, no host launch overhead), one
    graph replaying the calls over all tables (disjoint blocks, together larger than L2) and the time
    divided by their number. Falls back to eager ``do_bench`` (which flushes L2 itself) if capture fails.
    """
    import triton

    def all_tables() -> None:
        for t in tables:
            call(t)

    all_tables()
    torch.cuda.synchronize()
    if not args.eager:
        try:
            ms = triton.testing.do_bench_cudagraph(all_tables, rep=args.rep, return_mode="median")
            return float(ms) / len(tables), "cudagraph"
        except Exception as e:  # noqa: BLE001
            print(f"  (CUDA graph capture failed: {type(e).__name__}: {str(e)[:120]}; timing eagerly)", flush=True)
            torch.cuda.synchronize()
    ms = triton.testing.do_bench(all_tables, warmup=args.warmup, rep=4 * args.rep, return_mode="median")
    return float(ms) / len(tables), "eager"


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s, counting read + write (like the GPU README)."""
    import triton

    n = 2 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = float(triton.testing.do_bench(lambda: b.copy_(a), warmup=20, rep=200, return_mode="median"))
    del a, b
    torch.cuda.empty_cache()
    return 2 * n / (ms * 1e-3)


def our_formats(d: int) -> dict[str, "object"]:
    from vllm_lowrank.formats import preset_format

    return {
        "full": preset_format("full"),
        "int8": preset_format("int8"),
        "fp8": preset_format("fp8"),
        "int4": preset_format("int4"),
        "lowrank 1/2": preset_format("lowrank", d // 2, d // 2),
        "lowrank+int8 1/2": preset_format("lowrank+int8", d // 2, d // 2),
        "lowrank+int8 1/4": preset_format("lowrank+int8", d // 4, d // 4),
    }


def random_transforms(fmt, h: int, d: int):
    from vllm_lowrank.transforms import LayerTransforms, build_tensor_transform

    basis = torch.linalg.qr(torch.randn(h, d, d, device="cuda"))[0]
    return LayerTransforms(*(build_tensor_transform(f, h, d, basis, torch.randn(h, d, device="cuda") * 0.1)
                             for f in (fmt.k, fmt.v)))


@dataclass
class Problem:
    """One decode shape with a pool of cache bytes and rotating block tables over disjoint blocks."""

    model: str
    hq: int
    h: int
    d: int
    batch: int
    ctx: int
    pool: torch.Tensor | None = None
    tables: list[torch.Tensor] = field(default_factory=list)
    seq_lens: torch.Tensor | None = None
    blocks_per_set: int = 0

    @property
    def tokens(self) -> int:
        return self.batch * self.ctx

    def sets_for(self, bytes_per_set: int) -> int:
        return max(1, min(64, math.ceil(3 * L2_BYTES / max(1, bytes_per_set))))

    def prepare(self, max_token_head_bytes: int) -> None:
        bpr = self.ctx // BLOCK_SIZE
        self.blocks_per_set = self.batch * bpr
        n_sets = self.sets_for(self.tokens * self.h * max_token_head_bytes)
        need = n_sets * self.blocks_per_set * BLOCK_SIZE * self.h * max_token_head_bytes
        free, _ = torch.cuda.mem_get_info()
        if need > 0.85 * free:
            raise MemoryError(f"needs {need / 2**30:.1f} GiB of cache, {free / 2**30:.1f} GiB free")
        self.pool = torch.randint(0, 256, (need,), dtype=torch.uint8, device="cuda")
        perm = torch.randperm(n_sets * self.blocks_per_set, device="cuda").int()
        self.tables = [perm[i * self.blocks_per_set:(i + 1) * self.blocks_per_set].view(self.batch, bpr)
                       for i in range(n_sets)]
        self.seq_lens = torch.full((self.batch,), self.ctx, dtype=torch.int32, device="cuda")

    def cache(self, token_head_bytes: int, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
        """[num_blocks, BLOCK_SIZE, H, token_head_bytes / itemsize] view of the pool (NHD)."""
        n_sets = len(self.tables)
        nb = n_sets * self.blocks_per_set
        nbytes = nb * BLOCK_SIZE * self.h * token_head_bytes
        item = torch.empty((), dtype=dtype).element_size()
        return self.pool[:nbytes].view(dtype).view(nb, BLOCK_SIZE, self.h, token_head_bytes // item)

    def ours(self, slot_bytes: int) -> torch.Tensor:
        """The pool as our cache: [num_blocks, H, BLOCK_SIZE, slot_bytes], pages field by field."""
        from vllm_lowrank.formats import cache_shape

        nb = len(self.tables) * self.blocks_per_set
        return self.pool[:nb * BLOCK_SIZE * self.h * slot_bytes].view(cache_shape(nb, BLOCK_SIZE, self.h, slot_bytes))

    def release(self) -> None:
        self.pool = None
        self.tables = []
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------ variants


def ours_variant(pb: Problem, fmt, cfg: dict):
    """(call(block_table), bytes read, info) of our decode kernel on one format. ``cfg["ring"]`` = (W, S,
    exact dtype): a layered cache, whose ring takes each table row's first blocks (the sequences are
    that much shorter, so that the compressed part fits the rest of the row)."""
    from vllm_lowrank.formats import SlotLayout, ring_layout, ring_tokens_per_block
    from vllm_lowrank.kernels import decode_attention, default_num_splits, workspace_numel
    from vllm_lowrank.kernels.decode import DEFAULT_BLOCK_N

    layout = SlotLayout.build(fmt, pb.d, torch.bfloat16)
    tr = random_transforms(fmt, pb.h, pb.d)
    cache = pb.ours(layout.slot_bytes)
    q = torch.randn(pb.batch, pb.hq, pb.d, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(q)
    splits = cfg.get("num_splits") or default_num_splits(pb.batch, pb.h, "cuda",
                                                         block_n=cfg.get("block_n", DEFAULT_BLOCK_N))
    kw = {k: v for k, v in cfg.items() if k not in ("num_splits", "ring")}
    info = {"slot_bytes": layout.slot_bytes, "num_splits": splits, "compression": layout.compression_vs(torch.bfloat16)}
    if "ring" not in cfg:
        ws = torch.empty(workspace_numel(pb.batch, pb.hq, layout.v.latent_dim, splits), device="cuda")

        def call(bt: torch.Tensor) -> None:
            decode_attention(q, cache, bt, pb.seq_lens, layout, tr, pb.d ** -0.5, out, num_splits=splits,
                             workspace=ws, **kw)
        return call, pb.tokens * pb.h * layout.slot_bytes, info

    window, sink, exact = cfg["ring"]
    ring = ring_layout(pb.d, torch.bfloat16, exact)
    per_block = ring_tokens_per_block(BLOCK_SIZE, layout.slot_bytes, ring)
    if per_block == 0:
        raise ValueError(f"a {layout.slot_bytes}-byte slot's page holds no {exact} ring token")
    k = -(-(window + sink) // per_block)
    if pb.ctx - k * BLOCK_SIZE <= window + sink:
        raise ValueError(f"context {pb.ctx} too short for {k} ring blocks and {window + sink} exact tokens")
    seq_lens = pb.seq_lens - k * BLOCK_SIZE
    ws = torch.empty(workspace_numel(pb.batch, pb.hq, layout.v.latent_dim, splits, pb.d), device="cuda")

    def call(bt: torch.Tensor) -> None:
        decode_attention(q, cache, bt[:, k:], seq_lens, layout, tr, pb.d ** -0.5, out, num_splits=splits,
                         workspace=ws, ring_table=bt[:, :k], window=window, sink=sink, ring_slot=ring, **kw)
    nbytes = pb.batch * pb.h * ((pb.ctx - k * BLOCK_SIZE - window - sink) * layout.slot_bytes
                                + (window + sink) * ring.slot_bytes)
    return call, nbytes, {**info, "ring_blocks": k, "ring_slot_bytes": ring.slot_bytes}


def vllm_variant(pb: Problem, name: str):
    """(call(block_table), bytes read, info) of one of vLLM's decode kernels, called as its backends do."""
    d, h, hq, b = pb.d, pb.h, pb.hq, pb.batch
    q = torch.randn(b, hq, d, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(q)
    cu_q = torch.arange(b + 1, dtype=torch.int32, device="cuda")
    scale = d ** -0.5
    if name.startswith("FA3"):
        from vllm.vllm_flash_attn import flash_attn_varlen_func

        fp8 = name.endswith("fp8")
        dt = torch.float8_e4m3fn if fp8 else torch.bfloat16
        kv = pb.cache(2 * d * (1 if fp8 else 2), dt)  # [NB, BS, H, 2D]
        k, v = kv.split(d, dim=-1)
        if fp8:
            kv.view(torch.uint8).bitwise_and_(0x77)  # finite values
        extra = {}
        if fp8:
            one = torch.ones(b, h, device="cuda")
            extra = dict(q_descale=one, k_descale=one, v_descale=one)
            q = q.to(torch.float8_e4m3fn)

        def call(bt):
            flash_attn_varlen_func(q=q, k=k, v=v, out=out, cu_seqlens_q=cu_q, max_seqlen_q=1, seqused_k=pb.seq_lens,
                                   max_seqlen_k=pb.ctx, softmax_scale=scale, causal=True, block_table=bt,
                                   fa_version=3, **extra)
        return call, pb.tokens * h * 2 * d * (1 if fp8 else 2), {}

    from vllm.v1.attention.backends.triton_attn import TritonAttentionImpl
    from vllm.v1.attention.ops.triton_unified_attention import unified_attention

    kv_dtype = {"bf16": "auto", "int8_pth": "int8_per_token_head", "fp8_pth": "fp8_per_token_head",
                "int4_pth": "int4_per_token_head"}[name.split()[-1]]
    impl = TritonAttentionImpl(hq, d, scale, h, None, None, kv_dtype)
    threshold = 128 // h  # as TritonAttentionMetadataBuilder (MIN_LAUNCH_GRID_SIZE_2D // num_kv_heads)
    segs = 16
    segm = dict(seq_threshold_3D=threshold, num_par_softmax_segments=segs,
                softmax_segm_output=torch.empty(threshold, hq, segs, triton_next_pow2(d), device="cuda"),
                softmax_segm_max=torch.empty(threshold, hq, segs, device="cuda"),
                softmax_segm_expsum=torch.empty(threshold, hq, segs, device="cuda"))
    if kv_dtype == "auto":
        raw = pb.cache(4 * d, torch.bfloat16)  # physical NHD [NB, BS, H, 2D]
        k, v = raw.split(d, dim=-1)
        raw.view(torch.int16).bitwise_and_(0x3FFF)  # finite values
        one = torch.ones(1, device="cuda").expand(b, h)
        extra = dict(q_descale=None, k_descale=one, v_descale=one)
        token_head_bytes = 4 * d
    else:
        data = d // 2 if kv_dtype.startswith("int4") else d
        phs = data + 4  # payload + one float32 scale, inline (1-byte cache dtype)
        raw = pb.cache(2 * phs, torch.int8 if kv_dtype.startswith("int8") else torch.uint8)
        if kv_dtype.startswith("fp8"):
            raw.view(torch.uint8).bitwise_and_(0x77)
        logical = raw.permute(0, 2, 1, 3)  # (NB, H, BS, 2 * phs) as vLLM hands it over
        k, v = impl._pth_key_value_caches(logical)
        extra = dict(q_descale=None, k_descale=None, v_descale=None, kv_quant_mode=impl._kv_quant_mode,
                     k_scale_cache=impl._k_scale_cache, v_scale_cache=impl._v_scale_cache)
        token_head_bytes = 2 * phs

    def call(bt):
        unified_attention(q=q, k=k, v=v, out=out, cu_seqlens_q=cu_q, max_seqlen_q=1, seqused_k=pb.seq_lens,
                          max_seqlen_k=pb.ctx, softmax_scale=scale, causal=True, window_size=(-1, -1),
                          block_table=bt, softcap=0, **extra, **segm)
    return call, pb.tokens * h * token_head_bytes, {}


def triton_next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


# --------------------------------------------------------------------------------------------- phases


def tune(args, results: dict, copy_bw: float) -> dict:
    """Sweep tile shapes of our decode kernel at 8B x batch 64 x 8k; returns the best launch config."""
    configs = [dict(block_n=bn, num_warps=nw, num_stages=2) for bn in (32, 64, 128) for nw in (4, 8)]
    hq, h, d = MODELS["llama3-8b"]
    pb = Problem("llama3-8b", hq, h, d, 64, 8192)
    best: dict[str, tuple[float, dict]] = {}
    try:
        pb.prepare(4 * d + 16)
        for fname in ("int8", "lowrank+int8 1/2"):
            fmt = our_formats(d)[fname]
            for cfg in configs:
                try:
                    call, nbytes, _ = ours_variant(pb, fmt, cfg)
                    ms, _ = bench(call, pb.tables, args)
                    row = dict(phase="tune", format=fname, **cfg, ms=ms, pct_copy=100 * nbytes / (ms * 1e-3) / copy_bw)
                    print(f"tune {fname:18s} {cfg} {ms:.4f} ms {row['pct_copy']:.0f}%", flush=True)
                    results["tune"].append(row)
                    if fname not in best or ms < best[fname][0]:
                        best[fname] = (ms, cfg)
                except Exception as e:  # noqa: BLE001
                    print(f"tune {fname} {cfg} ERROR {type(e).__name__}: {str(e)[:200]}", flush=True)
                    results["tune"].append(dict(phase="tune", format=fname, **cfg, error=repr(e)[:500]))
    finally:
        pb.release()
    if not best:
        return {}
    # one config for all: the one with the least total time over the tuned formats
    totals = {}
    for row in results["tune"]:
        if "ms" in row:
            key = (row["block_n"], row["num_warps"], row["num_stages"])
            totals[key] = totals.get(key, 0.0) + row["ms"] / best[row["format"]][0]
    bn, nw, ns = min(totals, key=totals.get)
    print(f"tune: using block_n={bn} num_warps={nw} num_stages={ns}", flush=True)
    return dict(block_n=bn, num_warps=nw, num_stages=ns)


def run_decode(args, results: dict, copy_bw: float, cfg: dict, t_start: float) -> None:
    models = [m for m in args.models.split(",") if m]
    batches = [int(x) for x in args.batches.split(",")]
    contexts = [int(x) for x in args.contexts.split(",")]
    for model in models:
        hq, h, d = MODELS[model]
        fmts = our_formats(d)
        if args.formats:
            fmts = {k: v for k, v in fmts.items() if k in args.formats.split(",")}
        extra_cfg = {name: {} for name in fmts}
        if args.token_rows:  # the experimental decode orientation, side by side
            for name in list(fmts):
                fmts[f"{name} [tr]"] = fmts[name]
                extra_cfg[name] = {"token_rows": False}
                extra_cfg[f"{name} [tr]"] = {"token_rows": True}
        if args.stages:  # deeper software pipelines, side by side
            for name in [n for n in fmts if "[tr]" not in n]:
                for item in args.stages.split(","):
                    ns, _, bn = item.partition(":")
                    tag = f"{name} [s{ns}" + (f" n{bn}]" if bn else "]")
                    fmts[tag] = fmts[name]
                    extra_cfg[tag] = {**extra_cfg[name], "num_stages": int(ns), **({"block_n": int(bn)} if bn else {})}
        if args.ring:  # layered caches: the same formats with a ring of exact tokens
            window, sink = (int(x) for x in args.ring.split(","))
            for name in list(fmts):
                for tag, exact in (("+ring", "model"), ("+ring8", "int8")):
                    fmts[f"{name} {tag}"] = fmts[name]
                    extra_cfg[f"{name} {tag}"] = {**extra_cfg[name], "ring": (window, sink, exact)}
        theirs = [v for v in VLLM_VARIANTS if v in args.vllm_variants.split(",")]
        variants = ([] if args.no_vllm else theirs) + list(fmts)
        for ctx in contexts:
            for batch in batches:
                pb = Problem(model, hq, h, d, batch, ctx)
                shape = dict(model=model, batch=batch, ctx=ctx)
                if time.time() - t_start > args.time_budget:
                    results["decode"].append(dict(**shape, variant="*", error="skipped: time budget"))
                    print(f"{model} b={batch} ctx={ctx}: skipped (time budget)", flush=True)
                    continue
                try:
                    pb.prepare(4 * d + 16)
                except Exception as e:  # noqa: BLE001
                    results["decode"].append(dict(**shape, variant="*", error=repr(e)[:300]))
                    print(f"{model} b={batch} ctx={ctx}: ERROR {e}", flush=True)
                    pb.release()
                    continue
                bf16_bytes = pb.tokens * h * 4 * d
                for name in variants:
                    row = dict(**shape, variant=name, kind="ours" if name in fmts else "vllm")
                    try:
                        if name in fmts:
                            call, nbytes, info = ours_variant(pb, fmts[name], {**cfg, **extra_cfg[name]})
                        else:
                            call, nbytes, info = vllm_variant(pb, name)
                        ms, mode = bench(call, pb.tables, args)
                        row.update(info, ms=ms, timing=mode, bytes=nbytes, tbps=nbytes / (ms * 1e-3) / 1e12,
                                   pct_copy=100 * nbytes / (ms * 1e-3) / copy_bw, bytes_vs_bf16=bf16_bytes / nbytes)
                        print(f"{model:9s} b={batch:<3d} ctx={ctx:<5d} {name:22s} {ms:8.4f} ms "
                              f"{nbytes / 2**20:9.1f} MiB {row['tbps']:5.2f} TB/s {row['pct_copy']:4.0f}%", flush=True)
                    except Exception as e:  # noqa: BLE001
                        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                        print(f"{model:9s} b={batch:<3d} ctx={ctx:<5d} {name:22s} ERROR {row['error']}", flush=True)
                        if os.environ.get("BENCH_TRACEBACK"):
                            traceback.print_exc()
                    results["decode"].append(row)
                    torch.cuda.synchronize()
                pb.release()


def run_store(args, results: dict, cfg: dict) -> None:
    """Store cost per token (one layer) at 64 and 8192 new tokens, 8B shape; vs our decode at 64 x 8k.

    Formats with a transform are also timed the way the store ran until the thirteenth session, as the
    variant '<format> (host proj.)': ``TensorTransform.project`` on the host, then the kernel on the
    latents (identity transforms), so that the in-kernel projection is compared in the same run."""
    from vllm_lowrank.formats import SlotLayout, cache_shape
    from vllm_lowrank.kernels import store
    from vllm_lowrank.transforms import identity_transforms

    hq, h, d = MODELS["llama3-8b"]
    fmts = our_formats(d)
    if args.formats:
        fmts = {k: v for k, v in fmts.items() if k in args.formats.split(",")}
    decode_ms = {r["variant"]: r["ms"] for r in results["decode"]
                 if r.get("model") == "llama3-8b" and r.get("batch") == 64 and r.get("ctx") == 8192 and "ms" in r}
    num_blocks = 8192
    for name, fmt in fmts.items():
        layout = SlotLayout.build(fmt, d, torch.bfloat16)
        tr = random_transforms(fmt, h, d)
        cache = torch.zeros(cache_shape(num_blocks, BLOCK_SIZE, h, layout.slot_bytes), dtype=torch.uint8,
                            device="cuda")
        for n in (64, 8192):
            row = dict(variant=name, tokens=n)
            try:
                k = torch.randn(n, h, d, device="cuda", dtype=torch.bfloat16)
                v = torch.randn_like(k)
                perm = torch.randperm(num_blocks * BLOCK_SIZE, device="cuda")
                sets = [perm[i * n:(i + 1) * n] for i in range(min(8, num_blocks * BLOCK_SIZE // n))]
                calls = {name: lambda slots: store(k, v, cache, slots, layout, tr)}
                if not (tr.k.is_identity and tr.v.is_identity):
                    calls[f"{name} (host proj.)"] = lambda slots: store(tr.k.project(k), tr.v.project(v), cache, slots,
                                                                        layout, identity_transforms())
                for variant, call in calls.items():
                    row = dict(variant=variant, tokens=n)
                    ms, mode = bench(call, sets, args)
                    row.update(ms=ms, timing=mode, ns_per_token=ms * 1e6 / n)
                    if n == 64 and name in decode_ms:
                        row["pct_of_decode_b64_8k"] = 100 * ms / decode_ms[name]
                    print(f"store {variant:30s} n={n:<5d} {ms * 1e3:8.1f} us  {row['ns_per_token']:8.1f} ns/token"
                          + (f"  {row['pct_of_decode_b64_8k']:.1f}% of decode" if "pct_of_decode_b64_8k" in row
                             else ""), flush=True)
                    results["store"].append(row)
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                print(f"store {name} n={n} ERROR {row['error']}", flush=True)
                results["store"].append(row)
        del cache
        torch.cuda.empty_cache()


def short_table(results: dict, copy_bw: float) -> str:
    """One line per shape: ms and % of copy bandwidth per variant; then the issue's targets."""
    rows = {}
    for r in results["decode"]:
        rows.setdefault((r["model"], r["batch"], r["ctx"]), {})[r["variant"]] = r
    cols = [c for c in SHORT_COLUMNS if any(c in v for v in rows.values())]
    lines = [f"copy bandwidth {copy_bw / 1e12:.2f} TB/s (read+write); cell = ms / % of copy bandwidth on bytes read",
             f"{'shape':22s} " + " ".join(f"{c[-16:]:>16s}" for c in cols)]
    for (model, b, ctx), vs in rows.items():
        cells = []
        for c in cols:
            r = vs.get(c, {})
            cells.append(f"{r['ms']:.3f}/{r['pct_copy']:.0f}%" if "ms" in r else ("err" if r else "-"))
        lines.append(f"{model[-9:]:9s} {b:>3d} x {ctx // 1024:>2d}k    " + " ".join(f"{x:>16s}" for x in cells))
    # targets at 8k+ and batch 64+: bandwidth, and speed-up vs the fastest vLLM bf16 kernel
    lines.append("targets (8k+ context, batch 64+): ours % copy BW (>= 80%); speed-up vs fastest vLLM bf16 "
                 "(>= 0.8 x compression); vs vLLM int8/int4 pth")
    for (model, b, ctx), vs in rows.items():
        if ctx < 8192 or b < 64:
            continue
        base = [vs[n]["ms"] for n in ("FA3 bf16", "vllm-triton bf16") if "ms" in vs.get(n, {})]
        for name, r in vs.items():
            if r.get("kind") != "ours" or "ms" not in r:
                continue
            sp = f"{min(base) / r['ms']:.2f}x (target {0.8 * r['compression']:.2f}x)" if base else "-"
            q8 = vs.get("vllm-triton int8_pth", {}).get("ms")
            q4 = vs.get("vllm-triton int4_pth", {}).get("ms")
            lines.append(f"  {model[-9:]:9s} {b:>3d} x {ctx // 1024:>2d}k {name:18s} {r['pct_copy']:4.0f}%  "
                         f"vs bf16 {sp}  vs int8_pth {q8 / r['ms'] if q8 else float('nan'):.2f}x  "
                         f"vs int4_pth {q4 / r['ms'] if q4 else float('nan'):.2f}x")
    pairs = [(n, f"{n} [tr]") for n in SHORT_COLUMNS if any(f"{n} [tr]" in vs for vs in rows.values())]
    if pairs:
        lines.append("token rows: time of '<format> [tr]' / time of '<format>' (< 1: token rows faster)")
        for (model, b, ctx), vs in rows.items():
            ratios = [f"{a} {vs[t]['ms'] / vs[a]['ms']:.2f}" for a, t in pairs
                      if "ms" in vs.get(a, {}) and "ms" in vs.get(t, {})]
            lines.append(f"  {model[-9:]:9s} {b:>3d} x {ctx // 1024:>2d}k  " + ", ".join(ratios))
    rings = [(n, f"{n} {tag}") for tag in ("+ring", "+ring8") for n in SHORT_COLUMNS
             if any(f"{n} {tag}" in vs for vs in rows.values())]
    if rings:
        lines.append("layered caches: time of '<format> +ring[8]' / time of '<format>' (the ring's exact tokens read "
                     "beside the compressed ones; its sequences are shorter by the ring's blocks)")
        for (model, b, ctx), vs in rows.items():
            ratios = [f"{t} {vs[t]['ms'] / vs[a]['ms']:.2f}" for a, t in rings
                      if "ms" in vs.get(a, {}) and "ms" in vs.get(t, {})]
            lines.append(f"  {model[-9:]:9s} {b:>3d} x {ctx // 1024:>2d}k  " + ", ".join(ratios))
    for r in results["store"]:
        if "pct_of_decode_b64_8k" in r:
            lines.append(f"  store {r['variant']:30s} 64 tokens: {r['ms'] * 1e3:.1f} us = "
                         f"{r['pct_of_decode_b64_8k']:.1f}% of decode at 64 x 8k (target < 5%)")
    return "\n".join(lines)


def main() -> int:
    args = parse_args()
    if not torch.cuda.is_available():
        print("bench_kernels.py needs a CUDA GPU", file=sys.stderr)
        return 2
    t_start = time.time()
    out_path = args.out or os.path.join(os.environ.get("OUT", "."), "bench_kernels.json")
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "tune": [], "decode": [],
               "store": [], "args": vars(args)}
    try:
        import triton
        import vllm
        results["triton"], results["vllm"] = triton.__version__, vllm.__version__
    except Exception as e:  # noqa: BLE001
        results["vllm"] = f"not importable: {e!r}"[:300]
        args.no_vllm = True
    copy_bw = copy_bandwidth()
    results["copy_bandwidth"] = copy_bw
    print(f"device {results['device']}, copy bandwidth {copy_bw / 1e12:.2f} TB/s", flush=True)
    cfg = {} if args.no_tune else tune(args, results, copy_bw)
    results["config"] = cfg
    print(f"tune done at {time.time() - t_start:.0f}s", flush=True)

    def save():
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1, default=str)

    try:
        run_decode(args, results, copy_bw, cfg, t_start)
        save()
        run_store(args, results, cfg)
    finally:
        results["wall_s"] = time.time() - t_start
        save()
    print(f"\nwrote {out_path} ({results['wall_s']:.0f} s)\n")
    print(short_table(results, copy_bw))
    return 0


if __name__ == "__main__":
    sys.exit(main())
