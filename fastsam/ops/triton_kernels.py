"""Triton kernels of the ops contract: one launch covers every tensor of a list.

Tensors are reached through a table of int64 element offsets from one base tensor per
role (params, grads, backups, ...), so one kernel signature serves any number of tensors.
A launch plan (built on the host, fastsam/ops/triton_backend.py) gives the first
``n_chunks`` programs one full block of one tensor each (unmasked, vectorised loads);
the remaining programs cover the "lanes": every tail shorter than a block and every
small tensor, packed back to back, each lane with its own (tensor, element) pair.
Math is fp32 whatever the storage dtype; each result is rounded once on the store.
Reductions write one fp32 partial per program; ``sum_partials_kernel`` adds them in a
fixed order (no atomics), so results are bitwise repeatable.

This module imports triton and defines the kernels on import: set TRITON_INTERPRET=1
before importing it to run them on CPU tensors with Triton's interpreter.
"""

from __future__ import annotations

import triton
import triton.language as tl

# The int arguments below change with the tensor lists; specialising on their values
# (== 1, divisible by 16) would only multiply compilations.
_SIZES = ["n_chunks", "n_lanes"]


# -- addressing -----------------------------------------------------------------------

@triton.jit
def _chunk_coords(chunk_tensor, chunk_index, pid, BLOCK: tl.constexpr):
    """Tensor index and element indices of chunk program ``pid`` (a full block)."""
    t = tl.load(chunk_tensor + pid)
    start = tl.load(chunk_index + pid) * BLOCK  # a multiple of BLOCK, which the compiler sees
    return t, start + tl.arange(0, BLOCK)


@triton.jit
def _lane_coords(lane_tensor, lane_element, n_chunks, n_lanes, pid, LANES: tl.constexpr):
    """Per-lane tensor index, element index and validity of lane program ``pid``."""
    lane = (pid.to(tl.int64) - n_chunks) * LANES + tl.arange(0, LANES)
    valid = lane < n_lanes
    t = tl.load(lane_tensor + lane, mask=valid, other=0)
    element = tl.load(lane_element + lane, mask=valid, other=0)
    return t, element, valid


