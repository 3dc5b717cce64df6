"""Writing benchmark results to files: JSON (the whole run) and CSV (one row per measurement).

Used by the CLI (fastsam.bench.cli) and by ``python -m fastsam.bench.report FILE.json --csv``;
neither imports the other.
"""

from __future__ import annotations

import csv
import json
import math
import os

ENV_COLUMNS = ("date", "device_name", "driver", "torch", "triton", "fastsam", "git_commit", "load_average")


class ResultsFileError(ValueError):
    """A results file cannot be written as asked (the message says why and what to do)."""


def clean(value):
    """JSON without NaN/inf (strict parsers reject them): those become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    return value


def write_json(path: str, result: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(clean(result), f, indent=1)
        f.write("\n")


def write_csv(path: str, result: dict) -> None:
    """Append one row per measurement, each prefixed with the machine, versions and date.

    A new file gets a header; an existing one must have the same columns (else
    ResultsFileError: rows of another mode or version would be misread)."""
    env = result["environment"]
    prefix = {k: env.get(k) for k in ENV_COLUMNS}
    prefix["load_average"] = "/".join(map(str, env["load_average"])) if env.get("load_average") else None
    prefix["mode"] = result["kind"] + (" quick" if result["settings"].get("quick") else "")
    rows = [{**prefix, **clean(r)} for r in result["results"]]
    # the union of every row's keys, in order of appearance (--full-step rows have extra columns)
    columns = list(dict.fromkeys(key for row in rows for key in row)) if rows else list(prefix)
    if os.path.exists(path) and os.path.getsize(path) > 0:
        with open(path, newline="", encoding="utf-8") as f:
            existing = next(csv.reader(f), [])
        if existing != columns:
            raise ResultsFileError(f"--csv {path} exists with other columns (a different mode or version); "
                                   "choose another file")
        mode = "a"
    else:
        mode = "w"
    with open(path, mode, newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        if mode == "w":
            writer.writeheader()
        writer.writerows(rows)
