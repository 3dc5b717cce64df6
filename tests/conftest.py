"""Shared test helpers: which (device, backend) pairs to test and dtype-aware tolerances.

Every backend that can run on a device is compared with ``reference`` there. CPU cases
are generated for the backends available on the CPU; CUDA cases carry the ``gpu`` marker
and skip only where no CUDA device exists.
"""

from __future__ import annotations

import os

import pytest
import torch

# No GPU: test the triton backend in Triton's CPU interpreter (on before its kernels are defined).
os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")

from fastsam import ops

HAS_CUDA = torch.cuda.is_available()
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# tests.mutation_check: FASTSAM_MUTANT=<op>:<backend> replaces that backend by one with the
# op broken (tests/mutants.py), before any test is collected; the run must then fail.
MUTANT = None
if os.environ.get("FASTSAM_MUTANT"):
    from tests import mutants
    MUTANT = mutants.install(os.environ["FASTSAM_MUTANT"])


def pytest_terminal_summary(terminalreporter):
    if MUTANT is not None:  # printed even with -q; tests.mutation_check looks for it
        terminalreporter.write_line(
            f"fastsam: MUTANT installed, {MUTANT[1]} backend with {MUTANT[0]} broken (FASTSAM_MUTANT)")


def pytest_collection_modifyitems(session, config, items):
    """With a mutant installed, run the same tests in an order that reaches the broken op
    soonest: the cases parametrized with the mutated backend first, tests/test_ops.py's
    among them first and those named after the broken op before the others, then
    everything else in the usual order."""
    if MUTANT is None:
        return
    mutation, backend = MUTANT
    op_stem = mutation.rstrip("_")

    def priority(item):
        params = getattr(getattr(item, "callspec", None), "params", {})
        on_backend = any(value == backend for value in params.values() if isinstance(value, str))
        return (not on_backend, not item.nodeid.startswith("tests/test_ops.py"), op_stem not in item.name)

    order = {id(item): i for i, item in enumerate(items)}
    items.sort(key=lambda item: (priority(item), order[id(item)]))


def fast_backends(device: str) -> list[str]:
    return [name for name in ops.available_backends(device) if name != "reference"]


def backend_cases() -> list:
    """pytest params (device, backend) for every non-reference backend on every device."""
    cases = [pytest.param("cpu", name, id=f"cpu-{name}") for name in fast_backends("cpu")]
    if HAS_CUDA:
        cases += [pytest.param("cuda", name, id=f"cuda-{name}", marks=pytest.mark.gpu)
                  for name in fast_backends("cuda")]
    else:
        cases.append(pytest.param("cuda", "none", id="cuda", marks=[
            pytest.mark.gpu, pytest.mark.skip(reason="no CUDA device on this machine")]))
    return cases


def tolerance(dtype: torch.dtype, reduction: bool = False) -> float:
    """Relative error allowed against the fp32 reference, per unit of operand magnitude.

    fp32 element-wise: a few ulps, 1e-5. fp32 reductions over up to ~1e6 terms: 1e-4,
    because summation order alone moves them that far (measured: torch's own CPU norm
    kernel over 524295 fp32 values is 3e-5 off the float64 sum); tests also reduce each
    tensor on its own, where a lost tail element cannot hide in a large total. Low
    precision: two roundings of the dtype, i.e. no worse than plain PyTorch evaluating the
    formula term by term at that precision.
    """
    if dtype == torch.float32:
        return 1e-4 if reduction else 1e-5
    return 2.0 * torch.finfo(dtype).eps


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, magnitude, dtype=None,
                        reduction: bool = False, describe=None):
    """|actual - expected| <= tol(dtype) * (|expected| + magnitude) + step, elementwise.

    ``magnitude`` is the size of the operands that an implementation rounds on the way
    (a tensor broadcastable to ``expected`` or a float); ``describe(flat_index)``, if given,
    names the failing element in the message. ``step`` is the dtype's subnormal
    spacing (2^-24 in fp16): below the smallest normal number a rounding errs by up to
    half a step whatever the magnitude, so two roundings by up to one step. fp16 perturbed
    weights of ~3e-6 hit this on a GPU, where the foreach backend's fused multiply-add
    rounded once where the reference rounds twice (one step, 6e-8, off).
    """
    dtype = dtype or expected.dtype
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    if isinstance(magnitude, torch.Tensor):
        magnitude = magnitude.detach().double().cpu()
    info = torch.finfo(dtype)
    step = max(1e-30, info.smallest_normal * info.eps)
    bound = tolerance(dtype, reduction) * (e.abs() + magnitude) + step
    err = (a - e).abs()
    bad = err > bound
    if bad.any():
        i = int(torch.nonzero(bad.reshape(-1))[0])
        raise AssertionError(
            f"{int(bad.sum())} of {e.numel()} elements out of tolerance ({dtype}); first at flat index {i}: "
            f"actual {a.reshape(-1)[i].item()!r}, expected {e.reshape(-1)[i].item()!r}, "
            f"bound {bound.reshape(-1)[i].item()!r}" + (f" [{describe(i)}]" if describe else ""))


def _flat(tensors) -> torch.Tensor:
    """One flat tensor of all elements of ``tensors`` (on their device), in order."""
    return torch.cat([t.reshape(-1) for t in tensors]) if len(tensors) else torch.empty(0)


def _where(tensors, flat_index: int) -> str:
    for i, t in enumerate(tensors):
        if flat_index < t.numel():
            return f"tensor {i} (shape {tuple(t.shape)}), element {flat_index}"
        flat_index -= t.numel()
    return "past the end"


def assert_lists_close(actuals, expecteds, magnitudes, dtype=None):
    """assert_close_scaled over whole lists at once: one comparison, not one per tensor.

    On a GPU the per-tensor form cost ~20 s per 2000-tensor case (a device sync and two
    host copies per tensor, 8 test processes on one H200); this moves each list once.
    ``magnitudes`` is a list like ``expecteds`` or a float.
    """
    assert len(actuals) == len(expecteds)
    for a, e in zip(actuals, expecteds):
        assert a.shape == e.shape and a.dtype == e.dtype, f"{a.shape}/{a.dtype} vs {e.shape}/{e.dtype}"
    if not isinstance(magnitudes, (int, float)):
        magnitudes = _flat([m.double() for m in magnitudes])
    assert_close_scaled(_flat(actuals), _flat(expecteds), magnitudes, dtype or expecteds[0].dtype,
                        describe=lambda index: _where(expecteds, index))


def assert_lists_equal(actuals, expecteds, message: str):
    """Bitwise equality of two lists of same-shape tensors, in one comparison."""
    assert len(actuals) == len(expecteds) and all(a.shape == e.shape for a, e in zip(actuals, expecteds))
    assert torch.equal(_flat(actuals), _flat(expecteds)), message


def expected_backends(device: str) -> list[str]:
    """Backends the environment says must be available (CI and the GPU check set these)."""
    var = "FASTSAM_EXPECT_BACKENDS" if device == "cpu" else "FASTSAM_EXPECT_BACKENDS_CUDA"
    return [name for name in os.environ.get(var, "").split(",") if name]
