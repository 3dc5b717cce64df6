"""The fused SAM + base step: torch.optim's SGD, Adam or AdamW update taken from SAM's backup.

After the perturbed backward an unfused SAM step restores w from the backup (8N bytes for N
fp32 weights) and then runs the base optimizer, which reads w again. The fused step reads
the backup where the optimizer reads w, so the restore pass disappears; with GSAM the
combination is folded into the same sweep (the ops ``sgd_step_`` / ``adam_step_`` of
fastsam/ops/__init__.py; the bytes of every path are tabled in docs/DESIGN.md §9).

``SAM(fused_base_step=...)`` chooses it:

* ``"auto"`` (the default): fused where it was measured faster: the ``cpp`` backend on the
  CPU (README "Speed"). Not on CUDA until a GPU run has measured the fused kernels there,
  not with ``foreach`` (its composition of foreach ops measured slower than torch's own
  fused step), nor with ``reference``, which stays the plain composition with torch.optim.
* ``True``: fused wherever it is supported; ``False``: never.

It is used only where SAM knows the base step follows the restore at once:
``second_step()``, ``step(closure)`` and ``fastsam.train_step`` without gradient clipping
(with sub-batches the last one's accumulation goes into the step too: ``accums``). The
combined (GSAM) or summed (sub-batches) gradient exists only inside the sweep, so ``.grad``
then holds the descent pass's own gradient, or None after sub-batches. The optimizer's ``state`` stays torch.optim's own (the
same keys, dtypes and devices; a first step initialises it exactly as torch does), so
checkpoints move freely between fused runs, unfused runs and plain torch.optim.

What is supported (anything else takes the unfused path, with one log line per reason):
exactly ``torch.optim.SGD`` (momentum, dampening, nesterov, weight_decay, maximize),
``torch.optim.Adam`` and ``torch.optim.AdamW`` (weight_decay, amsgrad, maximize,
decoupled weight decay), each with a float or tensor lr, ``differentiable=False``, float
betas, no optimizer step hooks, no FSDP-sharded or float64 parameters, and for Adam step counts on
the parameters' device (always on the CPU; on CUDA ``capturable=True`` or ``fused=True``).
A GradScaler works through torch's own protocol for fused optimizers (``grad_scale`` and
``found_inf`` read by the kernels, a skipped step writes w <- backup and nothing else).
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import Tensor
from torch.optim import Optimizer

logger = logging.getLogger("fastsam")

MODES = ("auto", True, False)
SUPPORTED = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)


def check_mode(mode) -> None:
    if not any(mode is m or (isinstance(m, str) and mode == m) for m in MODES):
        raise ValueError(f"fused_base_step must be 'auto', True or False; got {mode!r}")


def _step_hooks(base: Optimizer) -> bool:
    from torch.optim import optimizer as optim_module
    return bool(base._optimizer_step_pre_hooks or base._optimizer_step_post_hooks
                or getattr(optim_module, "_global_optimizer_pre_hooks", None)
                or getattr(optim_module, "_global_optimizer_post_hooks", None))


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _lr_ok(lr) -> bool:
    return _is_number(lr) or (isinstance(lr, Tensor) and lr.numel() == 1)


class FusedBaseStep:
    """Decides whether the fused step can run now, and runs it on SAM's buckets."""

    def __init__(self, base: Optimizer, mode):
        check_mode(mode)
        self.base = base
        self.mode = mode
        self._logged: set = set()

    def _note(self, reason: str) -> None:
        """One log line per reason: warning when fused was asked for (True), info under 'auto'."""
        if reason in self._logged:
            return
        self._logged.add(reason)
        level = logging.WARNING if self.mode is True else logging.INFO
        logger.log(level, "fastsam: fused_base_step=%r: the unfused base step runs because %s", self.mode, reason)

    def unsupported(self, buckets: list) -> Optional[str]:
        """Why the fused step cannot run on these buckets now (None: it can)."""
        if self.mode is False:
            return "it is switched off"
        base = self.base
        if type(base) not in SUPPORTED:
            return (f"the base optimizer is {type(base).__module__}.{type(base).__qualname__}; only exactly "
                    "torch.optim.SGD, Adam and AdamW are fused")
        if _step_hooks(base):
            return "the base optimizer has step hooks, which a fused step would not run"
        if not buckets:
            return "no parameter requires a gradient"
        device = buckets[0].params[0].device
        if any(b.sharded for b in buckets):
            return "the parameters are FSDP-sharded (DTensor)"
        if any(b.params[0].dtype == torch.float64 for b in buckets):
            return "the parameters are float64 (the fused steps compute in fp32, torch.optim in fp64)"
        if self.mode == "auto" and device.type != "cpu":
            return (f"'auto' fuses on the CPU only, where it was measured faster; pass fused_base_step=True "
                    f"to fuse on {device.type}")
        if self.mode == "auto" and any(b.backend.name != "cpp" for b in buckets):
            # measured: the foreach composition is slower than torch's fused step (0.47-0.70x on
            # the bench's mini set), and backend='reference' stays the plain composition
            return f"'auto' fuses with the cpp backend only (this is {buckets[0].backend.name!r})"
        adam = isinstance(base, (torch.optim.Adam, torch.optim.AdamW))  # (AdamW subclasses Adam in recent torch)
        for group in base.param_groups:
            if group.get("differentiable", False):
                return "a param group has differentiable=True"
            if not _lr_ok(group["lr"]):
                return f"a param group's lr is {type(group['lr']).__name__}, not a float or a 1-element tensor"
            if adam:
                if not all(_is_number(b) for b in group["betas"]):
                    return "a param group's betas are tensors"
                if not _is_number(group["weight_decay"]) or not _is_number(group["eps"]):
                    return "a param group's eps or weight_decay is not a float"
                if device.type != "cpu" and not (group.get("capturable") or group.get("fused")):
                    return ("Adam keeps its step counts on the CPU for CUDA parameters unless capturable=True or "
                            "fused=True; the fused kernels read them on the device")
            elif not all(_is_number(group[k]) for k in ("momentum", "dampening", "weight_decay")):
                return "a param group's momentum, dampening or weight_decay is not a float"
        if adam:
            if torch.get_default_dtype() == torch.float64:
                return "torch's default dtype is float64, so Adam's step counts would be float64"
        return None

    def chain_enabled(self, buckets: list) -> bool:
        """Whether an accumulating unperturb may use the fused chain ops (restore_accumulate_,
        restore_gsam_reduce + gsam_combine_accumulate_): by the same rule as the step, whatever
        the base optimizer (the chain does not touch it)."""
        if self.mode is False or not buckets or any(b.sharded for b in buckets):
            return False
        if self.mode is True:
            return True
        return all(b.backend.name == "cpp" for b in buckets)

    def usable(self, buckets: list) -> bool:
        reason = self.unsupported(buckets)
        if reason is not None and self.mode is not False:
            self._note(reason)
        return reason is None

    # -- the step --

    def run(self, buckets: list, sources: dict, gsam: Optional[tuple], grad_scale: Optional[Tensor],
            found_inf: Optional[Tensor], accums: Optional[dict] = None, accum_scale: float = 1.0) -> None:
        """The base step of every parameter that has a gradient.

        ``sources``: id(param) -> its backup (the parameter is at w + eps and steps from the
        backup); parameters not in it step from themselves. ``gsam``: (stats, {id(param):
        (ascent, alpha)}) when GSAM's combination is still to be applied to the gradient.
        ``accums``: id(param) -> the sum of the earlier sub-batches' gradients; such a
        parameter steps along ``sum + accum_scale * g``.
        """
        accums = accums or {}
        fresh = []  # (state dict, param) initialised by this step: undone if the step is skipped
        for bucket in buckets:
            group = self.base.param_groups[bucket.group_index]
            live = [p for p in bucket.params if p.grad is not None]
            if not live:
                continue
            for part in _partition(live, sources, gsam, accums, self._first_key(group)):
                self._run_part(bucket, group, part, sources, gsam, accums, accum_scale, grad_scale, found_inf, fresh)
        if fresh and found_inf is not None and bool(found_inf.item()):
            # torch.optim never ran on a skipped step, so it initialised nothing: neither does this
            for p in fresh:
                self.base.state.pop(p, None)

    def _first_key(self, group: dict):
        """A function telling whether a parameter's state is still to be created (torch's first step)."""
        state = self.base.state
        if isinstance(self.base, torch.optim.SGD):
            if group["momentum"] == 0:
                return lambda p: False
            return lambda p: state[p].get("momentum_buffer") is None if p in state else True
        return lambda p: len(state[p]) == 0 if p in state else True

    def _run_part(self, bucket, group, part, sources, gsam, accums, accum_scale, grad_scale, found_inf,
                  fresh) -> None:
        params, first, has_backups, has_ascent, has_accum = part
        backend = bucket.backend
        chain = {}
        if has_backups:
            chain["backups"] = [sources[id(p)] for p in params]
        if has_accum:
            chain.update(accum=[accums[id(p)] for p in params], accum_scale=accum_scale)
        if has_ascent:
            stats, per_param = gsam
            chain.update(ascent=[per_param[id(p)][0] for p in params], gsam_stats=stats,
                         alpha=per_param[id(params[0])][1])
        grads = [p.grad for p in params]
        state = self.base.state
        if isinstance(self.base, torch.optim.SGD):
            momentum = group["momentum"]
            bufs = None
            if momentum != 0:
                if first:
                    for p in params:
                        state[p]["momentum_buffer"] = torch.empty_like(p, memory_format=torch.preserve_format)
                    fresh.extend(params)
                bufs = [state[p]["momentum_buffer"] for p in params]
            backend.sgd_step_(params, grads, bufs, group["lr"], weight_decay=group["weight_decay"], momentum=momentum,
                              dampening=group["dampening"], nesterov=group["nesterov"], maximize=group["maximize"],
                              first=first, grad_scale=grad_scale, found_inf=found_inf, **chain)
            return
        amsgrad = group["amsgrad"]
        if first:
            on_device = group.get("capturable") or group.get("fused")
            for p in params:
                st = state[p]
                st["step"] = (torch.zeros((), dtype=torch.float32, device=p.device) if on_device
                              else torch.tensor(0.0, dtype=torch.float32))
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if amsgrad:
                    st["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            fresh.extend(params)
        sts = [state[p] for p in params]
        if amsgrad and any("max_exp_avg_sq" not in st for st in sts):
            raise RuntimeError("fastsam: amsgrad=True but the loaded Adam state has no max_exp_avg_sq "
                               "(it was saved with amsgrad=False); load it into an optimizer with amsgrad=False")
        beta1, beta2 = group["betas"]
        decoupled = group.get("decoupled_weight_decay", isinstance(self.base, torch.optim.AdamW))
        backend.adam_step_(params, grads, [st["exp_avg"] for st in sts], [st["exp_avg_sq"] for st in sts],
                           [st["max_exp_avg_sq"] for st in sts] if amsgrad else None, [st["step"] for st in sts],
                           group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                           weight_decay=group["weight_decay"], amsgrad=amsgrad, maximize=group["maximize"],
                           decoupled_weight_decay=bool(decoupled), grad_scale=grad_scale, found_inf=found_inf,
                           **chain)


def _partition(params: list, sources: dict, gsam: Optional[tuple], accums: dict, is_first) -> list:
    """Split a bucket's parameters into runs that one op call can take: the same first-step
    flag, the same source (backup or self), the same GSAM combination and accumulator use.
    Usually one run."""
    per_param = gsam[1] if gsam is not None else {}
    parts: dict = {}
    for p in params:
        key = (is_first(p), id(p) in sources, id(p) in per_param, id(p) in accums)
        parts.setdefault(key, []).append(p)
    out = []
    for (first, has_backups, has_ascent, has_accum), ps in parts.items():
        if has_ascent:  # one alpha per call
            by_alpha: dict = {}
            for p in ps:
                by_alpha.setdefault(per_param[id(p)][1], []).append(p)
            out += [(group, first, has_backups, True, has_accum) for group in by_alpha.values()]
        else:
            out.append((ps, first, has_backups, False, has_accum))
    return out


def step_through_scaler(scaler, base: Optimizer, fused_step):
    """``scaler.step(base)`` with ``fused_step`` as the base optimizer's step.

    GradScaler's protocol for optimizers that unscale inside their own kernels (torch's fused
    Adam uses it): when ``_step_supports_amp_scaling`` is set, the scaler finds the infs,
    sets ``grad_scale`` (None if the gradients were already unscaled) and ``found_inf`` on the
    optimizer and calls its ``step()``. Both attributes are set on this instance only for the
    call, so the scaler's per-optimizer bookkeeping (an earlier ``unscale_(base)`` included)
    stays keyed on the base optimizer, exactly as without fastsam.
    """
    names = ("step", "_step_supports_amp_scaling")
    saved = {name: base.__dict__[name] for name in names if name in base.__dict__}
    base.step = fused_step
    base._step_supports_amp_scaling = True
    try:
        return scaler.step(base)
    finally:
        for name in names:
            base.__dict__.pop(name, None)
        base.__dict__.update(saved)
