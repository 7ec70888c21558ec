"""What a ring changes in the sensitivity sweep: per candidate and tensor, the one-at-a-time KL summed
over the 30 layers without a ring (the committed plans' sweep) and with the first token and the last 32
exact, and their ratio.

    python benchmarks/cpu-ring-plans-2026-12-05/ring_vs_plain.py
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
PLAIN = HERE.parent / "cpu-smooth-plans-2026-11-29"


def summed(files: list[Path]) -> dict[str, float]:
    kl: dict[str, float] = {}
    for f in files:
        kl.update(json.loads(f.read_text())["kl"])
    return kl


def main() -> None:
    plain = summed([PLAIN / "sens-unsmoothed-even.json", PLAIN / "sens-unsmoothed-odd.json"])
    ring = summed([HERE / "sweeps" / "sens-w32-even.json", HERE / "sweeps" / "sens-w32-odd.json"])
    print("| candidate | tensor | no ring | first 1 + last 32 exact | ratio |")
    print("|---|---|---|---|---|")
    for c in sorted({k.split(".", 2)[2] for k in ring}):
        for t in "kv":
            keys = [f"{i}.{t}.{c}" for i in range(30)]
            if not all(k in plain for k in keys):
                continue
            a, b = sum(plain[k] for k in keys), sum(ring[k] for k in keys)
            print(f"| {c} | {t.upper()} | {a:.4f} | {b:.4f} | {b / a:.3f} |")


if __name__ == "__main__":
    main()
