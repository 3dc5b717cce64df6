"""Small-scale experiments with fastsam (issue 7): SGD vs SAM, ASAM, GSAM, OBF, OBF+GSAM, RandSAM.

``python -m fastsam.experiments.compare --help`` runs them. Data is generated or shipped
offline (MNIST-1D from the ``mnist1d`` generator, scikit-learn's digits); install the extra
with ``pip install -e ".[experiments]"``. docs/EXPERIMENTS.md reports a full run.
"""
