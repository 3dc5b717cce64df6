"""How ``SAM.step(closure)`` finds the step's ascent gradient.

Two conventions are in use, and ``step(closure)`` serves both without a wasted pass:

* torch.optim's: ``optimizer.step(closure)`` calls the closure, which computes the loss
  and its gradients (usually zeroing them first). SAM calls it twice: at w for the ascent
  gradient, at w + eps for the descent gradient, and returns the first loss.
* the single-file SAM wrapper's: the caller runs ``loss.backward()`` and then
  ``optimizer.step(closure)``; the gradients already in ``.grad`` are the ascent gradient
  and the closure runs once, at w + eps (``step`` then returns None).

``SAM(closure_convention=...)`` says which one applies. ``"torch"`` and ``"wrapper"`` fix
it (no check, no host synchronisation; ``"wrapper"`` raises when no gradient is present).
``"auto"`` (the default) decides at every step from what is in ``.grad``, never from a
guess about how it got there:

1. no parameter has a gradient: torch.optim's convention;
2. every gradient is the tensor the previous ``step`` consumed, unchanged since (same
   tensor, same version counter): torch.optim's (they are stale);
3. otherwise gradients were written since the last step, and their sum of squares
   decides (one host synchronisation): zero means they were zeroed in place (e.g. by
   ``zero_grad(set_to_none=False)`` or ``p.grad.zero_()``) and the closure computes the
   ascent gradient; non-zero (or inf/nan, which the finite check then reports) means the
   caller computed them: the wrapper's convention. If only some gradients changed while
   others are left over from the previous step, a warning says so (the left-over ones
   would enter the ascent direction).

A zero ascent gradient is never used as one: with ``check_finite`` (the default) the step
warns when a perturbation had a zero norm (nothing was perturbed, so that step was a
plain base step).
"""

from __future__ import annotations

import enum
import warnings
from typing import Optional

from fastsam.ops import compiled

CONVENTIONS = ("auto", "torch", "wrapper")


class Ascent(enum.Enum):
    FROM_CLOSURE = "closure"  # call the closure at w for the ascent gradient
    PRESENT = "present"  # the gradients in .grad are the ascent gradient


class ClosureProtocol:
    """Remembers which gradients the last step consumed and decides where the next ascent gradient comes from."""

    def __init__(self, convention: str):
        if convention not in CONVENTIONS:
            raise ValueError(f"closure_convention must be one of {CONVENTIONS}; got {convention!r}")
        self.convention = convention
        self._consumed = None  # a grad record taken at the end of the last step(closure)

    def consumed(self, params: list) -> None:
        """Note the gradients a step(closure) just consumed (called at its end)."""
        if self.convention == "auto":
            self._consumed = compiled.grad_record(params)

    def decide(self, params: list, ascent_sumsq) -> Ascent:
        """Where this step's ascent gradient comes from.

        ``ascent_sumsq()`` returns the sum of squares of the present gradients as a 0-d
        tensor (the caller's plan computes it; it is only called in case 3).
        """
        if self.convention == "torch":
            return Ascent.FROM_CLOSURE
        unchanged, present = (self._consumed or compiled.grad_record([])).compare(params)
        if self.convention == "wrapper":
            if not present:
                raise RuntimeError(
                    "SAM(closure_convention='wrapper') found no gradient: call loss.backward() before "
                    "optimizer.step(closure), or use closure_convention='torch' (or 'auto')")
            return Ascent.PRESENT
        if not present or unchanged == present:
            return Ascent.FROM_CLOSURE
        total = ascent_sumsq()
        if total is not None and float(total) == 0.0:
            return Ascent.FROM_CLOSURE
        if unchanged:
            warnings.warn(
                f"fastsam.SAM.step(closure): {unchanged} of {present} gradients are left over from the previous "
                "step while the others were computed since; all of them form the ascent direction. Zero the "
                "gradients between steps (optimizer.zero_grad()).", RuntimeWarning, stacklevel=3)
        return Ascent.PRESENT


def zero_norm_warning(count: int, total: int) -> Optional[str]:
    if not count:
        return None
    return (f"fastsam.SAM: {count} of {total} perturbation(s) of this step had a zero ascent gradient, so nothing "
            "was perturbed there and the step was a plain base step. If you use step(closure), check that the "
            "gradients it finds are the ones you mean (see SAM's closure_convention).")
