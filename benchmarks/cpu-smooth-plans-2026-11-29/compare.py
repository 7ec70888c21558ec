"""The smoothed sweep against the unsmoothed one (summed one-at-a-time KL per candidate and tensor, layers
lower), and how many tensors the smoothed plans change against the committed plans.

    python benchmarks/cpu-smooth-plans-2026-11-29/compare.py   # from the repository root
"""

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def kl(files: list[Path]) -> dict[str, float]:
    out: dict[str, float] = {}
    for f in files:
        out.update(json.loads(f.read_text())["kl"])
    return out


new = kl([HERE / "sens-smooth-even.json", HERE / "sens-smooth-odd.json"])
old = kl([HERE / "sens-unsmoothed-even.json", HERE / "sens-unsmoothed-odd.json"])  # the committed plans' sweep
cands = json.loads((HERE / "sens-smooth-even.json").read_text())["candidates"]
for t in "kv":
    for c in cands:
        o = [old[f"{i}.{t}.{c}"] for i in range(30)]
        w = [new[f"{i}.{t}.{c}"] for i in range(30)]
        print(f"{t} {c:<14} unsmoothed {sum(o):.5f} smoothed {sum(w):.5f} ratio {sum(w) / sum(o):.2f} "
              f"lower in {sum(a < b for a, b in zip(w, o))}/30 layers")
plans_new = json.loads((HERE / "plans-smooth.json").read_text())["plans"]
plans_old = json.loads((REPO / "bases" / "smollm2-135m.plans.json").read_text())["plans"]
for k in ("2x", "2.5x", "2.75x", "3x", "3.56x"):
    a, b = plans_new[k]["layers"], plans_old[k]["layers"]
    print(f"plan {k}: {sum(a[i][t] != b[i][t] for i in a for t in 'kv')} of 60 tensors differ")
