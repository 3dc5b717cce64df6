"""Tables (markdown, CSV, JSON) and plots of an experiment run (fastsam.experiments.compare)."""

from __future__ import annotations

import csv
import json
import math
import os
import statistics

RUN_FIELDS = ("config", "method", "micro_batch", "rho", "seed", "test_acc", "train_loss", "train_acc",
              "train_memorised", "hessian_max_eig", "hessian_iters", "hessian_converged", "m_sharpness",
              "wall_ms_per_step", "cpu_ms_per_step", "grad_evals_per_step", "forward_evals_per_step")
SUMMARY_FIELDS = ("config", "method", "micro_batch", "rho", "seeds", "test_acc_mean", "test_acc_std",
                  "train_loss_mean", "train_memorised_mean", "hessian_max_eig_mean", "hessian_max_eig_std",
                  "m_sharpness_mean", "wall_ms_per_step_mean", "cpu_ms_per_step_mean", "cpu_ms_per_step_std",
                  "grad_evals_per_step_mean", "forward_evals_per_step_mean")


def _mean_std(values):
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(runs: list[dict], configs: list[tuple[str, int]]) -> list[dict]:
    """One row per configuration (method, m): means and sample standard deviations over seeds."""
    rows = []
    for method, m in configs:
        mine = [r for r in runs if r["method"] == method and r["micro_batch"] == m]
        if not mine:
            continue
        acc, acc_std = _mean_std([r["test_acc"] for r in mine])
        eig, eig_std = _mean_std([r["hessian_max_eig"] for r in mine])
        rows.append(dict(
            config=mine[0]["config"], method=method, micro_batch=m, rho=mine[0]["rho"], seeds=len(mine),
            test_acc_mean=acc, test_acc_std=acc_std,
            train_loss_mean=_mean_std([r["train_loss"] for r in mine])[0],
            train_memorised_mean=_mean_std([r["train_memorised"] for r in mine])[0],
            hessian_max_eig_mean=eig, hessian_max_eig_std=eig_std,
            m_sharpness_mean=_mean_std([r["m_sharpness"] for r in mine])[0],
            wall_ms_per_step_mean=_mean_std([r["wall_ms_per_step"] for r in mine])[0],
            cpu_ms_per_step_mean=_mean_std([r["cpu_ms_per_step"] for r in mine])[0],
            cpu_ms_per_step_std=_mean_std([r["cpu_ms_per_step"] for r in mine])[1],
            grad_evals_per_step_mean=_mean_std([r.get("grad_evals_per_step") for r in mine])[0],
            forward_evals_per_step_mean=_mean_std([r.get("forward_evals_per_step") for r in mine])[0]))
    return rows


