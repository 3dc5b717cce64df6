"""Fast checks of the benchmark CLI (fastsam.bench): outputs, errors and byte accounting.

These run the CLI on a toy workload in quick mode; they check that the numbers are made
and written correctly, never how fast anything is (speed claims come only from the CLI
and the pytest-benchmark suite on a quiet machine).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import sys
import time

import pytest
import torch

from fastsam import ops
from fastsam.bench import cli, engine, full_step, host, peers, report, variants, workloads
from fastsam.bench.engine import ITEMS, OP_ITEMS, Timer, bytes_moved, quantile

QUICK = ["--device", "cpu", "--workloads", "mini", "--quick", "--quiet"]


def _default_cpu_backends() -> list[str]:
    return [b for b in ops.available_backends("cpu") if b != "triton"]


def test_quick_run_writes_table_json_csv_and_plot(tmp_path, capsys):
    out_json, out_csv, out_png = tmp_path / "r.json", tmp_path / "r.csv", tmp_path / "r.png"
    rc = cli.main(QUICK + ["--json", str(out_json), "--csv", str(out_csv), "--plot", str(out_png)])
    assert rc == 0
    table = capsys.readouterr().out
    assert "SAM sub-step" in table and "copy bandwidth" in table

    result = json.loads(out_json.read_text())
    env = result["environment"]
    for key in ("device_name", "torch", "triton", "date", "load_average"):
        assert key in env
    assert env["torch"] == torch.__version__
    backends = _default_cpu_backends()
    assert result["settings"]["backends"][:2] == ["reference", "foreach"]
    assert sorted(result["settings"]["backends"]) == sorted(backends)
    rows = result["results"]
    assert {(r["backend"], r["item"]) for r in rows} == {(b, i) for b in backends for i in cli.ALL_ITEMS}
    copy_gbps = result["copy_bandwidth"]["GBps"]
    assert copy_gbps > 0
    n = workloads.WORKLOADS["mini"].numel
    mini = workloads.TensorSet(workloads.WORKLOADS["mini"], "cpu", torch.float32)
    for r in rows:
        assert r["error"] is None
        assert r["numel"] == n and r["tensors"] == 8
        assert r["bytes"] == (ITEMS[r["item"]].units * 4 * n if r["item"] in ITEMS
                              else variants.bytes_moved(r["item"], mini))
        assert r["reps"] >= 2 and 0 < r["min_ms"] <= r["median_ms"]
        assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert math.isclose(r["GBps"], r["bytes"] / (r["median_ms"] * 1e-3) / 1e9, rel_tol=1e-9)
        assert math.isclose(r["pct_copy_bw"], 100 * r["GBps"] / copy_gbps, rel_tol=1e-9)
        if r["backend"] == "reference":
            assert r["speedup_vs_reference"] == 1.0
        ref = next(x for x in rows if x["item"] == r["item"] and x["backend"] == "reference")
        assert math.isclose(r["speedup_vs_reference"], ref["median_ms"] / r["median_ms"], rel_tol=1e-9)

    with open(out_csv, newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(rows)
    assert all(row["device_name"] == env["device_name"] and row["torch"] == torch.__version__ for row in csv_rows)
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # --csv appends rows to a file with the same columns.
    assert cli.main(QUICK + ["--items", "sumsq", "--backends", "foreach", "--csv", str(out_csv)]) == 0
    with open(out_csv, newline="") as f:
        assert len(list(csv.DictReader(f))) == len(rows) + 1


@pytest.mark.parametrize("argv, message", [
    (["--workloads", "resnet5"], "unknown workload 'resnet5'"),
    (["--backends", "foreach,nope"], "unknown backend 'nope'"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--dtype", "fp8"], "unknown dtype 'fp8'"),
    (["--items", "sumsq,norm"], "unknown item 'norm'"),
    (["--bogus-option"], "unrecognized arguments"),
    (["--e2e", "--workloads", "gpt2"], "belong to the ops mode"),
    (["--e2e", "--peers"], "belong to the ops mode"),
    (["--peers", "--items", "sumsq,restore_"], "--peers needs the item sam_substep or gsam_substep"),
    (["--json", "/nonexistent-dir/r.json"], "does not exist"),
    (["--models", "resnet"], "--models belongs to --e2e"),
])
def test_bad_command_lines_exit_2_with_one_line(argv, message, capsys):
    started = time.perf_counter()
    assert cli.main(QUICK + argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastsam-bench: error: ") and message in err
    assert err.count("\n") == 1
    assert time.perf_counter() - started < 5  # refused before measuring anything


def test_unknown_e2e_model_exits_2(capsys):
    assert cli.main(["--device", "cpu", "--e2e", "--models", "resnet,gpt4"]) == 2
    assert "unknown model 'gpt4'" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda_is_a_clear_error(capsys):
    assert cli.main(["--device", "cuda", "--quick"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_unavailable_backend_is_a_clear_error(monkeypatch, capsys):
    reference = ops.get_backend("reference", "cpu")
    broken = ops.Backend(**{**{f: getattr(reference, f) for f in ops.OP_NAMES},
                            "name": "fake", "unavailable_reason": lambda device: "it was never built"})
    monkeypatch.setitem(ops._REGISTRY, "fake", broken)
    assert cli.main(QUICK + ["--backends", "fake"]) == 2
    err = capsys.readouterr().err
    assert "'fake'" in err and "it was never built" in err and err.count("\n") == 1


def test_a_backend_that_fails_to_load_is_left_out_of_a_default_run(monkeypatch, capsys):
    monkeypatch.setitem(ops._REGISTRY, "broken", "fastsam.no_such_module:BACKEND")
    backends, notes = cli.select_backends(None, torch.device("cpu"), torch.float32)
    assert "broken" not in backends and "foreach" in backends
    assert any("broken left out" in n and "ModuleNotFoundError" in n for n in notes)
    assert cli.main(QUICK + ["--backends", "broken"]) == 2
    assert "'broken' failed to load" in capsys.readouterr().err


def test_missing_matplotlib_is_a_clear_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    assert cli.main(QUICK + ["--plot", str(tmp_path / "p.png")]) == 2
    err = capsys.readouterr().err
    assert "matplotlib" in err and "pip install" in err and err.count("\n") == 1


def test_a_failing_backend_is_recorded_and_the_others_still_run(monkeypatch, tmp_path, capsys):
    foreach = ops.get_backend("foreach", "cpu")

    def broken_perturb(*args, **kwargs):
        raise RuntimeError("kernel exploded")

    monkeypatch.setitem(ops._REGISTRY, "flaky", ops.Backend(**{
        **{f: getattr(foreach, f) for f in ops.OP_NAMES if f != "perturb_"},
        "perturb_": broken_perturb, "name": "flaky", "unavailable_reason": lambda device: None}))
    out = tmp_path / "r.json"
    assert cli.main(QUICK + ["--backends", "foreach,flaky", "--json", str(out)]) == 1
    rows = json.loads(out.read_text())["results"]
    failed = {r["item"] for r in rows if r["error"]}
    # every item that perturbs: the SAM family's, and the variants' that do (fastsam.bench.variants)
    assert failed == {"perturb_", "sam_substep", "gsam_substep", "optimizer_substep", "kernels_substep",
                      "looksam_refresh", "msam_substep", "fsam_substep", "esam_swp_substep"}
    assert all("kernel exploded" in r["error"] for r in rows if r["error"])
    assert all(r["median_ms"] > 0 for r in rows if not r["error"])
    assert "FAILED" in capsys.readouterr().out


def test_bytes_follow_the_design_floor():
    """docs/DESIGN.md: sumsq 4N + perturb_ 16N + restore_ 8N = 28N bytes per fp32 SAM sub-step."""
    n = 278_011
    assert bytes_moved("sumsq", n, 4) == 4 * n
    assert bytes_moved("perturb_", n, 4) == 16 * n
    assert bytes_moved("restore_", n, 4) == 8 * n
    assert bytes_moved("sam_substep", n, 4) == 28 * n
    assert bytes_moved("sam_substep", n, 2) == 14 * n  # bf16
    assert bytes_moved("gsam_substep", n, 4) - bytes_moved("sam_substep", n, 4) == 24 * n  # "GSAM adds ~28N"
    parts = ("sumsq", "perturb_", "restore_")
    assert sum(bytes_moved(p, n, 4) for p in parts) == bytes_moved("sam_substep", n, 4)
    assert set(OP_ITEMS) | set(variants.OP_ITEMS) == set(ops.SUBSTEP_OP_NAMES + ops.VARIANT_OP_NAMES)  # fused steps: full_step.py; variants: variants.py


def test_workload_shapes_match_the_published_parameter_counts():
    expected = {"resnet50": (161, 25_557_032), "vit_b16": (152, 86_567_656), "gpt2": (148, 124_439_808)}
    for name, (tensors, params) in expected.items():
        w = workloads.WORKLOADS[name]
        assert (w.num_tensors, w.numel) == (tensors, params), name
    assert workloads.WORKLOADS["tiny"].num_tensors >= 4096
    assert workloads.parse_workloads(None) == ["resnet50", "vit_b16", "gpt2", "tiny"]


def test_timer_measures_what_it_times():
    s = engine.Settings(warmup_calls=2, warmup_s=0.0, warmup_cap_s=0.0, budget_s=0.02, min_reps=3, max_reps=5,
                        max_time_s=10.0, flush_mib=0, copy_mib=1)
    calls = []
    timing = Timer("cpu", settings=s).measure(lambda: calls.append(time.sleep(0.004)))
    assert 3 <= timing.reps <= 5
    assert len(calls) == timing.reps + 2  # two warm-up calls, then the timed ones
    assert 4.0 <= timing.min_ms <= timing.median_ms < 200.0

    # Slow calls: min_reps gives way to max_time_s, but never below 3 repetitions.
    slow = dataclasses.replace(s, min_reps=10, max_reps=100, max_time_s=0.05)
    reps, estimate = Timer("cpu", settings=slow).calibrate(lambda: time.sleep(0.01))
    assert estimate >= 0.01 and reps == max(3, int(0.05 / estimate))
    assert quantile([1.0, 2.0, 3.0, 4.0, 5.0], 0.2) == pytest.approx(1.8)
    assert quantile([3.0, 1.0, 2.0], 0.5) == 2.0


def test_each_timed_item_changes_what_it_should():
    """make_call runs the real op: a sub-step restores the weights bit for bit, perturb_ moves them."""
    ts = workloads.TensorSet(workloads.WORKLOADS["mini"], "cpu", torch.float32)
    backend = ops.get_backend("foreach", "cpu")
    before = [p.clone() for p in ts.params]
    engine.make_call("perturb_", backend, ts)()
    assert all(torch.equal(b, w) for b, w in zip(before, ts.backups))
    assert not all(torch.equal(b, w) for b, w in zip(before, ts.params))
    engine.make_call("restore_", backend, ts)()
    engine.make_call("sam_substep", backend, ts)()
    assert all(torch.equal(b, w) for b, w in zip(before, ts.params))
    total = engine.make_call("sumsq", backend, ts)()
    assert torch.allclose(total, sum(g.double().square().sum() for g in ts.grads).float(), rtol=1e-5)


def test_end_to_end_rows_for_base_and_each_backend(monkeypatch, tmp_path):
    from fastsam.bench import e2e, report

    monkeypatch.setattr(e2e, "MICRO_BATCH", 8)
    settings = e2e.E2ESettings(batch=16, image=8, warmup_steps=1, steps=2)
    backends = ["reference", "foreach"]
    rows = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops on a busy 2-core machine: 2 threads wait on each other (measured 10x)
    try:
        for name in ("resnet", "vit"):
            rows += e2e.run_model(e2e.MODELS[name], backends, torch.device("cpu"), torch.float32, settings)
    finally:
        torch.set_num_threads(threads)
    expected = []
    for m in ("resnet", "vit"):
        expected += [(m, "base", "-", 16)] + [(m, "sam", b, mb) for mb in (8, 16) for b in backends]
    assert [(r["model"], r["optimizer"], r["backend"], r["micro_batch"]) for r in rows] == expected
    for r in rows:
        assert r["error"] is None and r["reps"] == 2
        assert r["steps_per_s"] == pytest.approx(1e3 / r["median_ms"])
        assert r["fwd_bwd_ms"] > 0 and 0.0 <= r["outside_fwd_bwd_pct"] < 100.0
    assert [r["time_vs_base"] for r in rows if r["optimizer"] == "base"] == [1.0, 1.0]
    result = {"kind": "e2e", "environment": {"device_name": "cpu", "torch": torch.__version__, "triton": None,
                                             "date": "2026-01-01T00:00:00"},
              "settings": {"dtype": "fp32"}, "results": rows}
    assert "SAM foreach" in report.format_result(result)
    from fastsam.bench import plot
    plot.plot(result, str(tmp_path / "e2e.png"))
    assert (tmp_path / "e2e.png").read_bytes()[:4] == b"\x89PNG"


# -- peers --------------------------------------------------------------------------------------

def test_peers_are_timed_beside_the_backends_and_compared_in_the_tables(tmp_path, capsys):
    out_json, out_csv, out_png = tmp_path / "r.json", tmp_path / "r.csv", tmp_path / "r.png"
    argv = QUICK + ["--peers", "--items", "sumsq,sam_substep,gsam_substep", "--backends", "reference,foreach",
                    "--json", str(out_json), "--csv", str(out_csv), "--plot", str(out_png)]
    assert cli.main(argv) == 0
    table = capsys.readouterr().out
    result = json.loads(out_json.read_text())
    assert result["settings"]["peers"] == list(peers.PEERS)
    rows = result["results"]
    got = {(r["item"], r["backend"], r["kind"]) for r in rows}
    expected = {(i, b, "backend") for i in ("sumsq", "sam_substep", "gsam_substep") for b in ("reference", "foreach")}
    expected |= {(i, p, "peer") for i in ("sam_substep", "gsam_substep") for p in peers.peers_for(i)}
    assert got == expected
    assert "peer:loop has no GSAM sub-step (its original has none)" in result["notes"]
    for item in ("sam_substep", "gsam_substep"):
        mine = [r for r in rows if r["item"] == item]
        fastest = min((r for r in mine if r["kind"] == "peer"), key=lambda r: r["median_ms"])
        for r in mine:
            assert r["error"] is None and r["best_peer"] == fastest["backend"]
            assert math.isclose(r["speedup_vs_best_peer"], fastest["median_ms"] / r["median_ms"], rel_tol=1e-9)
            assert r["bytes"] == ITEMS[item].units * 4 * workloads.WORKLOADS["mini"].numel
        foreach = next(r for r in mine if r["backend"] == "foreach")
        assert f"{foreach['speedup_vs_best_peer']:.2f}x" in table
    assert all(r["best_peer"] is None and r["speedup_vs_best_peer"] is None for r in rows if r["item"] == "sumsq")
    assert "best peer" in table and "foreach vs peer" in table and "32N/28N" in table and "peer:best-effort" in table

    with open(out_csv, newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(rows) and list(csv_rows[0])[-len(engine.ROW_KEYS):] == list(engine.ROW_KEYS)
    assert {row["backend"] for row in csv_rows if row["kind"] == "peer"} == set(peers.PEERS)
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "peer:best-effort" in cli.list_everything()


def test_the_headline_table_marks_a_slower_backend_against_the_best_peer():
    def row(backend, kind, ms):
        return {"workload": "w", "item": "sam_substep", "backend": backend, "kind": kind, "numel": 10 ** 6,
                "tensors": 3, "median_ms": ms, "pct_copy_bw": 50.0}
    rows = [row("reference", "backend", 8.0), row("foreach", "backend", 2.5), row("cpp", "backend", 1.0),
            row("peer:a", "peer", 3.0), row("peer:b", "peer", 2.0)]
    engine.add_speedups(rows)
    table = report.headline_table({"results": rows})
    line = table.splitlines()[-1]
    assert "peer:b" in line and "2.000 [50%]" in line
    assert line.endswith("0.80x        2.00x")  # foreach is slower than the best peer; cpp twice as fast
    assert "reference vs peer" not in table


# -- host-time items ------------------------------------------------------------------------------

def test_host_items_time_the_optimizer_against_its_kernels(tmp_path, capsys):
    out = tmp_path / "r.json"
    backends = [b for b in ("foreach", "cpp") if b in _default_cpu_backends()]
    assert cli.main(QUICK + ["--items", "optimizer_substep,kernels_substep", "--backends", ",".join(backends),
                             "--json", str(out)]) == 0
    table = capsys.readouterr().out
    result = json.loads(out.read_text())
    rows = {(r["backend"], r["item"]): r for r in result["results"]}
    assert set(rows) == {(b, i) for b in backends for i in host.ITEMS}
    for b in backends:
        opt, kern = rows[(b, "optimizer_substep")], rows[(b, "kernels_substep")]
        assert opt["error"] is None and kern["error"] is None
        assert math.isclose(opt["optimizer_vs_kernels"], opt["median_ms"] / kern["median_ms"], rel_tol=1e-9)
        assert math.isclose(opt["host_overhead_ms"], opt["median_ms"] - kern["median_ms"], rel_tol=1e-9)
        assert math.isclose(opt["host_pct"], 100 * opt["host_overhead_ms"] / opt["median_ms"], rel_tol=1e-9)
        assert opt["host_ms"] is None and kern["optimizer_vs_kernels"] is None  # CPU: no enqueue time
        assert opt["goal"] is None  # mini has no goal
        assert f"{opt['optimizer_vs_kernels']:.2f}" in table
    assert "Host time" in table and "opt/kernels" in table
    assert {g["workload"] for g in result["settings"]["host_goals"]} == {"tiny", "resnet50"}


def _host_row(workload, backend, item, median, host_ms=None):
    row = dict.fromkeys(engine.ROW_KEYS)
    row.update(workload=workload, backend=backend, item=item, median_ms=median, host_ms=host_ms)
    return row


def test_host_goals_are_judged_on_the_measured_numbers():
    cpu = [_host_row("tiny", "cpp", "optimizer_substep", 1.2), _host_row("tiny", "cpp", "kernels_substep", 1.0),
           _host_row("resnet50", "cpp", "optimizer_substep", 10.4), _host_row("resnet50", "cpp", "kernels_substep", 10.0),
           _host_row("resnet50", "foreach", "optimizer_substep", 9.0)]  # no kernels row: no summary
    host.summarize(cpu, "cpu")
    tiny, resnet, lonely = cpu[0], cpu[2], cpu[4]
    assert tiny["optimizer_vs_kernels"] == pytest.approx(1.2) and tiny["goal"] == "optimizer/kernels <= 1.25"
    assert tiny["goal_met"] is True
    assert resnet["host_pct"] == pytest.approx(100 * 0.4 / 10.4) and resnet["goal_met"] is False  # 3.8% > 3%
    assert lonely["optimizer_vs_kernels"] is None and lonely["goal"] is None

    gpu = [_host_row("tiny", "cuda", "optimizer_substep", 2.0, host_ms=0.140),
           _host_row("tiny", "cuda", "kernels_substep", 1.9, host_ms=0.020),
           _host_row("tiny", "triton", "optimizer_substep", 2.5, host_ms=0.200),
           _host_row("tiny", "triton", "kernels_substep", 2.4, host_ms=0.050),
           _host_row("resnet50", "cuda", "optimizer_substep", 0.25, host_ms=0.031),
           _host_row("resnet50", "cuda", "kernels_substep", 0.20, host_ms=0.010)]
    host.summarize(gpu, "cuda")
    assert gpu[0]["host_overhead_ms"] == 0.140 and gpu[0]["host_pct"] == pytest.approx(7.0)
    assert (gpu[0]["goal"], gpu[0]["goal_met"]) == ("host <= 150 us per sub-step", True)
    assert (gpu[2]["goal"], gpu[2]["goal_met"]) == ("host <= 1.5x cuda's", True)  # 200 / 140 = 1.43
    assert (gpu[4]["goal"], gpu[4]["goal_met"]) == ("host <= 30 us per sub-step", False)


class _Spy:
    """fastsam._C's eager entry points, counted (or refusing, like a tensor subclass would be refused)."""

    def __init__(self, real, refuse=False):
        self.real, self.refuse, self.calls = real, refuse, []

    def __getattr__(self, name):
        def call(*args):
            self.calls.append(name)
            return NotImplemented if self.refuse else getattr(self.real, name)(*args)
        return call


