"""The triton backend beyond what test_ops/test_trajectories check for every backend.

The launch planner (every element covered exactly once, tiny tensors packed), the cache
of launches (re-validated when a tensor is replaced, never stale for a new size, layout
or dtype at the same address), tiny blocks that give many programs from few elements,
the availability messages, that the kernels compile for GPUs (checked on the CPU), and
GPU-only checks (marked ``gpu``) that a later session runs on a lent GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import weakref

import pytest
import torch

from fastsam import ops
from fastsam.ops import reference
from fastsam.ops import triton_backend as tb
from tests.conftest import DTYPES, assert_close_scaled, assert_lists_close, assert_lists_equal, expected_backends

REASON_CPU = tb.unavailable_reason("cpu")
needs_kernels_on_cpu = pytest.mark.skipif(REASON_CPU is not None, reason=f"triton on cpu: {REASON_CPU}")
HAS_CUDA = torch.cuda.is_available()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(code: str, **env_changes) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (fresh imports) from the repository root."""
    env = {**os.environ, "PYTHONPATH": ROOT}
    for name, value in env_changes.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


# -- the planner ----------------------------------------------------------------------------

def coverage(plan: tb.Plan) -> torch.Tensor:
    """How many times each element of the concatenated tensors is covered by the plan."""
    numels = torch.tensor(plan.numels, dtype=torch.int64)
    starts = torch.cumsum(numels, 0) - numels
    chunk_elements = (starts[plan.chunk_tensor] + plan.chunk_index * plan.block).unsqueeze(1) \
        + torch.arange(plan.block).unsqueeze(0)
    lane_elements = starts[plan.lane_tensor] + plan.lane_element
    covered = torch.cat([chunk_elements.reshape(-1), lane_elements])
    return torch.bincount(covered, minlength=int(numels.sum()))


ODD = [4097, 1, 3, 0, 278011, 105, 2 ** 19 + 7]


