"""Build script for fastsam.

The package itself is pure Python. Compiled backends (the ``fastsam._C`` extension) are
added here by ``extension_modules()``; install with ``--no-build-isolation`` so they are
compiled against the torch that will run them (README.md, docs/BUILDING.md).
"""

import functools
import glob
import os
import re
import shlex
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

# Environment switches for the compiled extension (fastsam._C):
#   FASTSAM_SKIP_EXTENSION=1  pure-Python install (the cpp/cuda backends report unavailable)
#   FASTSAM_SKIP_CUDA=1       CPU kernels only, even where torch has CUDA and nvcc exists
#   FASTSAM_REQUIRE_CUDA=1    fail the build instead of leaving the CUDA kernels out (CI)
#   TORCH_CUDA_ARCH_LIST      CUDA architectures, e.g. "8.0;9.0"; default below
#   CUDA_HOME                 CUDA toolkit root; found automatically when unset
# Build with `pip install --no-build-isolation -e .` after installing torch (and ninja):
# the extension must be compiled against the torch that will run it (docs/BUILDING.md).

# Used when TORCH_CUDA_ARCH_LIST is unset and no GPU is visible (torch's own detection
# needs one): Ampere and Hopper machine code plus Hopper PTX, which newer GPUs JIT-compile.
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"

CSRC = "csrc"
CPU_SOURCES = ["ops.cpp", "plan.cpp", "tensor_lists.cpp", "cpu_kernels.cpp", "eager.cpp", "list_signature.cpp",
               "grads_view.cpp", "variant_ops.cpp", "variant_cpu.cpp", "variant_eager.cpp"]
CUDA_SOURCES = ["cuda_ops.cpp", "cuda_kernels.cu", "variant_cuda.cpp", "variant_kernels.cu"]
# the fused base steps and the one-pass unperturb chain (csrc/base_step.h)
CPU_SOURCES += ["base_step_ops.cpp", "base_step_lists.cpp", "base_step_cpu.cpp", "base_step_eager.cpp"]
CUDA_SOURCES += ["base_step_cuda.cpp", "base_step_kernels.cu"]


def _archs_before_volta(arch_list):
    """The entries of a TORCH_CUDA_ARCH_LIST value ("6.1;8.0", "7.5 8.6+PTX", "9.0a",
    "Pascal;Ampere") older than compute capability 7.0. Kernel arguments over 4 KiB
    (CUDA >= 12.1) need 7.0 or newer: for such a list the kernels launch with 4 KiB only."""
    old_names = {"kepler", "tesla", "maxwell", "pascal"}
    older = []
    for entry in arch_list.replace(";", " ").split():
        parts = entry.lower().split("+")  # "8.6+PTX", "Kepler+Tesla"
        major = parts[0].split(".")[0]
        if parts[0] in old_names or (major.isdigit() and int(major) < 7):
            older.append(entry)
    return older


def _env_flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _note(message):
    print(f"fastsam setup: {message}", file=sys.stderr)


def _is_cuda_toolkit(root):
    """True if ``root`` holds nvcc, the runtime headers and the runtime library (libcudart)."""
    if not root or not os.path.isfile(os.path.join(root, "bin", "nvcc")):
        return False
    if not os.path.isfile(os.path.join(root, "include", "cuda_runtime.h")):
        return False
    patterns = ("lib64/libcudart.so*", "lib/libcudart.so*", "targets/*/lib/libcudart.so*",
                "lib/x64/cudart.lib")
    return any(glob.glob(os.path.join(root, p)) for p in patterns)


@functools.lru_cache(maxsize=None)
def find_cuda_home():
    """The CUDA toolkit root to build with, or None.

    torch's own guess takes the folder above the first ``nvcc`` on PATH; where that is a
    wrapper script (e.g. /usr/local/bin/nvcc) the guess has no libcudart and linking
    fails, so every candidate is checked for a complete toolkit.
    """
    candidates = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(os.environ[var])
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    candidates += sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for root in candidates:
        if _is_cuda_toolkit(root):
            if candidates[:1] and root != candidates[0] and candidates[0] in (os.environ.get("CUDA_HOME"),
                                                                          os.environ.get("CUDA_PATH")):
                _note(f"{candidates[0]} (from CUDA_HOME/CUDA_PATH) lacks nvcc, cuda_runtime.h or libcudart; "
                      f"using {root}")
            return root
    return None


