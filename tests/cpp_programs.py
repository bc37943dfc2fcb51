"""Runs the C++ deployment programs (examples/cpp, built by CMake) and
reads back what they computed."""

import os
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def cpp_program(name):
    """Path of a program built by scripts/build.sh. Missing, it fails the
    test where scripts/test.sh said it was built (CONVBN_BUILD_DIR), and skips
    it otherwise."""
    build_dir = os.environ.get("CONVBN_BUILD_DIR")
    path = Path(build_dir or ROOT / "build") / "examples" / "cpp" / name
    if not path.exists():
        if build_dir:
            pytest.fail(f"{path} is missing although CONVBN_BUILD_DIR={build_dir}: the CMake build did not make it")
        pytest.skip(f"{path} is not built: run `bash scripts/build.sh` (scripts/test.sh does)")
    return path


def installed_cpp_program(name):
    """Path of a program built by scripts/build.sh, after checking that it
    links the installed CMake package's libconvbn.so (scripts/build.sh
    builds the programs against it with find_package(convbn), as a C++ user
    would) and no libpython."""
    program = cpp_program(name)
    linked = linked_libraries(program)
    assert "libconvbn.so" in linked, linked
    assert not any(lib.startswith(("libpython", "libtorch_python")) for lib in linked), linked
    installed = Path(os.environ.get("CONVBN_BUILD_DIR") or ROOT / "build") / "install" / "lib" / "libconvbn.so"
    assert Path(linked["libconvbn.so"]).resolve() == installed.resolve(), linked["libconvbn.so"]
    return program


def run_cpp_program(name, model, shape, out, *options):
    """Runs the installed_cpp_program `name MODEL N C H W --save out
    [options]` and returns (input, output) as the program saved them."""
    program = installed_cpp_program(name)
    command = [str(program), str(model), *map(str, shape), "--save", str(out), *options]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{command} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    input, output = torch.load(out)
    assert list(input.shape) == list(shape)
    return input, output


def linked_libraries(path):
    """{name: the file it resolves to} for the shared libraries ldd reports
    for path (the name itself where ldd gives no file)."""
    listing = subprocess.run(["ldd", str(path)], capture_output=True, text=True, check=True).stdout
    linked = {}
    for line in listing.splitlines():
        words = line.split()
        if words:
            linked[words[0]] = words[2] if len(words) > 2 and words[1] == "=>" else words[0]
    return linked
