"""Bench items of the efficient SAM variants (docs/ALGORITHMS.md §9), beside the SAM sub-step.

Ops mode: each variant's bookkeeping per step (or per sub-step), timed like fastsam.bench's
items (fastsam/bench/engine.py) on the same workloads, with its byte floor: every operand
read once and every result written once, in units of the tensors' element size per parameter:

    looksam_project_   reads g_v, g_s, g; writes g_v (init=False)                         4
    looksam_combine_   reads g, g_v; writes g                                             3
    friendly_direction_ reads g, m; writes d, m                                           4
    looksam_reuse      sumsq(g) + looksam_combine_                       1 + 3 =          4
    looksam_refresh    SAM sub-step with the ascent copy (1 + 5 + 2) + gsam_reduce(g_s, g)
                       (2) + looksam_project_ (init: 3) + sumsq(g_v) (1)                  14
    msam_substep       sumsq(v) + perturb_ from v (rho < 0) + restore_  1 + 4 + 2 =       7
    fsam_substep       friendly_direction_ + perturb_(d) + restore_      4 + 4 + 2 =      10
    esam_swp_substep   the SAM sub-step on a beta = 0.5 subset of the tensors             7 (x kept share)
    ae_gate            sumsq(g) and its value on the host (AE-SAM's one sync)             1

The SAM sub-step is 7 (engine.ITEMS["sam_substep"]); Every-k and randomised switching add
nothing on their plain steps. End-to-end mode: training steps per second of the cheap
methods against the base optimizer alone (fastsam/bench/e2e.py's models and data).

    python -m fastsam.bench.variants --device cpu --workloads resnet50,tiny
    python -m fastsam.bench.variants --e2e --models resnet
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import fastsam
from fastsam import ops
from fastsam.bench import e2e, engine
from fastsam.bench.engine import Item, Timer, Timing
from fastsam.bench.workloads import WORKLOADS, TensorSet, parse_workloads

ITEMS: dict[str, Item] = {i.name: i for i in (
    Item("looksam_project_", 4, "g_v <- g_v + w (g_s - <g,g_s>/||g||^2 g)"),
    Item("looksam_combine_", 3, "g <- g + alpha ||g||/||g_v|| g_v"),
    Item("friendly_direction_", 4, "d <- g - sigma m; m <- lam m + (1-lam) g; ||d||^2"),
    Item("looksam_reuse", 4, "LookSAM reuse step: sumsq(g) + looksam_combine_"),
    Item("looksam_refresh", 14, "LookSAM refresh: SAM sub-step with ascent copy + gsam_reduce + project + sumsq(g_v)"),
    Item("msam_substep", 7, "Momentum-SAM: sumsq(v) + perturb_(v, -rho) + restore_"),
    Item("fsam_substep", 10, "Friendly SAM sub-step: friendly_direction_ + perturb_(d) + restore_"),
    Item("esam_swp_substep", 7, "ESAM SWP sub-step on the kept half of the tensors (bytes of the kept ones)"),
    Item("ae_gate", 1, "AE-SAM gate: sumsq(g) read on the host"),
)}
OP_ITEMS = ("looksam_project_", "looksam_combine_", "friendly_direction_")
STEP_ITEMS = ("looksam_reuse", "looksam_refresh", "msam_substep", "fsam_substep", "esam_swp_substep", "ae_gate")
RHO, ALPHA, SIGMA, LAM = 0.05, 0.7, 1.0, 0.9


def esam_kept(ts: TensorSet) -> list[int]:
    """The tensors the ESAM item perturbs: every other one (a fixed stand-in for a beta = 0.5 draw)."""
    return list(range(0, len(ts.params), 2))


def bytes_moved(item: str, ts: TensorSet) -> int:
    """The floor of ``item`` on ``ts`` (ESAM's counts only the kept tensors)."""
    if item == "esam_swp_substep":
        numel = sum(ts.params[i].numel() for i in esam_kept(ts))
    else:
        numel = ts.numel
    return ITEMS[item].units * numel * ts.element_size


def make_call(item: str, b, ts: TensorSet) -> Callable[[], object]:
    """A no-argument function running ``item`` once with backend ``b`` on the buffers of ``ts``.

    Roles: ``ts.ascent`` holds g_v / the EMA / the momentum, ``ts.accum`` the direction
    scratch; repeated calls drift the values slightly and stay finite (as engine.make_call's).
    """
    w, g, bk, asc, acc = ts.params, ts.grads, ts.backups, ts.ascent, ts.accum
    if item == "looksam_project_":
        stats = b.gsam_reduce(g, asc)
        return lambda: b.looksam_project_(acc, g, asc, stats, 0.5, False)
    if item == "looksam_combine_":
        s_g, s_v = b.sumsq(g), b.sumsq(asc)
        return lambda: b.looksam_combine_(g, asc, s_g, s_v, ALPHA)
    if item == "friendly_direction_":
        return lambda: b.friendly_direction_(acc, asc, g, SIGMA, LAM, False)
    if item == "looksam_reuse":
        s_v = b.sumsq(asc)

        def looksam_reuse():
            b.looksam_combine_(g, asc, b.sumsq(g), s_v, ALPHA)
        return looksam_reuse
    if item == "looksam_refresh":
        def looksam_refresh():
            s = b.sumsq(g)
            b.perturb_(w, g, bk, s, RHO, ascent=asc)
            b.restore_(w, bk)
            stats = b.gsam_reduce(g, asc)  # g plays g_s here: the same bytes
            b.looksam_project_(acc, g, asc, stats, 1.0, True)
            return b.sumsq(acc)
        return looksam_refresh
    if item == "msam_substep":
        def msam_substep():
            s = b.sumsq(asc)
            b.perturb_(w, asc, bk, s, -RHO)
            b.restore_(w, bk)
        return msam_substep
    if item == "fsam_substep":
        def fsam_substep():
            s = b.friendly_direction_(acc, asc, g, SIGMA, LAM, False)
            b.perturb_(w, acc, bk, s, RHO)
            b.restore_(w, bk)
        return fsam_substep
    if item == "esam_swp_substep":
        kept = esam_kept(ts)
        kw, kg, kb = [w[i] for i in kept], [g[i] for i in kept], [bk[i] for i in kept]

        def esam_swp_substep():
            s = b.sumsq(kg)
            b.perturb_(kw, kg, kb, s, RHO / 0.5)
            b.restore_(kw, kb)
        return esam_swp_substep
    if item == "ae_gate":
        return lambda: float(b.sumsq(g))
    raise ValueError(f"unknown item {item!r}; choose from {', '.join(ITEMS)}")


def run_workload(timer: Timer, workload, backends: dict, items, dtype: torch.dtype, copy_gbps: float,
                 progress: Optional[Callable[[str], None]] = None) -> list[dict]:
    """Rows like engine.iter_workload's (same keys), for the variants' items."""
    ts = TensorSet(workload, timer.device, dtype)
    rows = []
    for item in items:
        for name, backend in backends.items():
            row = {"workload": workload.name, "backend": name, "item": item, "dtype": str(dtype).replace("torch.", ""),
                   "numel": ts.numel, "tensors": len(ts.params), "bytes": bytes_moved(item, ts)}
            try:
                row.update(timer.measure(make_call(item, backend, ts)).summary())
                row["error"] = None
            except Exception as exc:  # recorded in the row, as engine's
                row.update({key: None for key in engine.TIMING_KEYS})
                row["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            engine.derive(row, copy_gbps)
            if progress is not None:
                progress(f"{workload.name:9s} {name:10s} {item:18s} " + (
                    f"FAILED: {row['error']}" if row["error"] else
                    f"{row['median_ms']:10.3f} ms ({row['pct_copy_bw']:5.1f}% of copy bw, spread "
                    f"{row['spread_pct']:.0f}%, {row['reps']} reps)"))
            rows.append(row)
    del ts
    return rows


# -- end to end: the cheap methods against the base optimizer alone ---------------------------

E2E_METHODS = ("base", "SAM", "Every-4", "RST-0.25", "AE-SAM", "LookSAM", "MSAM", "ESAM-SWP")


def make_optimizer(method: str, model, base_cls, base_kwargs: dict, backend: str, total_steps: int):
    params = model.parameters()
    if method == "base":
        return base_cls(params, **base_kwargs)
    kw = dict(rho=0.05, backend=backend, **base_kwargs)
    if method == "SAM":
        return fastsam.SAM(params, base_cls, **kw)
    if method == "Every-4":
        return fastsam.SAM(params, base_cls, schedule=fastsam.schedules.Every(4), **kw)
    if method == "RST-0.25":
        return fastsam.SAM(params, base_cls, schedule=fastsam.schedules.Random(0.25), **kw)
    if method == "AE-SAM":
        return fastsam.SAM(params, base_cls, schedule=fastsam.schedules.Adaptive(total_steps), **kw)
    if method == "LookSAM":
        return fastsam.LookSAM(params, base_cls, k=5, alpha=0.2, **kw)
    if method == "MSAM":
        return fastsam.MomentumSAM(params, base_cls, **{**kw, "rho": 1.0})
    if method == "ESAM-SWP":
        return fastsam.ESAM(params, base_cls, beta=0.6, gamma=1.0, **kw)
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(E2E_METHODS)}")


def run_e2e(spec, device: torch.device, dtype: torch.dtype, settings, backend: str = "auto", methods=E2E_METHODS,
            micro_batch: Optional[int] = None, progress: Optional[Callable[[str], None]] = None) -> list[dict]:
    """Steps/s of each method on one model (fresh model each, same seed), timed round-robin after warm-up.

    The methods' costs average over their cycles (Every-4: one SAM step in four), so each is
    timed over a multiple of 20 steps (a whole number of Every-4 and LookSAM cycles).
    """
    timer = Timer(device)
    x, y = e2e.make_data(settings, device, dtype)
    micro = None if micro_batch is None or micro_batch >= settings.batch else micro_batch
    steps_per_round = 20
    runs = []
    for method in methods:
        model = e2e._fresh_model(spec, settings.image, device, dtype)
        base_cls, base_kwargs = spec.base()
        row = {"model": spec.name, "method": method, "base": base_cls.__name__, "backend": backend,
               "batch": settings.batch, "micro_batch": micro or settings.batch, "image": settings.image,
               "dtype": str(dtype).replace("torch.", ""), "error": None}
        try:
            opt = make_optimizer(method, model, base_cls, base_kwargs, backend,
                                 total_steps=(settings.warmup_steps + settings.steps) * steps_per_round)
        except Exception as exc:
            row["error"] = e2e._error(exc)
            runs.append((row, None))
            continue

        def step(model=model, opt=opt):
            for _ in range(steps_per_round):
                fastsam.train_step(model, opt, x, y, F.cross_entropy, micro_batch=micro)
        runs.append((row, step))
    times = {id(row): [] for row, _ in runs}
    for timed in [False] * settings.warmup_steps + [True] * settings.steps:
        for row, step in runs:
            if step is None or row["error"]:
                continue
            try:
                ms = timer.measure(step, reps=1).times_ms[0]
            except Exception as exc:
                row["error"] = e2e._error(exc)
                continue
            if timed:
                times[id(row)].append(ms / steps_per_round)
    rows = []
    for row, _ in runs:
        if times[id(row)]:
            timing = Timing(tuple(times[id(row)])).summary()
            row.update(timing, steps_per_s=1e3 / timing["median_ms"])
        rows.append(row)
    base = next((r for r in rows if r["method"] == "base" and r.get("median_ms")), None)
    for r in rows:
        r["time_vs_base"] = r["median_ms"] / base["median_ms"] if base and r.get("median_ms") else None
        if progress is not None:
            progress(f"{r['model']:6s} {r['method']:9s} " + (f"FAILED: {r['error']}" if r["error"] else
                     f"{r['steps_per_s']:8.2f} steps/s ({r['time_vs_base']:.2f}x the base step, spread "
                     f"{r['spread_pct']:.0f}%)"))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastsam.bench.variants", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backends", help="comma-separated (default: every available one but triton on the CPU)")
    parser.add_argument("--workloads", default="resnet50,tiny")
    parser.add_argument("--items", default=",".join(("sam_substep",) + OP_ITEMS + STEP_ITEMS))
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--e2e", action="store_true", help="steps/s of the cheap methods against the base optimizer")
    parser.add_argument("--models", default="resnet", help="--e2e models (from fastsam.bench.e2e.MODELS)")
    parser.add_argument("--micro-batch", type=int, default=None, help="--e2e perturbation sub-batch (default: none)")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16

    def progress(message):
        print(message, file=sys.stderr, flush=True)

    if args.e2e:
        settings = e2e.E2ESettings.for_device(device, args.quick)
        rows = []
        for name in args.models.split(","):
            rows += run_e2e(e2e.MODELS[name], device, dtype, settings, micro_batch=args.micro_batch,
                            progress=progress)
    else:
        names = args.backends.split(",") if args.backends else [
            n for n in ops.available_backends(device) if not (device.type == "cpu" and n == "triton")]
        backends = {n: ops.get_backend(n, device, dtype) for n in names}
        timer = Timer(device, quick=args.quick)
        copy = timer.copy_bandwidth()
        progress(f"copy bandwidth {copy['GBps']:.1f} GB/s (median of {copy['reps']})")
        rows = []
        items = args.items.split(",")
        for workload in parse_workloads(args.workloads):
            core = [i for i in items if i in engine.ITEMS]
            mine = [i for i in items if i in ITEMS]
            rows += engine.run_workload(timer, WORKLOADS[workload], backends, core, dtype, copy["GBps"], progress)
            rows += run_workload(timer, WORKLOADS[workload], backends, mine, dtype, copy["GBps"], progress)
        rows = [{**r, "copy_GBps": copy["GBps"]} for r in rows]
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"device": str(device), "rows": rows}, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