def markdown_table(summary: list[dict], meta: dict) -> str:
    a = meta["args"]
    lines = [
        f"Test accuracy on clean labels after {a['epochs']} epochs (mean ± sample std over {a['seeds']} seeds); "
        f"train loss and memorised share on the {a['label_noise']:g}-noisy training labels; "
        f"λ_max: top Hessian eigenvalue of the training loss on {a['hessian_examples']} fixed training examples "
        f"(power iteration, ≤ {a['hessian_iters']} iterations, tol {a['hessian_tol']:g}); "
        f"m-sharpness with m = {a['msharp_m']}, ρ = {a['msharp_rho']:g} on the same examples.",
        "",
        "Cost: gradient evaluations (examples through forward + backward) and forward-only "
        "evaluations per step, in units of the batch; CPU time per training step.",
        "",
        "| configuration | ρ | test acc (%) | train loss | memorised noisy labels (%) | λ_max | "
        "m-sharpness | grad evals/step | fwd-only/step | wall ms/step | CPU ms/step |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in summary:
        lines.append(
            f"| {row['config']} | {row['rho']:g} | {100 * row['test_acc_mean']:.2f} ± {100 * row['test_acc_std']:.2f} "
            f"| {row['train_loss_mean']:.3f} | {100 * row['train_memorised_mean']:.1f} "
            f"| {row['hessian_max_eig_mean']:.3g} ± {row['hessian_max_eig_std']:.2g} "
            f"| {row['m_sharpness_mean']:.3g} | {row['grad_evals_per_step_mean']:.3g} "
            f"| {row['forward_evals_per_step_mean']:.3g} | {row['wall_ms_per_step_mean']:.1f} "
            f"| {row['cpu_ms_per_step_mean']:.1f} |")
    return "\n".join(lines) + "\n"


def tuning_table(tuning: list[dict], meta: dict) -> str:
    if not tuning:
        return ""
    chosen = meta["hyperparameters"]["chosen_rho"]
    lines = ["| configuration | ρ | validation acc (%) (noisy labels) | chosen |", "|---|---:|---:|:-:|"]
    for r in tuning:
        mark = "✓" if chosen.get(r["config"]) == r["rho"] else ""
        lines.append(f"| {r['config']} | {r['rho']:g} | {100 * r['val_acc']:.2f} | {mark} |")
    return "\n".join(lines) + "\n"


def _write_csv(path, rows, fields):
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def write(out: str, runs: list[dict], tuning: list[dict], configs, meta: dict) -> list[str]:
    """Write every table and plot into ``out``; returns the file names written."""
    summary = summarise(runs, configs)
    written = []

    def path(name):
        written.append(name)
        return os.path.join(out, name)

    with open(path("results.json"), "w", encoding="utf-8") as handle:
        json.dump(dict(meta=meta, summary=summary, runs=runs, tuning=tuning), handle, indent=1)
    _write_csv(path("summary.csv"), summary, SUMMARY_FIELDS)
    _write_csv(path("runs.csv"), runs, RUN_FIELDS)
    if tuning:
        _write_csv(path("tuning.csv"), tuning, ("config", "method", "micro_batch", "rho", "seed", "val_acc",
                                                "wall_ms_per_step", "cpu_ms_per_step"))
    machine = meta["machine"]
    text = ["# fastsam experiment results", "", f"Command: `{meta['command']}`", "",
            f"Machine: {machine['platform']}, {machine['cpus']} CPUs ({machine['processor']}), "
            f"Python {machine['python']}, torch {machine['torch']}, fastsam {machine['fastsam']} "
            f"(SAM backend '{machine['sam_backend']}'); total {meta['total_seconds']:.0f} s.", "",
            markdown_table(summary, meta)]
    if tuning:
        text += ["", "ρ tuning (one run per candidate, seed "
                 f"{meta['args']['tune_seed']}, final-epoch accuracy on the validation split):", "",
                 tuning_table(tuning, meta)]
    with open(path("results.md"), "w", encoding="utf-8") as handle:
        handle.write("\n".join(text))
    written += plot(out, runs, summary, configs)
    return written


def plot(out: str, runs: list[dict], summary: list[dict], configs) -> list[str]:
    """test_accuracy_curves.png, accuracy_vs_sharpness.png and (with an m study) m_study.png."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install -e \".[experiments]\")")
        return []
    written = []
    palette, size = ("tab10", 10) if len(summary) <= 10 else ("tab20", 20)  # distinct colours for many configs
    colours = {config_name: plt.get_cmap(palette)(i % size) for i, config_name in enumerate(r["config"] for r in summary)}

    fig, ax = plt.subplots(figsize=(8, 5))
    for row in summary:
        curves = [r["curve"] for r in runs if r["config"] == row["config"]]
        epochs = range(1, len(curves[0]) + 1)
        mean = [statistics.fmean(c[i] for c in curves) for i in range(len(curves[0]))]
        std = [statistics.stdev(c[i] for c in curves) if len(curves) > 1 else 0.0 for i in range(len(curves[0]))]
        style = "-" if row["micro_batch"] == min(m for _, m in configs) else "--"
        ax.plot(epochs, [100 * v for v in mean], style, color=colours[row["config"]], label=row["config"])
        ax.fill_between(epochs, [100 * (a - s) for a, s in zip(mean, std)], [100 * (a + s) for a, s in zip(mean, std)],
                        color=colours[row["config"]], alpha=0.15)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy, clean labels (%)")
    ax.set_title("Test accuracy during training (mean ± std over seeds)")
    lows = [100 * min(r["curve"][len(r["curve"]) // 3:]) for r in runs if r["curve"]]
    if lows:
        ax.set_ylim(bottom=max(0.0, min(lows) - 2))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "test_accuracy_curves.png"), dpi=120)
    plt.close(fig)
    written.append("test_accuracy_curves.png")

    fig, ax = plt.subplots(figsize=(7, 5))
    for row in summary:
        mine = [r for r in runs if r["config"] == row["config"]]
        ax.scatter([r["hessian_max_eig"] for r in mine], [100 * r["test_acc"] for r in mine], s=18, alpha=0.5,
                   color=colours[row["config"]])
        ax.errorbar(row["hessian_max_eig_mean"], 100 * row["test_acc_mean"], xerr=row["hessian_max_eig_std"],
                    yerr=100 * row["test_acc_std"], fmt="o", ms=7, capsize=3, color=colours[row["config"]],
                    label=row["config"])
    positive = all(r["hessian_max_eig"] > 0 for r in runs)
    if positive:
        ax.set_xscale("log")
    ax.set_xlabel("top Hessian eigenvalue λ_max of the training loss" + (" (log scale)" if positive else ""))
    ax.set_ylabel("test accuracy, clean labels (%)")
    ax.set_title("Accuracy vs sharpness (small dots: seeds; big: mean ± std)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "accuracy_vs_sharpness.png"), dpi=120)
    plt.close(fig)
    written.append("accuracy_vs_sharpness.png")

    if all(row.get("grad_evals_per_step_mean") is not None for row in summary):
        written.append(plot_cost(out, summary, runs, colours, plt))

    sizes = sorted({m for _, m in configs})
    methods = [method for method in dict.fromkeys(method for method, _ in configs)
               if sum(1 for row in summary if row["method"] == method) > 1]
    if len(sizes) > 1 and methods:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
        width = 0.8 / len(sizes)
        for j, m in enumerate(sizes):
            rows = [next((r for r in summary if r["method"] == method and r["micro_batch"] == m), None)
                    for method in methods]
            xs = [i + (j - (len(sizes) - 1) / 2) * width for i in range(len(methods))]
            for ax, key, scale in ((axes[0], "test_acc", 100), (axes[1], "hessian_max_eig", 1)):
                heights = [scale * r[f"{key}_mean"] if r else float("nan") for r in rows]
                errors = [scale * r[f"{key}_std"] if r else 0.0 for r in rows]
                ax.bar(xs, heights, width, yerr=errors, capsize=3, label=f"m = {m}")
        for ax, label in ((axes[0], "test accuracy (%)"), (axes[1], "λ_max")):
            ax.set_xticks(range(len(methods)))
            ax.set_xticklabels(methods)
            ax.set_ylabel(label)
            ax.grid(alpha=0.3, axis="y")
            ax.legend(fontsize=8)
        accs = [100 * r["test_acc_mean"] for r in summary if r["method"] in methods]
        axes[0].set_ylim(bottom=max(0.0, min(accs) - 5), top=min(100.0, max(accs) + 3))
        axes[0].set_title("Perturbation sub-batch size m: accuracy")
        axes[1].set_title("... and sharpness")
        fig.tight_layout()
        fig.savefig(os.path.join(out, "m_study.png"), dpi=120)
        plt.close(fig)
        written.append("m_study.png")
    return written


def plot_cost(out: str, summary: list[dict], runs: list[dict], colours: dict, plt) -> str:
    """accuracy_vs_cost.png: test accuracy against gradient evaluations and against CPU time per step."""
    baseline = next((r for r in summary if r["method"] == "SGD"), None)
    # the axis starts a few points below the baseline; configurations further down are named at its foot
    floor = 100 * baseline["test_acc_mean"] - 4 if baseline else min(100 * r["test_acc_mean"] for r in summary) - 1
    below = [r for r in summary if 100 * r["test_acc_mean"] < floor]
    fig, axes = plt.subplots(1, 2, figsize=(15, 5.5))
    fig.subplots_adjust(left=0.05, right=0.84, wspace=0.18, bottom=0.1, top=0.93)
    for ax, key, label in ((axes[0], "grad_evals_per_step", "gradient evaluations per step (batches)"),
                           (axes[1], "cpu_ms_per_step", "CPU time per training step (ms)")):
        for row in summary:
            mine = [r for r in runs if r["config"] == row["config"]]
            ax.scatter([r[key] for r in mine], [100 * r["test_acc"] for r in mine], s=14, alpha=0.4,
                       color=colours[row["config"]])
            ax.errorbar(row[f"{key}_mean"], 100 * row["test_acc_mean"], yerr=100 * row["test_acc_std"],
                        xerr=row.get(f"{key}_std"), fmt="o", ms=7, capsize=3, color=colours[row["config"]],
                        label=row["config"])
            ax.annotate(row["method"], (row[f"{key}_mean"], 100 * row["test_acc_mean"]), fontsize=7,
                        xytext=(4, 4), textcoords="offset points")
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy, clean labels (%)")
        ax.grid(alpha=0.3)
        top = max(100 * (r["test_acc_mean"] + r["test_acc_std"]) for r in summary) + 1
        ax.set_ylim(floor, top)
        if baseline is not None and key == "grad_evals_per_step":
            ax.axvline(1.3 * baseline[f"{key}_mean"], color="grey", ls=":", lw=1)
            ax.text(1.3 * baseline[f"{key}_mean"], top, " 1.3x SGD", fontsize=7, color="grey", va="top")
        for row in below:
            ax.annotate(f"{row['method']}: {100 * row['test_acc_mean']:.1f}% (below)", (row[f"{key}_mean"], floor),
                        xytext=(0, 8), textcoords="offset points", fontsize=7, ha="center",
                        arrowprops=dict(arrowstyle="->", color=colours[row["config"]]), color=colours[row["config"]])
    axes[0].set_title("Accuracy vs gradient evaluations (mean ± std over seeds)")
    axes[1].set_title("Accuracy vs CPU time (shared machine: inflated, noisy)")
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.savefig(os.path.join(out, "accuracy_vs_cost.png"), dpi=120)
    plt.close(fig)
    return "accuracy_vs_cost.png"
