"""Fail when a fused backend's SAM sub-step is slow: the gate of .github/workflows/gpu.yml.

    python benchmarks/check_gpu_results.py RESULTS_DIR [--min-copy-share 0.70]

Reads RESULTS_DIR/bench.json (written by benchmarks/gpu_check.sh) and checks, for each fused
backend (cuda, triton) and each workload that is not launch-bound (every workload but
"tiny" and "mini", whose 4096 small tensors measure the host, not the memory), that the SAM
sub-step reaches at least the given share of the copy bandwidth measured in the same run
(the bench's pct_copy_bw, which counts docs/DESIGN.md's floor of 28N bytes). Exits 1 with a
line per shortfall, and also when bench.json is missing, has no fused SAM sub-step rows, or
holds failed rows. Default share 0.70: the recorded H200 run
(benchmarks/results/nvidia-h200-2026-11-26-3) measured 83.5-93.8%.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

FUSED = ("cuda", "triton")
LAUNCH_BOUND = ("tiny", "mini")


def check(result: dict, min_share: float) -> list[str]:
    """The problems with one bench.json (empty: it passes)."""
    problems, checked = [], 0
    for row in result.get("results", []):
        if row.get("backend") not in FUSED or row.get("item") != "sam_substep":
            continue
        where = f"{row['workload']} {row['backend']} sam_substep"
        if row.get("error"):
            problems.append(f"{where}: failed: {row['error']}")
            continue
        if row.get("workload") in LAUNCH_BOUND:
            continue
        share = (row.get("pct_copy_bw") or 0.0) / 100.0
        checked += 1
        if share < min_share:
            problems.append(f"{where}: {share:.1%} of the copy bandwidth < {min_share:.0%} "
                            f"({row['median_ms']:.3f} ms median)")
        else:
            print(f"ok  {where}: {share:.1%} of the copy bandwidth ({row['median_ms']:.3f} ms)")
    if not checked and not problems:
        problems.append("no fused (cuda/triton) SAM sub-step of a bandwidth-bound workload in bench.json")
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results_dir")
    parser.add_argument("--min-copy-share", type=float, default=0.70)
    args = parser.parse_args(argv)
    path = os.path.join(args.results_dir, "bench.json")
    if not os.path.exists(path):
        print(f"FAIL: {path} is missing (did the bench stage of gpu_check.sh run?)")
        return 1
    with open(path, encoding="utf-8") as f:
        problems = check(json.load(f), args.min_copy_share)
    for line in problems:
        print(f"FAIL {line}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
