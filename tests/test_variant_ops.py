"""The efficient variants' ops (looksam_project_, looksam_combine_, friendly_direction_) of every
backend against the reference backend, on test_ops' tensor sets: odd sizes (0, 1, 3, 4097,
278011, more than one kernel chunk), 2000 tiny tensors and non-contiguous views (whose
neighbouring elements must stay untouched), in every dtype; and the reference itself
against numbers worked out by hand.
"""

from __future__ import annotations

import pytest
import torch

from fastsam import ops
from fastsam.ops import reference
from tests.conftest import DTYPES, assert_close_scaled, assert_lists_close, backend_cases, fast_backends
from tests.test_ops import KINDS, Case

VARIANT_OP_NAMES = ("looksam_project_", "looksam_combine_", "friendly_direction_")
needs_ext = pytest.mark.skipif(not fast_backends("cpu") or "cpp" not in fast_backends("cpu"),
                               reason="fastsam._C is not built")


@pytest.mark.parametrize("device,name", backend_cases())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("weight,init", [(0.375, True), (0.625, False)])
def test_looksam_project(device, name, dtype, kind, weight, init):
    case = Case(kind, dtype, device)
    backend = ops.get_backend(name, device)
    g_s, g = case.grads, case.grads2
    stats = reference.gsam_reduce(g_s, g)  # [<g_s, g>, ||g||^2]
    c = abs(stats[0].item()) / (stats[1].sqrt().item() + 1e-12) ** 2
    results = []
    for impl in (reference, backend):
        gv = case.clone_params()  # previous g_v (used unless init)
        impl.looksam_project_(gv, g_s, g, stats, weight, init, 1e-12)
        results.append(gv)
        if case.owners:
            case.check_outside_untouched(gv)
    magnitudes = [weight * (s.double().abs() + c * a.double().abs()) + (0.0 if init else v.double().abs())
                  for s, a, v in zip(g_s, g, case.params)]
    assert_lists_close(results[1], results[0], magnitudes)


@pytest.mark.parametrize("device,name", backend_cases())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_looksam_combine(device, name, dtype, kind):
    case = Case(kind, dtype, device)
    backend = ops.get_backend(name, device)
    gv = case.grads2
    grad_sumsq, gv_sumsq = reference.sumsq(case.params), reference.sumsq(gv)
    alpha = 0.7
    coefficient = alpha * grad_sumsq.sqrt().item() / (gv_sumsq.sqrt().item() + 1e-12)
    results = []
    for impl in (reference, backend):
        grads = case.clone_params()  # the gradients being combined: written in place (views too)
        impl.looksam_combine_(grads, gv, grad_sumsq, gv_sumsq, alpha, 1e-12)
        results.append(grads)
        if case.owners:
            case.check_outside_untouched(grads)
    magnitudes = [g.double().abs() + coefficient * v.double().abs() for g, v in zip(case.params, gv)]
    assert_lists_close(results[1], results[0], magnitudes)


