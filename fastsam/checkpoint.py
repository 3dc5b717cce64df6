"""SAM checkpoints in torch.optim's layout.

``SAM.state_dict()`` is the base optimizer's own state_dict (``state`` keyed by parameter
index, ``param_groups`` carrying SAM's per-group settings next to the base's), so tools
written for any torch.optim optimizer read it, torch.distributed.checkpoint's
``get/set_optimizer_state_dict`` among them. fastsam's own state goes where those tools
keep it and where ``torch.load(weights_only=True)`` accepts it:

* per parameter (a method's stored directions, EMAs): tensors in ``state[i]`` under keys
  that start with ``"fastsam."``;
* global (format, RNG states as uint8 tensors, counters as ints): a dict under the key
  ``"fastsam"`` of the first param group.

Format 1 (``{"base": ..., "fastsam": ...}``, fastsam 0.1.0) still loads.
"""

from __future__ import annotations

import copy

FORMAT = 2
GROUP_KEY = "fastsam"
STATE_PREFIX = "fastsam."


def pack(base_state_dict: dict, extras: dict, per_param: dict) -> dict:
    """The checkpoint: ``base_state_dict`` with ``extras`` (global) and ``per_param`` ({index: {name: tensor}})."""
    out = dict(base_state_dict)
    out["state"] = {index: dict(values) for index, values in base_state_dict["state"].items()}
    for index, values in per_param.items():
        entry = out["state"].setdefault(index, {})
        for name, value in values.items():
            entry[STATE_PREFIX + name] = value
    groups = [dict(g) for g in base_state_dict["param_groups"]]
    if groups:
        groups[0][GROUP_KEY] = {"format": FORMAT, **extras}
    out["param_groups"] = groups
    return out


def unpack(state_dict: dict) -> tuple[dict, dict, dict]:
    """(base state_dict, global extras, per-parameter extras) from a checkpoint of any format."""
    if "base" in state_dict and "fastsam" in state_dict and "state" not in state_dict:
        old = state_dict["fastsam"]
        if old.get("format") != 1:
            raise ValueError(f"unknown fastsam checkpoint format {old.get('format')!r} (this fastsam reads 1 and 2)")
        extras = {k: v for k, v in old.items() if k != "format" and v is not None}
        return state_dict["base"], extras, {}
    if "state" not in state_dict or "param_groups" not in state_dict:
        raise ValueError("not an optimizer state_dict: expected the keys 'state' and 'param_groups' "
                         "(or a fastsam 0.1 checkpoint with 'base' and 'fastsam')")
    groups = [dict(g) for g in state_dict["param_groups"]]
    extras = {}
    for group in groups:
        found = group.pop(GROUP_KEY, None)
        if found is not None:
            extras = dict(found)
    fmt = extras.pop("format", FORMAT)
    if fmt != FORMAT:
        raise ValueError(f"unknown fastsam checkpoint format {fmt!r} (this fastsam reads 1 and {FORMAT})")
    base_state, per_param = {}, {}
    for index, values in state_dict["state"].items():
        mine = {k[len(STATE_PREFIX):]: v for k, v in values.items() if isinstance(k, str) and k.startswith(STATE_PREFIX)}
        if mine:
            per_param[index] = mine
        base_state[index] = {k: v for k, v in values.items() if not (isinstance(k, str) and k.startswith(STATE_PREFIX))}
    base = {k: v for k, v in state_dict.items() if k not in ("state", "param_groups")}
    base["state"] = base_state
    base["param_groups"] = groups
    return base, extras, per_param


def copy_state(state_dict: dict) -> dict:
    """A deep copy (a live state_dict shares its tensors with the optimizer)."""
    return copy.deepcopy(state_dict)
