"""Loads the compiled op library, which registers torch.ops.convbn.*, after
checking that it was built against the running torch."""

import ctypes
import glob
import os
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


def check_torch(built_torch: str, built_cuda: Optional[str], running_torch: str,
                running_cuda: Optional[str]) -> None:
    """The library is binary code for the torch it was compiled against:
    with another version it fails with undefined symbols, or worse. The local
    label (+cpu, +cu130) may differ for a CPU build; a CUDA build needs
    torch with the same CUDA."""
    if built_torch.split("+")[0] != running_torch.split("+")[0]:
        raise ImportError(
            f"convbn: this build of convbn was compiled against torch {built_torch}, but torch "
            f"{running_torch} is installed. Install torch=={built_torch.split('+')[0]}, or rebuild "
            f"convbn for torch {running_torch}: {_REBUILD}."
        )
    if built_cuda is not None and running_cuda != built_cuda:
        running = f"CUDA {running_cuda}" if running_cuda else "no CUDA"
        raise ImportError(
            f"convbn: this build of convbn has CUDA kernels compiled against torch {built_torch} with CUDA "
            f"{built_cuda}, but the installed torch {running_torch} has {running}. Install that torch, or "
            f"rebuild convbn for this one: {_REBUILD}."
        )


def load() -> None:
    path = library_path()
    try:
        from . import _build_info
    except ImportError:
        raise ImportError(
            f"convbn: {os.path.join(_HERE, '_build_info.py')} is missing, so what torch the library "
            f"was built against is unknown: rebuild convbn with {_REBUILD}."
        ) from None
    check_torch(_build_info.TORCH_VERSION, _build_info.CUDA_VERSION, torch.__version__, torch.version.cuda)
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
