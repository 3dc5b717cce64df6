"""Triton kernels of the fused base steps and the one-pass unperturb chain.

Same machinery as fastsam/ops/triton_kernels.py (a table of element offsets per role,
chunk programs then lane programs, one launch for all tensors), same numerics: fp32 math,
one rounding per stored result, IEEE division and square root, and the order of
operations of torch.optim's single-tensor path (see csrc/base_step_math.h). Adam's
per-tensor scalars (-lr / bc1 and sqrt(bc2) from each tensor's step count) arrive as a
[2, tensors] fp32 device array, indexed by the program's tensor. Data-dependent scalars
(found_inf, grad_scale, a tensor lr, GSAM's stats) are read by the kernels from device
memory; a skipped step (found_inf) copies the sources into the parameters and writes
nothing else.

Importing this module imports triton and defines the kernels (TRITON_INTERPRET=1 before
the import runs them on CPU tensors).
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

from fastsam.ops.triton_kernels import _chunk_coords, _chunk_ptrs, _lane_coords, _lane_ptrs, _load, _restore_body

_SIZES = ["n_chunks", "n_lanes"]

# Triton 3.8's interpreter converts fp32 to bf16 by truncation (runtime/interpreter.py,
# _convert_float without a rounding mode); compiled kernels round to nearest even. Truncation
# biases every store towards zero: a 7-step bf16 Adam trajectory drifted 5 ulps from fp32
# against 1 for the reference (tests/test_fused_steps.py). Under the interpreter the stores
# below round by hand, so that the CPU tests see the GPU's rounding.
_BF16_BY_HAND = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"))


@triton.jit
def _store(ptrs, x, valid):
    """Round ``x`` once (to nearest even) into the pointee dtype and store it."""
    if _BF16_BY_HAND and ptrs.dtype.element_ty == tl.bfloat16 and x.dtype == tl.float32:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = ((bits + (((bits >> 16) & 1) + 0x7FFF)) >> 16).to(tl.uint16)
        rounded = tl.where(x != x, 0x7FC0, rounded)  # NaN stays NaN
        tl.store(ptrs, rounded.to(tl.bfloat16, bitcast=True), mask=valid)
    else:
        tl.store(ptrs, x.to(ptrs.dtype.element_ty), mask=valid)


# -- the direction a step consumes --------------------------------------------------------

@triton.jit
def _gsam_scalars(stats, gsam_eps):
    """||g_p|| + eps and <g_asc, h> from gsam_reduce's stats (as gsam_combine_kernel)."""
    gp_norm = tl.sqrt_rn(tl.load(stats + 1).to(tl.float32)) + gsam_eps
    return gp_norm, tl.div_rn(tl.load(stats).to(tl.float32), gp_norm)


@triton.jit
def _direction(g_ptrs, asc_ptrs, acc_ptrs, valid, gp_norm, along, alpha, accum_scale, grad_scale,
               GSAM: tl.constexpr, ACCUM: tl.constexpr, GRAD_SCALE: tl.constexpr, MAXIMIZE: tl.constexpr):
    d = _load(g_ptrs, valid).to(tl.float32)
    if GSAM:
        h = tl.div_rn(d, gp_norm)
        d = d - alpha * (_load(asc_ptrs, valid).to(tl.float32) - along * h)
    if ACCUM:
        d = _load(acc_ptrs, valid).to(tl.float32) + accum_scale * d
    if GRAD_SCALE:
        d = tl.div_rn(d, grad_scale)
    if MAXIMIZE:
        d = -d
    return d


# -- element-wise bodies ------------------------------------------------------------------