def test_kernels_substep_calls_the_compiled_entry_points_directly(monkeypatch):
    if "cpp" not in _default_cpu_backends():
        pytest.skip("the cpp backend is not built here")
    from fastsam.ops import compiled
    ts = workloads.TensorSet(workloads.WORKLOADS["mini"], "cpu", torch.float32)
    w0 = [p.clone() for p in ts.params]
    spy = _Spy(compiled.load_extension())
    monkeypatch.setattr(compiled, "load_extension", lambda: spy)
    calls = host.make_calls("cpp", ops.get_backend("cpp", "cpu"), ts, engine.RHO)
    spy.calls.clear()
    calls["kernels_substep"]()
    assert spy.calls == ["sumsq", "perturb_", "restore_"]
    assert all(torch.equal(a, b) for a, b in zip(ts.params, w0))
    spy.refuse = True  # as for tensors the entry points do not take: no silent fallback to torch.ops
    with pytest.raises(RuntimeError, match="refused these tensors"):
        host.kernels_call(ops.get_backend("cpp", "cpu"), ts.params, ts.grads, ts.backups, engine.RHO)


def test_optimizer_substep_is_a_real_sam_step_on_parameters(monkeypatch):
    reference = ops.get_backend("reference", "cpu")
    seen = []

    def perturb_(params, *args, **kwargs):
        seen.append(("perturb_", [type(p) for p in params], [p.clone() for p in params]))
        reference.perturb_(params, *args, **kwargs)
        seen.append(("perturbed", None, [p.clone() for p in params]))

    monkeypatch.setitem(ops._REGISTRY, "spy", ops.Backend(**{
        **{f: getattr(reference, f) for f in ops.OP_NAMES if f != "perturb_"},
        "perturb_": perturb_, "name": "spy", "unavailable_reason": lambda device: None}))
    ts = workloads.TensorSet(workloads.WORKLOADS["mini"], "cpu", torch.float32)
    params = ts.parameters()
    assert all(isinstance(p, torch.nn.Parameter) and p.grad is g and p.data_ptr() == t.data_ptr()
               for p, g, t in zip(params, ts.grads, ts.params))
    w0 = [p.clone() for p in ts.params]
    host.optimizer_call("spy", params, engine.RHO)()
    assert [s[0] for s in seen] == ["perturb_", "perturbed"]
    assert all(t is torch.nn.Parameter for t in seen[0][1])
    expected = [w.clone() for w in w0]
    reference.perturb_(expected, ts.grads, [torch.empty_like(w) for w in w0], reference.sumsq(ts.grads), engine.RHO)
    assert all(torch.equal(a, b) for a, b in zip(seen[1][2], expected))  # it did perturb, as reference does
    assert all(torch.equal(a, b) for a, b in zip(ts.params, w0))  # and restored


