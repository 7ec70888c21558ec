"""Rank structure of a model's keys, values and attention (``python -m vllm_lowrank.analyze_ranks --help``).

Per layer and head: effective rank at 99% energy and stable rank (||A||_F^2 / ||A||_2^2) of post-RoPE K,
pre-RoPE K and V (from the calibration statistics written by ``calibrate.py``), and of the attention
probability matrices on sample prompts (computed with the HF model). Prints a table (means over heads,
per layer) and writes PNG plots: the spectra per layer, and effective / stable rank by depth.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def attention_ranks(model: Path, prompts: list[list[int]], energy: float = 0.99) -> dict[str, torch.Tensor]:
    """Effective and stable rank [L, Hq] of the attention probability matrices, mean over prompts."""
    from tqdm import tqdm

    from . import simulate
    from .calibration import effective_rank, stable_rank

    sim = simulate.Simulator(model)
    sim.set_plan(None)
    eff, stab = [], []
    for ids in tqdm(prompts, desc="attention", unit="prompt"):
        simulate._STATE.capture = {}
        with torch.no_grad():
            sim.model(torch.tensor([ids]))
        cap = simulate._STATE.capture
        simulate._STATE.capture = None
        e_l, s_l = [], []
        for i in sorted(cap):
            p = cap[i].double()  # [Hq, T, T]
            sv2 = torch.linalg.svdvals(p) ** 2  # eigenvalues of P^T P, descending
            e_l.append(effective_rank(sv2, energy).double())
            s_l.append(stable_rank(sv2))
        eff.append(torch.stack(e_l))
        stab.append(torch.stack(s_l))
    return {"effective": torch.stack(eff).mean(0), "stable": torch.stack(stab).mean(0),
            "tokens": torch.tensor(len(prompts[0]))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="analyze_ranks", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--stats", default=str(REPO / "out" / "smollm2-135m-instruct-bfloat16-stats.safetensors"),
                   help="statistics from calibrate.py (made with the defaults if missing)")
    p.add_argument("--model", default=None, help="HF model folder for the attention matrices (default SmolLM2)")
    p.add_argument("--energy", type=float, default=0.99)
    p.add_argument("--prompts", type=int, default=2, help="sample prompts for the attention matrices (0: skip)")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--plots", default=str(REPO / "plots"), help="folder for the PNGs")
    p.add_argument("--json", default=None, help="also write the per-layer, per-head numbers here")
    args = p.parse_args(argv)

    from .calibration import Statistics, eig_desc, effective_rank, stable_rank

    if args.model is None:
        from .models import smollm2

        model = smollm2()
    else:
        model = Path(args.model)
    if not Path(args.stats).is_file():
        from .calibrate import main as calibrate_main

        calibrate_main(["--stats", args.stats])
    st = Statistics.load(args.stats)
    num_layers, d = st.num_layers, st.head_dim
    spectra, eff, stab = {}, {}, {}
    names = {"k": "K post-RoPE", "kp": "K pre-RoPE", "v": "V"}
    for t in names:
        e, _ = eig_desc(st.second_moment(t))
        spectra[t] = e
        eff[t] = effective_rank(e, args.energy).double()
        stab[t] = stable_rank(e)
    if args.prompts > 0:
        from transformers import AutoTokenizer

        from .textdata import split_text

        tok = AutoTokenizer.from_pretrained(str(model))
        ids = tok(split_text()[0][:200_000], add_special_tokens=False)["input_ids"]
        prompts = [ids[i * args.prompt_len:(i + 1) * args.prompt_len] for i in range(args.prompts)]
        att = attention_ranks(model, prompts, args.energy)
        names["attn"] = f"attention P ({args.prompt_len} tok)"
        eff["attn"], stab["attn"] = att["effective"], att["stable"]

    cols = list(names)
    print(f"{st.meta.get('model', model.name)}: {int(st.count[0])} calibration tokens per layer, head_dim {d}; "
          f"means over heads")
    print("| layer | " + " | ".join(f"eff{int(args.energy * 100)} {names[c]}" for c in cols) + " | "
          + " | ".join(f"stable {names[c]}" for c in cols) + " |")
    print("|---" * (1 + 2 * len(cols)) + "|")
    for i in range(num_layers):
        print(f"| {i} | " + " | ".join(f"{float(eff[c][i].mean()):.1f}" for c in cols) + " | "
              + " | ".join(f"{float(stab[c][i].mean()):.2f}" for c in cols) + " |")
    print("| mean | " + " | ".join(f"{float(eff[c].mean()):.1f}" for c in cols) + " | "
          + " | ".join(f"{float(stab[c].mean()):.2f}" for c in cols) + " |")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(args.plots)
    out.mkdir(parents=True, exist_ok=True)
    cmap = plt.get_cmap("viridis")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), sharey=True)
    for ax, t in zip(axes, ("k", "kp", "v")):
        e = spectra[t].mean(1)  # mean over heads
        e = e / e.sum(-1, keepdim=True)
        for i in range(num_layers):
            ax.semilogy(range(1, d + 1), e[i].clamp_min(1e-9).numpy(), color=cmap(i / max(1, num_layers - 1)), lw=1)
        ax.set_title(f"{names[t]}: eigenvalues per layer", fontsize=10)
        ax.set_xlabel("index")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("fraction of energy (mean over KV heads)")
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, num_layers - 1))
    fig.colorbar(sm, ax=axes, label="layer")
    fig.savefig(out / "spectra.png", dpi=110, bbox_inches="tight")
    plt.close(fig)

    for kind, data, ylabel, fname in (("effective", eff, f"effective rank at {args.energy:.0%} energy", "effective_rank.png"),
                                      ("stable", stab, "stable rank ||A||_F^2/||A||_2^2", "stable_rank.png")):
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for c in cols:
            if c != "attn":
                ax.plot(range(num_layers), data[c].mean(1).numpy(), marker="o", ms=3, label=names[c])
        lines, labels = ax.get_legend_handles_labels()
        if "attn" in cols:  # attention matrices are T x T: their own axis
            ax2 = ax.twinx()
            ax2.plot(range(num_layers), data["attn"].mean(1).numpy(), marker="s", ms=3, color="tab:red",
                     ls="--", label=names["attn"] + " (right axis)")
            ax2.set_ylabel(f"{ylabel}, attention", color="tab:red")
            l2, lb2 = ax2.get_legend_handles_labels()
            lines, labels = lines + l2, labels + lb2
        ax.set_xlabel("layer")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{kind} rank by depth (mean over heads; K/V of head_dim {d})")
        ax.grid(alpha=0.3)
        ax.legend(lines, labels, fontsize=8)
        fig.savefig(out / fname, dpi=110, bbox_inches="tight")
        plt.close(fig)
    print(f"plots -> {out}/spectra.png, effective_rank.png, stable_rank.png")
    if args.json:
        Path(args.json).write_text(json.dumps({c: {"effective": eff[c].tolist(), "stable": stab[c].tolist()}
                                               for c in cols}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