@pytest.mark.parametrize("device,name", backend_cases())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("init", [True, False])
def test_friendly_direction(device, name, dtype, kind, init):
    case = Case(kind, dtype, device)
    backend = ops.get_backend(name, device)
    sigma, lam = 0.8, 0.9
    outputs = []
    for impl in (reference, backend):
        direction = [torch.full_like(p, 7.0) for p in case.clone_params()]  # overwritten: any values will do
        ema = case.clone_params()  # the old EMA: the parameters' values, in their layout
        total = impl.friendly_direction_(direction, ema, case.grads, sigma, lam, init)
        outputs.append((direction, ema, total))
        if case.owners:
            case.check_outside_untouched(ema)
    (ref_d, ref_m, ref_total), (got_d, got_m, got_total) = outputs
    if init:
        for d, m, g in zip(got_d, got_m, case.grads):
            assert torch.equal(d, g) and torch.equal(m, g), "init copies g into direction and EMA bit-exactly"
    else:
        assert_lists_close(got_d, ref_d, [g.double().abs() + sigma * m.double().abs()
                                          for g, m in zip(case.grads, case.params)])
        assert_lists_close(got_m, ref_m, [lam * m.double().abs() + (1 - lam) * g.double().abs()
                                          for g, m in zip(case.grads, case.params)])
    assert got_total.dtype == torch.float32 and got_total.dim() == 0 and got_total.device.type == device
    assert_close_scaled(got_total, ref_total, 0.0, dtype, reduction=True)
    # the norm is of the stored (rounded) direction, as perturb_ will read it
    assert_close_scaled(got_total, reference.sumsq(got_d), 0.0, dtype, reduction=True)
    for i in range(min(len(got_d), 10)):  # each tensor alone: a lost tail cannot hide in the total
        d, m = [torch.empty_like(got_d[i])], [case.clone_params()[i]]
        one = backend.friendly_direction_(d, m, [case.grads[i]], sigma, lam, init)
        assert_close_scaled(one, reference.sumsq(d), 0.0, dtype, reduction=True)


@pytest.mark.parametrize("name", ["reference"] + fast_backends("cpu"))
def test_variant_ops_on_empty_lists_and_tensors(name):
    backend = ops.get_backend(name, "cpu")
    backend.looksam_project_([], [], [], torch.zeros(2), 1.0, True)
    backend.looksam_combine_([], [], torch.tensor(1.0), torch.tensor(1.0), 0.5)
    assert backend.friendly_direction_([], [], [], 1.0, 0.9).item() == 0.0
    empty = [torch.empty(0), torch.empty(2, 0)]
    backend.looksam_project_(empty, empty, empty, torch.tensor([1.0, 2.0]), 1.0, False)
    backend.looksam_combine_(empty, empty, torch.tensor(1.0), torch.tensor(1.0), 0.5)
    assert backend.friendly_direction_([torch.empty(0)], [torch.empty(0)], [torch.empty(0)], 1.0, 0.9).item() == 0.0