@triton.jit
def _sgd_body(w_ptrs, src_ptrs, g_ptrs, buf_ptrs, asc_ptrs, acc_ptrs, valid,
              gp_norm, along, alpha, accum_scale, grad_scale, neg_lr, weight_decay, momentum, one_minus_dampening,
              GSAM: tl.constexpr, ACCUM: tl.constexpr, GRAD_SCALE: tl.constexpr, MAXIMIZE: tl.constexpr,
              WEIGHT_DECAY: tl.constexpr, MOMENTUM: tl.constexpr, FIRST: tl.constexpr, NESTEROV: tl.constexpr):
    d = _direction(g_ptrs, asc_ptrs, acc_ptrs, valid, gp_norm, along, alpha, accum_scale, grad_scale,
                   GSAM, ACCUM, GRAD_SCALE, MAXIMIZE)
    w = _load(src_ptrs, valid).to(tl.float32)
    if WEIGHT_DECAY:
        d = d + weight_decay * w
    if MOMENTUM:
        if FIRST:
            buf = d
        else:
            buf = _load(buf_ptrs, valid).to(tl.float32) * momentum + one_minus_dampening * d
        _store(buf_ptrs, buf, valid)
        if NESTEROV:
            d = d + momentum * buf
        else:
            d = buf
    _store(w_ptrs, w + neg_lr * d, valid)


@triton.jit
def _adam_body(w_ptrs, src_ptrs, g_ptrs, m_ptrs, v_ptrs, vmax_ptrs, asc_ptrs, acc_ptrs, valid,
               gp_norm, along, alpha, accum_scale, grad_scale, neg_step_size, bc2_sqrt, decay, weight_decay,
               one_minus_beta1, beta2, one_minus_beta2, eps,
               GSAM: tl.constexpr, ACCUM: tl.constexpr, GRAD_SCALE: tl.constexpr, MAXIMIZE: tl.constexpr,
               WEIGHT_DECAY: tl.constexpr, DECOUPLED: tl.constexpr, AMSGRAD: tl.constexpr,
               SMALL_LERP_WEIGHT: tl.constexpr):
    d = _direction(g_ptrs, asc_ptrs, acc_ptrs, valid, gp_norm, along, alpha, accum_scale, grad_scale,
                   GSAM, ACCUM, GRAD_SCALE, MAXIMIZE)
    w = _load(src_ptrs, valid).to(tl.float32)
    if WEIGHT_DECAY:
        if DECOUPLED:
            w = w * decay
        else:
            d = d + weight_decay * w
    m = _load(m_ptrs, valid).to(tl.float32)
    if SMALL_LERP_WEIGHT:  # torch.lerp's two forms (ATen/native/Lerp.h)
        m = m + one_minus_beta1 * (d - m)
    else:
        m = d - (d - m) * (1.0 - one_minus_beta1)
    v = _load(v_ptrs, valid).to(tl.float32) * beta2
    v = v + one_minus_beta2 * d * d
    _store(m_ptrs, m, valid)
    _store(v_ptrs, v, valid)
    if AMSGRAD:
        vmax = _load(vmax_ptrs, valid).to(tl.float32)
        v = tl.where((vmax != vmax) | (v != v), vmax + v, tl.maximum(vmax, v))  # torch.maximum: NaN wins
        _store(vmax_ptrs, v, valid)
    denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    _store(w_ptrs, w + tl.div_rn(neg_step_size * m, denom), valid)


@triton.jit
def _restore_reduce_body(w_ptrs, backup_ptrs, asc_ptrs, g_ptrs, valid):
    _store(w_ptrs, _load(backup_ptrs, valid), valid)  # same dtype: a bit-exact copy
    a = _load(asc_ptrs, valid).to(tl.float32)
    g = _load(g_ptrs, valid).to(tl.float32)
    return tl.sum(a * g, axis=0), tl.sum(g * g, axis=0)


@triton.jit
def _combine_accumulate_body(acc_ptrs, g_ptrs, asc_ptrs, valid, gp_norm, along, alpha, scale, INIT: tl.constexpr):
    g = _load(g_ptrs, valid).to(tl.float32)
    combined = g - alpha * (_load(asc_ptrs, valid).to(tl.float32) - along * tl.div_rn(g, gp_norm))
    if INIT:
        _store(acc_ptrs, scale * combined, valid)
    else:
        _store(acc_ptrs, _load(acc_ptrs, valid).to(tl.float32) + scale * combined, valid)


