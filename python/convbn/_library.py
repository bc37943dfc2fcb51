"""Loads the compiled op library, which registers torch.ops.convbn.*, after
checking that it was built against the running torch."""

import ctypes
import glob
import os
import re
from typing import Dict, Optional

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
_REBUILD = "`pip install --no-build-isolation --force-reinstall .` from convbn's source (see README.md)"


def library_path() -> str:
    candidates = sorted(glob.glob(os.path.join(_HERE, "_C*.so")))
    if not candidates:
        raise ImportError(
            "convbn: the compiled op library (convbn/_C*.so) was not found "
            f"in {_HERE}. Build it with `pip install --no-build-isolation -e .` "
            "from the repository root (see README.md)."
        )
    return candidates[0]


# Local version labels of the official builds of one torch release: the
# same code compiled for another device (2.13.0+cpu, 2.13.0+cu130). Any other
# label (+git1a2b3c4, +ecf3bae.nv25.01) names a build of its own.
_DEVICE_LABEL = re.compile(r"\+(cpu|cu\d+|rocm[\d.]+|xpu)$")


def _known(git_version: object) -> bool:
    return git_version not in (None, "", "Unknown")


def check_torch(built: Dict[str, object], running: Dict[str, object]) -> None:
    """The library is binary code for the torch it was compiled against:
    with another one it fails with undefined symbols, or worse. `built` and
    `running` describe a torch: version (torch.__version__), git_version,
    cxx11_abi and cuda (torch.version.cuda; for `built`, None when the
    library has no CUDA code). A CPU build runs on the same release built
    for another device; a CUDA build needs torch with the same major CUDA
    version."""
    built_torch, running_torch = str(built["version"]), str(running["version"])
    if _DEVICE_LABEL.sub("", built_torch) != _DEVICE_LABEL.sub("", running_torch):
        mismatch = f"compiled against torch {built_torch}, but torch {running_torch} is installed"
    elif _known(built["git_version"]) and _known(running["git_version"]) \
            and built["git_version"] != running["git_version"]:
        mismatch = (f"compiled against torch {built_torch} from git {built['git_version']}, but the installed "
                    f"torch {running_torch} is from git {running['git_version']}")
    elif bool(built["cxx11_abi"]) != bool(running["cxx11_abi"]):
        mismatch = (f"compiled against torch {built_torch} with _GLIBCXX_USE_CXX11_ABI={int(bool(built['cxx11_abi']))}, "
                    f"but the installed torch {running_torch} has {int(bool(running['cxx11_abi']))}")
    elif built["cuda"] is not None and str(running["cuda"]).split(".")[0] != str(built["cuda"]).split(".")[0]:
        has = f"CUDA {running['cuda']}" if running["cuda"] else "no CUDA"
        mismatch = (f"compiled with CUDA kernels against torch {built_torch} with CUDA {built['cuda']}, "
                    f"but the installed torch {running_torch} has {has}")
    else:
        return
    raise ImportError(
        f"convbn: this build of convbn was {mismatch}. Install the torch it was built against "
        f"(torch=={built_torch.split('+')[0]}), or rebuild convbn for this torch: {_REBUILD}."
    )


def running_torch() -> Dict[str, object]:
    """The running torch, described as check_torch takes it."""
    return {"version": torch.__version__, "git_version": getattr(torch.version, "git_version", None),
            "cxx11_abi": bool(torch._C._GLIBCXX_USE_CXX11_ABI), "cuda": torch.version.cuda}


def load() -> None:
    path = library_path()
    try:
        from . import _build_info
    except ImportError:
        raise ImportError(
            f"convbn: {os.path.join(_HERE, '_build_info.py')}, which setup.py writes beside the library, is "
            f"missing, so what torch the library was built against is unknown: rebuild convbn with {_REBUILD}."
        ) from None
    built = {"version": _build_info.TORCH_VERSION, "git_version": _build_info.TORCH_GIT_VERSION,
             "cxx11_abi": _build_info.CXX11_ABI, "cuda": _build_info.CUDA_VERSION}
    check_torch(built, running_torch())
    torch.ops.load_library(path)


def build_info() -> Dict[str, object]:
    """What this build of convbn was compiled with: the torch it requires
    (recorded by setup.py), and what the library itself reports (its CPU
    kernels and, in CUDA builds, the CUDA toolkit and GPU architectures)."""
    from . import __version__, _build_info

    reported = ctypes.CDLL(library_path()).convbn_build_info
    reported.restype = ctypes.c_char_p
    lines = dict(line.split("=", 1) for line in reported().decode().splitlines() if line)
    return {
        "version": __version__,
        "torch": _build_info.TORCH_VERSION,
        "cuda": lines.get("cuda"),
        "cuda_architectures": lines["cuda_architectures"].split(",") if "cuda_architectures" in lines else [],
        "cpu_kernels": lines["cpu_kernels"].split(","),
        "cpu_kernels_used": lines["cpu_kernels_used"],
    }
