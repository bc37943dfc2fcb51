"""Loads the compiled op library, which registers torch.ops.convbn.*."""

import glob
import os

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))


def load():
    candidates = sorted(glob.glob(os.path.join(_HERE, "_C*.so")))
    if not candidates:
        raise ImportError(
            "convbn: the compiled op library (convbn/_C*.so) was not found "
            f"in {_HERE}. Build it with `pip install --no-build-isolation -e .` "
            "from the repository root (see README.md)."
        )
    torch.ops.load_library(candidates[0])