@triton.jit
def _restore_accumulate_body(w_ptrs, backup_ptrs, acc_ptrs, g_ptrs, valid, scale, INIT: tl.constexpr):
    _store(w_ptrs, _load(backup_ptrs, valid), valid)
    contribution = scale * _load(g_ptrs, valid).to(tl.float32)
    if INIT:
        _store(acc_ptrs, contribution, valid)
    else:
        _store(acc_ptrs, _load(acc_ptrs, valid).to(tl.float32) + contribution, valid)


# -- kernels ---------------------------------------------------------------------------------
# Roles (table columns): 0 params, 1 sources (the backups, or the params), 2 grads, then the
# state (SGD: buffer; Adam: exp_avg, exp_avg_sq[, max_exp_avg_sq]), then ascent and accum at
# the columns BUF/VMAX, ASCENT and ACCUM_ROLE (host-computed). Absent roles point at column 0
# and the params' base and are never touched (their constexpr flags are off).

@triton.jit(do_not_specialize=_SIZES)
def sgd_step_kernel(w_base, src_base, g_base, buf_base, asc_base, acc_base,
                    table, chunk_tensor, chunk_index, lane_tensor, lane_element, n_chunks, n_lanes,
                    lr_ptr, grad_scale_ptr, found_inf_ptr, stats_ptr,
                    lr, weight_decay, momentum, one_minus_dampening, alpha, gsam_eps, accum_scale,
                    BUF: tl.constexpr, ASCENT: tl.constexpr, ACCUM_ROLE: tl.constexpr,
                    GSAM: tl.constexpr, ACCUM: tl.constexpr, GRAD_SCALE: tl.constexpr, MAXIMIZE: tl.constexpr,
                    WEIGHT_DECAY: tl.constexpr, MOMENTUM: tl.constexpr, FIRST: tl.constexpr,
                    NESTEROV: tl.constexpr, LR_TENSOR: tl.constexpr, FOUND_INF: tl.constexpr,
                    HAS_BACKUPS: tl.constexpr,
                    ROLES: tl.constexpr, BLOCK: tl.constexpr, LANES: tl.constexpr, ALIGNED: tl.constexpr):
    """One SGD step of w from its source; see fastsam/ops/__init__.py (sgd_step_)."""
    if LR_TENSOR:
        neg_lr = -tl.load(lr_ptr).to(tl.float32)
    else:
        neg_lr = -lr
    if GRAD_SCALE:
        grad_scale = tl.load(grad_scale_ptr).to(tl.float32)
    else:
        grad_scale = lr  # unused
    if GSAM:
        gp_norm, along = _gsam_scalars(stats_ptr, gsam_eps)
    else:
        gp_norm, along = lr, lr  # unused
    if FOUND_INF:
        skip = tl.load(found_inf_ptr) != 0
    else:
        skip = False
    pid = tl.program_id(0)
    if pid < n_chunks:
        t, element = _chunk_coords(chunk_tensor, chunk_index, pid, BLOCK)
        w_ptrs = _chunk_ptrs(w_base, table, ROLES, 0, t, element, ALIGNED)
        src_ptrs = _chunk_ptrs(src_base, table, ROLES, 1, t, element, ALIGNED)
        if skip:
            if HAS_BACKUPS:
                _restore_body(w_ptrs, src_ptrs, None)
        else:
            _sgd_body(w_ptrs, src_ptrs, _chunk_ptrs(g_base, table, ROLES, 2, t, element, ALIGNED),
                      _chunk_ptrs(buf_base, table, ROLES, BUF, t, element, ALIGNED),
                      _chunk_ptrs(asc_base, table, ROLES, ASCENT, t, element, ALIGNED),
                      _chunk_ptrs(acc_base, table, ROLES, ACCUM_ROLE, t, element, ALIGNED), None,
                      gp_norm, along, alpha, accum_scale, grad_scale, neg_lr, weight_decay, momentum,
                      one_minus_dampening, GSAM, ACCUM, GRAD_SCALE, MAXIMIZE, WEIGHT_DECAY, MOMENTUM, FIRST, NESTEROV)
    else:
        lt, lelement, valid = _lane_coords(lane_tensor, lane_element, n_chunks, n_lanes, pid, LANES)
        lw_ptrs = _lane_ptrs(w_base, table, ROLES, 0, lt, lelement, valid)
        lsrc_ptrs = _lane_ptrs(src_base, table, ROLES, 1, lt, lelement, valid)
        if skip:
            if HAS_BACKUPS:
                _restore_body(lw_ptrs, lsrc_ptrs, valid)
        else:
            _sgd_body(lw_ptrs, lsrc_ptrs, _lane_ptrs(g_base, table, ROLES, 2, lt, lelement, valid),
                      _lane_ptrs(buf_base, table, ROLES, BUF, lt, lelement, valid),
                      _lane_ptrs(asc_base, table, ROLES, ASCENT, lt, lelement, valid),
                      _lane_ptrs(acc_base, table, ROLES, ACCUM_ROLE, lt, lelement, valid), valid,
                      gp_norm, along, alpha, accum_scale, grad_scale, neg_lr, weight_decay, momentum,
                      one_minus_dampening, GSAM, ACCUM, GRAD_SCALE, MAXIMIZE, WEIGHT_DECAY, MOMENTUM, FIRST, NESTEROV)


