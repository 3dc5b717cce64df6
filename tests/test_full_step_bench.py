"""fastsam.bench.full_step: the full-SAM-step bench items (unfused vs fused base step)."""

from __future__ import annotations

import json

import torch

from fastsam.bench import full_step


def test_byte_floors_follow_docs_fused_steps():
    """docs/DESIGN.md §9: SGD momentum 48N vs 40N, AdamW 56N vs 48N (fp32), half in bf16."""
    n = 1000
    assert full_step.bytes_moved("sgd_momentum", "unfused", n, 4) == 48 * n
    assert full_step.bytes_moved("sgd_momentum", "fused", n, 4) == 40 * n
    assert full_step.bytes_moved("adamw", "unfused", n, 4) == 56 * n
    assert full_step.bytes_moved("adamw", "fused", n, 4) == 48 * n
    assert full_step.bytes_moved("adamw", "fused", n, 2) == 24 * n
    # two sub-batches (the accumulation table of §9): each 20N of sumsq + perturb_, then
    # restore_ 8N + accumulate_ 8N/12N + the step, against restore_accumulate_ 16N + step(accum)
    assert full_step.bytes_moved("sgd_momentum", "SAM_accum_unfused", n, 4) == 96 * n
    assert full_step.bytes_moved("sgd_momentum", "SAM_accum_fused", n, 4) == 80 * n
    assert full_step.bytes_moved("adamw", "SAM_accum_unfused", n, 4) == 104 * n
    assert full_step.bytes_moved("adamw", "SAM_accum_fused", n, 4) == 88 * n


def test_fused_and_unfused_items_take_the_same_step():
    """The two timed calls do the same arithmetic: after a few calls from the same buffers,
    the weights agree (torch's fused/foreach step against fastsam's from the backups)."""
    from fastsam import ops
    from fastsam.bench.workloads import WORKLOADS, TensorSet
    backend = ops.get_backend("auto", "cpu")
    for optimizer in full_step.OPTIMIZERS:
        sets = {v: TensorSet(WORKLOADS["mini"], "cpu", torch.float32) for v in full_step.VARIANTS}
        steps = {v: full_step.FullStep(optimizer, v, backend, sets[v]) for v in full_step.VARIANTS}
        with torch.no_grad():
            for _ in range(3):
                for v in full_step.VARIANTS:
                    steps[v]()
        for variant in ("fused", "SAM_unfused", "SAM_fused"):
            for a, b in zip(sets[variant].params, sets["unfused"].params):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=lambda m: f"{variant}: {m}")
        assert not torch.equal(sets["fused"].params[0], TensorSet(WORKLOADS["mini"], "cpu", torch.float32).params[0])
        # two sub-batches per step, both with the prepared gradient at weight 1/2: the same
        # step as one whole batch, unfused (torch's step) and fused
        for variant in ("SAM_accum_unfused", "SAM_accum_fused"):
            for a, b in zip(sets[variant].params, sets["unfused"].params):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=lambda m: f"{variant}: {m}")


def test_quick_run_writes_rows_with_speedups(tmp_path):
    out = tmp_path / "full_step.json"
    assert full_step.main(["--device", "cpu", "--workloads", "mini", "--quick", "--rounds", "1",
                           "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert {r["item"] for r in rows} == {full_step.item_name(o, v) for o in full_step.OPTIMIZERS
                                         for v in full_step.VARIANTS}
    assert all(r["median_ms"] > 0 and r["pct_copy_bw"] > 0 and r["speedup_fused_vs_unfused"] > 0 for r in rows)
    assert {r["base_step"] for r in rows if r["item"].endswith("_unfused")} <= {"torch fused", "torch foreach"}
    assert {r["base_step"] for r in rows if r["item"].endswith("_fused")} == {"fastsam fused"}


def test_unknown_workload_is_a_clear_error(capsys):
    assert full_step.main(["--device", "cpu", "--workloads", "nope", "--quick"]) == 2
    assert "unknown workloads" in capsys.readouterr().err
