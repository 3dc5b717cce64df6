"""Triton kernels of the efficient variants' ops (docs/ALGORITHMS.md §9), one launch per op.

Same layout as fastsam/ops/triton_kernels.py, whose addressing helpers they reuse: a table of
element offsets per role, the first ``n_chunks`` programs one full block of one tensor each,
the rest "lanes" over tails and small tensors. fp32 math, one rounding per stored value; the
reduction writes one partial per program, summed in a fixed order by ``sum_partials_kernel``.
Importing this module imports triton and defines the kernels (TRITON_INTERPRET=1 first to run
them on CPU tensors).
"""

from __future__ import annotations

import triton
import triton.language as tl

from fastsam.ops.triton_kernels import _SIZES, _chunk_coords, _chunk_ptrs, _lane_coords, _lane_ptrs, _load, _store


# -- element-wise bodies, shared by the chunk and the lane programs --------------------

@triton.jit
def _project_body(gv_ptrs, gs_ptrs, g_ptrs, valid, c, weight, INIT: tl.constexpr):
    orthogonal = _load(gs_ptrs, valid).to(tl.float32) - c * _load(g_ptrs, valid).to(tl.float32)
    if INIT:
        _store(gv_ptrs, weight * orthogonal, valid)
    else:
        _store(gv_ptrs, _load(gv_ptrs, valid).to(tl.float32) + weight * orthogonal, valid)


@triton.jit
def _combine_body(g_ptrs, gv_ptrs, valid, coefficient):
    g = _load(g_ptrs, valid).to(tl.float32)
    _store(g_ptrs, g + coefficient * _load(gv_ptrs, valid).to(tl.float32), valid)


@triton.jit
def _friendly_body(d_ptrs, m_ptrs, g_ptrs, valid, sigma, lam, one_minus_lam, INIT: tl.constexpr):
    g_raw = _load(g_ptrs, valid)
    if INIT:
        _store(d_ptrs, g_raw, valid)  # same dtype: bit-exact copies
        _store(m_ptrs, g_raw, valid)
        d = g_raw.to(tl.float32)
    else:
        g = g_raw.to(tl.float32)
        m = _load(m_ptrs, valid).to(tl.float32)
        d_stored = (g - sigma * m).to(d_ptrs.dtype.element_ty)
        _store(d_ptrs, d_stored, valid)
        _store(m_ptrs, lam * m + one_minus_lam * g, valid)
        d = d_stored.to(tl.float32)  # the norm is of the stored (rounded) direction
    return tl.sum(d * d, axis=0)


# -- kernels: one program per chunk, then the lane programs ------------------------------
# (names differ between the branches on purpose; see triton_kernels.py)

@triton.jit(do_not_specialize=_SIZES)
def looksam_project_kernel(gv_base, gs_base, g_base,
                           table, chunk_tensor, chunk_index, lane_tensor, lane_element, n_chunks, n_lanes,
                           stats, weight, eps, INIT: tl.constexpr,
                           ROLES: tl.constexpr, BLOCK: tl.constexpr, LANES: tl.constexpr, ALIGNED: tl.constexpr):
    """gv <- (0 if INIT else gv) + weight (g_s - c g), c = <g, g_s> / (||g|| + eps)^2; roles: 0 gv, 1 g_s, 2 g."""
    norm = tl.sqrt_rn(tl.load(stats + 1).to(tl.float32)) + eps
    c = tl.div_rn(tl.load(stats).to(tl.float32), norm * norm)
    pid = tl.program_id(0)
    if pid < n_chunks:
        t, element = _chunk_coords(chunk_tensor, chunk_index, pid, BLOCK)
        _project_body(_chunk_ptrs(gv_base, table, ROLES, 0, t, element, ALIGNED),
                      _chunk_ptrs(gs_base, table, ROLES, 1, t, element, ALIGNED),
                      _chunk_ptrs(g_base, table, ROLES, 2, t, element, ALIGNED), None, c, weight, INIT)
    else:
        lt, lelement, valid = _lane_coords(lane_tensor, lane_element, n_chunks, n_lanes, pid, LANES)
        _project_body(_lane_ptrs(gv_base, table, ROLES, 0, lt, lelement, valid),
                      _lane_ptrs(gs_base, table, ROLES, 1, lt, lelement, valid),
                      _lane_ptrs(g_base, table, ROLES, 2, lt, lelement, valid), valid, c, weight, INIT)