@triton.jit(do_not_specialize=_SIZES + ["n_tensors"])
def adam_step_kernel(w_base, src_base, g_base, m_base, v_base, vmax_base, asc_base, acc_base,
                     table, chunk_tensor, chunk_index, lane_tensor, lane_element, n_chunks, n_lanes,
                     per_tensor, n_tensors, decay_ptr, grad_scale_ptr, found_inf_ptr, stats_ptr,
                     decay, weight_decay, one_minus_beta1, beta2, one_minus_beta2, eps, alpha, gsam_eps, accum_scale,
                     VMAX: tl.constexpr, ASCENT: tl.constexpr, ACCUM_ROLE: tl.constexpr,
                     GSAM: tl.constexpr, ACCUM: tl.constexpr, GRAD_SCALE: tl.constexpr, MAXIMIZE: tl.constexpr,
                     WEIGHT_DECAY: tl.constexpr, DECOUPLED: tl.constexpr, AMSGRAD: tl.constexpr,
                     SMALL_LERP_WEIGHT: tl.constexpr, DECAY_TENSOR: tl.constexpr, FOUND_INF: tl.constexpr,
                     HAS_BACKUPS: tl.constexpr,
                     ROLES: tl.constexpr, BLOCK: tl.constexpr, LANES: tl.constexpr, ALIGNED: tl.constexpr):
    """One Adam(W) step; per_tensor[0, t] = -lr / bc1, per_tensor[1, t] = sqrt(bc2) (see adam_step_)."""
    if DECAY_TENSOR:
        decay_f = tl.load(decay_ptr).to(tl.float32)
    else:
        decay_f = decay
    if GRAD_SCALE:
        grad_scale = tl.load(grad_scale_ptr).to(tl.float32)
    else:
        grad_scale = decay  # unused
    if GSAM:
        gp_norm, along = _gsam_scalars(stats_ptr, gsam_eps)
    else:
        gp_norm, along = decay, decay  # unused
    if FOUND_INF:
        skip = tl.load(found_inf_ptr) != 0
    else:
        skip = False
    pid = tl.program_id(0)
    if pid < n_chunks:
        t, element = _chunk_coords(chunk_tensor, chunk_index, pid, BLOCK)
        w_ptrs = _chunk_ptrs(w_base, table, ROLES, 0, t, element, ALIGNED)
        src_ptrs = _chunk_ptrs(src_base, table, ROLES, 1, t, element, ALIGNED)
        if skip:
            if HAS_BACKUPS:
                _restore_body(w_ptrs, src_ptrs, None)
        else:
            _adam_body(w_ptrs, src_ptrs, _chunk_ptrs(g_base, table, ROLES, 2, t, element, ALIGNED),
                       _chunk_ptrs(m_base, table, ROLES, 3, t, element, ALIGNED),
                       _chunk_ptrs(v_base, table, ROLES, 4, t, element, ALIGNED),
                       _chunk_ptrs(vmax_base, table, ROLES, VMAX, t, element, ALIGNED),
                       _chunk_ptrs(asc_base, table, ROLES, ASCENT, t, element, ALIGNED),
                       _chunk_ptrs(acc_base, table, ROLES, ACCUM_ROLE, t, element, ALIGNED), None,
                       gp_norm, along, alpha, accum_scale, grad_scale,
                       tl.load(per_tensor + t), tl.load(per_tensor + n_tensors + t), decay_f, weight_decay,
                       one_minus_beta1, beta2, one_minus_beta2, eps,
                       GSAM, ACCUM, GRAD_SCALE, MAXIMIZE, WEIGHT_DECAY, DECOUPLED, AMSGRAD, SMALL_LERP_WEIGHT)
    else:
        lt, lelement, valid = _lane_coords(lane_tensor, lane_element, n_chunks, n_lanes, pid, LANES)
        lw_ptrs = _lane_ptrs(w_base, table, ROLES, 0, lt, lelement, valid)
        lsrc_ptrs = _lane_ptrs(src_base, table, ROLES, 1, lt, lelement, valid)
        if skip:
            if HAS_BACKUPS:
                _restore_body(lw_ptrs, lsrc_ptrs, valid)
        else:
            _adam_body(lw_ptrs, lsrc_ptrs, _lane_ptrs(g_base, table, ROLES, 2, lt, lelement, valid),
                       _lane_ptrs(m_base, table, ROLES, 3, lt, lelement, valid),
                       _lane_ptrs(v_base, table, ROLES, 4, lt, lelement, valid),
                       _lane_ptrs(vmax_base, table, ROLES, VMAX, lt, lelement, valid),
                       _lane_ptrs(asc_base, table, ROLES, ASCENT, lt, lelement, valid),
                       _lane_ptrs(acc_base, table, ROLES, ACCUM_ROLE, lt, lelement, valid), valid,
                       gp_norm, along, alpha, accum_scale, grad_scale,
                       tl.load(per_tensor + lt, mask=valid, other=1.0),
                       tl.load(per_tensor + n_tensors + lt, mask=valid, other=1.0), decay_f, weight_decay,
                       one_minus_beta1, beta2, one_minus_beta2, eps,
                       GSAM, ACCUM, GRAD_SCALE, MAXIMIZE, WEIGHT_DECAY, DECOUPLED, AMSGRAD, SMALL_LERP_WEIGHT)