@pytest.mark.parametrize("numels,block,lanes", [
    (ODD, 1, 1), (ODD, 7, 3), (ODD, 64, 64), (ODD, 4096, 1024), (ODD, 65536, 65536), (ODD, 2 ** 20, 1024),
    ([5], 8, 8), ([8], 8, 2), ([0, 0], 8, 8), ([], 16, 4),
    (torch.randint(0, 40, (2000,), generator=torch.Generator().manual_seed(0)).tolist(), 8, 4),
])
def test_plan_covers_every_element_exactly_once(numels, block, lanes):
    plan = tb.build_plan(numels, block, lanes)
    counts = coverage(plan)
    assert counts.numel() == sum(numels)
    assert bool((counts == 1).all()), "an element is covered twice or not at all"
    sizes = torch.tensor(numels, dtype=torch.int64)
    if plan.n_chunks:  # chunk programs are full blocks: the kernels do not mask them
        assert bool(((plan.chunk_index + 1) * block <= sizes[plan.chunk_tensor]).all())
    if plan.n_lanes:
        assert bool((plan.lane_element < sizes[plan.lane_tensor]).all())
        assert bool((plan.lane_tensor[1:] >= plan.lane_tensor[:-1]).all())
    assert plan.n_chunks == sum(n // block for n in numels)
    assert plan.n_lanes == sum(n % block for n in numels)
    assert plan.n_programs == plan.n_chunks + -(-plan.n_lanes // lanes)


def test_plan_packs_tiny_tensors_into_few_programs():
    """2000 tensors of 1-9 elements share a few lane programs, not one program each."""
    numels = torch.randint(1, 10, (2000,), generator=torch.Generator().manual_seed(0)).tolist()
    plan = tb.build_plan(numels, 4096, 1024)
    assert plan.n_chunks == 0 and plan.n_programs == -(-sum(numels) // 1024) <= 10


def test_device_plan_arrays_are_the_plan_and_16_byte_aligned():
    """Triton compiles for each pointer's alignment: the plan's arrays must always be aligned."""
    numels = (5, 17, 3, 40)
    for blocking in ((8, 4), (16, 16), (4, 2)):
        plan = tb.build_plan(numels, *blocking)
        device_plan = tb._device_plan(torch.device("cpu"), blocking, numels)
        expected = (plan.chunk_tensor, plan.chunk_index, plan.lane_tensor, plan.lane_element)
        for array, wanted in zip(device_plan.arrays, expected):
            assert torch.equal(array, wanted) and array.data_ptr() % 16 == 0
        assert (device_plan.n_chunks, device_plan.n_lanes, device_plan.n_programs) == \
            (plan.n_chunks, plan.n_lanes, plan.n_programs)


def test_plan_rejects_bad_blocks():
    with pytest.raises(ValueError, match="block and lanes must be positive"):
        tb.build_plan([3], 0)
    with pytest.raises(ValueError, match="block and lanes must be positive"):
        tb.build_plan([3], 4, 0)


# -- kernels on many programs (tiny blocks) ---------------------------------------------------

SMALL = [0, 1, 15, 16, 17, 0, 33, 100, 3]  # 16-element blocks, 4 lanes: full chunks, tails, tiny, empty


def small_case(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    make = lambda scale: [(torch.randn(n, generator=gen) * scale).to(dtype) for n in SMALL]  # noqa: E731
    return make(1.0), make(0.1), make(0.1)


@needs_kernels_on_cpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_op_on_many_programs_matches_reference(dtype):
    triton_ops = ops.get_backend("triton", "cpu")
    params, grads, grads2 = small_case(dtype)
    # 10 chunk programs and 7 lane programs; their 17 partials are summed 16 at a time
    config = tb.LaunchConfig(block_bytes=16 * dtype.itemsize, num_warps=4, lanes=4, final_block=16)
    with tb.override_launch_config(config):
        for b in (0, 1):
            expected = reference.sumsq(grads, params, b, 0.01)
            assert_close_scaled(triton_ops.sumsq(grads, params, b, 0.01), expected, 0.0, dtype, reduction=True)
        sumsq = reference.sumsq(grads, params, 1, 0.01)
        ascent_sumsq = reference.sumsq(grads)
        results = []
        for impl in (reference, triton_ops):
            w = [p.clone() for p in params]
            backups = [torch.empty_like(p) for p in w]
            ascent = [torch.empty_like(p) for p in w]
            impl.perturb_(w, grads, backups, sumsq, 0.3, 2, 1, 0.01, 1e-12, ascent, ascent_sumsq)
            results.append((w, backups, ascent))
        inv = 1.0 / sumsq.sqrt().item()
        for (w_ref, _, a_ref), (w, backups, ascent), w0, g in zip(*[zip(*r) for r in results], params, grads):
            assert torch.equal(backups, w0)
            step = 0.3 * inv * (w0.double().abs() + 0.01) ** 2 * g.double().abs()
            assert_close_scaled(w, w_ref, w0.double().abs() + step)
            assert_close_scaled(ascent, a_ref, g.double().abs() / ascent_sumsq.sqrt().item())

        w = [p.clone() for p in params]
        triton_ops.restore_(w, grads)
        assert all(torch.equal(a, b) for a, b in zip(w, grads))

        stats = reference.gsam_reduce(grads, grads2)
        got = triton_ops.gsam_reduce(grads, grads2)
        abs_dot = sum((g.double() * h.double()).abs().sum() for g, h in zip(grads, grads2))
        assert_close_scaled(got[0], stats[0], abs_dot, dtype, reduction=True)
        assert_close_scaled(got[1], stats[1], 0.0, dtype, reduction=True)

        combined = [[g.clone() for g in grads2] for _ in range(2)]
        reference.gsam_combine_(combined[0], grads, stats, 0.4)
        triton_ops.gsam_combine_(combined[1], grads, stats, 0.4)
        coefficient = 1.0 + 0.4 * stats[0].item() / stats[1].item()
        for expected, actual, gp, g in zip(*combined, grads2, grads):
            assert_close_scaled(actual, expected, abs(coefficient) * gp.double().abs() + 0.4 * g.double().abs())

        for init in (True, False):
            accums = [[p.clone() for p in params] for _ in range(2)]
            reference.accumulate_(accums[0], grads, 0.375, init)
            triton_ops.accumulate_(accums[1], grads, 0.375, init)
            for expected, actual, acc0, g in zip(*accums, params, grads):
                magnitude = 0.375 * g.double().abs() + (0.0 if init else acc0.double().abs())
                assert_close_scaled(actual, expected, magnitude)


# -- the launch cache ----------------------------------------------------------------------------

@pytest.fixture(params=["native", "python"])
def cache_key(request, monkeypatch):
    """Run a cache test with the C++ key (fastsam._C._list_signature) and with the Python one."""
    if request.param == "native":
        from fastsam.ops import compiled
        if compiled.load_extension() is None:
            pytest.skip(f"fastsam._C is not built: {compiled.extension_error()}")
        monkeypatch.setattr(tb, "_native_signature", compiled.load_extension()._list_signature)
    else:
        monkeypatch.setattr(tb, "_native_signature", None)
    tb.clear_caches()
    yield request.param
    tb.clear_caches()


@needs_kernels_on_cpu
def test_cache_is_revalidated_when_a_gradient_is_replaced(cache_key):
    triton_ops = ops.get_backend("triton", "cpu")
    tb.clear_caches()
    grads = [torch.randn(n) for n in (300, 5, 70)]
    assert_close_scaled(triton_ops.sumsq(grads), reference.sumsq(grads), 0.0, reduction=True)
    assert (tb._entries.misses, tb._entries.hits, tb._plans.misses) == (1, 0, 1)
    triton_ops.sumsq(grads)
    assert tb._entries.hits == 1, "the same tensors again must reuse the cached launch"

    old = grads[1]  # kept alive, so the replacement cannot take its address
    grads[1] = torch.randn(5) * 10
    assert_close_scaled(triton_ops.sumsq(grads), reference.sumsq(grads), 0.0, reduction=True)
    assert tb._entries.misses == 2 and tb._plans.hits == 1, "new addresses: new table, same plan"

    params = [torch.randn(n) for n in (300, 5, 70)]
    backups = [torch.empty_like(p) for p in params]
    expected = [p.clone() for p in params]
    reference.perturb_(expected, grads, [torch.empty_like(p) for p in params], torch.tensor(4.0), 0.5)
    triton_ops.perturb_(params, grads, backups, torch.tensor(4.0), 0.5)
    for actual, wanted in zip(params, expected):
        assert_close_scaled(actual, wanted, wanted.abs())
    del old


@needs_kernels_on_cpu
def test_cache_is_not_stale_for_another_size_layout_or_dtype_at_the_same_address(cache_key):
    triton_ops = ops.get_backend("triton", "cpu")
    raw = torch.empty(1024, dtype=torch.uint8)
    for view in (raw.view(torch.float32)[:50], raw.view(torch.float32)[:30], raw.view(torch.float32)[:64].view(8, 8),
                 raw.view(torch.float32)[:64].view(8, 8).t(), raw.view(torch.bfloat16)[:64], raw.view(torch.float16)):
        view.copy_(torch.randn(view.shape))  # one first address for all, other sizes, layouts and dtypes
        assert_close_scaled(triton_ops.sumsq([view]), reference.sumsq([view]), 0.0, view.dtype, reduction=True)

    storage = torch.randn(64)
    grad = torch.randn(8, 8)
    for w in (storage.view(8, 8), storage.view(8, 8).t()):  # same address and size: the transpose pairs other elements
        expected = w.clone()
        reference.perturb_([expected], [grad], [torch.empty(8, 8)], torch.tensor(1.0), 0.5)
        before, backup = w.clone(), torch.empty(8, 8)
        triton_ops.perturb_([w], [grad], [backup], torch.tensor(1.0), 0.5)
        torch.testing.assert_close(w, expected, rtol=1e-6, atol=1e-6)
        assert torch.equal(backup, before)


@needs_kernels_on_cpu
def test_cache_sees_a_dtype_change_past_the_first_tensor(cache_key):
    """A later tensor replaced by one of another dtype at the same address and byte size
    must not hit the cached launch (its elements would be read as the old dtype)."""
    triton_ops = ops.get_backend("triton", "cpu")
    first = torch.randn(10)
    raw = torch.randn(16)
    grads = [first, raw]
    triton_ops.sumsq(grads)
    grads[1] = raw.view(torch.int32)  # same address, same bytes, another dtype
    with pytest.raises(TypeError, match=r"tensors\[1\] is torch.int32"):
        triton_ops.sumsq(grads)


def test_native_key_names_a_non_tensor_item():
    from fastsam.ops import compiled
    module = compiled.load_extension()
    if module is None:
        pytest.skip(f"fastsam._C is not built: {compiled.extension_error()}")
    with pytest.raises(TypeError, match="item 1 of list 0 is a float, not a tensor"):
        module._list_signature([[torch.zeros(1), 1.5]])


@needs_kernels_on_cpu
def test_dense_permuted_layouts_run_in_place_and_are_cached(cache_key):
    """channels_last weights with same-layout gradients need no temporaries."""
    triton_ops = ops.get_backend("triton", "cpu")
    params = [torch.randn(4, 3, 5, 5).to(memory_format=torch.channels_last), torch.randn(7, 9).t()]
    grads = [torch.randn_like(p) for p in params]  # randn_like keeps the layout
    expected = [p.clone() for p in params]
    reference.perturb_(expected, grads, [torch.empty_like(p) for p in params], torch.tensor(2.0), 0.1)
    weights = [p.clone() for p in params]  # clone keeps the layout too
    backups = [torch.empty_like(p) for p in params]
    triton_ops.perturb_(weights, grads, backups, torch.tensor(2.0), 0.1)
    for actual, wanted, backup, before in zip(weights, expected, backups, params):
        assert not actual.is_contiguous()
        torch.testing.assert_close(actual, wanted, rtol=1e-6, atol=1e-6)
        assert torch.equal(backup, before)

    tb.clear_caches()
    triton_ops.sumsq(grads)
    triton_ops.sumsq(grads)
    assert (tb._entries.misses, tb._entries.hits) == (1, 1), \
        "a walkable non-contiguous list must be cached like a contiguous one"


@needs_kernels_on_cpu
def test_cache_does_not_keep_tensors_alive():
    triton_ops = ops.get_backend("triton", "cpu")
    grad = torch.randn(1000)
    ref = weakref.ref(grad)
    triton_ops.sumsq([grad])
    del grad
    assert ref() is None


# -- semantics shared with in-place torch ops -------------------------------------------------------

@needs_kernels_on_cpu
@pytest.mark.parametrize("name", ["reference", "triton"])
def test_writes_bump_version_counters_like_torch(name):
    """A weight perturbed after the forward pass makes backward fail loudly, as with reference."""
    backend = ops.get_backend(name, "cpu")
    w = torch.randn(5, requires_grad=True)
    loss = (w * w).sum()  # saves w for backward
    with torch.no_grad():
        backend.perturb_([w], [torch.ones(5)], [torch.empty(5)], torch.tensor(1.0), 0.1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@needs_kernels_on_cpu
def test_invalid_lists_raise_clearly():
    triton_ops = ops.get_backend("triton", "cpu")
    w = [torch.randn(4), torch.randn(3)]
    with pytest.raises(ValueError, match="grads has 1 tensors but params has 2"):
        triton_ops.perturb_(w, [torch.randn(4)], [torch.empty(4), torch.empty(3)], torch.tensor(1.0), 0.1)
    with pytest.raises(ValueError, match=r"grads\[1\] has 5 elements but params\[1\] has 3"):
        triton_ops.perturb_(w, [torch.randn(4), torch.randn(5)], [torch.empty(4), torch.empty(3)],
                            torch.tensor(1.0), 0.1)
    with pytest.raises(TypeError, match="backend='foreach'"):
        triton_ops.sumsq([torch.randn(3, dtype=torch.float64)])
    with pytest.raises(TypeError, match="a list must share one dtype"):
        triton_ops.sumsq([torch.randn(3), torch.randn(3).half()])
    with pytest.raises(ValueError, match="ASAM exponents"):
        triton_ops.perturb_(w, w, w, torch.tensor(1.0), 0.1, a=3)
    with pytest.raises(ValueError, match="needs the parameters"):
        triton_ops.sumsq(w, None, 1)


# -- availability ----------------------------------------------------------------------------------

def test_importing_fastsam_does_not_import_triton_and_cpu_needs_the_interpreter():
    result = run_python("""
        import os, sys
        import fastsam
        from fastsam import ops
        assert "triton" not in sys.modules, "import fastsam imported triton"
        for attempt in (1, 2):
            try:
                ops.get_backend("triton", "cpu")
                print(f"REASON{attempt} available")
            except ops.BackendUnavailableError as error:
                print(f"REASON{attempt}", error)
            os.environ["TRITON_INTERPRET"] = "1"  # too late: the kernels are defined by now
    """, TRITON_INTERPRET="0")
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines() if line.startswith("REASON"))
    if "pip install triton" in lines["REASON1"]:
        pytest.skip("triton is not installed")
    assert "set TRITON_INTERPRET=1 before importing fastsam" in lines["REASON1"]
    assert "was set after" in lines["REASON2"] and "before importing fastsam" in lines["REASON2"]


def test_missing_triton_is_reported_with_the_fix(monkeypatch):
    """As if triton were not installed: the import of the kernels failed (no GPU-less subprocess needed)."""
    monkeypatch.setattr(tb, "_kernels_module", None)
    monkeypatch.setattr(tb, "_kernels_error", ModuleNotFoundError("No module named 'triton'", name="triton"))
    for device in ("cpu", "cuda"):
        assert "pip install triton" in tb.unavailable_reason(device)
    monkeypatch.setattr(tb, "_kernels_error", ImportError("libtriton.so: undefined symbol", name="triton._C"))
    assert "could not be imported (libtriton.so: undefined symbol)" in tb.unavailable_reason("cpu")


@needs_kernels_on_cpu
def test_unavailable_devices_say_why():
    assert "not on meta" in tb.unavailable_reason("meta")
    reason = tb.unavailable_reason("cuda")
    if tb.interpreted():
        assert "unset TRITON_INTERPRET before importing fastsam" in reason
    elif not HAS_CUDA:
        assert "no CUDA device" in reason


# -- GPU code, checked without a GPU ------------------------------------------------------------------

# Exit statuses of COMPILE_CHECK that mean "a tool is missing" (anything else non-zero is a failure).
TRITON_MISSING, PTXAS_MISSING = 3, 4

COMPILE_CHECK = f"""
    import os, re, subprocess, sys, tempfile
    try:
        import triton
    except ImportError as error:
        print(f"triton is not installed: {{error}}")
        sys.exit({TRITON_MISSING})

    def find_ptxas():
        # where triton itself looks (TRITON_PTXAS_PATH, then the copy it ships), so that this
        # check and triton.compile use the same ptxas
        try:
            from triton import knobs  # triton >= 3.4
            return knobs.nvidia.ptxas.path
        except ImportError:
            from triton.backends.nvidia.compiler import _path_to_binary  # older triton
            return _path_to_binary("ptxas")[0]

    try:
        PTXAS = find_ptxas()
    except RuntimeError as error:  # triton raises "Cannot find ptxas"
        print(f"ptxas not found: {{error}}")
        sys.exit({PTXAS_MISSING})
"""
COMPILE_CHECK += """
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from fastsam.ops import triton_backend as tb, triton_kernels as K

    COMMON = {"table": "*i64", "chunk_tensor": "*i64", "chunk_index": "*i64", "lane_tensor": "*i64",
              "lane_element": "*i64", "n_chunks": "i32", "n_lanes": "i32"}

    def sizes(dtype, aligned, roles=2):
        block, lanes = tb.GPU_CONFIG.blocking(dtype)
        return dict(ROLES=roles + 1, BLOCK=block, LANES=lanes, ALIGNED=aligned)  # + the positions column

    def ptx(kernel, types, constexprs, arch):
        signature = {n: "constexpr" if n in constexprs else types[n] for n in kernel.arg_names}
        aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(kernel.arg_names)
                   if signature[n].startswith("*")}
        source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=aligned)
        options = {"num_warps": tb.GPU_CONFIG.num_warps}
        return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options).asm["ptx"]

    def spills(code, arch):
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(code)
        gpu = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
        out = subprocess.run([PTXAS, "-v", f"--gpu-name={gpu}", f.name, "-o", os.devnull],
                             capture_output=True, text=True)
        os.unlink(f.name)
        log = out.stdout + out.stderr
        if out.returncode != 0:
            raise RuntimeError(f"{PTXAS} failed (exit status {out.returncode}):\\n{log}")
        stores = re.findall(r"(\\d+) bytes spill stores", log)
        if not stores:
            raise RuntimeError(f"{PTXAS} -v reported no spill counts:\\n{log}")
        return str(sum(int(n) for n in stores))

    def f32(*names, **more):
        return dict(COMMON, **{n: "*fp32" for n in names}, **more)

    half = {n: "*bf16" for n in ("w_base", "g_base", "backup_base", "ascent_base")}
    scalars = f32("sumsq_ptr", "ascent_sumsq_ptr", seed_ptr="*i64", rho="fp32", eta="fp32", eps="fp32")
    cases = [
        (K.perturb_kernel, dict(scalars, **{n: "*fp32" for n in ("w_base", "g_base", "backup_base", "ascent_base")}),
         dict(A=2, HAS_ASCENT=True, NORMALIZE_ASCENT=True, STOCHASTIC=False, **sizes(torch.float32, True, 4))),
        (K.perturb_kernel, dict(scalars, **half),
         dict(A=1, HAS_ASCENT=True, NORMALIZE_ASCENT=False, STOCHASTIC=False, **sizes(torch.bfloat16, True, 4))),
        (K.perturb_kernel, dict(scalars, **half),
         dict(A=0, HAS_ASCENT=False, NORMALIZE_ASCENT=False, STOCHASTIC=False, **sizes(torch.bfloat16, False, 3))),
        (K.perturb_kernel, dict(scalars, **half),
         dict(A=2, HAS_ASCENT=True, NORMALIZE_ASCENT=False, STOCHASTIC=True, **sizes(torch.bfloat16, True, 4))),
        (K.sumsq_kernel, f32("g_base", "w_base", "partials", eta="fp32"), dict(B=1, **sizes(torch.float32, True))),
        (K.restore_kernel, dict(COMMON, w_base="*fp16", backup_base="*fp16"), sizes(torch.float16, True)),
        (K.gsam_reduce_kernel, f32("ascent_base", "g_base", "partials", n_programs="i32"), sizes(torch.float32, True)),
        (K.gsam_combine_kernel, f32("g_base", "ascent_base", "stats", alpha="fp32", eps="fp32"),
         sizes(torch.float32, True)),
        (K.accumulate_kernel, f32("acc_base", "g_base", scale="fp32"), dict(INIT=False, **sizes(torch.float32, True))),
        (K.sum_partials_kernel, dict(partials="*fp32", out="*fp32", n="i32"), dict(BLOCK=tb.GPU_CONFIG.final_block)),
    ]
    for arch in (90,):  # H100/H200, the project's GPUs
        for kernel, types, constexprs in cases:
            code = ptx(kernel, types, constexprs, arch)
            vector = len(re.findall(r"ld\\.global\\.v4", code))
            print(arch, kernel.__name__, constexprs.get("ALIGNED"), vector, spills(code, arch))
"""


def test_kernels_compile_for_gpus_with_vector_accesses():
    """Compile every kernel as the GPU runs it (sizes from GPU_CONFIG) for sm_90, on this
    machine without a GPU: catches what the interpreter lets through, checks that
    aligned full chunks use 128-bit loads, and that ptxas needs no register spills.

    Skips only where a tool is missing and no GPU is present (triton not installed, or
    no ptxas where triton looks for one); on a GPU machine a missing ptxas fails, and a
    ptxas that runs and fails always does."""
    result = run_python(COMPILE_CHECK, TRITON_INTERPRET="0")
    missing = {TRITON_MISSING: "triton", PTXAS_MISSING: "ptxas"}.get(result.returncode)
    if missing is not None:
        message = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else f"{missing} missing"
        if HAS_CUDA or (missing == "triton" and "triton" in expected_backends("cpu")):
            pytest.fail(f"{message}: this machine must be able to compile the kernels for its GPU")
        pytest.skip(f"cannot compile for CUDA here: {message}")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    rows = [line.split() for line in result.stdout.splitlines()]
    assert len(rows) == 10, result.stdout
    for arch, name, aligned, vector_loads, spill_bytes in rows:
        if aligned == "True":
            assert int(vector_loads) > 0, f"{name} (sm_{arch}) has no 128-bit loads on its aligned path"
        assert spill_bytes == "0", f"{name} (sm_{arch}) spills {spill_bytes} bytes of registers"


# -- on a GPU (run by the GPU check; skipped elsewhere) ------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device on this machine")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "misaligned"])
def test_gpu_large_and_misaligned_tensors_match_reference(dtype, offset):
    triton_ops = ops.get_backend("triton", "cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    sizes = [2 ** 24 + 3, 4096 * 3, 1, 4095, 77777]
    owners = [torch.randn(n + offset, device="cuda", generator=gen).to(dtype) for n in sizes]
    params = [o[offset:] for o in owners]  # offset 1: not 16-byte aligned, so no 128-bit accesses
    grads = [(torch.randn(n + offset, device="cuda", generator=gen) * 0.1).to(dtype)[offset:] for n in sizes]
    for b in (0, 1):
        assert_close_scaled(triton_ops.sumsq(grads, params, b, 0.01), reference.sumsq(grads, params, b, 0.01),
                            0.0, dtype, reduction=True)
    sumsq = reference.sumsq(grads)
    results = []
    for impl in (reference, triton_ops):
        w = [p.clone() for p in params]
        backups = [torch.empty_like(p) for p in w]
        impl.perturb_(w, grads, backups, sumsq, 0.05, 2, 1, 0.01)
        results.append((w, backups))
    for w_ref, w, backup, w0, g in zip(results[0][0], results[1][0], results[1][1], params, grads):
        assert torch.equal(backup, w0)
        step = 0.05 / sumsq.sqrt().item() * (w0.double().abs() + 0.01) ** 2 * g.double().abs()
        assert_close_scaled(w, w_ref, w0.double().abs() + step)
    triton_ops.restore_(results[1][0], params)
    assert all(torch.equal(a, b) for a, b in zip(results[1][0], params))


SUBSTEP_INPUTS = ("params", "grads", "descent", "accum")
SUBSTEP_LISTS = SUBSTEP_INPUTS + ("backups", "ascent", "perturbed")


def gsam_substep(backend, lists: dict) -> tuple:
    """A GSAM sub-step with every op, on the tensor lists in ``lists`` (updated in place):
    returns (sumsq, GSAM stats). ``perturbed`` receives what perturb_ made before restore_
    undoes it; ``descent`` then replaces ``grads``, as the descent backward would (an
    ascent gradient parallel to the descent one would make gsam_combine_ a no-op)."""
    params, grads = lists["params"], lists["grads"]
    total = backend.sumsq(grads, params, 1, 0.01)
    backend.perturb_(params, grads, lists["backups"], total, 0.05, 2, 1, 0.01, 1e-12, lists["ascent"], total)
    torch._foreach_copy_(lists["perturbed"], params)
    backend.restore_(params, lists["backups"])
    torch._foreach_copy_(grads, lists["descent"])
    stats = backend.gsam_reduce(lists["ascent"], grads)
    backend.gsam_combine_(grads, lists["ascent"], stats, 0.4)
    backend.accumulate_(lists["accum"], grads, 0.5)
    return total, stats


def substep_lists(sizes, device, seed: int) -> dict:
    """Inputs of gsam_substep (SUBSTEP_INPUTS random; the rest filled with NaN)."""
    gen = torch.Generator().manual_seed(seed)
    lists = {name: [torch.full((n,), float("nan"), device=device) for n in sizes] for name in SUBSTEP_LISTS}
    for name, scale in (("params", 1.0), ("grads", 0.1), ("descent", 0.1), ("accum", 1.0)):
        lists[name] = [(torch.randn(n, generator=gen) * scale).to(device) for n in sizes]
    return lists


def assert_substep_matches(actual: dict, actual_scalars, inputs: dict, expected: dict, expected_scalars):
    """Every output of gsam_substep against the reference's outputs from the same inputs."""
    for a, e in zip(actual_scalars, expected_scalars):
        assert_close_scaled(a, e, 0.0, torch.float32, reduction=True)
    assert_lists_equal(actual["backups"], inputs["params"], "backups must hold the weights before perturb_")
    assert_lists_equal(actual["params"], inputs["params"], "restore_ must give back the weights bit-exactly")
    w0, g0, acc0 = inputs["params"], inputs["descent"], inputs["accum"]
    assert_lists_close(actual["perturbed"], expected["perturbed"],
                       [w.abs() + (e - w).abs() for w, e in zip(w0, expected["perturbed"])])
    assert_lists_close(actual["ascent"], expected["ascent"], [e.abs() for e in expected["ascent"]])
    assert_lists_close(actual["grads"], expected["grads"],
                       [g.abs() + (e - g).abs() + 0.4 * a.abs() for g, e, a in zip(g0, expected["grads"],
                                                                                 expected["ascent"])])
    assert_lists_close(actual["accum"], expected["accum"],
                       [acc.abs() + 0.5 * g.abs() for acc, g in zip(acc0, expected["grads"])])


def replay_with_new_inputs(replay, lists: dict, outputs: tuple, seed: int) -> None:
    """Write new inputs into the captured buffers, ``replay()``, and compare every output
    with the reference sub-step on the same inputs (a replay that does nothing, or that
    reads stale inputs, fails)."""
    sizes = [p.numel() for p in lists["params"]]
    new = substep_lists(sizes, lists["params"][0].device, seed)
    for name in SUBSTEP_INPUTS:
        torch._foreach_copy_(lists[name], new[name])
    inputs = {name: [t.clone() for t in new[name]] for name in SUBSTEP_INPUTS}
    replay()
    expected_scalars = gsam_substep(reference, new)
    assert_substep_matches(lists, outputs, inputs, new, expected_scalars)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device on this machine")
def test_gpu_step_never_synchronises_and_is_graph_capturable():
    triton_ops = ops.get_backend("triton", "cuda")
    lists = substep_lists((1000, 4096 * 5 + 7, 3), "cuda", seed=0)

    tb.clear_caches()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        gsam_substep(triton_ops, lists)  # cache misses: tables and plans go up from pinned memory, asynchronously
        gsam_substep(triton_ops, lists)  # cache hits
    finally:
        torch.cuda.set_sync_debug_mode("default")

    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        gsam_substep(triton_ops, lists)
        with torch.cuda.graph(graph):
            outputs = gsam_substep(triton_ops, lists)  # sumsq and stats: the graph's own tensors
    torch.cuda.current_stream().wait_stream(stream)
    tb.clear_caches()  # the graph must keep what it replays

    def replay():
        graph.replay()
        torch.cuda.synchronize()

    for seed in (1, 2):
        replay_with_new_inputs(replay, lists, outputs, seed)

    unseen = [torch.randn(7, device="cuda")]
    with pytest.raises(RuntimeError, match="outside CUDA graph capture"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            triton_ops.restore_(unseen, [torch.zeros_like(unseen[0])])  # a cache miss while capturing
