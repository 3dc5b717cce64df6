"""Readable tables of benchmark results (ops and end-to-end), from rows or a saved JSON file.

``python -m fastsam.bench.report FILE.json`` prints the tables of a saved run again.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import textwrap
from typing import Optional

from fastsam.bench import variants as variants_mod
from fastsam.bench.results import ResultsFileError, write_csv


def _num(value, fmt: str, missing: str = "-") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    return format(value, fmt)


def _pct(value) -> str:
    return _num(value, ".0f") + "%" if value is not None else "-"


def _millions(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def _table(header: list[str], rows: list[list[str]], right: Optional[set] = None) -> str:
    right = right if right is not None else set(range(1, len(header)))
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]

    def line(cells):
        return "  ".join(str(c).rjust(w) if i in right else str(c).ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def headline_table(result: dict, item: str = "sam_substep") -> str:
    """One line per workload, one column per backend: median ms [% of copy bandwidth]; with peers
    in the run also the best peer and each non-reference backend's speed-up over it."""
    rows = [r for r in result["results"] if r["item"] == item]
    if not rows:
        return ""
    mine = [r for r in rows if r.get("kind", "backend") == "backend"]
    backends = list(dict.fromkeys(r["backend"] for r in mine))
    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    cells = {(r["workload"], r["backend"]): r for r in rows}
    with_peers = any(r.get("kind") == "peer" for r in rows)
    compared = [b for b in backends if b != "reference"] if with_peers else []
    body = []
    for w in workloads:
        first = next(r for r in rows if r["workload"] == w)
        line = [w, _millions(first["numel"]), str(first["tensors"])]
        line += [_time_cell(cells.get((w, b))) for b in backends]
        if with_peers:
            best = first.get("best_peer")
            line += [best or "-", _time_cell(cells.get((w, best))) if best else "-"]
            line += [_num(cells[(w, b)].get("speedup_vs_best_peer"), ".2f") + "x" if (w, b) in cells
                     and cells[(w, b)].get("speedup_vs_best_peer") else "-" for b in compared]
        body.append(line)
    header = ["workload", "params", "tensors"] + [f"{b} ms [%bw]" for b in backends]
    if with_peers:
        header += ["best peer", "peer ms [%bw]"] + [f"{b} vs peer" for b in compared]
    return _table(header, body, right=set(range(1, len(header))) - ({3 + len(backends)} if with_peers else set()))


def _time_cell(r: Optional[dict]) -> str:
    if r is None:
        return "-"
    if r["median_ms"] is None:
        return "FAILED"
    return f"{r['median_ms']:.3f} [{r['pct_copy_bw']:.0f}%]"


def peers_table(result: dict) -> str:
    """One line per (workload, item), one column per peer: median ms [% of copy bandwidth]."""
    rows = [r for r in result["results"] if r.get("kind") == "peer"]
    if not rows:
        return ""
    names = list(dict.fromkeys(r["backend"] for r in rows))
    keys = list(dict.fromkeys((r["workload"], r["item"]) for r in rows))
    cells = {(r["workload"], r["item"], r["backend"]): r for r in rows}
    body = [[w, i] + [_time_cell(cells.get((w, i, n))) for n in names] for w, i in keys]
    return _table(["workload", "item"] + [f"{n} ms [%bw]" for n in names], body, right=set(range(2, 2 + len(names))))


PEER_CAP_NOTE = (
    "On a memory-bound machine a fused backend's lead over the best peer is capped by the bytes: "
    "the best-effort foreach peer moves 32N bytes per fp32 SAM sub-step on the CPU (norm 4N, backup copy 8N, "
    "in-place update 12N, restore 8N; 40N on a GPU, where it must scale the gradient first) against the fused "
    "floor of 28N, so on the large workloads expect at most ~32N/28N = 1.14x on the CPU (~1.43x on a GPU). "
    "GSAM: 72N (GPU 96N) against 52N. Larger leads come from per-tensor overhead (tiny) or from a peer "
    "running below the machine's bandwidth.")


