"""Builds convbn's op library as convbn/_C (torch.utils.cpp_extension).

The library registers its operators with TORCH_LIBRARY and is loaded with
torch.ops.load_library: it has no Python bindings and does not link
libpython or libtorch_python (py_limited_api), so C++ programs can load the
same code (see CMakeLists.txt).

CUDA sources (cuda/*.cu) are compiled when nvcc is found and torch has CUDA,
or when FORCE_CUDA=1; no GPU is needed to build. CONVBN_CPU_ONLY=1 leaves
them out.
"""

import glob
import os

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import (
    CUDA_HOME,
    BuildExtension,
    CppExtension,
    CUDAExtension,
)

ROOT = os.path.dirname(os.path.abspath(__file__))


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