def test_reference_variant_formulas_match_closed_forms():
    g = [torch.tensor([1.0, 0.0]), torch.tensor([0.0])]
    g_s = [torch.tensor([2.0, 3.0]), torch.tensor([4.0])]
    # <g, g_s> = 2, ||g||^2 = 1: g_v = g_s - 2 g = (0, 3, 4)
    stats = reference.gsam_reduce(g_s, g)
    assert stats.tolist() == [2.0, 1.0]
    gv = [torch.empty(2), torch.empty(1)]
    reference.looksam_project_(gv, g_s, g, stats, 1.0, True, 0.0)
    assert gv[0].tolist() == [0.0, 3.0] and gv[1].tolist() == [4.0]
    reference.looksam_project_(gv, g_s, g, stats, 0.5, False, 0.0)  # + 0.5 (0, 3, 4)
    assert gv[0].tolist() == [0.0, 4.5] and gv[1].tolist() == [6.0]
    # combine: ||grad|| = 5, ||g_v|| = 2 (g_v = (0, 2)): grad + 0.5 * 5/2 * (0, 2) = (3, 4 + 2.5)
    grads = [torch.tensor([3.0, 4.0])]
    reference.looksam_combine_(grads, [torch.tensor([0.0, 2.0])], torch.tensor(25.0), torch.tensor(4.0), 0.5, 0.0)
    assert grads[0].tolist() == [3.0, 6.5]
    # friendly: d = g - 0.5 m = (1 - 1, 2 + 1) = (0, 3); m = 0.9 m + 0.1 g = (1.9, -1.6)
    d, m = [torch.empty(2)], [torch.tensor([2.0, -2.0])]
    total = reference.friendly_direction_(d, m, [torch.tensor([1.0, 2.0])], 0.5, 0.9)
    torch.testing.assert_close(d[0], torch.tensor([0.0, 3.0]))
    torch.testing.assert_close(m[0], torch.tensor([1.9, -1.6]))
    assert total.item() == pytest.approx(9.0)


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=needs_ext),
                                    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
                                        not torch.cuda.is_available(), reason="no CUDA device")])])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck_variant_ops(device, dtype):
    """torch.library.opcheck: schemas, fake (meta) kernels and aliasing of the registered ops."""
    gen = torch.Generator().manual_seed(5)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    shapes = [(5,), (3, 4), (0,), (70,)]
    a, b, c = ([randn(*s) for s in shapes] for _ in range(3))
    strided = [randn(8, 6)[:, ::2], randn(5, 7).t()]
    strided_b = [randn(8, 3), randn(7, 5)]
    stats = torch.tensor([0.5, 2.0], device=device)
    one = torch.tensor(1.5, device=device)
    f = torch.ops.fastsam
    cases = [
        (f.looksam_project_, (a, b, c, stats, 0.5, True, 1e-12)),
        (f.looksam_project_, (strided, strided_b, strided_b, stats, 0.25, False, 1e-12)),
        (f.looksam_combine_, (a, b, one, one, 0.7, 1e-12)),
        (f.looksam_combine_, (strided, strided_b, one, one, 0.7, 1e-12)),
        (f.friendly_direction_, (a, b, c, 1.0, 0.9, False)),
        (f.friendly_direction_, ([torch.empty_like(t) for t in strided], strided, strided_b, 0.5, 0.6, True)),
    ]
    ran = set()
    for op, args in cases:
        torch.library.opcheck(op, args)
        ran.add(str(op).split(".")[-1])
    assert ran == set(VARIANT_OP_NAMES)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_variant_eager_and_dispatcher_paths_agree_bitwise(monkeypatch, dtype):
    """csrc/variant_eager.cpp against torch.ops.fastsam: the same bits, version counters bumped,
    and a GradsOf view of the gradients read like a list of them."""
    from fastsam.ops import compiled
    from tests.test_compiled_eager import NoOps, tensors
    backend = ops.get_backend("cpp", "cpu")

    def run_all(eager_path: bool):
        gv, gs, g = tensors(seed=1, dtype=dtype), tensors(seed=2, dtype=dtype), tensors(seed=3, dtype=dtype)
        params = [torch.nn.Parameter(t.clone(), requires_grad=True) for t in g]
        for p, t in zip(params, gs):
            p.grad = t.clone()
        grads_view = compiled.grads_view(params)
        stats = backend.gsam_reduce(gs, g)
        versions = [t._version for t in gv]
        backend.looksam_project_(gv, grads_view, g, stats, 0.5, False, 1e-12)
        if eager_path:  # like torch's in-place ops (the dispatcher's path leaves it to torch)
            assert [t._version for t in gv] == [v + 1 for v in versions]
        backend.looksam_combine_(grads_view, gv, backend.sumsq(gs), backend.sumsq(gv), 0.7, 1e-12)
        direction, ema = [torch.empty_like(t) for t in g], tensors(seed=4, dtype=dtype)
        total = backend.friendly_direction_(direction, ema, grads_view, 0.8, 0.9, False)
        return [stats, total] + gv + [p.grad for p in params] + direction + ema

    with monkeypatch.context() as m:
        m.setattr(compiled, "_ops", lambda: NoOps())
        eager = run_all(True)
    with monkeypatch.context() as m:
        m.setattr(compiled, "_eager", lambda: None)
        dispatched = run_all(False)
    for a, b in zip(eager, dispatched):
        assert torch.equal(a, b)


@needs_ext
def test_variant_ops_refuse_to_write_tensors_that_require_grad_in_grad_mode():
    backend = ops.get_backend("cpp", "cpu")
    p = torch.nn.Parameter(torch.randn(5))
    with pytest.raises(RuntimeError, match="under torch.no_grad"):
        backend.looksam_combine_([p], [torch.ones(5)], torch.tensor(1.0), torch.tensor(1.0), 0.5)
    with pytest.raises(RuntimeError, match="the lists must match one to one"):
        backend.friendly_direction_([torch.zeros(3)] * 2, [torch.zeros(3)], [torch.zeros(3)], 1.0, 0.9)