def host_table(result: dict) -> str:
    """One line per (workload, backend) of the host items: optimizer vs kernels, host time, goal."""
    rows = [r for r in result["results"] if r["item"] == "optimizer_substep"]
    if not rows:
        return ""
    kernels = {(r["workload"], r["backend"]): r for r in result["results"] if r["item"] == "kernels_substep"}
    gpu = result["environment"].get("device_type") == "cuda"
    body = []
    for r in rows:
        k = kernels.get((r["workload"], r["backend"]))
        met = r.get("goal_met")
        line = [r["workload"], r["backend"], _num(r["median_ms"], ".3f", "FAILED"),
                _num(k["median_ms"] if k else None, ".3f", "FAILED" if k else "-"),
                _num(r.get("optimizer_vs_kernels"), ".2f"),
                _num(r["host_overhead_ms"] * 1e3 if r.get("host_overhead_ms") is not None else None, ".0f"),
                _num(r.get("host_pct"), ".1f")]
        if gpu:
            line.insert(6, _num(k["host_ms"] * 1e3 if k and k.get("host_ms") is not None else None, ".0f"))
        line += [r.get("goal") or "", "" if not r.get("goal") else ("-" if met is None else "yes" if met else "NO")]
        body.append(line)
    header = ["workload", "backend", "optimizer ms", "kernels ms", "opt/kernels", "host us", "host %", "goal", "met"]
    if gpu:
        header[5] = "opt host us"
        header.insert(6, "kernels host us")
    return _table(header, body, right=set(range(2, len(header) - 2)))


HOST_TITLE_CPU = ("Host time: one SAM sub-step through fastsam.SAM (first_step + second_step, no-op base step, "
                  "check_finite off) against the same kernels called directly, timed interleaved; "
                  "host = optimizer - kernels (CPU ops are synchronous)")
HOST_TITLE_GPU = ("Host time: one SAM sub-step through fastsam.SAM (first_step + second_step, no-op base step, "
                  "check_finite off) against the same kernels called directly, timed interleaved; ms = device time "
                  "(CUDA events), host us = time to queue one sub-step, host % = of the optimizer's device time")


def full_step_table(result: dict) -> str:
    """One line per (workload, optimizer, backend): unfused and fused SAM step, speed-up."""
    rows = [r for r in result["results"] if r.get("kind") == "full_step"]
    if not rows:
        return ""
    pairs = {}
    for r in rows:
        optimizer, variant = r["item"][len("sam_"):].rsplit("_", 1)
        pairs.setdefault((r["workload"], optimizer, r["backend"]), {})[variant] = r
    body = []
    for (workload, optimizer, backend), pair in pairs.items():
        unfused, fused = pair.get("unfused"), pair.get("fused")
        body.append([workload, optimizer, backend, unfused.get("base_step", "") if unfused else "-",
                     _time_cell(unfused), _pct(unfused.get("spread_pct")) if unfused else "-",
                     _time_cell(fused), _pct(fused.get("spread_pct")) if fused else "-",
                     _num(fused.get("speedup_fused_vs_unfused") if fused else None, ".2f") + "x"])
    return _table(["workload", "optimizer", "backend", "unfused base step", "unfused ms [%bw]", "spread",
                   "fused ms [%bw]", "spread", "fused vs unfused"], body, right={4, 5, 6, 7, 8})


FULL_STEP_TITLE = ("Full SAM step with the base step (sumsq + perturb_, then restore_ + torch's step, or fastsam's "
                   "fused step from the backups; floors: SGD momentum 48N vs 40N, AdamW 56N vs 48N bytes in fp32): "
                   "median ms [% of copy bandwidth against each path's own floor]")


def ops_table(result: dict) -> str:
    """Every measurement: one line per (workload, item, backend)."""
    rows = [r for r in result["results"] if r.get("kind") != "full_step"]
    order = {key: {v: i for i, v in enumerate(dict.fromkeys(r[key] for r in rows))}
             for key in ("workload", "item", "backend")}
    rows = sorted(rows, key=lambda r: tuple(order[k][r[k]] for k in ("workload", "item", "backend")))
    body, previous = [], None
    for r in rows:
        if previous is not None and (r["workload"], r["item"]) != previous:
            body.append([""] * 12)
        previous = (r["workload"], r["item"])
        body.append([r["workload"], r["item"], r["backend"], _num(r["median_ms"], ".3f", "FAILED"),
                     _pct(r["spread_pct"]), _num(r["reps"], "d"), _num(r["GBps"], ".1f"),
                     _num(r["pct_copy_bw"], ".1f"), _num(r.get("speedup_vs_reference"), ".2f"),
                     _num(r.get("speedup_vs_foreach"), ".2f"), _num(r.get("speedup_vs_best_peer"), ".2f"),
                     _num(r["host_ms"] * 1e3 if r.get("host_ms") is not None else None, ".0f")])
    return _table(["workload", "item", "backend", "median ms", "spread", "reps", "GB/s", "% copy",
                   "x ref", "x foreach", "x peer", "host us"], body, right=set(range(3, 12)))


def methods_table(result: dict) -> str:
    """The cheap SAM variants end to end: steps/s and step time against the base optimizer alone."""
    rows = [r for r in result["results"] if r.get("kind") == "method"]
    if not rows:
        return ""
    body = [[r["model"], r["base"], r["method"], str(r["micro_batch"]), _num(r.get("steps_per_s"), ".2f"),
             _num(r.get("median_ms"), ".1f", "FAILED"), _pct(r.get("spread_pct")), _num(r.get("time_vs_base"), ".2f")]
            for r in rows]
    return _table(["model", "base", "method", "sub-batch", "steps/s", "step ms", "spread", "x base time"], body,
                  right=set(range(3, 8)))