def test_measure_many_interleaves_evenly_and_survives_a_failing_function():
    s = engine.Settings(warmup_calls=1, warmup_s=0.0, warmup_cap_s=0.0, budget_s=0.024, min_reps=2, max_reps=12,
                        max_time_s=10.0, flush_mib=0, copy_mib=1)
    timer = Timer("cpu", settings=s)
    order, calls = [], {"c": 0}

    def flaky():
        calls["c"] += 1
        if calls["c"] == 3:  # the warm-up call and one timed call work, then it breaks
            raise RuntimeError("broke mid-measurement")

    fast, slow, broken = timer.measure_many([lambda: order.append(time.sleep(0.002) or "a"),
                                             lambda: order.append(time.sleep(0.006) or "b"), flaky])
    assert isinstance(broken, RuntimeError) and "broke mid-measurement" in str(broken)
    assert fast.reps > slow.reps >= 2
    assert 2.0 <= fast.median_ms < slow.median_ms and slow.min_ms >= 6.0
    timed = order[-(fast.reps + slow.reps):]
    assert timed.count("a") == fast.reps and timed.count("b") == slow.reps
    for k in range(1, len(timed) + 1):  # every prefix: both equally far through their repetitions
        done_a, done_b = timed[:k].count("a") / fast.reps, timed[:k].count("b") / slow.reps
        assert abs(done_a - done_b) <= 1.0 / slow.reps + 1e-9, (k, timed)


