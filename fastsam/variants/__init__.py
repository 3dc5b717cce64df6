"""The efficient SAM variants (docs/ALGORITHMS.md §9): SAM at close to the base optimizer's cost.

``fastsam.SAM(schedule=...)`` (Every-k, randomised switching, AE-SAM) lives in
:mod:`fastsam.variants.scheduled`; the methods with their own update rules are subclasses
of :class:`fastsam.SAM` that override ``sub_step`` (and, where it applies, ``first_step``,
``unperturb``, ``descent_is_linear``), so ``train_step`` and the integrations drive them
unchanged.
"""
