"""Builds convbn's op library as convbn/_C (torch.utils.cpp_extension).

The library registers its operators with TORCH_LIBRARY and is loaded with
torch.ops.load_library: it has no Python bindings and does not link
libpython or libtorch_python (py_limited_api), so C++ programs can load the
same code (see CMakeLists.txt).

CUDA sources (cuda/*.cu) are compiled when nvcc is found and torch has CUDA,
or when FORCE_CUDA=1; no GPU is needed to build. CONVBN_CPU_ONLY=1 leaves
them out. Unless CUDA_HOME (or CUDA_PATH) is set, the toolkit is the one
scripts/cuda_env.sh finds. The GPU architectures are TORCH_CUDA_ARCH_LIST's;
without it, those of the visible GPUs, or DEFAULT_CUDA_ARCH_LIST when there
is none.
"""

import glob
import os
import subprocess
import sys

import torch
from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# sm_80 (A100) and sm_90 (H100/H200) machine code, and compute_90 PTX that
# the driver compiles for newer GPUs. CMakeLists.txt has the same default.
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"


def log(message):
    print(f"convbn: {message}", file=sys.stderr, flush=True)


def find_cuda_home():
    """Sets CUDA_HOME, when neither it nor CUDA_PATH is set, to the toolkit
    scripts/cuda_env.sh finds (torch would take the parent of the `nvcc` on
    PATH, which is wrong for a wrapper script outside the toolkit's bin/).
    torch.utils.cpp_extension reads CUDA_HOME once, when imported: so this
    runs before that import, and updates the module if it came first."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    if os.environ.get("CONVBN_CPU_ONLY") == "1":
        return
    if torch.version.cuda is None and os.environ.get("FORCE_CUDA") != "1":
        return
    script = os.path.join(ROOT, "scripts", "cuda_env.sh")
    if not os.path.exists(script):
        return
    found = subprocess.run(["bash", script], stdout=subprocess.PIPE, text=True).stdout.strip()
    if not found:
        return
    os.environ["CUDA_HOME"] = found
    log(f"CUDA_HOME={found} (scripts/cuda_env.sh)")
    if "torch.utils.cpp_extension" in sys.modules:
        sys.modules["torch.utils.cpp_extension"].CUDA_HOME = found


find_cuda_home()

from torch.utils.cpp_extension import (  # noqa: E402  (after find_cuda_home)
    CUDA_HOME,
    BuildExtension,
    CppExtension,
    CUDAExtension,
)


def choose_cuda_arch_list():
    """torch builds for TORCH_CUDA_ARCH_LIST, else for the visible GPUs; with
    neither it stops (IndexError in _get_cuda_arch_flags). Then build for
    DEFAULT_CUDA_ARCH_LIST."""
    given = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
    if given and given != "native":
        log(f"CUDA architectures: {given} (TORCH_CUDA_ARCH_LIST)")
    elif torch.cuda.device_count() > 0:
        log("CUDA architectures: those of the visible GPUs (TORCH_CUDA_ARCH_LIST is not set)")
    else:
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCH_LIST
        log(
            f"no GPU visible and TORCH_CUDA_ARCH_LIST not set: building for {DEFAULT_CUDA_ARCH_LIST} "
            "(set TORCH_CUDA_ARCH_LIST to choose)"
        )


def want_cuda(cuda_sources):
    if not cuda_sources or os.environ.get("CONVBN_CPU_ONLY") == "1":
        return False
    if os.environ.get("FORCE_CUDA") == "1":
        return True
    return CUDA_HOME is not None and torch.version.cuda is not None


def extensions():
    rel = lambda pattern: sorted(
        os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern), recursive=True)
    )
    # The AVX2 kernels go last: see csrc/cpu/kernels_avx2.cpp. csrc/nn/ is the
    # LibTorch module (convbn::ConvBN2d), built by CMake only: Python has its own.
    sources = sorted(
        (p for p in rel("csrc/**/*.cpp") if not p.startswith("csrc/nn/")),
        key=lambda p: p.endswith("_avx2.cpp"),
    )
    cuda_sources = rel("cuda/*.cu")
    cxx_flags = ["-O3", "-DPy_LIMITED_API=0x03090000"]
    if want_cuda(cuda_sources):
        choose_cuda_arch_list()
        return [
            CUDAExtension(
                "convbn._C",
                sources + cuda_sources,
                include_dirs=[os.path.join(ROOT, "csrc")],
                extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
                py_limited_api=True,
            )
        ]
    return [
        CppExtension(
            "convbn._C",
            sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx_flags},
            py_limited_api=True,
        )
    ]


setup(
    name="convbn",
    version="0.1.0",
    description="Conv2d + BatchNorm2d as one PyTorch operator, forward and backward",
    package_dir={"": "python"},
    packages=find_packages("python"),
    ext_modules=extensions(),
    install_requires=["torch>=2.6", "tqdm"],
    cmdclass={"build_ext": BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
