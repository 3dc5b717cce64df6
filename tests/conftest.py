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
from fastsam.tolerances import assert_close_scaled, tolerance  # noqa: F401  (the suite's tolerances live in fastsam)

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


# Test modules that import a trainer library (seconds each) at collection: skipped unless
# the run selects integration tests (-m integration), so the default run does not pay it.
INTEGRATION_MODULES = ("test_lightning.py", "test_transformers.py")


def pytest_ignore_collect(collection_path, config):
    if collection_path.name not in INTEGRATION_MODULES:
        return None
    markexpr = config.getoption("markexpr") or ""
    if not markexpr:
        return None
    try:
        from _pytest.mark.expression import Expression
        selected = Expression.compile(markexpr).evaluate(lambda name: name == "integration")
    except Exception:  # a pytest without this (internal) API: collect as usual
        return None
    return True if not selected else None
