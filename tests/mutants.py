"""Deliberately broken backends, to check that the default test run notices them.

``mutant_backend(mutation, backend)`` wraps one backend's real ops and breaks exactly one
of them; ``tests.mutation_check`` installs each mutant in turn (through ``FASTSAM_MUTANT``,
read by ``tests/conftest.py``) and requires the default test selection to fail.

A mutant is built with ``backend_from_functions``, so it has only the ops of the contract
(no in-place gradient views): whatever uses the backend (the ops tests, the optimizer) goes through them.
Arguments are passed through untouched (``*args, **kwargs``), so a keyword added to an op
later reaches the real implementation.
"""

from __future__ import annotations

import torch

from fastsam import ops

ENV_VAR = "FASTSAM_MUTANT"


def _perturb_skips_the_add(real):
    def perturb_(params, grads, backups, *args, **kwargs):
        real.perturb_(params, grads, backups, *args, **kwargs)  # backups and ascent written as usual
        with torch.no_grad():
            for w, backup in zip(params, backups):
                w.copy_(backup)  # ... but w keeps its unperturbed value
    return {"perturb_": perturb_}


def _sumsq_drops_the_last_tensor(real):
    def sumsq(tensors, params=None, *args, **kwargs):
        tensors = list(tensors)
        if len(tensors) <= 1:
            return real.sumsq(tensors, params, *args, **kwargs) * 0.0  # nothing left to sum
        kept_params = None if params is None else list(params)[:-1]
        return real.sumsq(tensors[:-1], kept_params, *args, **kwargs)
    return {"sumsq": sumsq}


def _restore_skips_one_tensor(real):
    def restore_(params, backups, *args, **kwargs):
        params, backups = list(params), list(backups)
        return real.restore_(params[:-1], backups[:-1], *args, **kwargs)  # the last tensor keeps w + eps
    return {"restore_": restore_}


MUTATIONS = {
    "perturb_": _perturb_skips_the_add,
    "sumsq": _sumsq_drops_the_last_tensor,
    "restore_": _restore_skips_one_tensor,
}
DESCRIPTIONS = {
    "perturb_": "perturb_ writes the backups but skips w += eps",
    "sumsq": "sumsq drops the last tensor of its list",
    "restore_": "restore_ skips the last tensor of its list",
}


def mutant_backend(mutation: str, backend: ops.Backend) -> ops.Backend:
    """``backend`` with the op named by ``mutation`` broken (see MUTATIONS)."""
    if mutation not in MUTATIONS:
        raise ValueError(f"unknown mutation {mutation!r}; choose from {', '.join(MUTATIONS)}")
    functions = {name: getattr(backend, name) for name in ops.OP_NAMES}
    functions.update(MUTATIONS[mutation](backend))
    return ops.backend_from_functions(backend.name, functions, backend.unavailable_reason, backend.dtypes)


def parse(spec: str) -> tuple[str, str]:
    """``"perturb_:cpp"`` -> ("perturb_", "cpp")."""
    mutation, sep, backend = spec.partition(":")
    if not sep or mutation not in MUTATIONS or not backend:
        raise ValueError(f"{ENV_VAR} must be '<op>:<backend>' with <op> one of {', '.join(MUTATIONS)}; got {spec!r}")
    return mutation, backend


def install(spec: str) -> tuple[str, str]:
    """Replace the registered backend named in ``spec`` by its mutant; returns (mutation, backend)."""
    mutation, name = parse(spec)
    if name not in ops.backend_names():
        raise ValueError(f"{ENV_VAR}: unknown backend {name!r}; choose from {ops.backend_names()}")
    real = ops.get_backend(name, "cpu")
    ops.register_backend(mutant_backend(mutation, real), name)
    return mutation, name