def test_enqueue_times_cover_the_calls():
    timer = Timer("cpu", quick=True)
    times = timer.enqueue_times(lambda: time.sleep(0.003), estimate_ms=3.0)
    assert 3.0 <= times["host_ms"] <= times["wall_ms"] < 100
    assert times["host_p20_ms"] <= times["host_ms"] <= times["host_p80_ms"]


# -- module structure -------------------------------------------------------------------------------

def test_bench_modules_import_no_cycle():
    """Each module of fastsam.bench imports the others one way only (issue 13: no import cycles)."""
    import ast
    import pathlib

    import fastsam.bench
    folder = pathlib.Path(fastsam.bench.__file__).parent
    graph = {}
    for path in folder.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "fastsam.bench":
                deps |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fastsam.bench."):
                deps.add(node.module.split(".")[2])
            elif isinstance(node, ast.Import):
                deps |= {a.name.split(".")[2] for a in node.names if a.name.startswith("fastsam.bench.")}
        graph[path.stem] = deps - {path.stem}
    assert "cli" not in graph["report"] and "cli" in graph["__main__"]

    def reaches(start, target, seen=()):
        return any(d == target or (d not in seen and reaches(d, target, seen + (d,))) for d in graph.get(start, ()))
    cycles = [m for m in graph if reaches(m, m)]
    assert not cycles, f"import cycles through {cycles}: {graph}"


