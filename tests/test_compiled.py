"""The compiled backends (fastsam._C: ``cpp`` on CPU, ``cuda`` on GPU) beyond what
test_ops/test_trajectories check for every backend.

The launch planners, checked exhaustively on the CPU (every element covered exactly once,
slot limits respected, launches not growing per tensor); closed-form results at work-item
boundaries (a missed or doubled element changes them); ``torch.library.opcheck`` on every
op; bitwise repeatability, also across thread counts; layouts the kernels must stage
(mixed strides, expanded inputs, unaligned views); argument errors; the messages of
unavailable backends. GPU tests (marked ``gpu``) run the same checks on CUDA tensors plus
multi-launch sets, no host synchronisation and CUDA graph capture.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
import types

import pytest
import torch

from fastsam import ops
from fastsam.ops import compiled, reference
from tests.test_variant_ops import VARIANT_OP_NAMES
from tests.conftest import DTYPES, assert_close_scaled, assert_lists_close, assert_lists_equal

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXT_ERROR = compiled.extension_error()
needs_ext = pytest.mark.skipif(EXT_ERROR is not None, reason=f"fastsam._C not loaded: {EXT_ERROR}")
HAS_CUDA_KERNELS = EXT_ERROR is None and compiled.cuda_kernels_built() and torch.cuda.is_available()
gpu = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA_KERNELS, reason="needs a CUDA device and the CUDA kernels")]
DEVICES = [pytest.param("cpu", marks=needs_ext), pytest.param("cuda", marks=gpu)]


def launch_config() -> dict:
    values = torch.ops.fastsam._launch_config()
    return dict(cpu_item=values[0], chunk=values[1], threads=values[2], max_blocks=values[3],
                max_tensors={depth: values[3 + depth] for depth in range(1, 5)},
                max_tensors_large={depth: values[7 + depth] for depth in range(1, 5)},
                large_params=bool(values[12]))


def launch_slots(config: dict, depth: int, tensors: int) -> int:
    """Slots per launch the CUDA launcher uses (plan.h: cuda_slots_for): the 4 KiB argument
    when the non-empty tensors fit in it, else the 32 KiB one where that is in use."""
    if config["large_params"] and tensors > config["max_tensors"][depth]:
        return config["max_tensors_large"][depth]
    return config["max_tensors"][depth]


def backend_for(device: str):
    return ops.get_backend("cpp" if device == "cpu" else "cuda", device)


# ---- planners ---------------------------------------------------------------------------

def numel_sets(item: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    return [
        [],
        [0, 0],
        [1],
        [item - 1, item, item + 1, 0, 2 * item + 3, 1],
        torch.randint(1, 10, (2000,), generator=gen).tolist(),
        torch.randint(0, 3 * item, (300,), generator=gen).tolist(),
        [5 * item + 7] + [0] * 5 + [3] * 40,
    ]


def check_cpu_items(numels: list[int], item: int) -> None:
    rows = torch.ops.fastsam._plan_cpu_items(numels, item)
    total = sum(numels)
    assert rows.shape[1] == 4
    k, tensor, begin, end = rows.unbind(1) if len(rows) else (torch.empty(0, dtype=torch.long),) * 4
    assert bool((end > begin).all()), "empty segment"
    # items run in order, each holds exactly `item` elements (the last what is left)
    assert bool((k[1:] >= k[:-1]).all())
    per_item = torch.zeros(max(math.ceil(total / item), 0), dtype=torch.long)
    per_item.index_add_(0, k, end - begin)
    expected = torch.full_like(per_item, item)
    if len(expected):
        expected[-1] = total - item * (len(expected) - 1)
    assert torch.equal(per_item, expected)
    # every element of every tensor exactly once, in order
    for t, n in enumerate(numels):
        mine = rows[tensor == t]
        if n == 0:
            assert len(mine) == 0
            continue
        assert mine[0, 2] == 0 and mine[-1, 3] == n
        assert torch.equal(mine[1:, 2], mine[:-1, 3]), f"tensor {t}: gap or overlap"


@needs_ext
@pytest.mark.parametrize("item", [1, 7, None], ids=["item1", "item7", "kernel_item"])
def test_cpu_items_cover_every_element_exactly_once(item):
    item = item or launch_config()["cpu_item"]
    for numels in numel_sets(item):
        check_cpu_items(numels, item)


def check_cuda_launches(numels: list[int], chunk: int, max_tensors: int, max_blocks: int) -> int:
    rows = torch.ops.fastsam._plan_cuda_launches(numels, chunk, max_tensors, max_blocks)
    chunks = [math.ceil(n / chunk) for n in numels]
    assert rows.shape == (sum(chunks), 5)
    if not len(rows):
        return 0
    launch, block, slot, tensor, c = rows.unbind(1)
    assert torch.equal(block, torch.arange(len(rows))), "partial slots must be 0..blocks-1 in order"
    assert bool((launch[1:] - launch[:-1] >= 0).all()) and bool((launch[1:] - launch[:-1] <= 1).all())
    launches = int(launch[-1]) + 1
    for l in range(launches):
        mine = rows[launch == l]
        assert 0 < len(mine) <= max_blocks
        slots = {}
        for s, t in zip(mine[:, 2].tolist(), mine[:, 3].tolist()):
            assert slots.setdefault(s, t) == t, "one slot, two tensors"
        assert sorted(slots) == list(range(len(slots))) and len(slots) <= max_tensors
        assert len(set(slots.values())) == len(slots), "one tensor, two slots in a launch"
    # every (tensor, chunk) exactly once, and chunks cover each tensor
    pairs = sorted(zip(tensor.tolist(), c.tolist()))
    assert pairs == [(t, k) for t, n in enumerate(chunks) for k in range(n)]
    # launches grow with size and with tensors over the slot limit, not one per tensor
    nonempty = sum(1 for n in numels if n)
    assert launches <= math.ceil(len(rows) / max_blocks) + math.ceil(nonempty / max_tensors)
    return launches


@needs_ext
@pytest.mark.parametrize("argument", ["max_tensors", "max_tensors_large"], ids=["4KiB", "32KiB"])
@pytest.mark.parametrize("depth", [1, 2, 3, 4])
def test_cuda_launch_plan_covers_every_chunk_once_within_slot_limits(depth, argument):
    config = launch_config()
    chunk, max_tensors, max_blocks = config["chunk"], config[argument][depth], config["max_blocks"]
    for numels in numel_sets(chunk):
        check_cuda_launches(numels, chunk, max_tensors, max_blocks)
    # toy limits exercise every way a launch fills (slots first, blocks first, mid-tensor)
    gen = torch.Generator().manual_seed(depth)
    for _ in range(50):
        numels = torch.randint(0, 25, (int(torch.randint(1, 30, (1,), generator=gen)),), generator=gen).tolist()
        check_cuda_launches(numels, 4, depth + 1, 5)


@needs_ext
@pytest.mark.parametrize("value,expected", [("4096", "4096"), ("1000", "must be a positive multiple of 2048")])
def test_cuda_chunk_size_override(value, expected):
    """FASTSAM_CUDA_CHUNK_SIZE (for tuning on a GPU) sets the chunk the launcher and the
    reductions' partial counts use; a value the kernels cannot walk in whole steps is refused."""
    code = ("import torch, fastsam.ops.compiled as c; c.load_extension()\n"
            "try:\n    print(torch.ops.fastsam._launch_config()[1])\n"
            "except RuntimeError as e:\n    print(str(e).splitlines()[0])")
    env = {**os.environ, "PYTHONPATH": ROOT, "FASTSAM_CUDA_CHUNK_SIZE": value}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert expected in out.stdout.strip().splitlines()[-1]