def _cuda_unavailable_reason(torch):
    """Why the CUDA kernels cannot be built here (None if they can)."""
    if _env_flag("FASTSAM_SKIP_CUDA"):
        return "FASTSAM_SKIP_CUDA is set"
    if not torch.version.cuda:
        return f"torch {torch.__version__} is not a CUDA build"
    if find_cuda_home() is None:
        return "no CUDA toolkit (nvcc with libcudart) was found; set CUDA_HOME to one"
    return None


def _openmp_flags(torch):
    """-fopenmp where torch's intra-op parallelism is OpenMP and the compiler is GCC.

    at::parallel_for is a header template that runs serially unless the extension itself
    is compiled with OpenMP (measured: without it the CPU kernels ran on one thread, e.g.
    accumulate_ on 25.6M floats 21.1 ms with 2 threads vs 13.2 ms for torch's add_). At
    run time the extension shares the libgomp.so.1 that torch has already loaded, so
    torch.set_num_threads applies to it too. Other compilers (clang would link a second
    OpenMP runtime) build serial CPU kernels.
    """
    if not sys.platform.startswith("linux") or not torch.backends.openmp.is_available():
        return [], "torch is not built with OpenMP"
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return [], "torch's parallel backend is not OpenMP"
    compiler = shlex.split(os.environ.get("CXX", "c++"))
    try:
        version = subprocess.run(compiler + ["--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    if "clang" in version.lower() or not ("GCC" in version or "g++" in version or "Free Software" in version):
        return [], f"{compiler[0]} is not GCC"
    return ["-fopenmp"], None


def _loaded_libstdcxx():
    """Path of the libstdc++ shared library this process (which imported torch) runs with.

    None where there is no /proc/self/maps (not Linux) or none is loaded (e.g. libc++).
    """
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            for line in maps:
                fields = line.split()
                if len(fields) >= 6 and os.path.basename(fields[5]).startswith("libstdc++.so"):
                    return fields[5]
    except OSError:
        pass
    return None


def extension_modules():
    """fastsam._C: CPU kernels always, CUDA kernels when torch has CUDA and nvcc is found.

    Returns ([], {}) (a pure-Python install; the compiled backends then say how to build
    them) when FASTSAM_SKIP_EXTENSION is set, torch is missing from the build environment
    or there is no C++ compiler.
    """
    if _env_flag("FASTSAM_SKIP_EXTENSION"):
        _note("FASTSAM_SKIP_EXTENSION is set: installing without the compiled extension")
        return [], {}
    try:
        import torch
    except ImportError:
        _note("torch is not installed in the build environment: installing without the compiled "
              "extension (install torch first, then `pip install --no-build-isolation -e .`)")
        return [], {}
    compiler = shlex.split(os.environ.get("CXX", "c++"))[:1]
    if not compiler or shutil.which(compiler[0]) is None:
        _note(f"no C++ compiler ({os.environ.get('CXX', 'c++')}) found: installing without the compiled extension")
        return [], {}

    cuda_reason = _cuda_unavailable_reason(torch)
    if cuda_reason is not None and _env_flag("FASTSAM_REQUIRE_CUDA"):
        raise RuntimeError(f"FASTSAM_REQUIRE_CUDA is set but the CUDA kernels cannot be built: {cuda_reason}")
    with_cuda = cuda_reason is None
    if with_cuda:
        cuda_home = find_cuda_home()
        # before torch.utils.cpp_extension reads it (and patched there if already imported)
        os.environ["CUDA_HOME"] = cuda_home
        if "torch.utils.cpp_extension" in sys.modules:
            sys.modules["torch.utils.cpp_extension"].CUDA_HOME = cuda_home
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCH_LIST
        _note(f"building CPU and CUDA kernels (CUDA_HOME={cuda_home}, "
              f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', 'visible GPUs')})")
        arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST") or " ".join(
            "%d.%d" % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count()))
        older_archs = _archs_before_volta(arch_list)
        if older_archs:
            _note(f"architectures before compute capability 7.0 ({', '.join(older_archs)}): every CUDA "
                  "launch will use 4 KiB of arguments (more launches for lists of many tensors)")
    else:
        _note(f"building CPU kernels only: {cuda_reason}")

    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    # -g0 and <ATen/ATen.h>-free includes keep the build short (docs/BUILDING.md: ~2x faster).
    openmp, openmp_reason = _openmp_flags(torch)
    if openmp_reason:
        _note(f"CPU kernels will run on one thread: {openmp_reason}")
    # -fno-math-errno: nothing reads errno, and with it sqrtf is a branch to the library for
    # negative inputs, which kept GCC from vectorising the Adam step (csrc/base_step_cpu.cpp).
    cxx_flags = ["-O3", "-g0", "-fno-math-errno"] + openmp
    # Link the libstdc++ that torch runs with, by path, ahead of the compiler's own. On the
    # lent H200 machines (2026-11-26) the compiler (/opt/gcc/bin/g++) linked its libstdc++
    # statically into fastsam._C; two libstdc++ copies in one process then shared one
    # locale, and formatting any error message (TORCH_CHECK) segfaulted.
    libstdcxx = _loaded_libstdcxx()
    link_args = openmp + ([libstdcxx] if libstdcxx else [])
    sources = [os.path.join(CSRC, name) for name in CPU_SOURCES]
    if with_cuda:
        extension = CUDAExtension(
            "fastsam._C", sources + [os.path.join(CSRC, name) for name in CUDA_SOURCES],
            define_macros=[("FASTSAM_WITH_CUDA", None)] + ([("FASTSAM_NO_LARGE_KERNEL_PARAMS", None)] if older_archs else []),
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]}, extra_link_args=link_args)
    else:
        extension = CppExtension("fastsam._C", sources, extra_compile_args={"cxx": cxx_flags},
                                 extra_link_args=link_args)
    return [extension], {"build_ext": BuildExtension}


