"""The op library loads without Python: it links LibTorch only."""

import glob
import os
import shutil
import subprocess

import pytest

import convbn


@pytest.mark.skipif(shutil.which("ldd") is None, reason="ldd is not available")
def test_op_library_does_not_link_python():
    package_dir = os.path.dirname(convbn.__file__)
    (library,) = glob.glob(os.path.join(package_dir, "_C*.so"))
    linked = subprocess.run(["ldd", library], capture_output=True, text=True, check=True).stdout
    names = [line.split()[0] for line in linked.splitlines() if line.strip()]
    assert any(n.startswith("libtorch") for n in names), linked
    assert not any(n.startswith(("libpython", "libtorch_python")) for n in names), linked