def large_params_by_default() -> bool:
    """32 KiB launch arguments need CUDA >= 12.1 at build time (the build uses torch's CUDA)
    and no architecture before 7.0 in the build (CI and gpu_check build for 8.0 and newer)."""
    version = tuple(int(x) for x in (torch.version.cuda or "0.0").split(".")[:2])
    return compiled.cuda_kernels_built() and version >= (12, 1)


def load_setup_helper(name: str):
    """A helper function of setup.py, compiled alone (importing setup.py would run setup())."""
    import ast
    with open(os.path.join(ROOT, "setup.py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    namespace: dict = {}
    exec(compile(ast.Module(body=[node], type_ignores=[]), "setup.py", "exec"), namespace)
    return namespace[name]


@pytest.mark.parametrize("arch_list,older", [
    ("8.0;9.0+PTX", []), ("7.0 7.5 8.6+PTX 9.0a 10.0 12.0", []), ("6.1;8.0", ["6.1"]),
    ("5.2 6.0+PTX 7.0", ["5.2", "6.0+PTX"]), ("Pascal;Volta;Ampere", ["Pascal"]), ("Kepler+Tesla Hopper", ["Kepler+Tesla"]),
])
def test_setup_finds_archs_that_cannot_take_large_kernel_arguments(arch_list, older):
    """setup.py builds with 4 KiB launch arguments only when an architecture predates 7.0
    (ptxas refuses larger ones there)."""
    assert load_setup_helper("_archs_before_volta")(arch_list) == older


@needs_ext
@pytest.mark.parametrize("value", [None, "1", "0", "yes"])
def test_cuda_large_params_switch(value):
    """32 KiB launch arguments are on wherever the CUDA kernels were built with CUDA >= 12.1;
    FASTSAM_CUDA_LARGE_PARAMS=0 turns them off (for measuring), other values are refused.
    An extension built without CUDA kernels (FASTSAM_SKIP_CUDA) has no launches to switch
    and does not read the variable: always off."""
    code = ("import torch, fastsam.ops.compiled as c; c.load_extension()\n"
            "try:\n    print(torch.ops.fastsam._launch_config()[12])\n"
            "except RuntimeError as e:\n    print(str(e).splitlines()[0])")
    env = {k: v for k, v in os.environ.items() if k != "FASTSAM_CUDA_LARGE_PARAMS"}
    if value is not None:
        env["FASTSAM_CUDA_LARGE_PARAMS"] = value
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**env, "PYTHONPATH": ROOT},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    last = out.stdout.strip().splitlines()[-1]
    if not compiled.cuda_kernels_built():
        assert last == "0"
    elif value == "yes":
        assert "FASTSAM_CUDA_LARGE_PARAMS must be 0 or 1" in last
    else:
        assert last == str(int(value != "0" and large_params_by_default()))


@needs_ext
def test_cuda_launch_counts_for_typical_sets():
    config = launch_config()
    chunk, blocks = config["chunk"], config["max_blocks"]
    # 2000 tiny tensors, perturb_ with GSAM's ascent (4 lists): one launch per full set of slots
    for argument in ("max_tensors", "max_tensors_large"):
        tiny = check_cuda_launches([5] * 2000, chunk, config[argument][4], blocks)
        assert tiny == math.ceil(2000 / config[argument][4])
    # the ResNet-50 set's 161 tensors: one launch per op for every depth with 32 KiB arguments
    assert min(config["max_tensors_large"].values()) >= 161 > config["max_tensors"][1]
    # a third of a launch's blocks, then a tensor of 2.5 launches: blocks fill, the big tensor continues
    assert check_cuda_launches([blocks // 3 * chunk, (2 * blocks + blocks // 2) * chunk], chunk,
                               config["max_tensors"][1], blocks) == 3


# ---- closed forms at work-item / chunk boundaries ------------------------------------

def boundary_numels(device: str) -> list[int]:
    config = launch_config()
    step = config["cpu_item"] if device == "cpu" else config["chunk"]
    return [step - 1, step, step + 1, 0, 3, 2 * step + 5, 1]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_element_is_visited_exactly_once(device, dtype):
    """Closed forms on tensors straddling item/chunk boundaries: a missed element keeps its
    old value, a doubled one moves twice; sums of ones are exact integers."""
    backend = backend_for(device)
    numels = boundary_numels(device)
    ones = [torch.ones(n, dtype=dtype, device=device) for n in numels]
    total = backend.sumsq(ones)
    assert total.item() == float(sum(numels))  # integers < 2^24: exact in any summation order
    for g, n in zip(ones, numels):
        assert backend.sumsq([g]).item() == float(n)
    params = [torch.zeros(n, dtype=dtype, device=device) for n in numels]
    backups = [torch.full((n,), 7.0, dtype=dtype, device=device) for n in numels]
    # rho = 0.5, sumsq = 1, eps = 0: every w becomes exactly 0.5
    backend.perturb_(params, ones, backups, torch.tensor(1.0, device=device), 0.5, eps=0.0)
    for w, b in zip(params, backups):
        assert bool((w == 0.5).all()) and bool((b == 0).all())
    backend.accumulate_(params, ones, 1.0)  # 0.5 + 1
    backend.accumulate_(backups, ones, 0.25, init=True)
    for w, b in zip(params, backups):
        assert bool((w == 1.5).all()) and bool((b == 0.25).all())
    backend.restore_(params, backups)
    for w in params:
        assert bool((w == 0.25).all())
    stats = backend.gsam_reduce(ones, params)  # <1, 0.25> and ||0.25||^2 = n/4, n/16
    assert stats.tolist() == [sum(numels) / 4, sum(numels) / 16]


# ---- opcheck -------------------------------------------------------------------------

def opcheck_cases(device: str, dtype: torch.dtype) -> list[tuple]:
    gen = torch.Generator().manual_seed(3)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    shapes = [(5,), (3, 4), (0,), (70,)]
    w = [randn(*s) for s in shapes]
    g = [randn(*s) for s in shapes]
    strided = [randn(8, 6)[:, ::2], randn(5, 7).t()]
    strided_g = [randn(8, 3), randn(7, 5)]
    s = torch.tensor(2.5, device=device)
    f = torch.ops.fastsam
    return [
        (f.sumsq, (g, [], 0, 0.0)),
        (f.sumsq, (g, w, 1, 0.01)),
        (f.sumsq, (strided_g, strided, 1, 0.0)),
        (f.perturb_, (w, g, [torch.empty_like(t) for t in w], s, 0.1, 0, 0.0, 1e-12, [], None)),
        (f.perturb_, (w, g, [torch.empty_like(t) for t in w], s, 0.1, 2, 0.01, 1e-12,
                      [torch.empty_like(t) for t in w], s)),
        (f.perturb_, (strided, strided_g, [torch.empty_like(t) for t in strided], s, 0.1, 1, 0.0, 1e-12,
                      [torch.empty_like(t) for t in strided], None)),
        (f.restore_, (w, g)),
        (f.restore_, (strided, strided_g)),
        (f.gsam_reduce, (g, w)),
        (f.gsam_combine_, (w, g, torch.tensor([1.0, 2.0], device=device), 0.4, 1e-12)),
        (f.accumulate_, (w, g, 0.5, True)),
        (f.accumulate_, (strided, strided_g, 0.5, False)),
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck_every_op(device, dtype):
    from tests.test_fused_steps import fused_step_opcheck_cases
    ran = set()
    for op, args in opcheck_cases(device, dtype) + fused_step_opcheck_cases(device, dtype):
        torch.library.opcheck(op, args)
        ran.add(str(op).split(".")[-1])
    assert ran == set(ops.OP_NAMES) - set(VARIANT_OP_NAMES)  # the variants' ops: tests/test_variant_ops.py


# ---- determinism ---------------------------------------------------------------------

def random_set(device, dtype=torch.float32, seed=0):
    """Always the same sizes (large, odd, 300 tiny); values depend on ``seed``."""
    sizes = [278011, 4097, 3, 2 ** 17 + 5] + torch.randint(1, 50, (300,), generator=torch.Generator().manual_seed(0)).tolist()
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, generator=gen) * (1 + i % 7)).to(device=device, dtype=dtype)
            for i, n in enumerate(sizes)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reductions_are_bitwise_repeatable(device, dtype):
    backend = backend_for(device)
    g, w = random_set(device, dtype, 0), random_set(device, dtype, 1)
    first = (backend.sumsq(g), backend.sumsq(g, w, 1, 0.01), backend.gsam_reduce(g, w))
    for _ in range(5):
        again = (backend.sumsq(g), backend.sumsq(g, w, 1, 0.01), backend.gsam_reduce(g, w))
        for x, y in zip(first, again):
            assert torch.equal(x, y)
    assert_close_scaled(first[0], reference.sumsq(g), 0.0, dtype, reduction=True)


@needs_ext
def test_cpu_kernels_run_on_several_threads():
    """at::parallel_for is serial in an extension built without OpenMP: that once made every
    CPU kernel single-threaded without any test noticing."""
    if torch.get_num_threads() < 2:
        pytest.skip("torch uses one thread here")
    assert torch.ops.fastsam._cpu_threads_used(64) == min(torch.get_num_threads(), 64)
    assert torch.ops.fastsam._cpu_threads_used(1) == 1


@needs_ext
def test_cpu_reductions_do_not_depend_on_thread_count():
    backend = backend_for("cpu")
    g, w = random_set("cpu", seed=4), random_set("cpu", seed=5)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append((backend.sumsq(g), backend.sumsq(g, w, 1, 0.0), backend.gsam_reduce(g, w)))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for x, y in zip(results[0], other):
            assert torch.equal(x, y)


# ---- layouts the kernels cannot walk flat ---------------------------------------------

def layout_cases(device: str, dtype: torch.dtype):
    """(params, grads, backups) whose layouts differ per position in every way that matters."""
    gen = torch.Generator().manual_seed(7)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    params = [randn(6, 9).t(),                                               # transposed, dense
              randn(2, 3, 5, 4).to(memory_format=torch.channels_last),       # channels_last, dense
              randn(1001)[1:],                                               # unaligned start
              randn(40, 6)[::3, 1:4],                                        # strided view
              randn(7)]
    grads = [randn(9, 6),                                                    # contiguous vs transposed
             randn(2, 3, 5, 4).to(memory_format=torch.channels_last),        # same dense layout
             randn(1003)[3:],
             randn(1, 3).expand(14, 3),                                      # stride 0: read-only input
             randn(7)]
    backups = [torch.empty(p.shape, dtype=dtype, device=device) for p in params]
    return params, grads, backups


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mixed_layouts_match_reference(device, dtype):
    backend = backend_for(device)
    params, grads, backups = layout_cases(device, dtype)
    owners = [p.as_strided((p.untyped_storage().nbytes() // p.element_size(),), (1,), 0).clone() for p in params]
    assert_close_scaled(backend.sumsq(grads, params, 1, 0.01), reference.sumsq(grads, params, 1, 0.01), 0.0,
                        dtype, reduction=True)
    s = reference.sumsq(grads)
    expected_p, expected_a = [p.clone() for p in params], [torch.empty(g.shape, dtype=dtype, device=device)
                                                           for g in grads]
    reference.perturb_(expected_p, grads, [torch.empty_like(p) for p in params], s, 0.3, 2, 1, 0.01, 1e-12,
                       expected_a, s)
    ascent = [torch.empty(g.shape, dtype=dtype, device=device) for g in grads]
    backend.perturb_(params, grads, backups, s, 0.3, 2, 1, 0.01, 1e-12, ascent, s)
    for p, e, b, o, g, a, ea in zip(params, expected_p, backups, owners, grads, ascent, expected_a):
        assert torch.equal(b, o.as_strided(p.shape, p.stride(), p.storage_offset())), "backup not bit-exact"
        assert_close_scaled(p, e, e.double().abs() + g.double().abs())
        assert_close_scaled(a, ea, g.double().abs() / s.sqrt().item())
        # elements of the owner outside the view are untouched
        now = p.as_strided((o.numel(),), (1,), 0)
        mask = torch.ones(o.numel(), dtype=torch.bool, device=device)
        mask.as_strided(p.shape, p.stride(), p.storage_offset()).fill_(False)
        assert torch.equal(now[mask], o[mask])
    backend.restore_(params, backups)
    for p, b in zip(params, backups):
        assert torch.equal(p, b)


@pytest.mark.parametrize("device", DEVICES)
def test_written_tensor_with_overlapping_elements_is_rejected(device):
    backend = backend_for(device)
    accum = [torch.zeros(1, 3, device=device).expand(4, 3)]
    with pytest.raises(RuntimeError, match="accum\\[0\\] is written but has overlapping elements"):
        backend.accumulate_(accum, [torch.ones(4, 3, device=device)], 1.0)


# ---- argument errors -----------------------------------------------------------------

@needs_ext
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ELF/Linux linking check")
def test_extension_links_libstdcxx_dynamically():
    """fastsam._C must use the process's libstdc++, not a static copy of the compiler's: with
    two copies (another version) in one process, formatting a TORCH_CHECK message
    segfaulted on the lent H200 machines (setup.py links torch's libstdc++ by path)."""
    import shutil
    with open("/proc/self/maps", encoding="utf-8") as maps:
        if "/libstdc++.so" not in maps.read():
            pytest.skip("this process runs without libstdc++ (nothing to share)")
    objdump = shutil.which("objdump")
    assert objdump, "objdump (binutils) is needed to read the extension's dependencies"
    out = subprocess.run([objdump, "-p", compiled.load_extension().__file__], capture_output=True, text=True,
                         check=True).stdout
    needed = [line.split()[1] for line in out.splitlines() if line.strip().startswith("NEEDED")]
    assert any(name.startswith("libstdc++.so") for name in needed), \
        f"fastsam._C does not load libstdc++ dynamically (NEEDED: {needed}): libstdc++ was linked statically"


@needs_ext
def test_argument_errors_name_the_problem():
    f = torch.ops.fastsam
    a, b = torch.zeros(3), torch.zeros(4)
    with pytest.raises(RuntimeError, match="grads has 1 tensors but params has 2"):
        f.perturb_([a, a], [a], [a, a], torch.tensor(1.0), 0.1, 0, 0.0, 0.0, [], None)
    with pytest.raises(RuntimeError, match=r"backups\[0\] has shape \[4\] but params\[0\] has shape \[3\]"):
        f.restore_([a], [b])
    with pytest.raises(RuntimeError, match="must share a dtype"):
        f.accumulate_([a], [a.half()], 1.0, False)
    with pytest.raises(RuntimeError, match="use backend 'foreach' or 'auto' for float64"):
        f.sumsq([a.double()], [], 0, 0.0)
    with pytest.raises(RuntimeError, match="ASAM exponent a must be in"):
        f.perturb_([a], [a], [a], torch.tensor(1.0), 0.1, 3, 0.0, 0.0, [], None)
    with pytest.raises(RuntimeError, match="stats must have 2 element"):
        f.gsam_combine_([a], [a], torch.tensor(1.0), 0.1, 0.0)
    with pytest.raises(ValueError, match="ASAM exponents"):
        compiled.sumsq([a], [a], b=2)


# ---- availability --------------------------------------------------------------------

@needs_ext
def test_backend_functions_load_the_extension_themselves(monkeypatch):
    """Called directly (not via ops.get_backend, which loads it), a function loads fastsam._C
    itself, or says how to build it."""
    monkeypatch.setattr(compiled, "_module", None)
    monkeypatch.setattr(compiled, "_load_error", None)
    params, backups = [torch.ones(3)], [torch.zeros(3)]
    compiled.CPP.restore_(params, backups)
    assert params[0].tolist() == [0.0, 0.0, 0.0] and compiled._module is not None
    assert compiled.sumsq((torch.ones(4), torch.ones(1))).item() == 5.0  # tuples work too

    monkeypatch.setattr(compiled, "_module", None)
    monkeypatch.setitem(sys.modules, "fastsam._C", None)  # the import now fails as if never built
    with pytest.raises(ops.BackendUnavailableError, match="pip install --no-build-isolation -e ."):
        compiled.CPP.restore_(params, backups)


def test_backends_refuse_the_other_device_type_clearly():
    assert "CPU tensors only" in compiled.CPP.unavailable_reason(torch.device("cuda"))
    assert "CUDA tensors only" in compiled.CUDA.unavailable_reason(torch.device("cpu"))


def test_float64_goes_to_foreach_under_auto_and_is_refused_explicitly():
    if ops.resolve_auto("cpu") == "cpp":
        assert ops.resolve_auto("cpu", torch.float64) == "foreach"
        with pytest.raises(ops.BackendUnavailableError, match="does not support torch.float64"):
            ops.get_backend("cpp", "cpu", torch.float64)
    assert torch.float64 not in compiled.CPP.dtypes and torch.float64 not in compiled.CUDA.dtypes


def test_extension_without_cuda_kernels_says_how_to_build_them(monkeypatch):
    monkeypatch.setattr(compiled, "_module", types.SimpleNamespace(WITH_CUDA=0))
    monkeypatch.setattr(compiled, "_load_error", None)
    reason = compiled.CUDA.unavailable_reason(torch.device("cuda"))
    assert "built without CUDA kernels" in reason and "pip install --no-build-isolation -e ." in reason


def test_missing_extension_is_reported_with_the_build_command():
    """A fresh interpreter where fastsam._C cannot be imported (as after a pure-Python install)."""
    code = textwrap.dedent("""
        import importlib.abc, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "fastsam._C":
                    raise ModuleNotFoundError("No module named 'fastsam._C'", name=name)
        sys.meta_path.insert(0, Block())
        import torch
        from fastsam import ops
        assert "cpp" not in ops.available_backends("cpu"), ops.available_backends("cpu")
        assert ops.resolve_auto("cpu") == "foreach"
        try:
            ops.get_backend("cpp", "cpu")
        except ops.BackendUnavailableError as error:
            print(error)
        else:
            raise SystemExit("no error")
    """)
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": ROOT}, timeout=120)
    assert result.returncode == 0, result.stderr
    message = result.stdout
    assert "installed without its compiled extension" in message
    assert "pip install --no-build-isolation -e ." in message


# ---- GPU only ------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=gpu)])
def test_multi_launch_sets_match_reference(device, dtype):
    """More tensors than the slots in use (so several launches even with 32 KiB arguments),
    for one list (sumsq) and for GSAM's ascent (4 lists), a tensor longer than one launch's
    blocks, and unaligned views (the scalar path)."""
    config = launch_config()
    gen = torch.Generator().manual_seed(11)
    count = launch_slots(config, 1, 10**6) + 1
    assert count > launch_slots(config, 4, count)
    sizes = [config["chunk"] * config["max_blocks"] + 12345] + torch.randint(1, 300, (count,), generator=gen).tolist()
    params = [torch.randn(n + 1, generator=gen).to(device=device, dtype=dtype)[i % 2:][:n]
              for i, n in enumerate(sizes)]
    grads = [torch.randn(n, generator=gen).to(device=device, dtype=dtype) * 0.1 for n in sizes]
    backend = backend_for(device)
    s = reference.sumsq(grads, params, 1, 0.01)
    assert_close_scaled(backend.sumsq(grads, params, 1, 0.01), s, 0.0, dtype, reduction=True)
    assert_close_scaled(backend.sumsq(grads), reference.sumsq(grads), 0.0, dtype, reduction=True)
    expected = [p.clone() for p in params]
    reference.perturb_(expected, grads, [torch.empty_like(p) for p in params], s, 0.3, 2, 1, 0.01)
    backups, ascent = [torch.empty_like(p) for p in params], [torch.empty_like(g) for g in grads]
    originals = [p.clone() for p in params]
    backend.perturb_(params, grads, backups, s, 0.3, 2, 1, 0.01, 1e-12, ascent)
    assert_lists_equal(backups, originals, "backups must be bit-exact copies")
    assert_lists_equal(ascent, grads, "the raw ascent must be a bit-exact copy of the gradients")
    assert_lists_close(params, expected, [e.double().abs() + g.double().abs() for e, g in zip(expected, grads)])
    stats = backend.gsam_reduce(ascent, grads)
    expected_stats = reference.gsam_reduce(ascent, grads)
    abs_dot = sum((x.double() * y.double()).abs().sum() for x, y in zip(ascent, grads))
    assert_close_scaled(stats[0], expected_stats[0], abs_dot, dtype, reduction=True)
    backend.restore_(params, backups)
    assert_lists_equal(params, originals, "restore must be bit-exact")


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=gpu)])
def test_multi_launch_sets_with_4kib_arguments(device):
    """The same sets with FASTSAM_CUDA_LARGE_PARAMS=0 (every launch within 4 KiB), in a
    fresh process since the switch is read once."""
    env = {**os.environ, "PYTHONPATH": ROOT, "FASTSAM_CUDA_LARGE_PARAMS": "0"}
    test = f"{os.path.relpath(__file__, ROOT)}::test_multi_launch_sets_match_reference"
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", "-m", "gpu", test],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "3 passed" in out.stdout, out.stdout[-2000:]


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=gpu)])
def test_sam_substep_never_synchronises_with_the_host(device):
    backend = backend_for(device)
    params, grads = random_set(device, seed=1), random_set(device, seed=2)
    backups, ascent, accum = ([torch.empty_like(p) for p in params] for _ in range(3))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        s = backend.sumsq(grads, params, 1, 0.01)
        backend.perturb_(params, grads, backups, s, 0.05, 2, 1, 0.01, 1e-12, ascent, backend.sumsq(grads))
        stats = backend.gsam_reduce(ascent, grads)
        backend.restore_(params, backups)
        backend.gsam_combine_(grads, ascent, stats, 0.4)
        backend.accumulate_(accum, grads, 0.5, init=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=gpu)])
