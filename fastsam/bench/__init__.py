"""fastsam.bench: throughput benchmarks of fastsam's ops and end-to-end training steps.

``python -m fastsam.bench`` (or ``fastsam-bench``) is the command-line entry
(fastsam.bench.cli); ``engine`` times things, ``workloads`` generates model shapes,
``peers`` holds other implementations' SAM sub-steps (``--peers``), ``host`` the
optimizer-vs-kernels items and their goals, ``e2e`` builds small models, ``report`` prints
tables, ``results`` writes JSON/CSV and ``plot`` draws (matplotlib only).
"""