@triton.jit(do_not_specialize=_SIZES + ["n_programs"])
def restore_gsam_reduce_kernel(w_base, backup_base, asc_base, g_base,
                               table, chunk_tensor, chunk_index, lane_tensor, lane_element, n_chunks, n_lanes,
                               partials, n_programs,
                               ROLES: tl.constexpr, BLOCK: tl.constexpr, LANES: tl.constexpr,
                               ALIGNED: tl.constexpr):
    """w <- backup; partials[pid] = sum g_asc g_p, partials[n_programs + pid] = sum g_p^2."""
    pid = tl.program_id(0)
    if pid < n_chunks:
        t, element = _chunk_coords(chunk_tensor, chunk_index, pid, BLOCK)
        dot, sq = _restore_reduce_body(_chunk_ptrs(w_base, table, ROLES, 0, t, element, ALIGNED),
                                       _chunk_ptrs(backup_base, table, ROLES, 1, t, element, ALIGNED),
                                       _chunk_ptrs(asc_base, table, ROLES, 2, t, element, ALIGNED),
                                       _chunk_ptrs(g_base, table, ROLES, 3, t, element, ALIGNED), None)
        tl.store(partials + pid, dot)
        tl.store(partials + n_programs + pid, sq)
    else:
        lt, lelement, valid = _lane_coords(lane_tensor, lane_element, n_chunks, n_lanes, pid, LANES)
        ldot, lsq = _restore_reduce_body(_lane_ptrs(w_base, table, ROLES, 0, lt, lelement, valid),
                                         _lane_ptrs(backup_base, table, ROLES, 1, lt, lelement, valid),
                                         _lane_ptrs(asc_base, table, ROLES, 2, lt, lelement, valid),
                                         _lane_ptrs(g_base, table, ROLES, 3, lt, lelement, valid), valid)
        tl.store(partials + pid, ldot)
        tl.store(partials + n_programs + pid, lsq)


