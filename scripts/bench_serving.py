#!/usr/bin/env python
"""vLLM's own throughput benchmark, side by side: vLLM's KV cache options against this plugin's formats.

One table per command: every variant runs vLLM's own ``vllm bench throughput`` (random dataset, dummy
weights of a model shape, fixed ``--kv-cache-memory-bytes``) on this machine, so all ratios come from
one run. Engines start side by side (``--parallel``: start-up takes about two minutes a variant on the
H200, compilation and CUDA graphs) and then measure one at a time, each alone on the GPU
(:mod:`vllm_lowrank.side_by_side`). Printed last: KV cache size in tokens, maximum concurrency,
requests/s, output tokens/s, and ratios to ``auto`` and to ``fp8``; the table is also printed after
every variant, so a command cut short still shows what it measured. ``--latency 1,32``: ``vllm bench
latency`` instead, with ample memory.

The ceiling, ``auto-ample``: vLLM's bf16 cache with ``--ample-kv-cache-memory-bytes`` (16 GiB) of KV
cache instead of the table's size, so that every prompt of the batch is resident at once. It is limited
by the GPU, not by KV capacity: no KV format that only adds capacity can beat it with vLLM's own
kernels (one that also reads fewer bytes a decode step, such as fp8, can exceed it by that saving).
A line below the table says whether the batch did fit.

Shapes: ``1b`` (hidden 2048, 16 layers, 32/8 heads, head_dim 64, vocab 128256; the reference table of
shared/gpu/README.md), ``8b`` (Llama-3-8B: hidden 4096, 32 layers, 32/8 heads, head_dim 128).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from vllm_lowrank import bundled
from vllm_lowrank.config import is_layered
from vllm_lowrank.shapes import SHAPES, make_basis, make_model
from vllm_lowrank.side_by_side import Job, run_side_by_side, worker_command

VLLM_VARIANTS = ["auto", "fp8", "int8_per_token_head", "int4_per_token_head"]

# KV cache of the ceiling ``auto-ample`` (default of --ample-kv-cache-memory-bytes): 16 GiB holds 524,288
# bf16 tokens of the 1B shape (32 KiB a token), more than the default batch's 256 x (1024 + 256) = 327,680,
# so every prompt runs at once (vLLM's default max_num_seqs on an H200 is 1024). The 8B shape (128 KiB a
# token) needs 64 GiB for its 64 x 8192 table. With an explicit KV size vLLM only checks at start-up that
# --gpu-memory-utilization of the GPU is free, so this engine still starts beside the table's others.
AMPLE_KV_CACHE_MEMORY_BYTES = 16 << 30


class Derived(NamedTuple):
    """A variant that runs another variant's settings with some of the table's arguments replaced:
    ``replace`` maps a flag of the command line (``vllm bench``'s, which profile_serving.py shares) to
    its new value."""

    base: str
    replace: dict[str, str]
    note: str


def derived_variants(ample_kv_cache_memory_bytes: int = AMPLE_KV_CACHE_MEMORY_BYTES) -> dict[str, Derived]:
    """The derived variants, by name: ``auto-ample``, the ceiling (module docstring)."""
    gib = ample_kv_cache_memory_bytes / (1 << 30)
    return {"auto-ample": Derived("auto", {"--kv-cache-memory-bytes": str(ample_kv_cache_memory_bytes)},
                                  f"auto with {gib:g} GiB of KV cache, the ceiling: limited by the GPU, not by "
                                  "KV capacity (only a format that reads fewer bytes can beat it, a little)")}


def replace_args(args: Sequence[str], replace: dict[str, str]) -> list[str]:
    """``args`` with the value after each flag of ``replace`` replaced. A flag that ``args`` lacks is an
    error: a replacement must never silently do nothing."""
    out = list(args)
    for flag, value in replace.items():
        if flag not in out:
            raise ValueError(f"{flag} is not in the command line {out}")
        out[out.index(flag) + 1] = value
    return out


PLANS = Path(bundled("smollm2-135m.plans.json"))
RING_PLANS = Path(bundled("smollm2-135m.ring.plans.json"))


def plan_for_shape(plan: str, num_layers: int, head_dim: int, plans_file: Path = PLANS) -> dict:
    """A SmolLM2 plan (30 layers, head_dim 64) mapped onto another shape for speed work: layer i takes
    the plan's layer at the same relative depth, ranks scale with head_dim. Speed proxy only: the plan's
    accuracy was measured on SmolLM2, not on this shape."""
    layers = json.loads(plans_file.read_text())["plans"][plan]["layers"]
    n = len(layers)

    def scaled(fmt: str) -> str:
        return re.sub(r"r(\d+)", lambda m: f"r{int(m.group(1)) * head_dim // 64}", fmt)

    return {str(i): {t: scaled(layers[str(round(i * (n - 1) / max(1, num_layers - 1)))][t]) for t in ("k", "v")}
            for i in range(num_layers)}


def plugin_variants(shape: str, basis: Path) -> dict[str, dict]:
    """This plugin's settings for the shape: int8, fp8, int4, low rank at about 2x, 4x and 8x, and the
    SmolLM2 plan that costs under 1% perplexity (2.75x) mapped onto the shape; ``basis`` (a file for
    the shape) goes to those that project."""
    d, num_layers = SHAPES[shape]["head_dim"], SHAPES[shape]["num_hidden_layers"]
    variants = {
        "lr:int8": {"format": "int8"},
        "lr:fp8": {"format": "fp8"},
        "lr:int4": {"format": "int4"},
        "lr:lowrank-2x": {"format": "lowrank", "rank_k": d // 2, "rank_v": d // 2},
        "lr:lowrank+int8-4x": {"format": "lowrank+int8", "rank_k": d // 2 - 2, "rank_v": d // 2 - 2},
        "lr:lowrank+int8-8x": {"format": "lowrank+int8", "rank_k": d // 4 - 2, "rank_v": d // 4 - 2},
        "lr:plan-2.75x": {"format": "int8", "layers": plan_for_shape("2.75x", num_layers, d)},
        # layered caches (first token and last W exact): the two that meet the 4x accuracy target on SmolLM2
        "lr:int4-w32": {"format": "int4", "exact_window": 32, "exact_sink": 1},
        # a smaller int8 ring: 2 ring blocks instead of 9 (3.47x capacity at 1,280 tokens, against 3.20x)
        "lr:int4-w8-int8": {"format": "int4", "exact_window": 8, "exact_sink": 1, "exact_dtype": "int8"},
        # the same window in bf16: within 1% on Qwen2.5-Coder too (+0.83%), where the int8 ring of raw keys is not
        # (EVALUATION.md, "The int4 ring on the second model")
        "lr:int4-w8": {"format": "int4", "exact_window": 8, "exact_sink": 1},
        "lr:plan-4x-w64": {"format": "int8", "layers": plan_for_shape("4x", num_layers, d), "exact_window": 64,
                           "exact_sink": 1},
        "lr:plan-4x-w64-int8": {"format": "int8", "layers": plan_for_shape("4x", num_layers, d), "exact_window": 64,
                                "exact_sink": 1, "exact_dtype": "int8"},
        # the layered 4x plan chosen inside its ring (+0.93% at 4.00x capacity for 8k-token sequences)
        "lr:ring-4x": {"format": "int8", "layers": plan_for_shape("4x", num_layers, d, RING_PLANS), "exact_window": 64,
                       "exact_sink": 1, "exact_dtype": "int8"},
    }
    return {name: {**v, "basis": str(basis)} if v["format"].startswith("lowrank") or "layers" in v else v
            for name, v in variants.items()}


def variant_args(shape: str, basis: Path, derived: dict[str, Derived]) -> dict[str, list[str]]:
    """Every variant's own vLLM arguments, by name: vLLM's KV cache dtype or this plugin's settings (a
    derived variant takes its base's; its replacements apply to the whole command line)."""
    variants = {v: ["--kv-cache-dtype", v] for v in VLLM_VARIANTS}
    for name, settings in plugin_variants(shape, basis).items():
        variants[name] = ["--attention-backend", "lowrank", "--additional-config", json.dumps({"lowrank": settings})]
        if is_layered(settings):
            variants[name].append("--no-enable-prefix-caching")
    for name, d in derived.items():
        variants[name] = list(variants[d.base])
    return variants


def fit_note(row: dict, batch_tokens: int) -> str:
    """Whether a row's KV cache held the whole batch (``batch_tokens``: prompts x (input + output))."""
    if not row.get("kv_tokens"):
        return "KV cache size unknown"
    if row["kv_tokens"] >= batch_tokens:
        return f"its {row['kv_tokens']:,} KV tokens hold the whole batch ({batch_tokens:,})"
    return (f"NOT a ceiling here: its {row['kv_tokens']:,} KV tokens hold less than the batch's {batch_tokens:,} "
            f"(raise --ample-kv-cache-memory-bytes)")


def _job_output(job: Job) -> tuple[dict, str, dict | None]:
    """The row fields every job has, its log text and vLLM's ``--output-json`` (None if not written)."""
    log = job.log.read_text() if job.log.exists() else ""
    js = output_json(job.gate)
    row = {"rc": job.rc, "startup_s": job.startup_s, "run_s": job.run_s}
    return row, log, json.loads(js.read_text()) if js.exists() else None


def _with_error(row: dict, job: Job, log: str) -> dict:
    if job.error:
        tail = log.strip().splitlines()[-1][-300:] if log.strip() else "no output"
        row["error"] = f"{job.error}: {tail}"
    return row


def output_json(gate: Path) -> Path:
    """Where a job writes vLLM's ``--output-json``: beside its gate folder."""
    return gate.parent / f"{gate.name}.json"


def throughput_row(job: Job, name: str) -> dict:
    """A table row from a finished ``vllm bench throughput`` job: its log and vLLM's JSON."""
    row, log, data = _job_output(job)
    row["variant"] = name
    if data is not None:
        row["vllm_json"] = data
    m = re.search(r"KV cache size: ([\d,]+) tokens", log)
    row["kv_tokens"] = int(m.group(1).replace(",", "")) if m else None
    m = re.search(r"Maximum concurrency for [\d,]+ tokens per request: ([\d.]+)x", log)
    row["max_concurrency"] = float(m.group(1)) if m else None
    m = re.search(r"Throughput: ([\d.]+) requests/s, ([\d.]+) total tokens/s, ([\d.]+) output tokens/s", log)
    if m:
        row.update(requests_per_s=float(m.group(1)), total_tokens_per_s=float(m.group(2)),
                   output_tokens_per_s=float(m.group(3)))
    elif job.error is None:
        job.error = "no throughput line in its output"
    return _with_error(row, job, log)


def latency_row(job: Job, name: str, batch: int) -> dict:
    """A table row from a finished ``vllm bench latency`` job."""
    row, log, data = _job_output(job)
    row.update(variant=name, batch=batch)
    if data is not None:
        row["avg_latency_s"] = data.get("avg_latency")
        row["p50_latency_s"] = (data.get("percentiles") or {}).get("50")
        row["latencies_s"] = data.get("latencies")
    elif job.error is None:
        job.error = "no JSON written"
    return _with_error(row, job, log)


def print_latency_table(rows: list[dict]) -> None:
    base = {r["batch"]: r.get("p50_latency_s") for r in rows if r["variant"] == "auto"}
    print(f"\n{'variant':<22} {'batch':>6} {'median s':>9} {'mean s':>8} {'x auto':>7}")
    for r in rows:
        if r.get("error") or r.get("p50_latency_s") is None:
            print(f"{r['variant']:<22} {r['batch']:>6} ERROR rc={r['rc']}: {r.get('error')}")
            continue
        b = base.get(r["batch"])
        ratio = f"{r['p50_latency_s'] / b:.3f}" if b else "-"
        print(f"{r['variant']:<22} {r['batch']:>6} {r['p50_latency_s']:>9.4f} {r['avg_latency_s']:>8.4f} {ratio:>7}")


def print_table(rows: list[dict], notes: dict[str, str] | None = None) -> None:
    """The throughput table; ``notes`` (variant -> text) are printed below it for the variants it has."""
    by = {r["variant"]: r for r in rows}

    def ratio(r, base, key):
        b = by.get(base, {}).get(key)
        return f"{r[key] / b:.2f}" if r.get(key) and b else "-"

    print(f"\n{'variant':<22} {'KV tokens':>10} {'max conc':>9} {'req/s':>8} {'out tok/s':>10} "
          f"{'x auto':>7} {'x fp8':>7} {'KV x auto':>9}")
    for r in rows:
        if r.get("error"):
            print(f"{r['variant']:<22} ERROR rc={r['rc']}: {r['error']}")
            continue
        print(f"{r['variant']:<22} {r['kv_tokens'] or 0:>10,} {r['max_concurrency'] or 0:>9.2f} "
              f"{r.get('requests_per_s', 0):>8.2f} {r.get('output_tokens_per_s', 0):>10,.0f} "
              f"{ratio(r, 'auto', 'output_tokens_per_s'):>7} {ratio(r, 'fp8', 'output_tokens_per_s'):>7} "
              f"{ratio(r, 'auto', 'kv_tokens'):>9}")
    for name, text in (notes or {}).items():
        if name in by:
            print(f"{name}: {text}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    ap.add_argument("--tokenizer", type=Path, default=Path("/tmp/smollm2"), help="folder with a tokenizer")
    ap.add_argument("--variants", default=None,
                    help="comma-separated subset (vLLM: auto,fp8,int8_per_token_head,int4_per_token_head; "
                         "plugin: lr:int8,lr:fp8,lr:int4,lr:lowrank-2x,lr:lowrank+int8-4x,lr:lowrank+int8-8x,lr:plan-2.75x, "
                         "layered: lr:int4-w32,lr:int4-w8,lr:int4-w8-int8,lr:plan-4x-w64,lr:plan-4x-w64-int8,lr:ring-4x; "
                         "the ceiling: auto-ample)")
    ap.add_argument("--kv-cache-memory-bytes", type=int, default=1 << 30,
                    help="KV cache of the throughput runs (memory pressure); default 1 GiB")
    ap.add_argument("--ample-kv-cache-memory-bytes", type=int, default=AMPLE_KV_CACHE_MEMORY_BYTES,
                    help="KV cache of the ceiling auto-ample instead of --kv-cache-memory-bytes; default 16 GiB, "
                         "which holds the 1B shape's default batch (the 8B shape's 64 x 8k needs 64 GiB)")
    ap.add_argument("--num-prompts", type=int, default=256)
    ap.add_argument("--input-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--parallel", type=int, default=4,
                    help="engines started side by side (each then measured alone, see vllm_lowrank.side_by_side); "
                         "1: one after another")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.05,
                    help="passed to every run: with an explicit KV cache size vLLM only checks that this share of "
                         "the GPU is free at start-up, so it must be small for engines side by side")
    ap.add_argument("--out", type=Path, default=Path("bench_out"),
                    help="results: <table>-<shape>.json (rows with vLLM's own JSON) and <table>-<shape>.log "
                         "(every engine's output), two files per command")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "bench_serving",
                    help="scratch: the dummy model folder, the basis, vLLM's raw outputs")
    ap.add_argument("--latency", default=None, metavar="BATCHES",
                    help="instead of throughput: `vllm bench latency` at these comma-separated batch sizes "
                         "(ample memory: --latency-kv-cache-memory-bytes), e.g. 1,32")
    ap.add_argument("--latency-output-len", type=int, default=128)
    ap.add_argument("--latency-iters", type=int, default=5)
    ap.add_argument("--latency-kv-cache-memory-bytes", type=int, default=4 << 30,
                    help="KV cache of the latency runs (default 4 GiB: 4x what the 1B shape needs at batch 32 "
                         "in bf16; the 8B shape needs 4.5 GiB there)")
    ap.add_argument("extra", nargs="*", help="after --: more arguments for every vLLM run, e.g. -- --enforce-eager")
    args = ap.parse_args()

    from tqdm import tqdm

    args.out, work = args.out.resolve(), args.work.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    model = make_model(args.shape, args.tokenizer, work / f"model-{args.shape}")
    basis = make_basis(args.shape, work / f"basis-{args.shape}.safetensors")
    derived = derived_variants(args.ample_kv_cache_memory_bytes)
    variants = variant_args(args.shape, basis, derived)
    chosen = args.variants.split(",") if args.variants else list(variants)
    unknown = [v for v in chosen if v not in variants]
    if unknown:
        sys.exit(f"unknown variants {unknown}; known: {', '.join(variants)}")
    common = ["--model", str(model), "--load-format", "dummy", "--max-model-len", str(args.max_model_len),
              "--gpu-memory-utilization", str(args.gpu_memory_utilization)]
    table = f"latency-{args.shape}" if args.latency else f"throughput-{args.shape}"
    log_path, json_path = args.out / f"{table}.log", args.out / f"{table}.json"
    log_path.write_text("")
    jobs, rows, what = [], [], {}  # what: job name -> (variant, latency batch or None)
    for name in chosen:
        for batch in ([int(b) for b in args.latency.split(",")] if args.latency else [None]):
            tag = name.replace(":", "_") + (f"-b{batch}" if batch else "")
            gate = work / "gates" / tag
            if batch:
                bench = ["bench", "latency", "--batch-size", str(batch), "--input-len", str(args.input_len),
                         "--output-len", str(args.latency_output_len), "--num-iters-warmup", "2",
                         "--num-iters", str(args.latency_iters),
                         "--kv-cache-memory-bytes", str(args.latency_kv_cache_memory_bytes)]
            else:
                bench = ["bench", "throughput", "--dataset-name", "random", "--random-input-len", str(args.input_len),
                         "--random-output-len", str(args.output_len), "--num-prompts", str(args.num_prompts),
                         "--kv-cache-memory-bytes", str(args.kv_cache_memory_bytes)]
            vllm_args = [*bench, *common, "--output-json", str(output_json(gate)), *variants[name]]
            if name in derived:
                vllm_args = replace_args(vllm_args, derived[name].replace)
            cmd = worker_command(gate, [*vllm_args, *args.extra])
            # run outside the source checkout, so that the installed plugin (not the source folder) is imported
            jobs.append(Job(tag, cmd, gate, work / "logs" / f"{tag}.log", cwd=work))
            what[tag] = (name, batch)
    progress = tqdm(total=len(jobs), desc=f"vllm bench {'latency' if args.latency else 'throughput'} ({args.shape})")

    def on_done(job: Job) -> None:
        with log_path.open("a") as f:
            f.write(f"\n{'=' * 100}\n{job.name}: startup {job.startup_s} s, run {job.run_s} s, rc {job.rc}\n"
                    f"{job.log.read_text() if job.log.exists() else ''}")
        name, batch = what[job.name]
        rows.append(latency_row(job, name, batch) if batch else throughput_row(job, name))
        json_path.write_text(json.dumps(rows, indent=1))
        progress.update()
        # printed after every run: a command cut short by a time limit still shows what it measured
        if args.latency:
            print(f"\nshape {args.shape}, vllm bench latency, {args.input_len} in / {args.latency_output_len} out, "
                  f"median of {args.latency_iters} iterations", flush=True)
            print_latency_table(rows)
        else:
            print(f"\nshape {args.shape}, {args.num_prompts} prompts of {args.input_len} in / {args.output_len} out, "
                  f"--kv-cache-memory-bytes {args.kv_cache_memory_bytes}, --max-model-len {args.max_model_len}",
                  flush=True)
            batch_tokens = args.num_prompts * (args.input_len + args.output_len)
            print_table(rows, {r["variant"]: f"{derived[r['variant']].note}; {fit_note(r, batch_tokens)}"
                               for r in rows if r["variant"] in derived})

    run_side_by_side(jobs, args.parallel, on_done)


if __name__ == "__main__":
    main()
