#!/usr/bin/env python
"""Two ``bench_kernels.py`` JSON files side by side: per shape and variant, the time of each run, the
ratio (second / first; below 1: the second is faster) and the second's % of copy bandwidth.

Made for A/B runs of one kernel change in one device call (``scripts/h200.sh scales-ab``): each run's
bandwidth is against its own copy measurement, the ratio is of raw times.

Example: ``python scripts/compare_kernel_runs.py before.json after.json``
"""

from __future__ import annotations

import argparse
import json
import sys


def rows(path: str) -> dict[tuple, dict]:
    """Timed decode rows of a bench_kernels.py JSON file, keyed by (model, batch, ctx, variant)."""
    with open(path) as f:
        data = json.load(f)
    return {(r["model"], r["batch"], r["ctx"], r["variant"]): r for r in data["decode"] if "ms" in r}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("first", help="bench_kernels.py JSON (A)")
    ap.add_argument("second", help="bench_kernels.py JSON (B)")
    args = ap.parse_args(argv)
    a, b = rows(args.first), rows(args.second)
    print(f"{'shape':20s} {'variant':24s} {'A ms':>8s} {'B ms':>8s} {'B/A':>6s} {'B % copy':>9s}")
    for key in sorted(set(a) | set(b)):
        model, batch, ctx, variant = key
        ra, rb = a.get(key, {}), b.get(key, {})
        ta, tb = ra.get("ms"), rb.get("ms")
        ratio = f"{tb / ta:6.2f}" if ta and tb else f"{'-':>6s}"
        print(f"{model[-9:]:9s} {batch:>3d} x {ctx // 1024:>2d}k  {variant:24s} "
              f"{ta if ta else float('nan'):8.4f} {tb if tb else float('nan'):8.4f} {ratio} "
              f"{rb.get('pct_copy', float('nan')):8.0f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
