"""Build script for fastsam.

The package itself is pure Python. Compiled backends (the ``fastsam._C`` extension) are
added here by ``extension_modules()``; install with ``--no-build-isolation`` so they are
compiled against the torch that will run them (README.md, BUILD-NOTES).
"""

from setuptools import find_packages, setup


def extension_modules():
    """The compiled extensions to build (none yet: the core is pure Python)."""
    return [], {}


ext_modules, cmdclass = extension_modules()

setup(
    name="fastsam",
    version="0.1.0",
    description="Fast, complete sharpness-aware minimization (SAM, ASAM, GSAM, OBF, RandSAM) for PyTorch",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["fastsam", "fastsam.*"]),
    install_requires=["torch>=2.4"],
    extras_require={
        "test": ["pytest>=7", "pytest-benchmark>=4", "numpy"],
        "plot": ["matplotlib"],
        "experiments": ["matplotlib", "mnist1d", "scikit-learn"],
    },
    entry_points={"console_scripts": ["fastsam-bench = fastsam.bench.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