@triton.jit
def _chunk_ptrs(base, table, ROLES: tl.constexpr, ROLE: tl.constexpr, t, element, ALIGNED: tl.constexpr):
    """Pointers to ``element`` of tensor ``t`` of role ``ROLE`` (one tensor for the block)."""
    offset = tl.load(table + (t * ROLES + ROLE))
    if ALIGNED:
        # The host checked that every tensor lies a multiple of 16 bytes from the base
        # (itself 16-byte aligned): tell the compiler, so that it emits 128-bit accesses.
        offset = tl.multiple_of(offset, 128 // base.dtype.element_ty.primitive_bitwidth)
    return base + offset + element


@triton.jit
def _lane_ptrs(base, table, ROLES: tl.constexpr, ROLE: tl.constexpr, t, element, valid):
    """Pointers for lanes that may each belong to another tensor of role ``ROLE``."""
    offset = tl.load(table + (t * ROLES + ROLE), mask=valid, other=0)
    return base + (offset + element)


@triton.jit
def _load(ptrs, valid):
    """Load (masked lanes hold 0); ``valid`` is None for full chunks."""
    if valid is None:
        x = tl.load(ptrs)
    else:
        x = tl.load(ptrs, mask=valid, other=0)
    return x


@triton.jit
def _store(ptrs, x, valid):
    """Round ``x`` once into the pointee dtype and store it."""
    tl.store(ptrs, x.to(ptrs.dtype.element_ty), mask=valid)


@triton.jit
def _inverse_norm(sumsq_ptr, eps):
    """1 / (sqrt(sumsq) + eps) in fp32, IEEE-rounded like torch (not the fast sqrt/div)."""
    sumsq = tl.load(sumsq_ptr).to(tl.float32)
    return tl.div_rn(tl.full((), 1.0, tl.float32), tl.sqrt_rn(sumsq) + eps)


# -- element-wise bodies, shared by the chunk and the lane programs --------------------

@triton.jit
def _sumsq_body(g_ptrs, w_ptrs, valid, eta, B: tl.constexpr):
    x = _load(g_ptrs, valid).to(tl.float32)
    if B == 1:
        x = x * (tl.abs(_load(w_ptrs, valid).to(tl.float32)) + eta)
    return tl.sum(x * x, axis=0)


@triton.jit
def _fmix32(x):
    """MurmurHash3's 32-bit finaliser on uint32 values (csrc/math.h: fmix32)."""
    x = x ^ (x >> 16)
    x = x * 0x85EBCA6B
    x = x ^ (x >> 13)
    x = x * 0xC2B2AE35
    return x ^ (x >> 16)


@triton.jit
def _rounding_bits(seed_ptr, tensor, element):
    """Random bits of (seed, tensor, element), as csrc/math.h's rounding_key/rounding_bits."""
    seed = tl.load(seed_ptr).to(tl.int64)
    low = seed.to(tl.uint32)
    high = (seed >> 32).to(tl.uint32)
    element = element.to(tl.int64)
    key = _fmix32(_fmix32(_fmix32(_fmix32(tensor.to(tl.uint32) ^ 0x9E3779B9) ^ high) ^ low)
                  ^ (element >> 32).to(tl.uint32))
    return _fmix32(element.to(tl.uint32) ^ key)


@triton.jit
def _stochastically_rounded(x, bits, dtype: tl.constexpr):
    """fp32 ``x`` to bf16/fp16 ``dtype``: the nearest value r, or the other neighbour o with
    probability |x - r| / |o - r| (csrc/math.h: stochastically_rounded)."""
    if dtype == tl.bfloat16:
        # round to nearest even on the bits: the interpreter's float-to-bf16 cast truncates
        x_bits = x.to(tl.uint32, bitcast=True)
        r = ((x_bits + 0x7FFF + ((x_bits >> 16) & 1)) >> 16).to(tl.uint16).to(dtype, bitcast=True)
    else:
        r = x.to(dtype)
    rf = r.to(tl.float32)
    r_bits = r.to(tl.uint16, bitcast=True)
    magnitude = r_bits & 0x7FFF
    o_bits = (r_bits & 0x8000) | tl.where(tl.abs(x) > tl.abs(rf), magnitude + 1, magnitude - 1)
    o = o_bits.to(tl.uint16).to(dtype, bitcast=True)
    p = tl.div_rn(tl.abs(x - rf), tl.abs(o.to(tl.float32) - rf))
    u = (bits >> 8).to(tl.float32) * 5.9604644775390625e-08  # 2^-24
    keep = (rf == x) | (u >= p) | (p != p)
    return tl.where(x != x, x.to(dtype), tl.where(keep, r, o))


@triton.jit
def _perturb_body(w_ptrs, g_ptrs, backup_ptrs, ascent_ptrs, valid, scale, ascent_scale, eta, seed_ptr, tensor,
                  element, A: tl.constexpr, HAS_ASCENT: tl.constexpr, NORMALIZE_ASCENT: tl.constexpr,
                  STOCHASTIC: tl.constexpr):
    w = _load(w_ptrs, valid)
    g_raw = _load(g_ptrs, valid)
    g = g_raw.to(tl.float32)
    _store(backup_ptrs, w, valid)  # same dtype: a bit-exact copy
    if HAS_ASCENT:
        if NORMALIZE_ASCENT:
            _store(ascent_ptrs, g * ascent_scale, valid)
        else:
            _store(ascent_ptrs, g_raw, valid)
    w32 = w.to(tl.float32)
    # eps = (scale * T^a) * g with T = |w| + eta, in the reference's order of operations
    if A == 0:
        step = scale * g
    elif A == 1:
        step = (scale * (tl.abs(w32) + eta)) * g
    else:
        t = tl.abs(w32) + eta
        step = (scale * (t * t)) * g
    if STOCHASTIC:
        bits = _rounding_bits(seed_ptr, tensor, element)
        _store(w_ptrs, _stochastically_rounded(w32 + step, bits, w_ptrs.dtype.element_ty), valid)
    else:
        _store(w_ptrs, w32 + step, valid)


@triton.jit
def _restore_body(w_ptrs, backup_ptrs, valid):
    _store(w_ptrs, _load(backup_ptrs, valid), valid)


@triton.jit
def _gsam_reduce_body(ascent_ptrs, g_ptrs, valid):
    a = _load(ascent_ptrs, valid).to(tl.float32)
    g = _load(g_ptrs, valid).to(tl.float32)
    return tl.sum(a * g, axis=0), tl.sum(g * g, axis=0)


@triton.jit
def _gsam_combine_body(g_ptrs, ascent_ptrs, valid, gp_norm, ascent_along_gp, alpha):
    g = _load(g_ptrs, valid).to(tl.float32)
    a = _load(ascent_ptrs, valid).to(tl.float32)
    h = tl.div_rn(g, gp_norm)
    orthogonal = a - ascent_along_gp * h
    _store(g_ptrs, g - alpha * orthogonal, valid)


@triton.jit
def _accumulate_body(acc_ptrs, g_ptrs, valid, scale, INIT: tl.constexpr):
    contribution = scale * _load(g_ptrs, valid).to(tl.float32)
    if INIT:
        _store(acc_ptrs, contribution, valid)
    else:
        _store(acc_ptrs, _load(acc_ptrs, valid).to(tl.float32) + contribution, valid)


# -- kernels: one program per chunk, then the lane programs ------------------------------
# Every kernel takes the same plan arguments after its base tensors (table ... n_lanes),
# and ROLES, the number of columns of the table: one per role it was given, then one with
# each tensor's position in the caller's lists.
# Names differ between the two branches on purpose: the compiler merges variables
# assigned in both branches of a runtime `if`, and a scalar cannot merge with a block.

@triton.jit(do_not_specialize=_SIZES)
def sumsq_kernel(g_base, w_base,
                 table, chunk_tensor, chunk_index, lane_tensor, lane_element, n_chunks, n_lanes,
                 partials, eta, B: tl.constexpr,
                 ROLES: tl.constexpr, BLOCK: tl.constexpr, LANES: tl.constexpr, ALIGNED: tl.constexpr):
    """partials[pid] = sum over the program's elements of (T^B g)^2; roles: 0 grads, 1 params."""
    pid = tl.program_id(0)
    if pid < n_chunks:
        t, element = _chunk_coords(chunk_tensor, chunk_index, pid, BLOCK)
        g_ptrs = _chunk_ptrs(g_base, table, ROLES, 0, t, element, ALIGNED)
        if B == 1:
            w_ptrs = _chunk_ptrs(w_base, table, ROLES, 1, t, element, ALIGNED)
        else:
            w_ptrs = g_ptrs
        tl.store(partials + pid, _sumsq_body(g_ptrs, w_ptrs, None, eta, B))
    else:
        lt, lelement, valid = _lane_coords(lane_tensor, lane_element, n_chunks, n_lanes, pid, LANES)
        lg_ptrs = _lane_ptrs(g_base, table, ROLES, 0, lt, lelement, valid)
        if B == 1:
            lw_ptrs = _lane_ptrs(w_base, table, ROLES, 1, lt, lelement, valid)
        else:
            lw_ptrs = lg_ptrs
        tl.store(partials + pid, _sumsq_body(lg_ptrs, lw_ptrs, valid, eta, B))


@triton.jit(do_not_specialize=_SIZES)
def perturb_kernel(w_base, g_base, backup_base, ascent_base,
                   table, chunk_tensor, chunk_index, lane_tensor, lane_element, n_chunks, n_lanes,
                   sumsq_ptr, ascent_sumsq_ptr, seed_ptr, rho, eta, eps,
                   A: tl.constexpr, HAS_ASCENT: tl.constexpr, NORMALIZE_ASCENT: tl.constexpr,
                   STOCHASTIC: tl.constexpr,
                   ROLES: tl.constexpr, BLOCK: tl.constexpr, LANES: tl.constexpr, ALIGNED: tl.constexpr):
    """backup <- w; w <- w + rho T^A g / (sqrt(sumsq) + eps); roles: 0 w, 1 g, 2 backup, 3 ascent.

    STOCHASTIC: bf16/fp16 results are rounded stochastically with the bits of (*seed_ptr,
    tensor position, element index)."""
    scale = rho * _inverse_norm(sumsq_ptr, eps)  # read on the device: the host never waits
    if NORMALIZE_ASCENT:
        ascent_scale = _inverse_norm(ascent_sumsq_ptr, eps)
    else:
        ascent_scale = scale  # unused
    pid = tl.program_id(0)
    if pid < n_chunks:
        t, element = _chunk_coords(chunk_tensor, chunk_index, pid, BLOCK)
        w_ptrs = _chunk_ptrs(w_base, table, ROLES, 0, t, element, ALIGNED)
        if HAS_ASCENT:
            ascent_ptrs = _chunk_ptrs(ascent_base, table, ROLES, 3, t, element, ALIGNED)
        else:
            ascent_ptrs = w_ptrs  # unused
        position = tl.load(table + (t * ROLES + ROLES - 1))  # t indexes the non-empty tensors only
        _perturb_body(w_ptrs, _chunk_ptrs(g_base, table, ROLES, 1, t, element, ALIGNED),
                      _chunk_ptrs(backup_base, table, ROLES, 2, t, element, ALIGNED), ascent_ptrs,
                      None, scale, ascent_scale, eta, seed_ptr, position, element, A, HAS_ASCENT,
                      NORMALIZE_ASCENT, STOCHASTIC)
    else:
        lt, lelement, valid = _lane_coords(lane_tensor, lane_element, n_chunks, n_lanes, pid, LANES)
        lw_ptrs = _lane_ptrs(w_base, table, ROLES, 0, lt, lelement, valid)
        if HAS_ASCENT:
            lascent_ptrs = _lane_ptrs(ascent_base, table, ROLES, 3, lt, lelement, valid)
        else:
            lascent_ptrs = lw_ptrs  # unused
        lposition = tl.load(table + (lt * ROLES + ROLES - 1), mask=valid, other=0)
        _perturb_body(lw_ptrs, _lane_ptrs(g_base, table, ROLES, 1, lt, lelement, valid),
                      _lane_ptrs(backup_base, table, ROLES, 2, lt, lelement, valid), lascent_ptrs,
                      valid, scale, ascent_scale, eta, seed_ptr, lposition, lelement, A, HAS_ASCENT,
                      NORMALIZE_ASCENT, STOCHASTIC)


@triton.jit(do_not_specialize=_SIZES)
def restore_kernel(w_base, backup_base,
                   table, chunk_tensor, chunk_index, lane_tensor, lane_element, n_chunks, n_lanes,
                   ROLES: tl.constexpr, BLOCK: tl.constexpr, LANES: tl.constexpr, ALIGNED: tl.constexpr):
    """w <- backup; roles: 0 w, 1 backup."""
    pid = tl.program_id(0)
    if pid < n_chunks:
        t, element = _chunk_coords(chunk_tensor, chunk_index, pid, BLOCK)
        _restore_body(_chunk_ptrs(w_base, table, ROLES, 0, t, element, ALIGNED),
                      _chunk_ptrs(backup_base, table, ROLES, 1, t, element, ALIGNED), None)
    else:
        lt, lelement, valid = _lane_coords(lane_tensor, lane_element, n_chunks, n_lanes, pid, LANES)
        _restore_body(_lane_ptrs(w_base, table, ROLES, 0, lt, lelement, valid),
                      _lane_ptrs(backup_base, table, ROLES, 1, lt, lelement, valid), valid)


@triton.jit(do_not_specialize=_SIZES + ["n_programs"])
def gsam_reduce_kernel(ascent_base, g_base,
                       table, chunk_tensor, chunk_index, lane_tensor, lane_element, n_chunks, n_lanes,
                       partials, n_programs,
                       ROLES: tl.constexpr, BLOCK: tl.constexpr, LANES: tl.constexpr, ALIGNED: tl.constexpr):
    """partials[pid] = sum g_asc g_p, partials[n_programs + pid] = sum g_p^2; roles: 0 ascent, 1 g_p."""
    pid = tl.program_id(0)
    if pid < n_chunks:
        t, element = _chunk_coords(chunk_tensor, chunk_index, pid, BLOCK)
        dot, sq = _gsam_reduce_body(_chunk_ptrs(ascent_base, table, ROLES, 0, t, element, ALIGNED),
                                    _chunk_ptrs(g_base, table, ROLES, 1, t, element, ALIGNED), None)
        tl.store(partials + pid, dot)
        tl.store(partials + n_programs + pid, sq)
    else:
        lt, lelement, valid = _lane_coords(lane_tensor, lane_element, n_chunks, n_lanes, pid, LANES)
        ldot, lsq = _gsam_reduce_body(_lane_ptrs(ascent_base, table, ROLES, 0, lt, lelement, valid),
                                      _lane_ptrs(g_base, table, ROLES, 1, lt, lelement, valid), valid)
        tl.store(partials + pid, ldot)
        tl.store(partials + n_programs + pid, lsq)


@triton.jit(do_not_specialize=_SIZES)
def gsam_combine_kernel(g_base, ascent_base,
                        table, chunk_tensor, chunk_index, lane_tensor, lane_element, n_chunks, n_lanes,
                        stats, alpha, eps,
                        ROLES: tl.constexpr, BLOCK: tl.constexpr, LANES: tl.constexpr, ALIGNED: tl.constexpr):
    """g_p <- g_p - alpha (g_asc - <g_asc, h> h), h = g_p / (|g_p| + eps); roles: 0 g_p, 1 ascent."""
    gp_norm = tl.sqrt_rn(tl.load(stats + 1).to(tl.float32)) + eps
    ascent_along_gp = tl.div_rn(tl.load(stats).to(tl.float32), gp_norm)
    pid = tl.program_id(0)
    if pid < n_chunks:
        t, element = _chunk_coords(chunk_tensor, chunk_index, pid, BLOCK)
        _gsam_combine_body(_chunk_ptrs(g_base, table, ROLES, 0, t, element, ALIGNED),
                           _chunk_ptrs(ascent_base, table, ROLES, 1, t, element, ALIGNED),
                           None, gp_norm, ascent_along_gp, alpha)
    else:
        lt, lelement, valid = _lane_coords(lane_tensor, lane_element, n_chunks, n_lanes, pid, LANES)
        _gsam_combine_body(_lane_ptrs(g_base, table, ROLES, 0, lt, lelement, valid),
                           _lane_ptrs(ascent_base, table, ROLES, 1, lt, lelement, valid),
                           valid, gp_norm, ascent_along_gp, alpha)


@triton.jit(do_not_specialize=_SIZES)
def accumulate_kernel(acc_base, g_base,
                      table, chunk_tensor, chunk_index, lane_tensor, lane_element, n_chunks, n_lanes,
                      scale, INIT: tl.constexpr,
                      ROLES: tl.constexpr, BLOCK: tl.constexpr, LANES: tl.constexpr, ALIGNED: tl.constexpr):
    """acc <- scale g (INIT) or acc + scale g; roles: 0 accumulator, 1 g."""
    pid = tl.program_id(0)
    if pid < n_chunks:
        t, element = _chunk_coords(chunk_tensor, chunk_index, pid, BLOCK)
        _accumulate_body(_chunk_ptrs(acc_base, table, ROLES, 0, t, element, ALIGNED),
                         _chunk_ptrs(g_base, table, ROLES, 1, t, element, ALIGNED), None, scale, INIT)
    else:
        lt, lelement, valid = _lane_coords(lane_tensor, lane_element, n_chunks, n_lanes, pid, LANES)
        _accumulate_body(_lane_ptrs(acc_base, table, ROLES, 0, lt, lelement, valid),
                         _lane_ptrs(g_base, table, ROLES, 1, lt, lelement, valid), valid, scale, INIT)


@triton.jit(do_not_specialize=["n"])
def sum_partials_kernel(partials, out, n, BLOCK: tl.constexpr):
    """out[row] = sum of partials[row * n : (row + 1) * n], always in the same order."""
    row = tl.program_id(0)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    # a while loop, not range(0, n, BLOCK): triton 3.6's interpreter cannot turn the
    # runtime n into a Python int for range() under numpy 2.4 ("only 0-dimensional arrays
    # can be converted to Python scalars"); 3.8 can. Both compile it to the same loop.
    start = 0
    while start < n:
        index = start + tl.arange(0, BLOCK)
        acc += tl.load(partials + row * n + index, mask=index < n, other=0.0)
        start += BLOCK
    tl.store(out + row, tl.sum(acc, axis=0))


def _call_helpers_directly_when_interpreted() -> None:
    """Under TRITON_INTERPRET=1, let kernels call the helpers above as plain Python functions.

    The interpreter re-patches triton.language on every call of a nested @triton.jit
    function (~1 ms each, measured with triton 3.8), which made helpers cost ten times the
    arithmetic. The plain functions are the same source and run inside the kernel's own
    patched scope. Compiled kernels (GPU) are unaffected.
    """
    if type(perturb_kernel).__name__ != "InterpretedFunction":
        return
    for name, value in list(globals().items()):
        if name.startswith("_") and type(value).__name__ == "InterpretedFunction":
            globals()[name] = value.fn


_call_helpers_directly_when_interpreted()