def test_full_step_items_in_the_ops_run(tmp_path):
    out, out_csv = tmp_path / "full.json", tmp_path / "full.csv"
    assert cli.main(QUICK + ["--items", "sam_substep", "--backends", "foreach,cpp", "--full-step",
                             "--json", str(out), "--csv", str(out_csv)]) == 0
    result = json.loads(out.read_text())
    with open(out_csv, newline="") as f:  # the full-step rows' extra columns are in the CSV too
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(result["results"])
    assert {r["speedup_fused_vs_unfused"] for r in csv_rows if r["kind"] == "full_step"} - {""} \
        and all(r["speedup_fused_vs_unfused"] == "" for r in csv_rows if r["kind"] != "full_step")
    rows = [r for r in result["results"] if r["kind"] == "full_step"]
    assert {(r["backend"], r["item"]) for r in rows} == {
        (b, f"sam_{o}_{v}") for b in ("foreach", "cpp") for o in ("sgd_momentum", "adamw") for v in full_step.VARIANTS}
    assert all(r["median_ms"] > 0 and r["speedup_fused_vs_unfused"] > 0 for r in rows)
    table = report.format_result(result)
    assert "Full SAM step with the base step" in table and "fused vs unfused" in table


@pytest.mark.slow  # 18 s on the 2-core CI machine
def test_e2e_has_the_cheap_methods(tmp_path):
    out = tmp_path / "e2e.json"
    assert cli.main(["--e2e", "--quick", "--quiet", "--backends", "cpp", "--models", "resnet", "--json",
                     str(out)]) == 0
    result = json.loads(out.read_text())
    methods = [r for r in result["results"] if r.get("kind") == "method"]
    assert {r["method"] for r in methods} == set(variants.E2E_METHODS)
    assert all(r["error"] is None and r["steps_per_s"] > 0 for r in methods)
    base = next(r for r in methods if r["method"] == "base")
    assert base["time_vs_base"] == 1.0
    assert "The cheap SAM variants end to end" in report.format_result(result)
