"""The op library loads without Python: it links LibTorch only. What the
build records (convbn.build_info(), the torch the package requires) and how
import convbn treats another torch; how a build without torch stops."""

import glob
import importlib.metadata
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import convbn
from cpp_programs import installed_cpp_program


@pytest.mark.skipif(shutil.which("ldd") is None, reason="ldd is not available")
def test_op_library_does_not_link_python():
    package_dir = os.path.dirname(convbn.__file__)
    (library,) = glob.glob(os.path.join(package_dir, "_C*.so"))
    linked = subprocess.run(["ldd", library], capture_output=True, text=True, check=True).stdout
    names = [line.split()[0] for line in linked.splitlines() if line.strip()]
    assert any(n.startswith("libtorch") for n in names), linked
    assert not any(n.startswith(("libpython", "libtorch_python")) for n in names), linked


def _public(version):
    return version.split("+")[0]


def test_build_info_says_what_the_library_was_built_with():
    info = convbn.build_info()
    assert info["version"] == convbn.__version__
    assert info["torch"] == torch.__version__
    assert "default" in info["cpu_kernels"]
    if platform.machine() == "x86_64":
        assert "avx2" in info["cpu_kernels"]
    flags = set()
    if os.path.exists("/proc/cpuinfo"):
        flags = {f for line in open("/proc/cpuinfo") if line.startswith("flags") for f in line.split()}
    has_avx2 = {"avx2", "fma", "f16c"} <= flags and "avx2" in info["cpu_kernels"]
    expected = "avx2" if has_avx2 and os.environ.get("CONVBN_CPU_CAPABILITY") != "default" else "default"
    assert info["cpu_kernels_used"] == expected
    # CUDA kernels registered <=> the library reports a CUDA build.
    with_cuda = torch._C._dispatch_has_kernel_for_dispatch_key("convbn::conv_bn_train", "CUDA")
    assert (info["cuda"] is not None) == with_cuda
    assert bool(info["cuda_architectures"]) == with_cuda


def test_build_info_reports_forced_portable_kernels():
    code = "import convbn; print(convbn.build_info()['cpu_kernels_used'])"
    env = dict(os.environ, CONVBN_CPU_CAPABILITY="default")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert result.stdout.strip() == "default"


def test_installed_package_requires_the_torch_it_was_built_against():
    try:
        distribution = importlib.metadata.distribution("convbn")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("convbn is not pip-installed here (PYTHONPATH=python): no package metadata to check")
    assert distribution.version == convbn.__version__
    requirements = distribution.requires
    assert f"torch=={_public(torch.__version__)}" in requirements, requirements


def test_import_with_another_torch_fails_clearly():
    """A library built for one torch crashes with undefined symbols (or
    worse) under another: import convbn stops before loading it."""
    code = "import torch; torch.__version__ = '2.5.1+cpu'; import convbn"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode != 0
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("ImportError: convbn: this build of convbn was compiled against torch "
                              f"{torch.__version__}, but torch 2.5.1+cpu is installed."), message
    assert f"torch=={_public(torch.__version__)}" in message and "--no-build-isolation" in message, message


def _torch(version, cuda=None, git_version="abc", cxx11_abi=True):
    return {"version": version, "git_version": git_version, "cxx11_abi": cxx11_abi, "cuda": cuda}