def test_sam_substep_can_be_captured_in_a_cuda_graph(device):
    backend = backend_for(device)
    params, grads = random_set(device, seed=1), random_set(device, seed=2)
    backups = [torch.empty_like(p) for p in params]
    originals = [p.clone() for p in params]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside capture
        backend.perturb_(params, grads, backups, backend.sumsq(grads), 0.05)
        backend.restore_(params, backups)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        s = backend.sumsq(grads)
        backend.perturb_(params, grads, backups, s, 0.05)
    graph.replay()
    torch.cuda.synchronize()
    expected = [o.clone() for o in originals]
    reference.perturb_(expected, grads, [torch.empty_like(p) for p in params], reference.sumsq(grads), 0.05)
    for p, e, o, b in zip(params, expected, originals, backups):
        assert torch.equal(b, o)
        assert_close_scaled(p, e, e.double().abs() + 0.05)


# ---- past 2^31 elements (memory: marked slow) -----------------------------------------

# One bf16 tensor of 2^31 + 2^16 + 3 elements (4.3 GB), zero except at MARKED positions:
# the first elements, both sides of 2^31, the last three (alone in the last 16384-element
# CPU item and CUDA chunk), and the two whose index minus 2^31 is also marked (n - 1 and
# n - 2 alias 65538 and 65537 under an int32 wrap, as 2^31 and 2^31 + 1 alias 0 and 1).
# Each holds a distinct power of two, so every sum of a subset of their squares is exact
# in fp32 and different: a dropped tail, a dropped last chunk, a doubled element or an
# index that wraps past 2^31 each give a different total than the closed form.
PAST_2_31 = 2 ** 31 + 2 ** 16 + 3
MARKED = [0, 1, 65537, 65538, 2 ** 31 - 1, 2 ** 31, 2 ** 31 + 1, PAST_2_31 - 3, PAST_2_31 - 2, PAST_2_31 - 1]
MARKED_VALUES = [(-1.0) ** k * 2.0 ** k for k in range(len(MARKED))]  # 1, -2, 4, ..., -512


