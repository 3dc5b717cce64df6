"""Readable tables of benchmark results (ops and end-to-end), from rows or a saved JSON file.

``python -m fastsam.bench.report FILE.json`` prints the tables of a saved run again.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Optional

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
    """One line per workload, one column per backend: median ms [% of copy bandwidth]."""
    rows = [r for r in result["results"] if r["item"] == item]
    if not rows:
        return ""
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    cells = {(r["workload"], r["backend"]): r for r in rows}
    body = []
    for w in workloads:
        first = next(r for r in rows if r["workload"] == w)
        line = [w, _millions(first["numel"]), str(first["tensors"])]
        for b in backends:
            r = cells.get((w, b))
            if r is None:
                line.append("-")
            elif r["median_ms"] is None:
                line.append("FAILED")
            else:
                line.append(f"{r['median_ms']:.3f} [{r['pct_copy_bw']:.0f}%]")
        body.append(line)
    return _table(["workload", "params", "tensors"] + [f"{b} ms [%bw]" for b in backends], body, right=set(range(1, 3 + len(backends))))


def ops_table(result: dict) -> str:
    """Every measurement: one line per (workload, item, backend)."""
    rows = result["results"]
    order = {key: {v: i for i, v in enumerate(dict.fromkeys(r[key] for r in rows))}
             for key in ("workload", "item", "backend")}
    rows = sorted(rows, key=lambda r: tuple(order[k][r[k]] for k in ("workload", "item", "backend")))
    body, previous = [], None
    for r in rows:
        if previous is not None and (r["workload"], r["item"]) != previous:
            body.append([""] * 10)
        previous = (r["workload"], r["item"])
        body.append([r["workload"], r["item"], r["backend"], _num(r["median_ms"], ".3f", "FAILED"),
                     _pct(r["spread_pct"]), _num(r["reps"], "d"), _num(r["GBps"], ".1f"),
                     _num(r["pct_copy_bw"], ".1f"), _num(r.get("speedup_vs_reference"), ".2f"),
                     _num(r.get("speedup_vs_foreach"), ".2f")])
    return _table(["workload", "item", "backend", "median ms", "spread", "reps", "GB/s", "% copy",
                   "x ref", "x foreach"], body, right=set(range(3, 10)))


def e2e_table(result: dict) -> str:
    body = []
    for r in result["results"]:
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
        if not brief:
            out += ["", "All measurements (median over reps after warm-up; spread = (p80 - p20) / median; "
                    "x ref / x foreach = speed-up)", ops_table(result)]
    else:
        out += ["", "End-to-end training steps (% outside = share of step time outside forward/backward)",
                e2e_table(result)]
    for r in result["results"]:
        if r.get("error"):
            where = r.get("workload") or r.get("model")
            out.append(f"FAILED: {where} {r['backend']} {r.get('item', '')}: {r['error']}")
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
