"""fastsam.verify: the check users run on their own model finds a backend that disagrees.

Every backend available here (cpp, foreach, triton in the interpreter) must pass on a
small model for every variant; a backend broken on purpose (a perturbation 1e-3 too
long, a restore that is off by one ulp) must fail, through the Python API and through
the command line's exit status.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

import fastsam
from fastsam import ops
from fastsam.ops import reference
from fastsam.verify import VARIANTS, Variant, main, register_variant


def tiny_model():
    """A model for --model (tests.test_verify:tiny_model): odd sizes, a norm layer, a 0-d free bias."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(7, 13), torch.nn.LayerNorm(13), torch.nn.Tanh(), torch.nn.Linear(13, 3))


def broken(name: str, **overrides) -> ops.Backend:
    functions = {op: getattr(reference, op) for op in ops.OP_NAMES}
    functions.update(overrides)
    return ops.backend_from_functions(name, functions)


def long_perturb_(params, grads, backups, sumsq, rho, *args, **kwargs):
    reference.perturb_(params, grads, backups, sumsq, rho * 1.001, *args, **kwargs)


def sloppy_restore_(params, backups):
    reference.restore_(params, backups)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.nextafter(p, torch.full_like(p, float("inf"))))


@pytest.fixture
def broken_backends():
    ops.register_backend(broken("broken_perturb", perturb_=long_perturb_))
    ops.register_backend(broken("broken_restore", restore_=sloppy_restore_))
    yield ["broken_perturb", "broken_restore"]
    for name in ("broken_perturb", "broken_restore"):
        ops._REGISTRY.pop(name, None)


def test_every_backend_here_passes_every_variant():
    backends = [b for b in ops.available_backends("cpu") if b != "reference"]
    assert "cpp" in backends or "cpp" not in os.environ.get("FASTSAM_EXPECT_BACKENDS", "")
    report = fastsam.verify(tiny_model(), variants=list(VARIANTS), backends=backends, timing=False, steps=3)
    assert len(report.rows) == len(VARIANTS) * len(backends)
    assert report.ok, report.table()
    assert all(r["step_error"] <= 1.0 and r["trajectory_error"] <= 1.0 for r in report.rows)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_parameters(dtype):
    report = fastsam.verify(tiny_model(), variants=["sam", "gsam"], backends=["cpp", "foreach"], dtype=dtype,
                            timing=False, steps=3)
    assert report.ok, report.table()
    assert {r["dtype"] for r in report.rows} == {"bf16" if dtype == torch.bfloat16 else "fp16"}


def test_broken_backends_fail(broken_backends):
    report = fastsam.verify(tiny_model(), variants=["sam", "gsam"], backends=broken_backends, timing=False, steps=3)
    assert not report.ok
    assert all(not r["ok"] and r["error"] is None for r in report.rows), report.table()
    # the restore is off by one ulp only: the step check (not only the trajectory) sees it
    assert all(r["step_error"] > 1.0 for r in report.rows if r["backend"] == "broken_restore")


def test_a_backend_that_cannot_run_is_a_failure_with_its_reason():
    report = fastsam.verify(tiny_model(), backends=["cuda"] if not torch.cuda.is_available() else ["nonexistent"],
                            timing=False, steps=1)
    assert not report.ok and report.rows[0]["error"]


def test_new_variants_register_themselves():
    class CountingSAM(fastsam.SAM):
        made = 0

        def __init__(self, *args, **kwargs):
            CountingSAM.made += 1
            super().__init__(*args, **kwargs)

    register_variant(Variant("counting_sam", "a SAM subclass", dict(rho=0.05), optimizer_class=CountingSAM))
    try:
        report = fastsam.verify(tiny_model(), variants=["counting_sam"], backends=["cpp"], timing=False, steps=2)
        assert report.ok and CountingSAM.made > 0
        assert "--counting_sam" in _help()
    finally:
        VARIANTS.pop("counting_sam")


def _help() -> str:
    from fastsam.verify import build_parser
    return build_parser().format_help()


def test_inputs_shapes_and_tensors():
    model = tiny_model()
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    by_shapes = fastsam.verify(shapes, backends=["cpp"], timing=False, steps=2)
    by_params = fastsam.verify(list(model.parameters()), backends=["cpp"], timing=False, steps=2)
    assert by_shapes.ok and by_params.ok
    assert by_shapes.rows[0]["numel"] == by_params.rows[0]["numel"] == sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match="unknown variant"):
        fastsam.verify(model, variants=["nope"])
    with pytest.raises(TypeError, match="neither a tensor nor a shape"):
        fastsam.verify({"w": "3x3"})


def test_cli_json_timing_and_exit_status(tmp_path, broken_backends, capsys):
    out = tmp_path / "report.json"
    assert main(["--model", "tests.test_verify:tiny_model", "--backends", "cpp,foreach", "--sam", "--obf",
                 "--steps", "2", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["ok"] and report["environment"]["torch"] == torch.__version__
    assert {(r["variant"], r["backend"]) for r in report["results"]} == {
        (v, b) for v in ("sam", "obf") for b in ("cpp", "foreach")}
    assert all(r["ms"] > 0 and r["speedup"] > 0 for r in report["results"])
    table = capsys.readouterr().out
    assert "vs reference" in table and "all backends agree" in table
    shapes = tmp_path / "shapes.pt"
    torch.save({"a.weight": (5, 4), "a.bias": (5,)}, shapes)
    assert main(["--shapes", str(shapes), "--backends", "broken_perturb", "--no-timing", "--steps", "2"]) == 1
    assert "FAILED" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--model", "no_such_module:thing"])


def test_cli_runs_triton_in_the_interpreter_without_a_gpu(tmp_path):
    """A fresh process with TRITON_INTERPRET unset: naming triton on the CPU switches the interpreter on."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: triton runs there")
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")])
    out = tmp_path / "triton.json"
    proc = subprocess.run([sys.executable, "-m", "fastsam.verify", "--model", "tests.test_verify:tiny_model",
                           "--backends", "triton", "--gsam", "--steps", "2", "--no-timing", "--json", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out.read_text())["results"]
    assert [(r["backend"], r["ok"]) for r in rows] == [("triton", True)]
