"""Plots of benchmark results (matplotlib is an optional extra: ``pip install 'fastsam[plot]'``).

Ops results: one column per workload; top row the median time of each item (log scale),
bottom row its achieved bandwidth as % of the measured copy bandwidth; one bar per backend
(peers, where timed, hatched).
End-to-end results: one column per model; steps/s and the share of step time outside
forward/backward, per configuration. ``python -m fastsam.bench.plot RESULT.json OUT.png``
draws a saved run again. matplotlib is imported here only.
"""

from __future__ import annotations

import json
import sys


class PlotUnavailableError(RuntimeError):
    pass


def require_matplotlib():
    """matplotlib.pyplot (Agg backend), or PlotUnavailableError saying how to install it."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise PlotUnavailableError(
            f"--plot needs matplotlib, which cannot be imported ({exc}); "
            "install it with: pip install 'fastsam[plot]' (or pip install matplotlib)") from None
    return plt


def _grouped_bars(ax, groups: list[str], series: dict, log: bool = False, hatched=()):
    n = max(1, len(series))
    width = 0.8 / n
    for i, (label, values) in enumerate(series.items()):
        xs = [g + (i - (n - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, [v if v is not None else 0.0 for v in values], width, label=label,
               hatch="//" if label in hatched else None)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=45, ha="right", fontsize=7)
    if log:
        ax.set_yscale("log")
    ax.grid(axis="y", alpha=0.3)


def _title(result: dict) -> str:
    env = result["environment"]
    versions = [f"torch {env['torch']}", f"triton {env.get('triton') or '-'}", env["date"][:10]]
    if env.get("driver"):
        versions.insert(0, f"driver {env['driver']}")
    return env["device_name"] + "\n" + " | ".join(versions)


def _size(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def plot_ops(result: dict, path: str) -> None:
    plt = require_matplotlib()
    rows = result["results"]
    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    peer_names = {r["backend"] for r in rows if r.get("kind") == "peer"}  # drawn hatched
    items = list(dict.fromkeys(r["item"] for r in rows))
    cell = {(r["workload"], r["item"], r["backend"]): r for r in rows}
    fig, axes = plt.subplots(2, len(workloads), figsize=(max(6.5, 4.2 * len(workloads) + 1), 8), squeeze=False)
    for col, w in enumerate(workloads):
        times = {b: [cell[(w, i, b)]["median_ms"] if (w, i, b) in cell else None for i in items] for b in backends}
        pct = {b: [cell[(w, i, b)]["pct_copy_bw"] if (w, i, b) in cell else None for i in items] for b in backends}
        first = next(r for r in rows if r["workload"] == w)
        _grouped_bars(axes[0][col], items, times, log=True, hatched=peer_names)
        axes[0][col].set_title(f"{w} ({_size(first['numel'])} params, {first['tensors']} tensors)", fontsize=9)
        _grouped_bars(axes[1][col], items, pct, hatched=peer_names)
        axes[1][col].axhline(100.0, color="black", lw=0.8, ls="--")
    axes[0][0].set_ylabel("median time (ms, log)")
    axes[1][0].set_ylabel("% of measured copy bandwidth")
    axes[0][-1].legend(fontsize=8)
    copy = result["copy_bandwidth"]["GBps"]
    fig.suptitle(f"fastsam ops, {result['settings']['dtype']}: {_title(result)}\n"
                 f"copy bandwidth {copy:.1f} GB/s (dashed line = 100%)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_e2e(result: dict, path: str) -> None:
    plt = require_matplotlib()
    rows = [r for r in result["results"] if r.get("kind") != "method"]  # the cheap variants: a table only
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(2, len(models), figsize=(max(6.5, 5 * len(models) + 1), 7.5), squeeze=False)
    for col, m in enumerate(models):
        mine = [r for r in rows if r["model"] == m]
        labels = [("base" if r["optimizer"] == "base" else f"SAM {r['backend']}") + f"\nm={r['micro_batch']}" for r in mine]
        axes[0][col].bar(range(len(mine)), [r["steps_per_s"] or 0.0 for r in mine], color="tab:blue")
        axes[1][col].bar(range(len(mine)), [r["outside_fwd_bwd_pct"] or 0.0 for r in mine], color="tab:orange")
        for ax in (axes[0][col], axes[1][col]):
            ax.set_xticks(range(len(mine)))
            ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=7)
            ax.grid(axis="y", alpha=0.3)
        axes[0][col].set_title(f"{m} ({_size(mine[0]['params'])} params, batch {mine[0]['batch']}, "
                              f"{mine[0]['image']} px)", fontsize=9)
    axes[0][0].set_ylabel("training steps / s")
    axes[1][0].set_ylabel("% of step time outside fwd/bwd")
    fig.suptitle(f"fastsam end-to-end, {result['settings']['dtype']}: {_title(result)}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot(result: dict, path: str) -> None:
    (plot_ops if result["kind"] == "ops" else plot_e2e)(result, path)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m fastsam.bench.plot RESULT.json OUT.png", file=sys.stderr)
        return 2
    with open(argv[0], encoding="utf-8") as f:
        result = json.load(f)
    try:
        plot(result, argv[1])
    except PlotUnavailableError as exc:
        print(f"fastsam.bench.plot: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