@triton.jit(do_not_specialize=_SIZES)
def gsam_combine_accumulate_kernel(acc_base, g_base, asc_base,
                                   table, chunk_tensor, chunk_index, lane_tensor, lane_element, n_chunks, n_lanes,
                                   stats, alpha, eps, scale, INIT: tl.constexpr,
                                   ROLES: tl.constexpr, BLOCK: tl.constexpr, LANES: tl.constexpr,
                                   ALIGNED: tl.constexpr):
    """acc <- [acc +] scale (g_p - alpha (g_asc - <g_asc, h> h)); roles: 0 accum, 1 g_p, 2 ascent."""
    gp_norm, along = _gsam_scalars(stats, eps)
    pid = tl.program_id(0)
    if pid < n_chunks:
        t, element = _chunk_coords(chunk_tensor, chunk_index, pid, BLOCK)
        _combine_accumulate_body(_chunk_ptrs(acc_base, table, ROLES, 0, t, element, ALIGNED),
                                 _chunk_ptrs(g_base, table, ROLES, 1, t, element, ALIGNED),
                                 _chunk_ptrs(asc_base, table, ROLES, 2, t, element, ALIGNED), None,
                                 gp_norm, along, alpha, scale, INIT)
    else:
        lt, lelement, valid = _lane_coords(lane_tensor, lane_element, n_chunks, n_lanes, pid, LANES)
        _combine_accumulate_body(_lane_ptrs(acc_base, table, ROLES, 0, lt, lelement, valid),
                                 _lane_ptrs(g_base, table, ROLES, 1, lt, lelement, valid),
                                 _lane_ptrs(asc_base, table, ROLES, 2, lt, lelement, valid), valid,
                                 gp_norm, along, alpha, scale, INIT)


@triton.jit(do_not_specialize=_SIZES)
def restore_accumulate_kernel(w_base, backup_base, acc_base, g_base,
                              table, chunk_tensor, chunk_index, lane_tensor, lane_element, n_chunks, n_lanes,
                              scale, INIT: tl.constexpr,
                              ROLES: tl.constexpr, BLOCK: tl.constexpr, LANES: tl.constexpr,
                              ALIGNED: tl.constexpr):
    """w <- backup; acc <- [acc +] scale g; roles: 0 w, 1 backup, 2 accum, 3 g."""
    pid = tl.program_id(0)
    if pid < n_chunks:
        t, element = _chunk_coords(chunk_tensor, chunk_index, pid, BLOCK)
        _restore_accumulate_body(_chunk_ptrs(w_base, table, ROLES, 0, t, element, ALIGNED),
                                 _chunk_ptrs(backup_base, table, ROLES, 1, t, element, ALIGNED),
                                 _chunk_ptrs(acc_base, table, ROLES, 2, t, element, ALIGNED),
                                 _chunk_ptrs(g_base, table, ROLES, 3, t, element, ALIGNED), None, scale, INIT)
    else:
        lt, lelement, valid = _lane_coords(lane_tensor, lane_element, n_chunks, n_lanes, pid, LANES)
        _restore_accumulate_body(_lane_ptrs(w_base, table, ROLES, 0, lt, lelement, valid),
                                 _lane_ptrs(backup_base, table, ROLES, 1, lt, lelement, valid),
                                 _lane_ptrs(acc_base, table, ROLES, 2, lt, lelement, valid),
                                 _lane_ptrs(g_base, table, ROLES, 3, lt, lelement, valid), valid, scale, INIT)


def _call_helpers_directly_when_interpreted() -> None:
    """As in triton_kernels.py: under TRITON_INTERPRET=1 the helpers run as plain Python functions."""
    if type(sgd_step_kernel).__name__ != "InterpretedFunction":
        return
    for name, value in list(globals().items()):
        if name.startswith("_") and type(value).__name__ == "InterpretedFunction":
            globals()[name] = value.fn


_call_helpers_directly_when_interpreted()
