"""The bench's peer baselines (fastsam.bench.peers) against the reference backend.

A peer is only a fair baseline if it computes what fastsam computes: its perturbation half
alone must leave the weights at reference's w + rho g / (||g|| + eps), its restore must give
the weights back bit for bit, and its GSAM combination must match reference's.
"""

from __future__ import annotations

import pytest
import torch

from fastsam.bench import peers, workloads
from fastsam.ops import reference
from tests.conftest import assert_lists_close, assert_lists_equal

RHO, ALPHA = 0.05, 0.4
# Odd sizes, an empty tensor, a 3-d tensor and many tiny ones.
SHAPES = [(4097,), (1,), (3,), (0,), (3, 5, 7), (278011,)] + [((i % 9) + 1,) for i in range(300)]
ODD = workloads.Workload("odd", "odd sizes for tests", lambda: SHAPES, default=False)


def _snapshot(tensors):
    return [t.clone() for t in tensors]


def _reference_perturbed(w0, g0):
    expected = _snapshot(w0)
    reference.perturb_(expected, g0, [torch.empty_like(w) for w in w0], reference.sumsq(g0), RHO)
    return expected


def _step_magnitudes(w0, g0):
    inv_norm = 1.0 / (reference.sumsq(g0).sqrt().item() + peers.EPS)
    return [w.double().abs() + RHO * inv_norm * g.double().abs() for w, g in zip(w0, g0)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(peers.PEERS))
def test_peer_perturbs_like_reference_and_restores_bit_exactly(name, dtype):
    ts = workloads.TensorSet(ODD, "cpu", dtype)
    w0, g0 = _snapshot(ts.params), _snapshot(ts.grads)
    peer = peers.PEERS[name]()
    peer.perturb(ts, RHO)
    assert_lists_close(peer.weights(ts), _reference_perturbed(w0, g0), _step_magnitudes(w0, g0))
    peer.restore(ts)
    assert_lists_equal(peer.weights(ts), w0, f"{name}: the restore must give the weights back bit for bit")
    assert_lists_equal(ts.params, w0, f"{name}: the TensorSet's weights must end where they started")


@pytest.mark.parametrize("name", list(peers.PEERS))
def test_peer_sam_substep_leaves_the_weights_unchanged_call_after_call(name):
    ts = workloads.TensorSet(ODD, "cpu", torch.float32)
    w0 = _snapshot(ts.params)
    peer = peers.PEERS[name]()
    substep = peers.make_call("sam_substep", peer, ts, RHO, ALPHA)
    for _ in range(3):  # paper and (on a GPU) best-effort rescale the gradients in place each time
        substep()
        assert_lists_equal(peer.weights(ts), w0, f"{name}: a SAM sub-step must end at the original weights")
        assert_lists_equal(ts.params, w0, f"{name}: the TensorSet's weights must end where they started")
    assert all(torch.isfinite(g).all() for g in ts.grads)


@pytest.mark.parametrize("name", peers.peers_for("gsam_substep"))
def test_peer_gsam_matches_reference(name):
    ts = workloads.TensorSet(ODD, "cpu", torch.float32)
    w0, g0 = _snapshot(ts.params), _snapshot(ts.grads)
    # A descent gradient partly along the ascent one, so that the projection <g_asc, h> h matters.
    gen = torch.Generator().manual_seed(1)
    descent = [0.7 * g + 5e-4 * torch.randn(g.shape, generator=gen) for g in g0]
    peer = peers.PEERS[name]()

    peer.perturb(ts, RHO, keep_ascent=True)
    assert_lists_equal(ts.ascent, g0, f"{name}: GSAM's ascent copy must be the ascent gradient")
    assert_lists_close(peer.weights(ts), _reference_perturbed(w0, g0), _step_magnitudes(w0, g0))
    torch._foreach_copy_(ts.grads, descent)  # the descent backward writes new gradients
    peer.gsam_finish(ts, ALPHA)

    assert_lists_equal(peer.weights(ts), w0, f"{name}: GSAM's restore must give the weights back bit for bit")
    expected = _snapshot(descent)
    stats = reference.gsam_reduce(g0, descent)
    reference.gsam_combine_(expected, g0, stats, ALPHA, peers.EPS)
    coefficient = 1.0 + ALPHA * stats[0].item() / (stats[1].sqrt().item() + peers.EPS) ** 2
    assert_lists_close(ts.grads, expected, [abs(coefficient) * d.double().abs() + ALPHA * g.double().abs()
                                            for d, g in zip(descent, g0)])


def test_which_peers_have_gsam():
    assert peers.peers_for("sam_substep") == list(peers.PEERS)
    assert peers.peers_for("gsam_substep") == ["peer:paper", "peer:best-effort"]
    assert peers.peers_for("sumsq") == []
    ts = workloads.TensorSet(workloads.WORKLOADS["mini"], "cpu", torch.float32)
    with pytest.raises(NotImplementedError, match="peer:loop has no GSAM"):
        peers.make_call("gsam_substep", peers.LoopPeer(), ts, RHO, ALPHA)
    with pytest.raises(ValueError, match="sam_substep, gsam_substep only"):
        peers.make_call("sumsq", peers.PaperPeer(), ts, RHO, ALPHA)


def test_peer_loop_keeps_the_shared_weights_where_they_are():
    """peer:loop rebinds .data at every restore (as its original does) on its own copy of the
    weights: the TensorSet's tensors keep their memory, so backends timed beside it do too."""
    ts = workloads.TensorSet(workloads.WORKLOADS["mini"], "cpu", torch.float32)
    addresses = [p.data_ptr() for p in ts.params]
    peer = peers.LoopPeer()
    substep = peers.make_call("sam_substep", peer, ts, RHO, ALPHA)
    substep()
    substep()
    assert [p.data_ptr() for p in ts.params] == addresses
    assert [p.data_ptr() for p in peer.weights(ts)] != addresses
