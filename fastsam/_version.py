"""fastsam's version, in one place: setup.py reads this file as text (without importing
fastsam or torch) and fastsam/__init__.py re-exports it as fastsam.__version__."""

__version__ = "0.1.0"
