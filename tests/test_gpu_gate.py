"""benchmarks/check_gpu_results.py, the bandwidth gate of the GPU workflow, on the recorded H200 run."""

from __future__ import annotations

import copy
import json
import shutil
import sys

sys.path.insert(0, "benchmarks")
import check_gpu_results as gate  # noqa: E402

RECORDED = "benchmarks/results/nvidia-h200-2026-11-26-3"


def recorded():
    with open(f"{RECORDED}/bench.json", encoding="utf-8") as f:
        return json.load(f)


def test_the_recorded_h200_run_passes_and_a_slow_fused_substep_fails(tmp_path, capsys):
    assert gate.check(recorded(), 0.70) == []
    assert gate.main([RECORDED]) == 0
    slow = copy.deepcopy(recorded())
    row = next(r for r in slow["results"] if (r["workload"], r["backend"], r["item"]) == ("gpt2", "triton", "sam_substep"))
    row["pct_copy_bw"] = 61.0
    problems = gate.check(slow, 0.70)
    assert len(problems) == 1 and "gpt2 triton" in problems[0]
    assert gate.check(recorded(), 0.90)  # the threshold is read: 83.5% fails at 90%
    (tmp_path / "bench.json").write_text(json.dumps(slow))
    assert gate.main([str(tmp_path)]) == 1
    shutil.rmtree(tmp_path)
    tmp_path.mkdir()
    assert gate.main([str(tmp_path)]) == 1  # no bench.json
    assert gate.check({"results": []}, 0.70)  # nothing fused measured