def check_tensors_past_two_to_the_31_elements(backend, device: str) -> None:
    """sumsq, accumulate_ and restore_ on the MARKED tensor against closed forms."""
    n = PAST_2_31
    where = torch.tensor(MARKED, dtype=torch.int64, device=device)
    values = torch.tensor(MARKED_VALUES, dtype=torch.bfloat16, device=device)
    g = torch.zeros(n, dtype=torch.bfloat16, device=device)
    g[where] = values
    expected_sumsq = sum(v * v for v in MARKED_VALUES)  # sum of 4^k, k < 10: 349525, exact in fp32
    assert backend.sumsq([g]).item() == expected_sumsq, "sumsq lost, doubled or misplaced an element"

    w = torch.zeros(n, dtype=torch.bfloat16, device=device)
    backend.accumulate_([w], [g], 0.5, init=True)  # halving a power of two is exact
    assert w[where].tolist() == [0.5 * v for v in MARKED_VALUES], "accumulate_ missed a marked element"
    assert int(torch.count_nonzero(w)) == len(MARKED), "accumulate_ wrote outside the marked elements"

    backend.restore_([w], [g])  # w <- g: every marked element changes (0.5 v -> v)
    assert w[where].tolist() == MARKED_VALUES, "restore_ missed a marked element"
    assert int(torch.count_nonzero(w)) == len(MARKED), "restore_ wrote outside the marked elements"


@pytest.mark.slow
@pytest.mark.parametrize("device", [pytest.param("cpu", marks=needs_ext), pytest.param("cuda", marks=gpu)])
def test_tensors_past_two_to_the_31_elements(device):
    """64-bit offsets throughout: two 4.3 GB bf16 tensors past 2^31 elements."""
    check_tensors_past_two_to_the_31_elements(backend_for(device), device)
