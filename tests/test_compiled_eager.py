"""The compiled backends' eager entry points (csrc/eager.cpp) against their torch.ops path.

In eager mode fastsam/ops/compiled.py calls fastsam._C's functions directly; torch.compile,
torch function/dispatch modes and tensor subclasses go through torch.ops.fastsam. Both
paths must compute the same bits and behave like in-place torch ops towards autograd.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastsam import ops

pytestmark = pytest.mark.skipif("cpp" not in ops.available_backends("cpu"),
                                reason="fastsam._C is not built (see test_expected_backends_are_available)")


@pytest.fixture
def compiled():
    from fastsam.ops import compiled
    compiled.load_extension()
    return compiled


def tensors(n=37, seed=0, dtype=torch.float32):
    """``n`` tensors of odd sizes (the same sizes for every seed), values from ``seed``."""
    sizes = torch.randint(1, 300, (n,), generator=torch.Generator().manual_seed(0)).tolist()
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(k, generator=gen).to(dtype) for k in sizes]


class NoOps:
    """Makes the torch.ops path fail, so a passing call proves the eager path ran."""

    def __getattr__(self, name):
        raise AssertionError(f"torch.ops.fastsam.{name} was called instead of the eager entry point")


def run_all(backend, dtype):
    w, g, g2 = tensors(seed=1, dtype=dtype), tensors(seed=2, dtype=dtype), tensors(seed=3, dtype=dtype)
    backups, ascent, accum = [torch.empty_like(t) for t in w], [torch.empty_like(t) for t in w], \
        tensors(seed=4, dtype=dtype)
    s = backend.sumsq(g, w, 1, 0.01)
    backend.perturb_(w, g, backups, s, 0.3, 2, 1, 0.01, 1e-12, ascent, backend.sumsq(g))
    stats = backend.gsam_reduce(ascent, g2)
    backend.gsam_combine_(g2, ascent, stats, 0.4)
    backend.accumulate_(accum, g2, 0.5, init=False)
    backend.restore_(w, backups)
    return [s, stats] + w + backups + ascent + g2 + accum


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_eager_and_dispatcher_paths_agree_bitwise(compiled, monkeypatch, dtype):
    backend = ops.get_backend("cpp", "cpu")
    with monkeypatch.context() as m:
        m.setattr(compiled, "_ops", lambda: NoOps())
        eager = run_all(backend, dtype)
    m2 = pytest.MonkeyPatch()
    m2.setattr(compiled, "_eager", lambda: None)
    try:
        dispatched = run_all(backend, dtype)
    finally:
        m2.undo()
    for a, b in zip(eager, dispatched):
        assert torch.equal(a, b)


def test_writes_bump_version_counters_like_inplace_ops(compiled, monkeypatch):
    monkeypatch.setattr(compiled, "_ops", lambda: NoOps())
    backend = ops.get_backend("cpp", "cpu")
    w, b = tensors(3), tensors(3, seed=1)
    assert not all(torch.equal(x, y) for x, y in zip(w, b))
    before_w, before_b = [t._version for t in w], [t._version for t in b]
    backend.restore_(w, b)
    assert [t._version for t in w] == [v + 1 for v in before_w]
    assert [t._version for t in b] == before_b  # read only


def test_autograd_sees_an_inplace_change_to_a_saved_tensor():
    backend = ops.get_backend("cpp", "cpu")
    p = torch.nn.Parameter(torch.randn(5))
    loss = (p * p).sum()  # saves p for backward
    with torch.no_grad():
        backend.restore_([p], [torch.zeros(5)])
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_refuses_to_write_tensors_that_require_grad_in_grad_mode():
    backend = ops.get_backend("cpp", "cpu")
    p = torch.nn.Parameter(torch.randn(5))
    with pytest.raises(RuntimeError, match="under torch.no_grad"):
        backend.restore_([p], [torch.zeros(5)])
    assert not torch.equal(p.detach(), torch.zeros(5))
    with torch.no_grad():
        backend.restore_([p], [torch.zeros(5)])
    assert torch.equal(p.detach(), torch.zeros(5))


class Marked(torch.Tensor):
    """A tensor subclass: the eager path must hand it to torch.ops."""


def test_tensor_subclasses_and_dispatch_modes_go_through_torch_ops(compiled):
    backend = ops.get_backend("cpp", "cpu")
    seen = []

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    w, b = tensors(4), tensors(4, seed=1)
    with Recorder():
        backend.restore_(w, b)
    assert any("fastsam.restore_" in name for name in seen)
    assert all(torch.equal(x, y) for x, y in zip(w, b))

    sub = [t.clone().as_subclass(Marked) for t in tensors(4, seed=2)]
    expected = ops.get_backend("reference", "cpu").sumsq([t.as_subclass(torch.Tensor) for t in sub])
    got = backend.sumsq(sub)
    torch.testing.assert_close(got.as_subclass(torch.Tensor), expected, rtol=1e-6, atol=0)


def test_errors_from_the_kernels_reach_python_as_exceptions():
    backend = ops.get_backend("cpp", "cpu")
    with pytest.raises(RuntimeError, match="has 2 tensors but"):
        backend.restore_(tensors(3), tensors(2))
    with pytest.raises(RuntimeError, match="shape"):
        backend.restore_([torch.zeros(3)], [torch.zeros(4)])
