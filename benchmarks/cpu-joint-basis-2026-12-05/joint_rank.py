"""Would one basis per layer, shared by its KV heads (Palu's group-head low rank), beat one per KV head?

    python -P benchmarks/cpu-joint-basis-2026-12-05/joint_rank.py [--windows 4] [--json out.json]

Post-RoPE K and V of SmolLM2-135M on calibration windows (the simulation's HF model, float32), centred
by the mean as the plugin's offsets do. Bases fitted on half of the windows; per layer, for the same
total number of latent dimensions per token (``dims``), the fraction of the other half's energy left out:

- ``per-head``: one basis per KV head, the ``dims`` dimensions shared out across heads at best (the
  largest eigenvalues of all the heads' covariances together), what per-head ranks allow at most;
- ``joint``: one basis over the concatenated heads ``[k_0 | k_1 | k_2]`` (``H * head_dim`` wide).

Joint never leaves out more; the gap is what correlation across heads is worth. For keys the energy is
also measured query-weighted (each head's keys multiplied by the square root of its query group's
second moment, from the calibration statistics), which is the error of the attention scores.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm import tqdm
from transformers import AutoTokenizer

from vllm_lowrank import simulate
from vllm_lowrank.models import smollm2
from vllm_lowrank.textdata import calibration_windows

REPO = Path(__file__).resolve().parents[2]
STATS = REPO / "out" / "smollm2-135m-instruct-bfloat16-stats.safetensors"


def _eig(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending) and eigenvectors of x^T x."""
    e, u = torch.linalg.eigh(x.T.double() @ x.double())
    return e.flip(0), u.flip(1)


def left_out(fit: list[torch.Tensor], test: list[torch.Tensor], dims: int) -> tuple[float, float]:
    """(per-head, joint) fraction of the test rows' energy outside ``dims`` dimensions chosen on the fit
    rows: per head, each head's eigenvectors with the ``dims`` largest eigenvalues of all heads; joint, the
    leading eigenvectors of the concatenated heads. Rows are [T, D] per head, centred on the fit mean."""
    total = sum(float((x.double() ** 2).sum()) for x in test)
    eigs, caught = [], []
    for f, t in zip(fit, test):
        e, u = _eig(f)
        eigs.append(e)
        caught.append(((t.double() @ u) ** 2).sum(0))
    order = torch.cat(eigs).argsort(descending=True)[:dims]
    kept_heads = float(torch.cat(caught)[order].sum())
    _, u = _eig(torch.cat(fit, 1))
    kept_joint = float(((torch.cat(test, 1).double() @ u[:, :dims]) ** 2).sum())
    return 1 - kept_heads / total, 1 - kept_joint / total


def effective_dims(per_head: list[torch.Tensor], energy: float = 0.99) -> tuple[int, int]:
    """(sum over heads of each head's rank at ``energy``, the joint rank at ``energy``), in sample."""
    def rank(x: torch.Tensor) -> int:
        e = _eig(x)[0].clamp_min(0)
        return int((e.cumsum(0) / e.sum() < energy).sum()) + 1

    return sum(rank(x) for x in per_head), rank(torch.cat(per_head, 1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--windows", type=int, default=8, help="calibration windows of 1024 tokens: the bases are "
                   "fitted on the first half and the energy left out is measured on the second")
    p.add_argument("--dims", type=int, nargs="+", default=[48, 96, 144], help="latent dimensions per token, "
                   "all KV heads together (3 heads x 16/32/48)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    model = smollm2()
    tok = AutoTokenizer.from_pretrained(str(model))
    sim = simulate.Simulator(model)
    qq = load_file(str(STATS))["qq"]  # [layers, H, D, D]: query second moment per KV head's group
    caps: list[dict[int, tuple[torch.Tensor, torch.Tensor]]] = []
    for w in tqdm(calibration_windows(tok, args.windows), desc="windows"):
        simulate._STATE.capture_kv = {}
        sim.prepare([w])
        caps.append(simulate._STATE.capture_kv)
    simulate._STATE.capture_kv = None
    rows = []
    half = args.windows // 2
    for layer in range(sim.num_layers):
        parts = {}
        for name, i in (("K", 0), ("V", 1)):
            fit = torch.cat([c[layer][i] for c in caps[:half]])  # [T, H, D]
            test = torch.cat([c[layer][i] for c in caps[half:]])
            mean = fit.mean(0)
            parts[name] = ([(fit - mean)[:, h] for h in range(fit.shape[1])],
                           [(test - mean)[:, h] for h in range(fit.shape[1])])
        roots = []
        for h in range(len(parts["K"][0])):
            e, u = torch.linalg.eigh(qq[layer, h].double())
            roots.append((u * e.clamp_min(0).sqrt()) @ u.T)
        parts["K (scores)"] = tuple([x.double() @ roots[h] for h, x in enumerate(xs)] for xs in parts["K"])
        row = {"layer": layer}
        for name, (fit, test) in parts.items():
            row[f"{name} rank99"] = effective_dims(fit)
            for d in args.dims:
                row[f"{name} left@{d}"] = left_out(fit, test, d)
        rows.append(row)
    names = list(rows[0])[1:]
    print("| layer | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for r in rows:
        print(f"| {r['layer']} | " + " | ".join(
            f"{a} / {b}" if "rank" in n else f"{a:.3f} / {b:.3f}" for n in names for a, b in [r[n]]) + " |")
    mean = {n: [sum(r[n][i] for r in rows) / len(rows) for i in (0, 1)] for n in names}
    print("| mean | " + " | ".join(f"{a:.1f} / {b:.1f}" if "rank" in n else f"{a:.3f} / {b:.3f}"
                                   for n in names for a, b in [mean[n]]) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"windows": args.windows, "rows": rows, "mean": mean}, indent=1))


if __name__ == "__main__":
    main()
