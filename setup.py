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

import setuptools
from setuptools import setup

if int(setuptools.__version__.split(".")[0]) < 64:
    # pyproject.toml asks for setuptools>=64, but --no-build-isolation
    # builds with whatever is installed.
    sys.exit(f"convbn: building needs setuptools >= 64 (this is {setuptools.__version__}): "
             "pip install -U 'setuptools>=64', then build again.")

try:
    import torch
except ImportError:
    # pip's build isolation (`pip install .`) builds in a fresh environment
    # without the installed torch; pulling a second torch into it would
    # compile against a torch that is not the one convbn runs with.
    sys.exit(
        "convbn: building convbn needs the torch it will run with, and this build environment has none: "
        "install torch (if it is not installed), then build with `pip install --no-build-isolation .` "
        "(pip's default build isolation hides the installed torch)."
    )

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
    """(whether the build compiles CUDA, [the extension])."""
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
    # -g0 after Python's own CFLAGS (which carry -g): a release library
    # without debug information, a third of the size.
    cxx_flags = ["-O3", "-g0", "-DPy_LIMITED_API=0x03090000"]
    link_flags = ["-Wl,--strip-debug"]
    if want_cuda(cuda_sources):
        choose_cuda_arch_list()
        return True, [
            CUDAExtension(
                "convbn._C",
                sources + cuda_sources,
                include_dirs=[os.path.join(ROOT, "csrc")],
                extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-Xcompiler", "-g0"]},
                extra_link_args=link_flags,
                py_limited_api=True,
            )
        ]
    return False, [
        CppExtension(
            "convbn._C",
            sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
            py_limited_api=True,
        )
    ]


def public_version(version):
    """torch's version without its local label: 2.13.0 for 2.13.0+cpu or
    2.13.0+cu130, which `torch==2.13.0` accepts whichever is installed."""
    return version.split("+")[0]


def build_info_source(with_cuda):
    """The text of convbn/_build_info.py: what this build is compiled
    against, which `import convbn` compares with the running torch before
    loading the library (a mismatch would be an undefined-symbol crash, or
    worse)."""
    return (
        '"""Written by setup.py next to the library it built: what that library was compiled against."""\n\n'
        f"TORCH_VERSION = {torch.__version__!r}\n"
        f"TORCH_GIT_VERSION = {getattr(torch.version, 'git_version', None)!r}\n"
        f"CXX11_ABI = {bool(torch._C._GLIBCXX_USE_CXX11_ABI)!r}\n"
        f"CUDA_VERSION = {(torch.version.cuda if with_cuda else None)!r}\n"
    )


class BuildExtensionRecordingTorch(BuildExtension):
    """torch's BuildExtension, which also writes _build_info.py beside each
    library it builds: into the package for in-place (editable) builds, into
    the build directory for wheels and --build-lib, never into a source tree
    it did not build for."""

    def run(self):
        super().run()
        for ext in self.extensions:
            path = os.path.join(os.path.dirname(self.get_ext_fullpath(ext.name)), "_build_info.py")
            with open(path, "w") as f:
                f.write(build_info_source(WITH_CUDA))


WITH_CUDA, EXT_MODULES = extensions()

# The metadata is in pyproject.toml; what depends on the build is here.
setup(
    ext_modules=EXT_MODULES,
    # The library's binary works only with the torch it was compiled
    # against: the wheel requires exactly that version.
    install_requires=[f"torch=={public_version(torch.__version__)}", "tqdm"],
    cmdclass={"build_ext": BuildExtensionRecordingTorch},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