VARIANT_COMPILE_CHECK = """
    import os, re, subprocess, tempfile
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from fastsam.ops import triton_backend as tb, triton_variant_kernels as K

    COMMON = {"table": "*i64", "chunk_tensor": "*i64", "chunk_index": "*i64", "lane_tensor": "*i64",
              "lane_element": "*i64", "n_chunks": "i32", "n_lanes": "i32"}
    PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")

    def ptx(kernel, types, constexprs):
        signature = {n: "constexpr" if n in constexprs else types[n] for n in kernel.arg_names}
        aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(kernel.arg_names)
                   if signature[n].startswith("*")}
        source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=aligned)
        return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": tb.GPU_CONFIG.num_warps}).asm["ptx"]

    def spills(code):
        if not os.path.exists(PTXAS):
            return "-"
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(code)
        out = subprocess.run([PTXAS, "-v", "--gpu-name=sm_90a", f.name, "-o", os.devnull], capture_output=True,
                             text=True)
        os.unlink(f.name)
        return str(sum(int(n) for n in re.findall(r"(\\d+) bytes spill stores", out.stdout + out.stderr)))

    def sizes(dtype, roles):
        block, lanes = tb.GPU_CONFIG.blocking(dtype)
        return dict(ROLES=roles, BLOCK=block, LANES=lanes, ALIGNED=True)

    def lists(dtype, *names, **more):
        return dict(COMMON, **{n: dtype for n in names}, **more)

    cases = [
        (K.looksam_project_kernel, lists("*fp32", "gv_base", "gs_base", "g_base", stats="*fp32", weight="fp32",
                                         eps="fp32"), dict(INIT=False, **sizes(torch.float32, 3))),
        (K.looksam_project_kernel, lists("*bf16", "gv_base", "gs_base", "g_base", stats="*fp32", weight="fp32",
                                         eps="fp32"), dict(INIT=True, **sizes(torch.bfloat16, 3))),
        (K.looksam_combine_kernel, lists("*fp32", "g_base", "gv_base", grad_sumsq="*fp32", gv_sumsq="*fp32",
                                         alpha="fp32", eps="fp32"), sizes(torch.float32, 2)),
        (K.friendly_direction_kernel, lists("*fp32", "d_base", "m_base", "g_base", partials="*fp32", sigma="fp32",
                                            lam="fp32", one_minus_lam="fp32"), dict(INIT=False, **sizes(torch.float32, 3))),
        (K.friendly_direction_kernel, lists("*fp16", "d_base", "m_base", "g_base", partials="*fp32", sigma="fp32",
                                            lam="fp32", one_minus_lam="fp32"), dict(INIT=False, **sizes(torch.float16, 3))),
    ]
    for kernel, types, constexprs in cases:
        code = ptx(kernel, types, constexprs)
        print(kernel.__name__, len(re.findall(r"ld\\.global\\.v4", code)), spills(code))
"""


def test_variant_triton_kernels_compile_for_gpus_with_vector_accesses():
    """As tests/test_triton.py does for the core kernels: compile for sm_90 on this machine (no
    GPU needed), with 128-bit loads on the aligned path and no register spills."""
    from tests.test_triton import run_python
    result = run_python(VARIANT_COMPILE_CHECK, TRITON_INTERPRET="0")
    if result.returncode != 0 and ("No module named 'triton'" in result.stderr or "ptxas" in result.stderr):
        pytest.skip(f"cannot compile for CUDA here: {result.stderr.strip().splitlines()[-1]}")
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines()]
    assert len(rows) == 5
    for name, vector_loads, spill_bytes in rows:
        assert int(vector_loads) > 0, f"{name} has no 128-bit loads on its aligned path"
        assert spill_bytes in ("0", "-"), f"{name} spills {spill_bytes} bytes of registers"