@triton.jit(do_not_specialize=_SIZES)
def looksam_combine_kernel(g_base, gv_base,
                           table, chunk_tensor, chunk_index, lane_tensor, lane_element, n_chunks, n_lanes,
                           grad_sumsq, gv_sumsq, alpha, eps,
                           ROLES: tl.constexpr, BLOCK: tl.constexpr, LANES: tl.constexpr, ALIGNED: tl.constexpr):
    """g <- g + alpha sqrt(grad_sumsq) / (sqrt(gv_sumsq) + eps) gv; roles: 0 g, 1 gv."""
    coefficient = tl.div_rn(alpha * tl.sqrt_rn(tl.load(grad_sumsq).to(tl.float32)),
                            tl.sqrt_rn(tl.load(gv_sumsq).to(tl.float32)) + eps)
    pid = tl.program_id(0)
    if pid < n_chunks:
        t, element = _chunk_coords(chunk_tensor, chunk_index, pid, BLOCK)
        _combine_body(_chunk_ptrs(g_base, table, ROLES, 0, t, element, ALIGNED),
                      _chunk_ptrs(gv_base, table, ROLES, 1, t, element, ALIGNED), None, coefficient)
    else:
        lt, lelement, valid = _lane_coords(lane_tensor, lane_element, n_chunks, n_lanes, pid, LANES)
        _combine_body(_lane_ptrs(g_base, table, ROLES, 0, lt, lelement, valid),
                      _lane_ptrs(gv_base, table, ROLES, 1, lt, lelement, valid), valid, coefficient)


@triton.jit(do_not_specialize=_SIZES)
def friendly_direction_kernel(d_base, m_base, g_base,
                              table, chunk_tensor, chunk_index, lane_tensor, lane_element, n_chunks, n_lanes,
                              partials, sigma, lam, one_minus_lam, INIT: tl.constexpr,
                              ROLES: tl.constexpr, BLOCK: tl.constexpr, LANES: tl.constexpr, ALIGNED: tl.constexpr):
    """d <- g - sigma m, m <- lam m + (1 - lam) g (INIT: both <- g); partials[pid] = sum d^2; roles: 0 d, 1 m, 2 g."""
    pid = tl.program_id(0)
    if pid < n_chunks:
        t, element = _chunk_coords(chunk_tensor, chunk_index, pid, BLOCK)
        part = _friendly_body(_chunk_ptrs(d_base, table, ROLES, 0, t, element, ALIGNED),
                              _chunk_ptrs(m_base, table, ROLES, 1, t, element, ALIGNED),
                              _chunk_ptrs(g_base, table, ROLES, 2, t, element, ALIGNED), None,
                              sigma, lam, one_minus_lam, INIT)
        tl.store(partials + pid, part)
    else:
        lt, lelement, valid = _lane_coords(lane_tensor, lane_element, n_chunks, n_lanes, pid, LANES)
        lpart = _friendly_body(_lane_ptrs(d_base, table, ROLES, 0, lt, lelement, valid),
                               _lane_ptrs(m_base, table, ROLES, 1, lt, lelement, valid),
                               _lane_ptrs(g_base, table, ROLES, 2, lt, lelement, valid), valid,
                               sigma, lam, one_minus_lam, INIT)
        tl.store(partials + pid, lpart)


def _call_helpers_directly_when_interpreted() -> None:
    """As in triton_kernels.py: under TRITON_INTERPRET=1 the bodies run as plain Python functions."""
    if type(friendly_direction_kernel).__name__ != "InterpretedFunction":
        return
    for name, value in list(globals().items()):
        if name.startswith("_") and type(value).__name__ == "InterpretedFunction":
            globals()[name] = value.fn


_call_helpers_directly_when_interpreted()