@pytest.mark.parametrize(
    "built, running, error",
    [
        (_torch("2.13.0+cpu"), _torch("2.13.0+cpu"), None),
        # A CPU build runs on the same release built for a GPU, and back.
        (_torch("2.13.0+cpu"), _torch("2.13.0+cu130", "13.0"), None),
        (_torch("2.13.0"), _torch("2.13.0+rocm6.4"), None),
        (_torch("2.13.0"), _torch("2.13.1"), "compiled against torch 2.13.0, but torch 2.13.1 is installed"),
        # Source and vendor builds: the local label and git name the build.
        (_torch("2.13.0a0+git1111111", git_version="1111111"), _torch("2.13.0a0+git2222222", git_version="2222222"),
         "compiled against torch 2.13.0a0+git1111111, but torch 2.13.0a0+git2222222 is installed"),
        (_torch("2.6.0a0+ecf3bae40a.nv25.01"), _torch("2.6.0a0+deadbeef.nv25.02"), "but torch 2.6.0a0+deadbeef.nv25.02"),
        (_torch("2.14.0.dev20261101+cpu", git_version="aaa"), _torch("2.14.0.dev20261101+cpu", git_version="bbb"),
         "from git aaa, but the installed torch 2.14.0.dev20261101+cpu is from git bbb"),
        (_torch("2.13.0", git_version="Unknown"), _torch("2.13.0", git_version="bbb"), None),
        (_torch("2.5.1", cxx11_abi=False), _torch("2.5.1"), "_GLIBCXX_USE_CXX11_ABI=0, but the installed torch 2.5.1 has 1"),
        (_torch("2.11.0+cu130", "13.0"), _torch("2.11.0+cu130", "13.0"), None),
        (_torch("2.11.0+cu126", "12.6"), _torch("2.11.0+cu128", "12.8"), None),  # one libcudart.so.12
        (_torch("2.11.0+cu130", "13.0"), _torch("2.11.0+cpu"), "with CUDA 13.0, but the installed torch 2.11.0+cpu has no CUDA"),
        (_torch("2.11.0+cu130", "13.0"), _torch("2.11.0+cu128", "12.8"), "has CUDA 12.8"),
    ],
)
def test_torch_version_check(built, running, error):
    from convbn._library import check_torch

    if error is None:
        check_torch(built, running)
    else:
        with pytest.raises(ImportError, match=re.escape(error)):
            check_torch(built, running)


def test_build_without_torch_says_what_to_do():
    """pip's default build isolation runs setup.py where the installed torch
    is not importable: it stops with one sentence saying what to do, and
    never installs a second torch to build against."""
    root = Path(__file__).resolve().parents[1]
    code = ("import sys; sys.modules['torch'] = None; sys.argv = ['setup.py', '--version']; "
            "exec(compile(open('setup.py').read(), 'setup.py', 'exec'))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root)
    assert result.returncode != 0
    assert result.stderr.strip() == (
        "convbn: building convbn needs the torch it will run with, and this build environment has none: "
        "install torch (if it is not installed), then build with `pip install --no-build-isolation .` "
        "(pip's default build isolation hides the installed torch).")
    build_system = re.search(r"^\[build-system\]\n(.*?)^\[", (root / "pyproject.toml").read_text(), re.M | re.S)
    requires = re.search(r"^requires = \[(.*)\]$", build_system.group(1), re.M).group(1)
    assert "torch" not in requires, requires


@pytest.mark.skipif(shutil.which("readelf") is None, reason="readelf is not available")
def test_op_library_has_no_debug_information():
    package_dir = os.path.dirname(convbn.__file__)
    (library,) = glob.glob(os.path.join(package_dir, "_C*.so"))
    sections = subprocess.run(["readelf", "-S", "-W", library], capture_output=True, text=True, check=True).stdout
    assert ".debug_" not in sections


def test_cpp_program_reports_the_installed_librarys_build():
    """A program built against the installed CMake package (its headers,
    convbn::convbn) calls convbn::build_info() from the installed library:
    the same build as the Python package's."""
    program = installed_cpp_program("convbn_jit_infer")
    result = subprocess.run([str(program), "--build-info"], capture_output=True, text=True, timeout=60, check=True)
    lines = dict(line.split("=", 1) for line in result.stdout.splitlines())
    info = convbn.build_info()
    assert lines["torch"] == _public(torch.__version__)
    assert lines["cpu_kernels"].split(",") == info["cpu_kernels"]
    assert lines["cpu_kernels_used"] == info["cpu_kernels_used"]
