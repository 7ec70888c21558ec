"""Sensitivity-driven per-layer plans: given a byte budget, each layer's K and V format that minimises loss.

1. Sweep (:func:`sweep`): compress ONE layer's K or V at a time with each candidate format and measure
   the loss it causes on calibration text (the PyTorch simulation of :mod:`vllm_lowrank.simulate`; the
   windows come after the calibration windows, so both stay disjoint from the evaluation text). The
   loss is the mean KL divergence from the exact model's next-token distribution (always >= 0, much
   less noisy than the change in NLL; the change in NLL is recorded too).
2. Choose (:func:`choose_plan`): a multiple-choice knapsack over layers, exact in bytes: each layer
   picks a (K format, V format) pair, costing its exact slot bytes (:class:`~vllm_lowrank.formats.SlotLayout`,
   alignment included) times the KV heads; the sum of the measured losses (assumed additive) is
   minimised under the budget of bytes per token. Solved exactly by dynamic programming.
3. A plan is the plugin's ``layers`` setting: ``{"0": {"k": "r16+int4", "v": "int8"}, ...}``;
   :func:`plan_settings` gives the whole ``additional_config["lowrank"]`` dict.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .formats import LayerFormat, SlotLayout, TensorFormat

# the block size a layered plan's capacity is counted for (vLLM's default on CUDA)
BLOCK_SIZE = 16

# candidate formats per tensor (besides the exact "model"), cheapest last
CANDIDATES = ("int8", "hadamard+int4", "r48+int8", "r32+int8", "r48+int4", "r40+int4", "r32+int4",
              "r24+int4", "r16+int4", "r8+int4")


def slot_bytes(kf: str, vf: str, head_dim: int, model_dtype: torch.dtype = torch.bfloat16) -> int:
    return SlotLayout.build(LayerFormat(TensorFormat.parse(kf), TensorFormat.parse(vf)), head_dim, model_dtype).slot_bytes


def sweep(sim, candidates: tuple[str, ...] = CANDIDATES, progress: bool = True,
          layers: list[int] | None = None) -> dict[str, Any]:
    """Loss of each (layer, tensor, format), one at a time; ``sim`` is a prepared Simulator."""
    from tqdm import tqdm

    ref = sim.reference()
    out: dict[str, Any] = {"reference": ref, "candidates": list(candidates), "kl": {}, "dnll": {}}
    layers = list(range(sim.num_layers)) if layers is None else layers
    jobs = [(i, t, f) for i in layers for t in ("k", "v") for f in candidates]
    for i, t, f in tqdm(jobs, desc="sensitivity", unit="run", disable=not progress):
        plan = {i: (f, "model") if t == "k" else ("model", f)}
        sim.set_plan(plan)
        r = sim.run(i)
        out["kl"][f"{i}.{t}.{f}"] = r["kl"]
        out["dnll"][f"{i}.{t}.{f}"] = r["nll"] - ref["nll"]
    sim.set_plan(None)
    return out


def choose_plan(sens: dict[str, Any], budget_bytes: int, num_layers: int, num_kv_heads: int, head_dim: int,
                candidates: tuple[str, ...] | None = None, metric: str = "kl",
                model_dtype: torch.dtype = torch.bfloat16, min_slot_bytes: int = 0) -> dict[int, tuple[str, str]]:
    """Minimise the summed measured loss subject to sum_layers H * slot_bytes <= budget_bytes (exact DP),
    every layer's slot at least ``min_slot_bytes``."""
    cands = ["model", *(candidates or sens["candidates"])]
    loss = sens[metric]

    def cost_of(i: int, t: str, f: str) -> float:
        return 0.0 if f == "model" else max(0.0, float(loss[f"{i}.{t}.{f}"]))

    unit = 2  # slot bytes are even
    cap = budget_bytes // (num_kv_heads * unit)
    inf = float("inf")
    best = np.full(cap + 1, inf)
    best[0] = 0.0
    choice: list[np.ndarray] = []
    pairs = [(kf, vf, b // unit) for kf in cands for vf in cands
             if (b := slot_bytes(kf, vf, head_dim, model_dtype)) >= min_slot_bytes]
    for i in range(num_layers):
        nb = np.full(cap + 1, inf)
        arg = np.full(cap + 1, -1, dtype=np.int64)
        for j, (kf, vf, w) in enumerate(pairs):
            if w > cap:
                continue
            c = cost_of(i, "k", kf) + cost_of(i, "v", vf)
            cand = np.full(cap + 1, inf)
            cand[w:] = best[:cap + 1 - w] + c
            better = cand < nb
            nb[better] = cand[better]
            arg[better] = j
        best = nb
        choice.append(arg)
    if not np.isfinite(best).any():
        raise ValueError(f"no plan fits in {budget_bytes} bytes per token")
    b = int(np.nanargmin(np.where(np.isfinite(best), best, np.nan)))
    plan: dict[int, tuple[str, str]] = {}
    for i in range(num_layers - 1, -1, -1):
        j = int(choice[i][b])
        kf, vf, w = pairs[j]
        plan[i] = (kf, vf)
        b -= w
    return dict(sorted(plan.items()))


def choose_layered_plan(sens: dict[str, Any], capacity: float, context: int, window: int, sink: int,
                        num_layers: int, num_kv_heads: int, head_dim: int, exact_dtype: str = "model",
                        block_size: int = BLOCK_SIZE, candidates: tuple[str, ...] | None = None, metric: str = "kl",
                        model_dtype: torch.dtype = torch.bfloat16) -> dict[int, tuple[str, str]]:
    """The least-loss plan whose layered cache (last ``window`` and first ``sink`` tokens also exact, in ring
    blocks) holds ``capacity`` times as many sequences of ``context`` tokens as the model dtype does.

    The ring's blocks are set by the layer with the smallest slot (one block table for all layers,
    :func:`vllm_lowrank.layered.ring_plan`), so a plan cannot be chosen by slot bytes alone: for each
    possible ring size ``k`` (blocks), the layers are kept to slots whose page holds enough exact
    tokens for ``k`` blocks, and the budget is what is left after ``k`` ring pages; the best over ``k``."""
    from .formats import ring_layout
    from .layered import ring_blocks

    ring = ring_layout(head_dim, model_dtype, exact_dtype).slot_bytes
    blocks = -(-context // block_size)
    full = num_layers * num_kv_heads * 2 * head_dim * model_dtype.itemsize
    best, best_loss = None, float("inf")
    for k in sorted({ring_blocks(window, sink, [t]) for t in range(1, window + sink + 1)}):
        per_block = -(-(window + sink) // k)  # the fewest exact tokens a page must hold for k blocks
        min_slot = -(-per_block * ring // block_size)
        budget = int(full * blocks / (capacity * (blocks + k)))
        try:
            plan = choose_plan(sens, budget, num_layers, num_kv_heads, head_dim, candidates, metric, model_dtype,
                               min_slot)
        except ValueError:
            continue
        loss = predicted_loss(sens, plan, metric)
        if loss < best_loss:
            best, best_loss = plan, loss
    if best is None:
        raise ValueError(f"no plan holds {capacity}x the sequences of {context} tokens")
    return best


def plan_bytes(plan: dict[int, tuple[str, str]], num_kv_heads: int, head_dim: int,
               model_dtype: torch.dtype = torch.bfloat16) -> int:
    return sum(num_kv_heads * slot_bytes(kf, vf, head_dim, model_dtype) for kf, vf in plan.values())


def predicted_loss(sens: dict[str, Any], plan: dict[int, tuple[str, str]], metric: str = "kl") -> float:
    return sum(float(sens[metric][f"{i}.{t}.{f}"]) for i, (kf, vf) in plan.items()
               for t, f in (("k", kf), ("v", vf)) if f != "model")


def plan_layers(plan: dict[int, tuple[str, str]]) -> dict[str, dict[str, str]]:
    """The plugin's ``layers`` setting."""
    return {str(i): {"k": kf, "v": vf} for i, (kf, vf) in sorted(plan.items())}


def plan_settings(plan: dict[int, tuple[str, str]], basis: str | None, **extra: Any) -> dict[str, Any]:
    """The whole ``additional_config['lowrank']`` dict for a plan."""
    s: dict[str, Any] = {"format": "int8", "layers": plan_layers(plan), **extra}
    if basis is not None and any(f.startswith("r") for kv in plan.values() for f in kv):
        s["basis"] = str(basis)
    elif basis is not None:
        s["basis"] = str(basis)  # offsets of the file still apply
    return s


def plan_config(plan: dict[int, tuple[str, str]], **ring: Any):
    """A plan's formats as a :class:`~vllm_lowrank.config.LowRankConfig`, with the layered-cache settings
    ``ring`` (``exact_window``, ``exact_sink``, ``exact_dtype``) and no basis file: for the block
    arithmetic (:func:`vllm_lowrank.layered.capacity_ratio`), which needs no bases."""
    from .config import LowRankConfig

    return LowRankConfig({}, LayerFormat(TensorFormat.parse("int8"), TensorFormat.parse("int8")),
                         {i: LayerFormat(TensorFormat.parse(kf), TensorFormat.parse(vf)) for i, (kf, vf) in plan.items()},
                         **ring)


def parse_plan(layers: dict[str, Any]) -> dict[int, tuple[str, str]]:
    return {int(i): (str(v["k"]), str(v["v"])) for i, v in layers.items()}


def plans_ranks(plans: dict[str, Any], num_layers: int) -> dict[str, list[int]]:
    """Per layer and tensor, the largest rank any of the plans' r<N> formats uses (0 if none)."""
    ranks = {"k": [0] * num_layers, "v": [0] * num_layers}
    for p in plans.get("plans", plans).values():
        layers = p["layers"] if "layers" in p else p
        for i, kv in layers.items():
            for t in ("k", "v"):
                tf = TensorFormat.parse(kv[t])
                if tf.transform == "basis":
                    ranks[t][int(i)] = max(ranks[t][int(i)], tf.rank)
    return ranks


def load_plans(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


# ---------------------------------------------------------------------------------------------------
# command line: python -m vllm_lowrank.sensitivity --help


def sweep_settings(offset: bool | None, smooth_keys: bool, exact_window: int = 0,
                   exact_sink: int = 0) -> dict[str, bool | int]:
    """The plugin settings a sweep is measured with, as its plans record them (defaults left out).

    With ``exact_window``/``exact_sink`` the sweep measures each tensor's cost inside a layered cache
    (the last W and first S positions read exact), so its plans are chosen for, and carry, that cache."""
    out: dict[str, bool | int] = {}
    if offset is not None:
        out["offset"] = offset
    if smooth_keys:
        out["smooth_keys"] = True
    if exact_window:
        out["exact_window"] = exact_window
    if exact_sink:
        out["exact_sink"] = exact_sink
    return out


def _sim_settings(settings: dict[str, bool | int]) -> dict[str, Any]:
    return {"use_offsets": settings.get("offset"), "smooth_keys": settings.get("smooth_keys", False),
            "exact_window": settings.get("exact_window", 0), "exact_sink": settings.get("exact_sink", 0)}


def _ratio_key(r: float) -> str:
    return f"{r:g}x"


def main(argv: list[str] | None = None) -> int:
    import argparse
    import datetime
    import time

    from .basis import BasisFile

    repo = Path(__file__).resolve().parent.parent
    p = argparse.ArgumentParser(prog="choose_plan", description="Measure per-layer sensitivity (PyTorch simulation "
                                "on the HF model) and choose per-layer K/V formats for byte budgets.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="HF model folder (default: the embedded SmolLM2-135M)")
    p.add_argument("--basis", default=str(repo / "out" / "smollm2-135m-instruct-bfloat16-basis.safetensors"),
                   help="basis file with all columns (from calibrate.py)")
    p.add_argument("--windows", type=int, default=2, help="sensitivity windows (calibration text, after the "
                   "calibration windows)")
    p.add_argument("--window", type=int, default=512, help="tokens per sensitivity window")
    p.add_argument("--skip-tokens", type=int, default=64 * 1024,
                   help="start this many tokens into the calibration text (past the calibration windows)")
    p.add_argument("--candidates", nargs="+", default=list(CANDIDATES), help="candidate formats per tensor")
    p.add_argument("--sweep", default=str(repo / "out" / "sensitivity.json"), help="sweep results (written, or "
                   "read with --from-sweep)")
    p.add_argument("--from-sweep", nargs="*", default=None,
                   help="reuse sweep files (default: --sweep) instead of measuring; several are merged")
    p.add_argument("--layers", default=None, help="sweep only these layers (e.g. 0-14 or 0,2,4), to split the "
                   "sweep over processes; then merge with --from-sweep A B")
    p.add_argument("--sweep-only", action="store_true", help="measure and write the sweep, choose no plans")
    p.add_argument("--ratios", type=float, nargs="+", default=[2.0, 4.0, 8.0],
                   help="compression ratios vs bf16 K+V to plan for")
    p.add_argument("--metric", choices=("kl", "dnll"), default="kl")
    p.add_argument("--offset", choices=("auto", "true", "false"), default="auto",
                   help="the plugin's 'offset' setting to measure with (auto: offsets when the basis file has them)")
    p.add_argument("--smooth-keys", action="store_true",
                   help="measure with the plugin's 'smooth_keys' setting on (the basis file's key scales)")
    p.add_argument("--exact-window", type=int, default=0, metavar="W",
                   help="measure inside a layered cache whose last W positions are read exact (the plugin's "
                        "'exact_window'); the plans then carry that setting")
    p.add_argument("--exact-sink", type=int, default=0, metavar="S",
                   help="... and whose first S positions are read exact (the plugin's 'exact_sink')")
    p.add_argument("--capacity-at", type=int, default=0, metavar="TOKENS",
                   help="with --exact-window/--exact-sink: the ratios are capacities for sequences of this many "
                        "tokens, the ring's blocks counted (otherwise: compressed slot bytes only)")
    p.add_argument("--exact-dtype", choices=("model", "int8"), default="model",
                   help="the ring's storage the capacity counts (the plugin's 'exact_dtype'; the sweep reads the "
                        "exact tokens unrounded either way); recorded in the plans")
    p.add_argument("--verify", action="store_true", help="simulate each chosen plan in full")
    p.add_argument("--out", default=str(repo / "bases" / "smollm2-135m.plans.json"), help="plans file to write")
    p.add_argument("--rank-bases", nargs="*", default=[], metavar="R=PATH",
                   help="bases optimised for rank R (calibrate.py --optimize-rank R); with them each plan gets "
                        "its own basis file (--plan-basis-prefix), composed of the columns its r<N> formats use")
    p.add_argument("--plan-basis-prefix", default="bases/smollm2-135m-",
                   help="per-plan basis files: PREFIX<plan>.safetensors (relative to the repository)")
    p.add_argument("--compact-plan-bases", action="store_true",
                   help="per-plan basis files small enough to commit: float16 columns, and no key smoothing "
                        "scales unless the plan smooths keys")
    args = p.parse_args(argv)

    from transformers import AutoTokenizer

    from .simulate import Simulator
    from .textdata import split_text

    if args.model is None:
        from .models import smollm2

        model = smollm2()
    else:
        model = Path(args.model)
    basis = BasisFile.load(args.basis)
    settings = sweep_settings(None if args.offset == "auto" else args.offset == "true", args.smooth_keys,
                              args.exact_window, args.exact_sink)
    sim = None
    if args.from_sweep is not None:
        files = args.from_sweep or [args.sweep]
        sweeps = [json.loads(Path(f).read_text()) for f in files]
        for f, other in zip(files, sweeps):
            found = other.get("meta", {}).get("settings", {})
            if found != settings:
                raise SystemExit(f"choose_plan: {f} was measured with settings {found or '(defaults)'}, but this run "
                                 f"asks for {settings or '(defaults)'}: pass the same --offset/--smooth-keys/--exact-window/"
                                 f"--exact-sink")
        sens = sweeps[0]
        for other in sweeps[1:]:
            sens["kl"].update(other["kl"])
            sens["dnll"].update(other["dnll"])
    else:
        tok = AutoTokenizer.from_pretrained(str(model))
        ids = tok(split_text()[0], add_special_tokens=False)["input_ids"][args.skip_tokens:]
        wins = [ids[i * args.window:(i + 1) * args.window] for i in range(args.windows)]
        sim = Simulator(model, basis, **_sim_settings(settings))
        t0 = time.time()
        sim.prepare(wins)
        layers = None
        if args.layers:
            layers = []
            for part in args.layers.split(","):
                a, _, b = part.partition("-")
                layers += list(range(int(a), int(b) + 1)) if b else [int(a)]
        sens = sweep(sim, tuple(args.candidates), layers=layers)
        sens["meta"] = {"windows": args.windows, "window": args.window, "skip_tokens": args.skip_tokens,
                        "basis": Path(args.basis).name, "settings": settings, "seconds": round(time.time() - t0, 1),
                        "date": datetime.date.today().isoformat()}
        Path(args.sweep).parent.mkdir(parents=True, exist_ok=True)
        Path(args.sweep).write_text(json.dumps(sens, indent=1))
        print(f"sweep -> {args.sweep} ({time.time() - t0:.0f} s)")
        if args.sweep_only:
            return 0
    n, h, d = basis.num_layers, basis.num_kv_heads, basis.head_dim
    full = n * h * 2 * d * 2
    plans: dict[str, Any] = {}
    layered = args.capacity_at and (args.exact_window or args.exact_sink)
    if args.capacity_at and not layered:
        raise SystemExit("choose_plan: --capacity-at counts a layered cache's ring: set --exact-window/--exact-sink")
    recorded = {**settings, **({"exact_dtype": args.exact_dtype} if args.exact_dtype != "model" else {})}
    for r in args.ratios:
        if layered:
            plan = choose_layered_plan(sens, r, args.capacity_at, args.exact_window, args.exact_sink, n, h, d,
                                       args.exact_dtype, candidates=tuple(args.candidates), metric=args.metric)
            limit = {}
        else:
            limit = {"budget": int(full / r)}
            plan = choose_plan(sens, limit["budget"], n, h, d, tuple(args.candidates), args.metric)
        used = plan_bytes(plan, h, d)
        entry = {"ratio": round(full / used, 3), "bytes_per_token": used, **limit,
                 "predicted_kl": round(predicted_loss(sens, plan, "kl"), 6),
                 "predicted_dnll": round(predicted_loss(sens, plan, "dnll"), 6), "layers": plan_layers(plan)}
        if recorded:
            entry["settings"] = dict(recorded)
        if layered:
            from .layered import capacity_ratio

            cfg = plan_config(plan, exact_window=args.exact_window, exact_sink=args.exact_sink,
                              exact_dtype=args.exact_dtype)
            entry["capacity"] = {str(t): round(capacity_ratio(cfg, n, d, torch.bfloat16, BLOCK_SIZE, t), 3)
                                 for t in (1024, 8192, 32768)}
        plan_basis = basis
        if args.rank_bases:
            rank_files = {int(x.split("=")[0]): BasisFile.load(x.split("=", 1)[1]) for x in args.rank_bases}
            plan_basis = compose_plan_basis(plan_layers(plan), rank_files, basis)
            plan_basis.extra["plan"] = _ratio_key(r)
            rel = f"{args.plan_basis_prefix}{_ratio_key(r)}.safetensors"
            if args.compact_plan_bases and not settings.get("smooth_keys"):
                plan_basis.smooth = plan_basis.smooth_raw = None
            plan_basis.save(repo / rel, torch.float16 if args.compact_plan_bases else torch.float32)
            plan_basis = BasisFile.load(repo / rel)  # verified as stored
            entry["basis"] = rel
        if args.verify:
            if sim is None:
                tok = AutoTokenizer.from_pretrained(str(model))
                ids = tok(split_text()[0], add_special_tokens=False)["input_ids"][args.skip_tokens:]
                sim = Simulator(model, basis, **_sim_settings(settings))
                sim.prepare([ids[i * args.window:(i + 1) * args.window] for i in range(args.windows)])
            sim.basis = basis
            ref = sim.reference()
            sim.basis = plan_basis
            sim.set_plan(plan)
            res = sim.run(0)
            entry["simulated_kl"] = round(res["kl"], 6)
            entry["simulated_dnll"] = round(res["nll"] - ref["nll"], 6)
        plans[_ratio_key(r)] = entry
        ks = [kv[0] for kv in plan.values()]
        vs = [kv[1] for kv in plan.values()]
        print(f"{_ratio_key(r)}: {used} B/token ({full / used:.2f}x"
              + (f"; capacity {', '.join(f'{v:.2f}x at {t}' for t, v in entry['capacity'].items())}" if layered else "")
              + f"), predicted KL {entry['predicted_kl']:.5f}"
              + (f", simulated KL {entry['simulated_kl']:.5f} dNLL {entry['simulated_dnll']:+.5f}" if args.verify else ""))
        print("   K:", " ".join(ks))
        print("   V:", " ".join(vs))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"model": basis.model, "metric": args.metric, "sweep": sens.get("meta", {}),
                                          "plans": plans}, indent=1))
    print(f"plans -> {args.out}")
    return 0



def compose_plan_basis(layers: dict[str, dict[str, str]], rank_files: dict[int, Any], fallback: Any):
    """A basis file for one plan: for each layer and tensor with an ``r<N>`` format, the first N columns
    of the basis optimised for rank N (``rank_files[N]``, a BasisFile); elsewhere one column of
    ``fallback`` (unused, kept for the file's shape). Offsets and spectra from ``fallback``."""
    from .basis import BasisFile

    n = fallback.num_layers
    bases: dict[str, list[torch.Tensor]] = {"k": [], "v": []}
    ranks: dict[str, list[int]] = {"k": [], "v": []}
    for t in ("k", "v"):
        for i in range(n):
            tf = TensorFormat.parse(layers[str(i)][t])
            if tf.transform == "basis":
                src = rank_files.get(tf.rank, fallback)
                bases[t].append(src.bases[t][i][:, :, :tf.rank].contiguous())
                ranks[t].append(tf.rank)
            else:
                bases[t].append(fallback.bases[t][i][:, :, :1].contiguous())
                ranks[t].append(1)
    extra = dict(fallback.extra)
    extra["optimised_ranks"] = sorted(rank_files)
    return BasisFile(n, fallback.num_kv_heads, fallback.head_dim, bases, fallback.eigenvalues, fallback.offsets,
                     ranks, fallback.model, "post_rope", extra, smooth=fallback.smooth,
                     smooth_raw=fallback.smooth_raw)


if __name__ == "__main__":
    import sys

    sys.exit(main())