def e2e_table(result: dict) -> str:
    body = []
    for r in result["results"]:
        if r.get("kind") == "method":
            continue
        label = "base only" if r["optimizer"] == "base" else f"SAM {r['backend']}"
        body.append([r["model"], f"{r['base']}", label, str(r["micro_batch"]), _num(r["steps_per_s"], ".2f"),
                     _num(r["median_ms"], ".1f", "FAILED"), _pct(r["spread_pct"]), _num(r["fwd_bwd_ms"], ".1f"),
                     _num(r["outside_fwd_bwd_pct"], ".1f"), _num(r["time_vs_base"], ".2f")])
    return _table(["model", "base", "optimizer", "sub-batch", "steps/s", "step ms", "spread",
                   "fwd/bwd ms", "% outside", "x base time"], body, right=set(range(3, 10)))


def environment_line(result: dict) -> str:
    env = result["environment"]
    parts = [env["device_name"]]
    if env.get("driver"):
        parts.append(f"driver {env['driver']}")
    parts += [f"torch {env['torch']}", f"triton {env['triton'] or '-'}", env["date"]]
    if env.get("load_average"):
        parts.append("load " + "/".join(str(x) for x in env["load_average"]))
    return " | ".join(parts)


def format_result(result: dict, brief: bool = False) -> str:
    """The tables of a run; ``brief``: only the sub-step headlines (ops) or the step table (e2e)."""
    out = [environment_line(result)]
    if result["kind"] == "ops":
        copy = result["copy_bandwidth"]
        out.append(f"copy bandwidth (measured, {copy['bytes'] / 2**20:.0f} MiB moved): {copy['GBps']:.1f} GB/s; "
                   f"dtype {result['settings']['dtype']}")
        for item, title in (("sam_substep", "SAM sub-step (sumsq + perturb_ + restore_, floor 7 x N x element size bytes)"),
                            ("gsam_substep", "GSAM sub-step (+ ascent copy, gsam_reduce, gsam_combine_; 13 x N x element size)")):
            table = headline_table(result, item)
            if table:
                out += ["", title + ": median ms [% of copy bandwidth]", table]
        for item in variants_mod.STEP_ITEMS:
            table = headline_table(result, item)
            if table:
                spec = variants_mod.ITEMS[item]
                out += ["", f"{item}: {spec.description} (floor {spec.units} x N x element size bytes): "
                        "median ms [% of copy bandwidth]", table]
        if any(r.get("kind") == "peer" for r in result["results"]):
            out += ["", "Peers (fastsam.bench.peers): median ms [% of copy bandwidth]", peers_table(result),
                    textwrap.fill(PEER_CAP_NOTE, 110)]
        table = host_table(result)
        if table:
            gpu = result["environment"].get("device_type") == "cuda"
            out += ["", textwrap.fill(HOST_TITLE_GPU if gpu else HOST_TITLE_CPU, 110), table]
        table = full_step_table(result)
        if table:
            out += ["", textwrap.fill(FULL_STEP_TITLE, 110), table]
        if not brief:
            out += ["", "All measurements (median over reps after warm-up; spread = (p80 - p20) / median; "
                    "x ref / x foreach / x peer = speed-up over reference, foreach, the best peer; "
                    "host us = GPU time to queue one call)", ops_table(result)]
    else:
        out += ["", "End-to-end training steps (% outside = share of step time outside forward/backward)",
                e2e_table(result)]
        table = methods_table(result)
        if table:
            out += ["", "The cheap SAM variants end to end (fastsam.bench.variants; backend auto; x base time = "
                    "step time over the base optimizer's alone)", table]
    for r in result["results"]:
        if r.get("error"):
            where = r.get("workload") or r.get("model")
            out.append(f"FAILED: {where} {r['backend']} {r.get('item') or r.get('method') or ''}: {r['error']}")
    for note in result.get("notes", []):
        out.append(f"note: {note}")
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastsam.bench.report",
                                     description="Print the tables of a saved fastsam-bench JSON file again.")
    parser.add_argument("json_file")
    parser.add_argument("--brief", action="store_true", help="only the headline tables")
    parser.add_argument("--csv", metavar="FILE", help="also append its rows to a CSV file (as fastsam-bench --csv)")
    args = parser.parse_args(argv)
    with open(args.json_file, encoding="utf-8") as f:
        result = json.load(f)
    print(format_result(result, brief=args.brief))
    if args.csv:
        try:
            write_csv(args.csv, result)
        except ResultsFileError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