def read_version():
    """__version__ from fastsam/_version.py, read as text: importing fastsam would import torch."""
    with open(os.path.join("fastsam", "_version.py"), encoding="utf-8") as f:
        match = re.search(r'^__version__ = "([^"]+)"$', f.read(), flags=re.MULTILINE)
    if match is None:
        raise RuntimeError("fastsam/_version.py must define __version__ = \"X.Y.Z\"")
    return match.group(1)


ext_modules, cmdclass = extension_modules()

setup(
    name="fastsam",
    version=read_version(),
    description="Fast, complete sharpness-aware minimization (SAM, ASAM, GSAM, OBF, RandSAM) for PyTorch",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    license_files=["LICENSE"],
    python_requires=">=3.9",
    packages=find_packages(include=["fastsam", "fastsam.*"]),
    install_requires=["torch>=2.7"],  # the oldest torch the test suite passed on: docs/TORCH-FLOOR.md
    extras_require={
        # everything the test suite runs (the experiments' smoke tests and the plots too)
        "test": ["pytest>=7", "pytest-benchmark>=4", "numpy", "matplotlib", "mnist1d", "scikit-learn"],
        "plot": ["matplotlib"],
        "experiments": ["matplotlib", "mnist1d", "scikit-learn"],
        # the trainer integrations (fastsam.integrations); they import nothing until used
        "lightning": ["pytorch-lightning>=2.0,<3"],
        "transformers": ["transformers>=4.46", "accelerate>=0.34"],
        "timm": ["timm>=1.0"],
    },
    entry_points={"console_scripts": ["fastsam-bench = fastsam.bench.cli:main",
                                      "fastsam-verify = fastsam.verify:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
